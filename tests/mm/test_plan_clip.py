"""`mm plan`'s clip-pretrain formulas (`mm.app.plan_activations_clip`) against what autograd saves on the real
modules (bf16 on the CPU, the loss in fp32 as the stage computes it) at two tiny sizes each."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mm.app import plan as P
from mm.app import plan_activations_clip as C
from mm.encoders.clip import bag_of_words_loss, clip_loss
from mm.stages.clip_pretrain import ClipPretrainConfig, ClipStage, build_clip_model
from mm.training.config import load_config
from mm.training.stage import StageContext
from tests.mm.test_plan import saved_bytes


@pytest.mark.parametrize("multi_positive", [False, True])
@pytest.mark.parametrize("E", [16, 32])
def test_contrastive_loss_formula_is_what_autograd_saves(E, multi_positive):
    torch.manual_seed(0)
    for B in (4, 8):
        image, text = torch.randn(B, E, requires_grad=True), torch.randn(B, E, requires_grad=True)
        scale = torch.tensor(10.0, requires_grad=True)
        pos = torch.eye(B, dtype=torch.bool) if multi_positive else None
        loss = partial(clip_loss, image, text, scale, pos, reduction="sum")
        got = saved_bytes(loss, [image, text, scale])
        pairs = B * B * C.clip_pair_bytes(multi_positive)
        # + two 4 B scalars without positives (the loss's halves)
        want = pairs + B * C.clip_loss_sample_bytes(E, multi_positive) + (0 if multi_positive else 8)
        assert got == want


def clip_stage(overrides):
    """A clip-pretrain stage over the tiny config, its model built in bf16 on the CPU (no tokenizer read)."""
    base = ["tokenizer=none", "image_encoder.stem=patch", "image_encoder.canvas_position=false"]
    cfg = load_config(ClipPretrainConfig, "configs/encoders/clip_tiny.yaml", base + overrides)
    stage = ClipStage(cfg, StageContext(device=torch.device("cpu"), shapes_only=True))
    torch.manual_seed(0)
    stage.model = build_clip_model(cfg, 256).to(torch.bfloat16)
    return stage


@pytest.mark.parametrize(
    "overrides",
    [
        ["image_encoder.mask_mode=mllama"],
        [
            "image_encoder.mask_mode=mllama",
            "text.dim=96",
            "text.n_layers=3",
            "embed_dim=32",
            "data.max_tiles=1",
        ],
    ],
)
def test_whole_step_activations_match_autograd_for_clip(overrides):
    """The plan's per-sample parts and per-pair logits against everything one step's loss saves (within 2%: the
    RoPE tables, pooling indices and scalars are not all counted)."""
    st = clip_stage(overrides)
    m, cfg = st.model, st.cfg
    tiles, S, T = cfg.data.max_tiles, cfg.data.tile_size, cfg.text.max_len
    parts, transient = P.activation_bytes(st, T, "none")
    assert set(parts) == {"image_encoder", "image_pool", "text_tower", "contrastive"} and transient == 0
    B = 4
    px = torch.randn(B, tiles, 3, S, S, dtype=torch.bfloat16)
    ids, am = torch.randint(3, 256, (B, T)), torch.ones(B, T, dtype=torch.long)
    ratio, tile_mask = torch.full((B,), tiles), torch.ones(B, tiles, dtype=torch.long)

    def step():
        pooled = m.pool_image(px, ratio, tile_mask)
        image = F.normalize(m.image_proj(pooled), dim=-1)
        text = m.encode_text(ids, am)
        loss = clip_loss(image.float(), text.float(), m.scale().float(), None, reduction="sum", gather=True)
        return loss + bag_of_words_loss(m.bow_head(pooled).float(), ids, am.bool(), reduction="sum")

    want = B * sum(parts.values()) + B * B * C.clip_pair_bytes()
    assert saved_bytes(step, list(m.parameters())) == pytest.approx(want, rel=0.02)
