"""ImageEncoder: parity with timm's own forward, timm weight files, tile masking, gated global layers and
exact parity with transformers' `MllamaVisionModel` (weights mapped by `load_mllama_vision_state_dict`)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mm.encoders.image import GatedBlock, ImageEncoder, ImageEncoderConfig
from mm.formats.hf_mllama import config_from_mllama, load_mllama_vision_state_dict
from mm.formats.timm import build_image_encoder

TINY = dict(tile_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, max_tiles=4, out_dim=16)
N_TOK = (32 // 8) ** 2 + 1  # 16 patches + class token


def tiny_encoder(**kw) -> ImageEncoder:
    return ImageEncoder(
        ImageEncoderConfig(**{**TINY, "intermediate_layers": (1, 2), "n_global_layers": 2, **kw})
    ).eval()


def timm_tiny() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4,
        num_heads=2, num_classes=0, global_pool="",
    ).eval()  # fmt: skip


def single_tile(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) -> encoder inputs with one image of one tile per sample (aspect ratio id 1 = 1x1)."""
    B = x.shape[0]
    return x[:, None, None], torch.ones(B, 1, dtype=torch.long), torch.ones(B, 1, 1)


@torch.no_grad()
@pytest.mark.parametrize("rule", ["block_output", "block_input"])
def test_features_equal_timm_forward_intermediates_with_gates_at_zero(rule):
    # timm's forward_intermediates(indices=[i]) returns block i's output; Meta's index i + 1 names the same
    # tensor (block i + 1's input)
    shift = 1 if rule == "block_input" else 0
    layers = tuple(i + shift for i in (2, 0, 3))[: 3 - shift]  # any order; the features follow it
    enc = tiny_encoder(intermediate_layers=layers, intermediate_from=rule)
    for emb in (enc.pre_tile.embedding, enc.post_tile.embedding, enc.tile_pos_embed):
        emb.weight.normal_(std=3.0)  # large tile embeddings: only the zero gates may hide them
    x = torch.randn(3, 3, 32, 32)
    ref = enc.vit.forward_intermediates(
        x, indices=[0, 2, 3], norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    ref = {
        i: torch.cat([prefix, patches], dim=1) for i, (patches, prefix) in zip([0, 2, 3], ref)
    }  # (B, n, D)

    for max_tiles_used in (1, 4):  # one real tile, alone or followed by three padding tiles
        pix = torch.zeros(3, 1, max_tiles_used, 3, 32, 32)
        pix[:, 0, 0] = x
        mask = torch.zeros(3, 1, max_tiles_used)
        mask[:, :, 0] = 1
        feats = enc.forward_features(pix, torch.ones(3, 1, dtype=torch.long), mask)
        K = len(layers)
        assert feats.shape == (3, 1, max_tiles_used, N_TOK, (1 + K) * 32)
        final, inters = enc.split_features(feats[:, 0, 0])
        torch.testing.assert_close(final, enc.vit.forward_features(x))  # last block + vit.norm
        for got, i in zip(inters, layers):
            torch.testing.assert_close(got, ref[i - shift])
        # Mllama's layout: channel c of intermediate k sits at D + c * K + k.
        torch.testing.assert_close(feats[:, 0, 0, :, 32 + 5 * K + 1], ref[0][..., 5])


@torch.no_grad()
def test_block_input_index_zero_is_the_embedded_tiles_and_meta_is_the_default():
    assert ImageEncoderConfig().intermediate_from == "block_input"
    enc = tiny_encoder(intermediate_layers=(0,))
    x = torch.randn(2, 3, 32, 32)
    _, (first,) = enc.encode(*single_tile(x))
    vit = enc.vit
    embedded = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # the gates are 0: timm's own embedding
    torch.testing.assert_close(first[:, 0, 0], embedded)
    with pytest.raises(ValueError, match="intermediate_from='inputs'; expected one of"):
        ImageEncoderConfig(intermediate_from="inputs")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_weight_file_loads_and_reproduces_the_timm_model(tmp_path, fmt):
    torch.manual_seed(123)
    ref = timm_tiny()
    path = tmp_path / f"vit.{fmt}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save({"state_dict": sd}, path)

    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(**TINY, weights=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.forward_features(x)
        torch.testing.assert_close(enc.vit.forward_features(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(enc.forward_features(*single_tile(x))[:, 0, 0], expected)


def test_timm_weight_file_errors_name_the_key_and_shapes(tmp_path):
    sd = {k: v.contiguous() for k, v in timm_tiny().state_dict().items()}

    renamed = dict(sd)
    renamed["blocks.1.attn.qkv.weightX"] = renamed.pop("blocks.1.attn.qkv.weight")
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(
        ValueError, match=r"unexpected key 'blocks\.1\.attn\.qkv\.weightX'.*missing key 'blocks\.1"
    ):
        build_image_encoder(ImageEncoderConfig(**TINY, weights=str(tmp_path / "renamed.safetensors")))

    wrong = dict(sd, pos_embed=torch.zeros(1, 50, 32))
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 50, 32\), expected \(1, 17, 32\)"):
        build_image_encoder(ImageEncoderConfig(**TINY, weights=str(tmp_path / "wrong.pt")))

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_image_encoder(ImageEncoderConfig(**TINY, weights=str(tmp_path / "nope.safetensors")))


def test_classifier_head_in_weight_file_is_ignored(tmp_path):
    sd = {k: v.contiguous() for k, v in timm_tiny().state_dict().items()}
    sd |= {"head.weight": torch.randn(10, 32), "head.bias": torch.zeros(10)}
    save_file(sd, str(tmp_path / "cls.safetensors"))
    enc = build_image_encoder(ImageEncoderConfig(**TINY, weights=str(tmp_path / "cls.safetensors")))
    torch.testing.assert_close(enc.vit.pos_embed, sd["pos_embed"])


@torch.no_grad()
def test_output_shape_and_padding_tiles_do_not_change_real_tiles():
    enc = tiny_encoder()
    for p in (enc.pre_tile.gate, enc.post_tile.gate, enc.pos_gate) + tuple(
        g for layer in enc.global_layers for g in (layer.gate_attn, layer.gate_ffn)
    ):
        p.fill_(0.7)  # every embedding and global layer active
    B, N, T = 2, 2, 4
    pix = torch.randn(B, N, T, 3, 32, 32)
    ids = torch.tensor([[2, 6], [5, 0]])  # 1x2, 2x2, 2x1, no image
    mask = torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 1]], [[1, 1, 0, 0], [0, 0, 0, 0]]])
    out = enc(pix, ids, mask)
    assert out.shape == (B, N, T * N_TOK, 16) and enc.num_tokens_per_tile == N_TOK
    assert torch.isfinite(out).all()  # also for the all-padding image

    pix2 = pix.clone()
    pix2[0, 0, 2:] = torch.randn(2, 3, 32, 32) * 5  # padding tiles of a real image
    pix2[1, 1] = torch.randn(T, 3, 32, 32)  # the padding image
    out2 = enc(pix2, ids, mask)
    real = mask.bool()[..., None].expand(B, N, T, N_TOK).reshape(B, N, T * N_TOK)
    torch.testing.assert_close(out2[real], out[real], rtol=0, atol=1e-6)
    assert not torch.allclose(out2[0, 0, 2 * N_TOK :], out[0, 0, 2 * N_TOK :])  # the padding tiles did change

    # Images are independent of each other: image (0, 1) alone gives the same tokens.
    alone = enc(pix[:1, 1:], ids[:1, 1:], mask[:1, 1:])
    torch.testing.assert_close(alone[0, 0], out[0, 1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mllama_mask_mode_lets_real_tokens_see_padding():
    """The reference quirk (Meta and transformers): only padding<->padding pairs are hidden."""
    enc = tiny_encoder(mask_mode="mllama")
    pix = torch.randn(1, 1, 4, 3, 32, 32)
    ids, mask = torch.tensor([[2]]), torch.tensor([[[1, 1, 0, 0]]])
    out = enc(pix, ids, mask)
    pix[0, 0, 3] += 1.0
    assert not torch.allclose(enc(pix, ids, mask)[0, 0, : 2 * N_TOK], out[0, 0, : 2 * N_TOK])


@torch.no_grad()
def test_global_layers_are_identity_with_gates_at_zero():
    enc = tiny_encoder(n_global_layers=3)
    layer = enc.global_layers[0]
    assert isinstance(layer, GatedBlock) and layer.gate_attn.item() == 0 and layer.gate_ffn.item() == 0
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
    layer.gate_ffn.fill_(0.5)
    assert (layer(x) - x).abs().max() > 1e-3

    layer.gate_ffn.fill_(0.0)
    no_global = ImageEncoder(ImageEncoderConfig(**{**TINY, "intermediate_layers": (1, 2)})).eval()
    missing, unexpected = no_global.load_state_dict(enc.state_dict(), strict=False)
    assert not missing and all(k.startswith("global_layers.") for k in unexpected)
    pix, ids, mask = single_tile(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(enc(pix, ids, mask), no_global(pix, ids, mask), rtol=0, atol=0)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"intermediate_layers \[4\] out of range.*blocks 0\.\.3"):
        ImageEncoder(ImageEncoderConfig(**TINY, intermediate_layers=(1, 4)))
    with pytest.raises(ValueError, match="mask_mode='causal'"):
        ImageEncoderConfig(mask_mode="causal")
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="at most max_tiles=4"):
        enc(torch.zeros(1, 1, 5, 3, 32, 32), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, 5))


@torch.no_grad()
def test_matches_transformers_mllama_vision_model():
    from transformers import MllamaVisionConfig, MllamaVisionModel

    hc = MllamaVisionConfig(
        hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[3, 1], vision_output_dim=96,
    )  # fmt: skip
    hf = MllamaVisionModel(hc).eval()
    for name, p in hf.named_parameters():  # move every gate and norm off its init so each one is tested
        if "gate" in name:
            p.uniform_(-1.0, 1.0)
        elif "layernorm" in name:
            p.add_(0.1 * torch.randn_like(p))
    projector = torch.nn.Linear(96, 16)  # MllamaModel.multi_modal_projector

    # transformers 5.x records block outputs; mm reads Mllama configs as Meta does unless told otherwise
    assert config_from_mllama(hc, out_dim=16).intermediate_from == "block_input"
    enc = ImageEncoder(config_from_mllama(hc, out_dim=16, intermediate_from="block_output")).eval()
    load_mllama_vision_state_dict(enc, hf.state_dict(), projector.state_dict())

    pix = torch.randn(2, 2, 4, 3, 32, 32)
    ids = torch.tensor([[6, 2], [1, 0]])
    mask = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 0], [1, 0, 0, 0]]])
    ref = hf(pixel_values=pix, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
    assert ref.shape == (2, 2, 4, N_TOK, 3 * 32)
    feats = enc.forward_features(pix, ids, mask)
    torch.testing.assert_close(feats, ref)
    # MllamaModel: multi_modal_projector(vision states).reshape(-1, n_tokens, hidden) == our project + view.
    torch.testing.assert_close(
        enc(pix, ids, mask).reshape(-1, N_TOK, 16), projector(ref).reshape(-1, N_TOK, 16)
    )

    with pytest.raises(ValueError, match=r"no place in ImageEncoder: \['extra'\]"):
        load_mllama_vision_state_dict(enc, hf.state_dict() | {"extra": torch.zeros(1)})
    with pytest.raises(KeyError, match="transformer.layers.2.self_attn"):
        sd = {
            k: v for k, v in hf.state_dict().items() if not k.startswith("transformer.layers.2.self_attn.k")
        }
        load_mllama_vision_state_dict(enc, sd)


def test_conv_stem_replaces_the_patch_projection_and_keeps_the_token_grid():
    from mm.encoders.image_layers import ConvStem

    enc = tiny_encoder(stem="conv", tile_size=64, patch_size=16)
    assert isinstance(enc.vit.patch_embed.proj, ConvStem)
    assert enc.num_tokens_per_tile == (64 // 16) ** 2 + 1
    x = torch.randn(2, 3, 64, 64)
    out = enc(*single_tile(x))
    assert out.shape == (2, 1, 17, 16)
    # locality: a pixel change in the top-left corner moves the top-left patch token, not the far corner's
    y = x.clone()
    y[:, :, :4, :4] += 1.0
    tokens = enc.vit.patch_embed(torch.cat([x, y]))  # (4, 16, D)
    diff = (tokens[2:] - tokens[:2]).abs().sum(-1)  # (2, 16)
    assert (diff[:, 0] > 1e-3).all() and (diff[:, -1] == 0).all()


def test_cnn_stem_is_a_pooled_cnn_with_the_patch_grid():
    from mm.encoders.image_layers import ConvStem

    enc = tiny_encoder(stem="cnn", tile_size=64, patch_size=16, stem_channels=(8, 8, 16, 16))
    stem = enc.vit.patch_embed.proj
    assert isinstance(stem, ConvStem)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in stem.modules()) == 4
    assert [m.stride for m in stem.modules() if isinstance(m, torch.nn.Conv2d)][:4] == [(1, 1)] * 4
    x = torch.randn(2, 3, 64, 64)
    assert stem(x).shape == (2, 32, 4, 4)
    assert enc(*single_tile(x)).shape == (2, 1, 17, 16)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(stem="resnet"), "stem"),
        (dict(stem="conv", tile_size=36, patch_size=12), "power of two"),
        (dict(stem="conv", stem_channels=(8, 16)), "expected 3 widths"),
    ],
)
def test_conv_stem_config_is_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        ImageEncoderConfig(**{**TINY, **kw})


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6])
def test_canvas_positions_follow_the_tiling_grid_order(max_tiles):
    from mm.datasets.tiling import supported_aspect_ratios
    from mm.encoders.image_layers import tile_grids

    # encoders may not import datasets: the aspect-ratio id -> grid rule is written in both rooms
    assert tile_grids(max_tiles) == supported_aspect_ratios(max_tiles)
    enc = tiny_encoder(canvas_position=True, max_tiles=4)
    xy = enc.canvas_position.coords  # (ids, tiles, tokens, 2)
    right = 1 + tile_grids(4).index((1, 2))  # two tiles side by side: the second tile is the right half
    assert float(xy[right, 0, 1:, 0].max()) < 0.5 < float(xy[right, 1, 1:, 0].min())


def test_cnn_stem_pools_before_the_relu_with_the_values_and_gradients_of_relu_then_pool():
    """The "cnn" stem runs [conv -> max pool -> ReLU] channels-last (fewer values through the ReLU); it must
    compute what [conv -> ReLU -> max pool] computes in the default layout, values and input gradients."""
    from mm.encoders.image_layers import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(16, 24, (8, 8, 16, 16), pool=True)
    kinds = [type(m).__name__ for m in stem.layers]
    assert kinds[:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    y = stem(x)

    def reference(h: torch.Tensor) -> torch.Tensor:
        layers = list(stem.layers)
        for i in range(0, len(layers) - 1, 3):
            conv, pool = layers[i], layers[i + 1]
            h = pool(torch.relu(F.conv2d(h.contiguous(), conv.weight, conv.bias, padding=1)))
        return layers[-1](h)

    ref = reference(x)
    torch.testing.assert_close(y, ref)
    g, g_ref = (torch.autograd.grad(t.square().sum(), x)[0] for t in (y, ref))
    torch.testing.assert_close(g, g_ref)
