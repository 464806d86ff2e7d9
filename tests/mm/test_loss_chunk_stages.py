"""`train.loss_chunk` in the stages' losses: lm-pretrain, the image stage and the speech stage (tiny models built
and initialised as a run does) give the same loss and gradients with the LM loss in chunks, and the output head
really runs chunk by chunk; `mm plan` counts one chunk instead of the whole logits."""

from __future__ import annotations

import math

import pytest
import torch

from mm.app import plan as P
from mm.app.plan_activations import head_bytes
from mm.training.materialize import materialize, record_init

B, T = 2, 32


def real_stage(config: str, overrides: list[str]):
    """The stage with its model built on the meta device and materialised on the CPU (float32), as a run does."""
    with record_init() as rec:
        stage = P.load_stage(config, overrides)
    rec.bind(stage.model)
    materialize(stage.model, rec, torch.device("cpu"))
    return stage


def labels_of(tokens: torch.Tensor, ignored: int) -> torch.Tensor:
    labels = tokens.roll(-1, 1)
    labels[:, :ignored] = -100
    labels[:, -1] = -100
    return labels


def loss_and_grads(stage, batch, chunk, calls):
    stage.cfg.train.loss_chunk = chunk
    stage.model.zero_grad(set_to_none=True)
    calls.clear()
    loss, count = stage.loss(batch)
    n_forward = len(calls)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in stage.model.named_parameters() if p.grad is not None}
    return loss.detach(), int(count), grads, n_forward, len(calls) - n_forward


def check_chunks_equal_whole(stage, batch, chunk=6):
    lm = getattr(stage.model, "lm", stage.model)
    calls = []
    lm.output.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    loss0, n0, grads0, fwd0, bwd0 = loss_and_grads(stage, batch, 0, calls)
    loss, n, grads, fwd, bwd = loss_and_grads(stage, batch, chunk, calls)
    assert (fwd0, bwd0) == (1, 0)  # whole: one head, its logits kept for the backward
    assert fwd == bwd == math.ceil(B * T / chunk)  # chunked: each chunk's head once more in the backward
    assert n == n0 > 0 and loss0 > 0
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-4)
    assert grads.keys() == grads0.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, grads0[name], rtol=1e-4, atol=1e-5, msg=name)  # summed: O(1) values


def test_lm_pretrain_loss_in_chunks():
    stage = real_stage("configs/lm/tiny.yaml", [])
    torch.manual_seed(1)
    tokens = torch.randint(0, stage.model.cfg.vocab_size, (B, T))
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[:, T // 2 :] = 1  # two packed documents per row
    check_chunks_equal_whole(stage, {"tokens": tokens, "labels": labels_of(tokens, 3), "doc_ids": doc_ids})


def test_image_stage_loss_in_chunks():
    stage = real_stage(
        "configs/stages/image_pretrain_tiny.yaml",
        ["lm=tiny", "image_encoder.stem=patch", "caption_head.weight=0", "caption_head.bag_of_words=0"],
    )
    tiles, S = stage.cfg.data.max_tiles, stage.cfg.data.tile_size
    torch.manual_seed(1)
    tokens = torch.randint(0, stage.model.lm.cfg.vocab_size, (B, T))
    xmask = torch.ones(B, T, 1, tiles, dtype=torch.long)
    xmask[:, :4] = 0  # the prompt's first tokens see no image
    batch = {
        "pixel_values": torch.randn(B, 1, tiles, 3, S, S),
        "aspect_ratio_ids": torch.full((B, 1), 1),
        "aspect_ratio_mask": torch.ones(B, 1, tiles, dtype=torch.long),
        "tokens": tokens,
        "cross_attention_mask": xmask,
        "labels": labels_of(tokens, 5),
    }
    check_chunks_equal_whole(stage, batch)


def test_speech_stage_loss_in_chunks_with_ctc_and_a_row_without_transcript():
    stage = real_stage(
        "configs/stages/speech_tiny.yaml",
        ["lm=tiny", "data.features.max_seconds=0.8", "speech_encoder.dropout=0"],
    )
    m = stage.model
    assert m.speech_adapter.cfg.ctc_weight and m.speech_adapter.cfg.ctc_compress
    slots = m.n_slots(81)
    torch.manual_seed(1)
    tokens = torch.randint(0, m.lm.cfg.vocab_size, (B, T))
    smask = torch.zeros(B, T, dtype=torch.bool)
    smask[:, 2 : 2 + slots] = True
    batch = {
        "tokens": tokens,
        "features": torch.randn(B, 81, 80),
        "feature_lengths": torch.full((B,), 81),
        "speech_mask": smask,
        "labels": labels_of(tokens, 2 + slots),
        "ctc_targets": torch.randint(0, m.lm.cfg.vocab_size, (B, 4)),
        "ctc_lengths": torch.tensor([4, 0]),  # the second clip has no transcript: its CTC loss counts 0
    }
    check_chunks_equal_whole(stage, batch)


def test_plan_counts_one_chunk_instead_of_the_whole_logits():
    whole = P.load_stage("configs/lm/llama3-8b.yaml", ["train.loss_chunk=0"])
    chunked = P.load_stage("configs/lm/llama3-8b.yaml", ["train.loss_chunk=1024"])
    c, T128 = whole.model.cfg, 131072  # the 128K-token step of the 8B ramp, micro-batch 1
    kw = {"gpus": 8, "gpu_memory_gib": 80, "seq_len": T128, "batch": 1}
    a, b = P.plan(whole, **kw), P.plan(chunked, **kw)
    saved, extra = head_bytes(c)
    assert a["activations_detail_gib"]["logits"] == pytest.approx(saved * T128 / P.GIB, abs=1e-3)  # 66.6 GiB
    assert "loss_chunk" not in a["activations_detail_gib"]
    assert b["activations_detail_gib"]["logits"] == pytest.approx((2 * c.dim + 8) * T128 / P.GIB, abs=1e-3)
    assert b["activations_detail_gib"]["loss_chunk"] == pytest.approx(
        1024 * (saved + extra) / P.GIB, abs=1e-3
    )
    assert b["total_gib"] < a["total_gib"] - 150  # 244.8 -> 78.9 GiB per GPU
    assert b["fits"] and not a["fits"]
