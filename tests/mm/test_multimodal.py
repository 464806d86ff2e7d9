"""Composition: gates at 0 leave the LM's logits exactly unchanged; rows that see no image get no
cross-attention output; cached media K/V generation equals recomputing the media every step; freezing."""

import pytest
import torch
from torch import nn

from mm.lm import KVCache, Transformer, generate, preset
from mm.models.multimodal import MediaInput, MultimodalLM, xattn_layer_ids
from mm.training.freeze import assert_no_lm_tensors, fingerprint


class PixelEncoder(nn.Module):
    """A minimal media encoder for composition tests: each tile -> P tokens from a linear map of pixels."""

    num_tokens_per_tile = 3

    def __init__(self, dim: int, tile: int = 4):
        super().__init__()
        self.proj = nn.Linear(3 * tile * tile, dim * self.num_tokens_per_tile)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        B, N, T = pixel_values.shape[:3]
        out = self.proj(pixel_values.flatten(3))  # (B, N, T, P*D)
        return out.reshape(B, N, T * self.num_tokens_per_tile, -1)


IMG = 500  # an id in the nano vocabulary used as the image token in these tests


def build(every=1, **kw):
    lm = Transformer(preset("nano")).eval()
    return MultimodalLM(lm, PixelEncoder(lm.cfg.dim), xattn_every=every, image_token_id=IMG, **kw).eval()


def media(B=2, tiles=2):
    pv = torch.randn(B, 1, tiles, 3, 4, 4)
    ar = torch.ones(B, 1, dtype=torch.long)
    arm = torch.ones(B, 1, tiles, dtype=torch.long)
    return pv, ar, arm


def xmask(tokens, tiles=2):
    """Image range from the image token to the end; before it nothing."""
    seen = (tokens == IMG).long().cumsum(1) > 0
    return seen[:, :, None, None].expand(-1, -1, 1, tiles).long()


def test_xattn_placement_every_kth_layer():
    assert xattn_layer_ids(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert xattn_layer_ids(4, 2) == [1, 3]
    with pytest.raises(ValueError, match="every=8 must be in"):
        xattn_layer_ids(4, 8)


def test_gates_at_zero_equal_the_bare_lm_exactly():
    m = build()
    tokens = torch.randint(0, 400, (2, 10))
    tokens[:, 2] = IMG
    pv, ar, arm = media()
    bare = m.lm(tokens)
    assert torch.equal(m(tokens), bare)
    assert torch.equal(m(tokens, {"image": MediaInput(m.encode("image", pv, ar, arm), xmask(tokens))}), bare)


def test_open_gates_change_only_rows_that_see_the_image():
    m = build()
    with torch.no_grad():
        for blk in m.image_xattn.values():
            blk.gate_attn.fill_(1.0)
            blk.gate_ffn.fill_(1.0)
    tokens = torch.randint(0, 400, (2, 10))
    tokens[:, 4] = IMG
    pv, ar, arm = media()
    out = m(tokens, {"image": MediaInput(m.encode_media(pv, ar, arm), xmask(tokens))})
    bare = m.lm(tokens)
    torch.testing.assert_close(out[:, :4], bare[:, :4], rtol=0, atol=0)  # rows before the image: untouched
    assert (out[:, 4:] - bare[:, 4:]).abs().max() > 1e-3
    # transformers' treatment (its issue #39379): rows without an image still get cross-attention output;
    # the block's output differs from ours exactly on those rows.
    blk = m.image_xattn["0"]
    x = torch.randn(2, 10, m.cfg.dim)
    ctx = m.encode_media(pv, ar, arm)
    mask = torch.zeros(2, 10, ctx.n_media_tokens, dtype=torch.bool)
    mask[:, 4:] = True
    ours = blk(x, ctx.kv[0], mask)
    blk.hf_row_compat = True
    theirs = blk(x, ctx.kv[0], mask)
    torch.testing.assert_close(ours[:, :4], x[:, :4], rtol=0, atol=0)
    assert (theirs[:, :4] - x[:, :4]).abs().max() > 1e-3
    torch.testing.assert_close(theirs[:, 4:], ours[:, 4:], rtol=0, atol=0)


def test_cached_media_generation_equals_recomputing_media_each_step():
    torch.manual_seed(1)
    m = build()
    with torch.no_grad():
        for blk in m.image_xattn.values():
            blk.gate_attn.fill_(0.8)
            blk.gate_ffn.fill_(0.8)
    prompt = torch.randint(0, 400, (2, 6))
    prompt[:, 1] = IMG
    pv, ar, arm = media()
    ctx = m.encode_media(pv, ar, arm)
    cached = generate(m, prompt, 12, model_kwargs={"media": {"image": MediaInput(ctx)}})
    # Reference: no KV cache, encode the image again and rebuild the mask for the whole sequence each step.
    seq = prompt.clone()
    for _ in range(12):
        logits = m(seq, {"image": MediaInput(m.encode_media(pv, ar, arm), xmask(seq))})
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached == seq[:, 6:].tolist()


def test_lm_is_frozen_and_adapter_state_has_no_lm_tensors():
    m = build(every=2)
    assert not {id(p) for p in m.lm.parameters()} & {id(p) for _, p in m.trainable_named_parameters()}
    names = {n.split(".")[0] for n, _ in m.trainable_named_parameters()}
    assert names == {"image_encoder", "image_xattn"}
    state = m.adapter_state()
    assert state and not any(k.startswith("lm.") for k in state)
    with pytest.raises(ValueError, match="must not carry LM weights"):
        assert_no_lm_tensors({"lm.norm.weight": torch.ones(1)}, "x.safetensors")
    with pytest.raises(ValueError, match="never trainable"):
        MultimodalLM(m.lm, PixelEncoder(64), trainable=("lm",))
    m.train()
    assert not m.lm.training and m.image_xattn.training


def test_fingerprint_sees_a_single_changed_value():
    lm = Transformer(preset("nano"))
    fp = fingerprint(lm)
    assert fp == fingerprint(lm)
    with torch.no_grad():
        lm.layers[1].feed_forward.w2.weight[3, 5] += 1e-6
    assert fingerprint(lm) != fp


def test_kv_cache_works_with_composite_model():
    m = build()
    c = KVCache.for_model(m, 1, 8)
    assert c.max_len == 8 and c.k.shape[0] == m.cfg.n_layers
