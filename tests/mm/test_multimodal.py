"""Composition: gates at 0 leave the LM's logits exactly unchanged; rows that see no image get no
cross-attention output; cached media K/V generation equals recomputing the media every step; freezing."""

import pytest
import torch
from torch import nn

from mm.datasets.collate import cross_attention_mask_from_tokens
from mm.lm import KVCache, Transformer, generate, preset
from mm.models.media import media_mask
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


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_cached_media_generation_equals_recomputing_media_each_step(decode):
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
    cached = generate(m, prompt, 12, model_kwargs={"media": {"image": MediaInput(ctx)}}, decode=decode)
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
    assert c.max_len == 8 and len(c.k) == m.cfg.n_layers


# Two images mid-row (row 0: apart; row 1: a run of two), 2 of 3 tiles real in image 0 and 1 in image 1.
TWO_IMAGES = torch.tensor([[1, 5, IMG, 6, 7, IMG, 8, 9, 10], [1, IMG, IMG, 6, 7, 8, 9, 10, 11]])
# What each token sees, by the rule (a token sees the latest image, or run of images, placed before it).
SEES = [
    [(), (), (0,), (0,), (0,), (1,), (1,), (1,), (1,)],
    [(), (0,), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1)],
]


def two_images(B=2, max_tiles=3):
    pv = torch.randn(B, 2, max_tiles, 3, 4, 4)
    ar = torch.ones(B, 2, dtype=torch.long)
    arm = torch.zeros(B, 2, max_tiles, dtype=torch.long)
    arm[:, 0, :2] = 1
    arm[:, 1, :1] = 1
    return pv, ar, arm


def media_tokens(images, arm, P=PixelEncoder.num_tokens_per_tile):
    """Indices of the real-tile media tokens of `images` (image n, tile j, token p at (n*max_tiles + j)*P + p)."""
    T = arm.shape[-1]
    return [(n * T + j) * P + p for n in images for j in range(int(arm[n].sum())) for p in range(P)]


def test_several_images_mask_follows_the_rule_per_token():
    m = build()
    pv, ar, arm = two_images()
    image = MediaInput(m.encode_media(pv, ar, arm))
    mask = media_mask(TWO_IMAGES, image, None, IMG, "image")  # derived from the image tokens
    assert mask.shape == (2, 9, 2 * 3 * PixelEncoder.num_tokens_per_tile)
    for b, row in enumerate(SEES):
        for t, images in enumerate(row):
            assert mask[b, t].nonzero().flatten().tolist() == media_tokens(images, arm[b]), (b, t)
    given = cross_attention_mask_from_tokens(TWO_IMAGES, IMG, [[2, 1], [2, 1]], 3)
    assert torch.equal(media_mask(TWO_IMAGES, MediaInput(image.context, given), None, IMG, "image"), mask)


def test_forward_with_two_images_mid_row_equals_per_token_cross_attention():
    torch.manual_seed(0)
    m = build(every=2)
    with torch.no_grad():
        for blk in m.image_xattn.values():
            blk.gate_attn.fill_(0.9)
            blk.gate_ffn.fill_(0.7)
    pv, ar, arm = two_images()
    ctx = m.encode_media(pv, ar, arm)
    with torch.no_grad():
        out = m(TWO_IMAGES, {"image": MediaInput(ctx)})
        # Reference: each token through each block alone, with the K/V of exactly the images it sees.
        h = m.embed(TWO_IMAGES)
        lm_ctx = m.lm.context(*TWO_IMAGES.shape, device=h.device)
        for i, layer in enumerate(m.lm.layers):
            if str(i) in m.image_xattn:
                blk, (k, v) = m.image_xattn[str(i)], ctx.kv[i]
                rows = []
                for b, row in enumerate(SEES):
                    for t, images in enumerate(row):
                        x = h[b : b + 1, t : t + 1]
                        if images:
                            idx = torch.tensor(media_tokens(images, arm[b]))
                            kv = (k[b : b + 1, :, idx], v[b : b + 1, :, idx])
                            x = blk(x, kv, torch.ones(1, 1, len(idx), dtype=torch.bool))
                        rows.append(x)
                h = torch.cat(rows, dim=1).reshape_as(h)
            h = layer(h, lm_ctx)
        ref = m.lm.head(h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - m.lm(TWO_IMAGES)).abs().max() > 1e-3  # the images matter


def test_media_keyed_by_modality_and_unknown_modalities_rejected():
    m = build()
    assert m.modalities() == ["image"]
    assert m.modality("image").xattn == "image_xattn" and m.modality("image").encode == "encode_media"
    ctx = m.encode("image", *media())
    with pytest.raises(ValueError, match="video given to a model without a video path"):
        m(torch.zeros(2, 4, dtype=torch.long), {"video": MediaInput(ctx)})
    with pytest.raises(ValueError, match="audio given to a model without a audio path"):
        m.encode("audio", torch.zeros(1))


def test_image_index_starts_at_zero_and_then_tells_images_apart():
    m = build()
    tokens = torch.cat([torch.full((1, 2), IMG), torch.randint(0, 400, (1, 6))], 1)
    pv = torch.randn(1, 2, 2, 3, 4, 4)
    ar, arm = torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long)
    for blk in m.image_xattn.values():  # open the gates so the media reach the logits
        nn.init.constant_(blk.gate_attn, 0.5)
        nn.init.constant_(blk.gate_ffn, 0.5)

    def logits(pixels):  # every token sees both images
        both = torch.ones(1, tokens.shape[1], 2, 2, dtype=torch.long)
        return m(tokens, {"image": MediaInput(m.encode_media(pixels, ar, arm), both)})

    swapped = pv.flip(1)
    assert torch.allclose(logits(pv), logits(swapped), atol=1e-5)  # cross-attention is blind to image order
    m.add_image_index(2)
    assert torch.equal(m.image_index.weight, torch.zeros(2, m.cfg.dim))
    assert torch.allclose(logits(pv), logits(swapped), atol=1e-5)  # zero at start: nothing changes
    nn.init.normal_(m.image_index.weight)
    assert not torch.allclose(logits(pv), logits(swapped), atol=1e-3)
    with pytest.raises(ValueError, match="3 images in a row; this model tells apart at most 2"):
        m.encode_media(torch.randn(1, 3, 2, 3, 4, 4), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, 2))


def test_media_of_some_rows_equal_the_rows_alone():
    m = build()
    for blk in m.image_xattn.values():
        nn.init.constant_(blk.gate_attn, 0.5)
    tokens = torch.randint(0, 400, (3, 8))
    tokens[1, 2] = IMG
    pv, ar, arm = media(B=1)
    ctx = m.encode_media(pv, ar, arm)
    mask = torch.zeros(3, 8, 1, 2, dtype=torch.long)
    mask[1] = xmask(tokens[1:2])[0]
    out = m(tokens, {"image": MediaInput(ctx, mask, rows=torch.tensor([1]))})
    alone = m(tokens[1:2], {"image": MediaInput(m.encode_media(pv, ar, arm), mask[1:2])})
    torch.testing.assert_close(out[1:2], alone)
    torch.testing.assert_close(out[[0, 2]], m.lm(tokens[[0, 2]]))  # rows without an image: the bare LM
    with pytest.raises(ValueError, match="needs its mask over every row"):
        m(tokens, {"image": MediaInput(ctx, rows=torch.tensor([1]))})


def test_a_module_inside_a_part_can_train_alone():
    m = build()
    m.set_trainable(("image_encoder.proj", "image_xattn"))
    names = [n for n, _ in m.trainable_named_parameters()]
    assert "image_encoder.proj.weight" in names and any(n.startswith("image_xattn.") for n in names)
    assert not any(n.startswith(("lm.", "image_encoder.projx")) for n in names)
    with pytest.raises(ValueError, match="never trainable"):
        m.set_trainable(("lm.layers",))
    with pytest.raises(ValueError, match=r"unknown trainable parts \['imagery.x'\]"):
        m.set_trainable(("imagery.x",))
