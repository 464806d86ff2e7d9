"""Aspect-ratio tiling (mm.datasets.tiling) against Meta's reference transform, value for value.

Meta's reference is llama_models' `VariableSizeImageTransform(size)(image, max_num_chunks)` -> (tiles (n, 3, S, S),
ar = (ratio_h, ratio_w)). Its model uses `ar` as a grid: tile-position embeddings `embed[:ratio_h, :ratio_w]`
flattened row-major (`TilePositionEmbedding.forward`, `VisionEncoder.apply_positional_embedding`), the first
ratio_h * ratio_w tiles are real (`build_encoder_attention_mask`, `_pad_masks` with num_chunks = n), padding tiles
are zeros (`_stack_images`). So Meta's ar is mm's `TiledImage.aspect_ratio` (h_tiles, w_tiles), mm's
aspect_ratio_id is `supported_aspect_ratios(encoder max_tiles).index(ar) + 1` (what transformers' weight
converter does with Meta's embeddings) and mm's aspect_ratio_mask is [1] * (ratio_h * ratio_w) + [0] * rest.

mm configured like Meta (CLIP mean/std, bilinear, `backend="pil"`) matches it bit for bit on RGB images: the same
canvas, the same PIL resize, zero padding at the bottom/right, and float32 x/255 is the same float as mm's
float32(x * (1/255)) for all 256 levels, then the same (x - mean) / std in float32. mm's default
`backend="torchvision"` (transformers' default processor) is within one grey level (1 / 255 / std).
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

meta_it = pytest.importorskip("llama_models.llama3.multimodal.image_transform")

from mm.datasets.collate import ImageCaptionCollator  # noqa: E402
from mm.datasets.tiling import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    TileTransform,
    fit_to_canvas,
    optimal_canvas,
    supported_aspect_ratios,
)
from mm.prompts import IMAGE_PROMPT  # noqa: E402

META_TILE = 560  # Llama 3.2 Vision's tile size
ONE_LEVEL = 1 / 255 / min(CLIP_STD)  # one uint8 grey level after normalisation (~0.0150)


def meta_transform(tile_size: int):
    return meta_it.VariableSizeImageTransform(tile_size)


def mm_like_meta(tile_size: int, max_tiles: int, **kwargs) -> TileTransform:
    meta = meta_transform(tile_size)
    return TileTransform(tile_size, max_tiles, mean=meta._mean, std=meta._std, resample="bilinear", **kwargs)


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin((x + 2 * y) / 9.0)
    return Image.fromarray(np.stack([r, g, b], axis=-1).round().astype(np.uint8))


def sizes_for(t: int) -> list[tuple[int, int]]:
    """(width, height): tiny, 1x1, below/at/above tile multiples, square, very wide/tall, huge."""
    return [
        (1, 1),
        (3, 2),
        (t // 2, t // 3),  # smaller than a tile
        (t - 1, t - 1),
        (t, t),
        (t + 1, t + 1),
        (2 * t - 1, t),
        (2 * t, t),
        (2 * t + 1, t),
        (t, 2 * t + 1),
        (t + 1, 3 * t - 1),
        (4 * t + 1, t),
        (t - 1, 4 * t - 1),
        (5 * t + 3, 5 * t - 2),  # square-ish, downscaled
        (600, 30),  # very wide (20:1): 1-px tall at 28-px tiles
        (26, 700),  # very tall
        (1999, 1500),  # huge
    ]


def test_meta_transform_imports_without_fairscale():
    # Meta's model.py needs fairscale; the image transform must not (fresh interpreter where it cannot load).
    code = (
        "import sys; sys.modules['fairscale'] = None\n"
        "import llama_models.llama3.multimodal.image_transform as m\n"
        "import torch.distributed as d\n"
        "assert not d.is_initialized() and m.VariableSizeImageTransform(28)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_supported_grids_match_meta():
    # Meta lists its canvases in another order (by chunk count, then by ratio); only the set matters for it,
    # the ids come from mm's (transformers') order.
    for tile in (28, META_TILE):
        meta = meta_transform(tile)
        for max_tiles in range(1, 9):
            res = meta.find_supported_resolutions(max_tiles, tile)
            grids = {(h // tile, w // tile) for h, w in res}
            assert len(res) == len(grids) == len(supported_aspect_ratios(max_tiles))
            assert grids == set(supported_aspect_ratios(max_tiles))


def test_canvas_and_resize_size_match_meta(monkeypatch):
    # Meta's own helpers, on many sizes; its resize is stubbed to return the size it was asked for.
    monkeypatch.setattr(meta_it.F, "resize", lambda image, size, interpolation: tuple(size))
    rng = np.random.default_rng(0)
    degenerate = 0
    for tile in (28, META_TILE):
        meta = meta_transform(tile)
        sizes = [(h, w) for w, h in sizes_for(tile)] + [(1, 500), (500, 1), (10, 1000), (1000, 10)]
        sizes += [tuple(int(v) for v in rng.integers(1, 4 * tile + 3, 2)) for _ in range(60)]
        sizes += [tuple(int(v) for v in rng.integers(1, 8000, 2)) for _ in range(60)]
        for max_tiles in (1, 2, 4):
            resolutions = torch.tensor(meta.find_supported_resolutions(max_tiles, tile))
            for h, w in sizes:
                canvas_w, canvas_h = meta.get_best_fit((w, h), resolutions)  # Meta: (width, height)
                assert optimal_canvas(h, w, max_tiles, tile) == (canvas_h, canvas_w), (tile, max_tiles, h, w)
                meta_new = meta.resize_without_distortion(
                    SimpleNamespace(size=(w, h)), (canvas_w, canvas_h), tile
                )
                ours = fit_to_canvas(h, w, canvas_h, canvas_w, tile)
                if min(meta_new) == 0:  # Meta floors the short side to 0 px (and then raises); mm keeps 1 px
                    degenerate += 1
                    assert ours == tuple(max(v, 1) for v in meta_new)
                else:
                    assert ours == meta_new, (tile, max_tiles, h, w)
    assert degenerate > 0


@pytest.mark.parametrize("tile", [28, 56])
@pytest.mark.parametrize("max_tiles", [1, 2, 4])
def test_tiles_match_meta(tile, max_tiles):
    meta = meta_transform(tile)
    ours = mm_like_meta(tile, max_tiles, backend="pil")
    default = TileTransform(tile, max_tiles)  # transformers' default (torchvision) backend
    grids = supported_aspect_ratios(max_tiles)
    padded = resized = 0
    for k, (width, height) in enumerate(sizes_for(tile)):
        for image in (noise(width, height, seed=k), gradient(width, height)):
            ref, ar = meta(image, max_num_chunks=max_tiles)
            tiled = ours(image)
            where = (width, height, tile, max_tiles)
            n = ar[0] * ar[1]
            assert tiled.aspect_ratio == tuple(ar), (
                where
            )  # Meta's (ratio_h, ratio_w) is mm's (h_tiles, w_tiles)
            assert tiled.aspect_ratio_id == grids.index(tuple(ar)) + 1, where
            assert ref.shape == tiled.tiles.shape == (n, 3, tile, tile), where
            assert ref.dtype == tiled.tiles.dtype == torch.float32
            # Same canvas, same PIL resize, same zero padding, same float32 rescale/normalise: bit for bit.
            torch.testing.assert_close(tiled.tiles, ref, rtol=0, atol=0, msg=str(where))
            torch.testing.assert_close(
                default(image).tiles, ref, rtol=0, atol=ONE_LEVEL + 1e-6, msg=str(where)
            )
            (_, _), (new_h, new_w) = ours.grid_for(height, width)
            padded += (new_h, new_w) != (ar[0] * tile, ar[1] * tile)
            resized += (new_h, new_w) != (height, width)
    assert padded and resized  # the sizes do exercise padding and resizing


def test_tiles_match_meta_at_560():
    meta = meta_transform(META_TILE)
    ours = mm_like_meta(META_TILE, 4, backend="pil")
    for image, grid in ((gradient(1000, 700), (2, 2)), (noise(1500, 400, seed=1), (1, 3))):
        ref, ar = meta(image, 4)
        tiled = ours(image)
        assert tuple(ar) == tiled.aspect_ratio == grid
        torch.testing.assert_close(tiled.tiles, ref, rtol=0, atol=0)
        torch.testing.assert_close(
            TileTransform(META_TILE, 4)(image).tiles, ref, rtol=0, atol=ONE_LEVEL + 1e-6
        )


def test_rescale_is_the_same_float():
    # Meta: ToTensor divides float32 by 255; mm (pil backend) rounds float64 x * (1/255) to float32.
    levels = np.arange(256)
    ours = (levels.astype(np.float64) * (1 / 255)).astype(np.float32)
    assert np.array_equal(ours, (torch.arange(256, dtype=torch.float32) / 255).numpy())


def test_tile_order_and_padding_match_meta():
    # Four coloured quadrants, 2x2 grid without resizing: tile k is quadrant k in row-major order.
    t = 28
    quad = np.zeros((2 * t, 2 * t, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    for k, c in enumerate(colours):
        r, col = divmod(k, 2)
        quad[r * t : (r + 1) * t, col * t : (col + 1) * t] = c
    ref, ar = meta_transform(t)(Image.fromarray(quad), 4)
    tiles = mm_like_meta(t, 4, backend="pil")(Image.fromarray(quad)).tiles
    assert tuple(ar) == (2, 2)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for k, c in enumerate(colours):
        expected = ((torch.tensor(c).view(3, 1, 1) / 255 - mean) / std).expand(3, t, t)
        torch.testing.assert_close(ref[k], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(tiles[k], ref[k], rtol=0, atol=0)
    # White images without resizing: 60x28 pads 24 columns on the right (1x3 grid), 28x45 pads 11 rows at the
    # bottom (2x1 grid); padding is black before normalisation, i.e. -mean/std.
    white, pad = ((1 - mean) / std).expand(3, t, t), (-mean / std).expand(3, t, t)
    for (width, height), grid, expected in (
        ((60, 28), (1, 3), torch.stack([white, white, torch.cat([white[..., :4], pad[..., 4:]], dim=2)])),
        ((28, 45), (2, 1), torch.stack([white, torch.cat([white[:, :17], pad[:, 17:]], dim=1)])),
    ):
        image = Image.new("RGB", (width, height), (255, 255, 255))
        ref, ar = meta_transform(t)(image, 4)
        assert tuple(ar) == grid
        torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(mm_like_meta(t, 4, backend="pil")(image).tiles, ref, rtol=0, atol=0)


def test_too_elongated_images_break_meta_not_mm():
    # The short side scales below 1 px: Meta floors it to 0 and torchvision raises; mm (and transformers) keep 1 px.
    t = 28
    for (width, height), max_tiles in (((1, 500), 4), ((500, 1), 4), ((10, 1000), 1), ((1000, 10), 2)):
        image = noise(width, height, seed=width)
        with pytest.raises(ValueError, match="height and width must be > 0"):
            meta_transform(t)(image, max_tiles)
        grid, (new_h, new_w) = TileTransform(t, max_tiles).grid_for(height, width)
        tiled = mm_like_meta(t, max_tiles, backend="pil")(image)
        assert min(new_h, new_w) == 1 and tiled.aspect_ratio == grid and tiled.n_tiles == grid[0] * grid[1]


def test_ar_maps_to_mm_id_mask_and_stacked_pixels():
    """Meta's ar -> mm's aspect_ratio_id / aspect_ratio_mask / pixel_values, through Meta's own model code."""
    meta_model = pytest.importorskip("llama_models.llama3.multimodal.model")
    from llama_models.llama3.multimodal.encoder_utils import build_encoder_attention_mask

    t, enc_tiles, dim, ntok = 28, 4, 6, 5
    grids = supported_aspect_ratios(enc_tiles)
    torch.manual_seed(0)
    tile_embed = meta_model.TilePositionEmbedding(num_tiles=enc_tiles, width=dim, gated=False)
    # transformers' converter (pre_compute_positional_embedding): row id = index in the grid list + 1, 0 = pad
    table = torch.zeros(len(grids) + 1, enc_tiles, 1, dim)
    for i, (h, w) in enumerate(grids):
        table[i + 1, : h * w] = tile_embed.embedding.data[:h, :w].reshape(h * w, 1, dim)
    tokenizer = SimpleNamespace(bos_id=1, image_id=2, encode=lambda text: [3])
    collator = ImageCaptionCollator(tokenizer, IMAGE_PROMPT, max_tiles=enc_tiles)
    cases = [(TileTransform(t, enc_tiles, backend="pil"), enc_tiles, grid) for grid in grids]
    # a stage tiling with 2 tiles for a 4-tile encoder: Meta's ar does not depend on max_num_chunks
    two = TileTransform(t, 2, backend="pil", id_max_tiles=enc_tiles)
    cases += [(two, 2, grid) for grid in supported_aspect_ratios(2)]
    for transform, max_chunks, (h, w) in cases:
        image = noise(w * t - 3, h * t - 5, seed=h * 10 + w)  # just below the h x w canvas: that grid
        ref, ar = meta_transform(t)(image, max_chunks)
        tiled = transform(image)
        assert tuple(ar) == tiled.aspect_ratio == (h, w)
        media = collator.media([{"tiles": tiled.tiles, "aspect_ratio_id": tiled.aspect_ratio_id}])
        mm_id = media["aspect_ratio_ids"][0, 0].item()
        assert mm_id == grids.index(tuple(ar)) + 1
        # Tile-position embedding: Meta's forward with ar == the id-indexed table row mm's encoder would use.
        x = torch.randn(1, enc_tiles, ntok, dim)
        got = tile_embed(x, torch.tensor([ar]))
        torch.testing.assert_close(got, x + table[mm_id].unsqueeze(0), rtol=0, atol=0)
        # Real tiles: Meta's encoder mask (pad tokens are those masked against themselves) == mm's mask.
        x8 = torch.zeros(1, enc_tiles, 8, dim)  # ntok tokens padded to 8, as Meta does
        mask = build_encoder_attention_mask(x8, torch.tensor([ar]), ntok, enc_tiles, 1)[0, 0]
        meta_real = (mask.diagonal().view(enc_tiles, 8)[:, 0] == 0).long()
        assert (
            media["aspect_ratio_mask"][0, 0].tolist()
            == meta_real.tolist()
            == [1] * (h * w) + [0] * (enc_tiles - h * w)
        )
        # Cross-attention: Meta's _pad_masks lets text see the first num_chunks = n tiles.
        xattn = meta_model._pad_masks([[[0, -1]]], [[ref.shape[0]]], 3, enc_tiles)
        assert (xattn[0, 0, 0] == 0).long().tolist() == media["aspect_ratio_mask"][0, 0].tolist()
        # Stacked pixels with zero padding tiles.
        stacked, n_chunks = meta_model._stack_images([[ref]], enc_tiles, t, 1)
        assert n_chunks == [[h * w]] and media["n_tiles"] == [[h * w]]
        torch.testing.assert_close(media["pixel_values"], stacked, rtol=0, atol=0)


def _colour_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 70, 1), dtype=np.uint8)
    return {
        "L": Image.fromarray(rgb[..., 0], mode="L"),
        "RGBA opaque": Image.fromarray(np.concatenate([rgb, np.full_like(alpha, 255)], axis=2), mode="RGBA"),
        "RGBA": Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA"),
        "LA": Image.fromarray(np.concatenate([rgb[..., :1], alpha], axis=2), mode="LA"),
        "P": Image.fromarray(rgb).convert("P"),
        "1": Image.fromarray(rgb[..., 0] > 128),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "I;16": Image.frombytes(
            "I;16", (70, 40), rng.integers(0, 65536, (40, 70), dtype=np.uint16).tobytes()
        ),
    }


def test_colour_modes():
    # 70x40: resized with 28-px tiles (2x2 canvas, 56x32), not resized with 56-px tiles (1x2 canvas).
    for t in (28, 56):
        meta = meta_transform(t)
        hf_colour = mm_like_meta(t, 4, backend="pil")
        meta_colour = mm_like_meta(t, 4, backend="pil", colour_conversion="meta")
        for name, image in _colour_images().items():
            ref, ar = meta(image, 4)
            ours, theirs = hf_colour(image), meta_colour(image)
            assert tuple(ar) == ours.aspect_ratio == theirs.aspect_ratio, name
            torch.testing.assert_close(theirs.tiles, ref, rtol=0, atol=0, msg=f"{name} {t}")
            diff = (ours.tiles - ref).abs().max().item()
            if name in ("L", "RGBA opaque") or (t == 56 and name in ("P", "1", "CMYK")):
                assert diff == 0, (name, t)  # mm's default colour handling gives the same numbers
            else:
                # alpha: Meta drops it, mm composites on white; 16-bit: Meta clips, mm scales to 8 bits; when
                # resizing, P and 1 are resampled NEAREST by Meta, CMYK is resized before converting
                assert diff > 0, (name, t)
    # Without a resize, Meta's RGBA is the alpha-dropped RGB image, mm's the image composited on white.
    rgba = _colour_images()["RGBA"]
    ref, _ = meta_transform(56)(rgba, 4)
    torch.testing.assert_close(
        mm_like_meta(56, 4, backend="pil")(rgba.convert("RGB")).tiles, ref, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="backend"):
        TileTransform(28, 4, colour_conversion="meta")
    with pytest.raises(ValueError, match="colour_conversion"):
        TileTransform(28, 4, backend="pil", colour_conversion="cv2")
