"""Aspect-ratio tiling (mm.datasets.tiling) against transformers' Mllama image processors, value for value."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mllama import image_processing_mllama as hf_tv
from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from mm.datasets.tiling import (
    CLIP_MEAN,
    CLIP_STD,
    TileTransform,
    fit_to_canvas,
    optimal_canvas,
    supported_aspect_ratios,
    to_rgb,
)

T = 32  # tile size of the parity tests (small: fast)
# (width, height) -> expected (h_tiles, w_tiles) with 4 tiles of 32 px
SIZES = {
    (64, 256): (4, 1),
    (300, 100): (1, 3),
    (50, 50): (2, 2),
    (200, 120): (2, 2),
    (1, 500): (4, 1),
    (500, 1): (1, 4),
    (20, 20): (1, 1),
    (33, 17): (1, 2),
}
HF_BACKENDS = {"torchvision": MllamaImageProcessor, "pil": MllamaImageProcessorPil}


def hf_processor(backend: str, tile_size: int = T):
    return HF_BACKENDS[backend](
        do_resize=True,
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=4,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_supported_aspect_ratios_order_matches_mllama():
    assert supported_aspect_ratios(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert supported_aspect_ratios(1) == [(1, 1)]
    for n in range(1, 9):
        assert supported_aspect_ratios(n) == hf_tv.get_all_supported_aspect_ratios(n)
    with pytest.raises(ValueError, match="max_tiles"):
        supported_aspect_ratios(0)


def test_canvas_and_fit_match_mllama_helpers():
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (1, 500), (500, 1), (560, 560), (561, 560), (1120, 560), (100, 2000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(200)]
    for tile in (32, 560):
        for max_tiles in (1, 4, 6):
            for h, w in sizes:
                canvas = optimal_canvas(h, w, max_tiles, tile)
                assert canvas == tuple(int(v) for v in hf_tv.get_optimal_tiled_canvas(h, w, max_tiles, tile))
                ours = fit_to_canvas(h, w, *canvas, tile)
                assert ours == tuple(int(v) for v in hf_tv.get_image_size_fit_to_canvas(h, w, *canvas, tile))


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_parity_with_mllama_image_processor(backend):
    hf = hf_processor(backend)
    ours = TileTransform(T, 4, backend=backend)
    grids = supported_aspect_ratios(4)
    for k, ((width, height), grid) in enumerate(SIZES.items()):
        image = random_image(width, height, seed=k)
        ref = hf(images=[[image]], return_tensors="pt")
        tiled = ours(image)
        n = grid[0] * grid[1]
        assert tiled.aspect_ratio == grid
        assert tiled.aspect_ratio_id == grids.index(grid) + 1 == ref["aspect_ratio_ids"][0, 0].item()
        assert tiled.tiles.dtype == torch.float32 and tiled.tiles.shape == (n, 3, T, T)
        assert ref["num_tiles"] == [[n]]
        assert ref["aspect_ratio_mask"][0, 0].tolist() == [1] * n + [0] * (4 - n)
        # Same kernels, same order of float ops: equal to float32 rounding (in practice bit for bit).
        torch.testing.assert_close(tiled.tiles, ref["pixel_values"][0, 0, :n], rtol=0, atol=1e-6)


def test_backends_differ_only_by_resampling_rounding():
    image = random_image(300, 100, seed=3)
    tv = TileTransform(T, 4, backend="torchvision")(image).tiles
    pil = TileTransform(T, 4, backend="pil")(image).tiles
    # PIL and torchvision's uint8 antialiased bilinear differ by at most one grey level on some pixels.
    one_level = 1 / 255 / min(CLIP_STD)
    assert (tv - pil).abs().max().item() <= one_level + 1e-6
    # No resize needed (64x32 is exactly a 1x2 canvas): equal up to float32 rounding of the normalisation.
    image = random_image(64, 32, seed=4)
    pil, tv = TileTransform(T, 4, backend="pil")(image).tiles, TileTransform(T, 4)(image).tiles
    torch.testing.assert_close(pil, tv, rtol=0, atol=1e-6)


def test_padding_and_tile_order():
    # 50x50 with 32-px tiles: canvas 2x2 tiles (64x64), resized to 64x64 -> no padding; 200x120: resized to
    # 64x38 and padded below: the lower tiles' rows 6..31 are padding (value -mean/std).
    tiled = TileTransform(T, 4)(Image.new("RGB", (200, 120), (255, 255, 255)))
    assert tiled.aspect_ratio == (2, 2)
    pad = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)
    white = ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(3, 1, 1)
    for k in (2, 3):
        torch.testing.assert_close(tiled.tiles[k, :, 6:], pad.expand(3, 26, T), rtol=0, atol=1e-6)
        torch.testing.assert_close(tiled.tiles[k, :, :6], white.expand(3, 6, T), rtol=0, atol=1e-6)
    # Row-major tile order: a 64x64 image with four coloured quadrants, no resize.
    quad = np.zeros((64, 64, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    for k, c in enumerate(colours):
        r, col = divmod(k, 2)
        quad[r * 32 : (r + 1) * 32, col * 32 : (col + 1) * 32] = c
    tiles = TileTransform(T, 4)(Image.fromarray(quad)).tiles
    for k, c in enumerate(colours):
        expected = ((torch.tensor(c) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(3, 1, 1)
        torch.testing.assert_close(tiles[k], expected.expand(3, T, T), rtol=0, atol=1e-5)


def test_colour_modes_match_mllama():
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (40, 70, 1), dtype=np.uint8)], axis=2)
    palette = Image.fromarray(rgb).convert("P")
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    images = {
        "L": Image.fromarray(rgb[..., 0], mode="L"),
        "1": Image.fromarray(rgb[..., 0] > 128),
        "P": palette,
        "P+transparency": palette_t,
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "LA": Image.fromarray(rgba[..., [0, 3]], mode="LA"),
        "CMYK": Image.fromarray(rgba, mode="RGBA").convert("RGB").convert("CMYK"),
    }
    hf = hf_processor("torchvision")
    ours = TileTransform(T, 4)
    for name, image in images.items():
        out = hf(images=[[image]], return_tensors="pt")
        tiled = ours(image)
        assert tiled.aspect_ratio == (2, 2) and out["num_tiles"] == [[4]], name
        torch.testing.assert_close(tiled.tiles, out["pixel_values"][0, 0], rtol=0, atol=1e-6, msg=name)
    # Transparent pixels become white; opaque ones keep their colour.
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    assert np.array(to_rgb(Image.fromarray(rgba, mode="RGBA"))).tolist() == [
        [[10, 20, 30], [255, 255, 255]],
        [[255, 255, 255], [255, 255, 255]],
    ]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.frombytes("I;16", (4, 1), values.tobytes())
    assert np.array(to_rgb(image))[0, :, 0].tolist() == [0, 1, 128, 255]
    tiled = TileTransform(T, 4)(image)  # 4x1 px: smallest upscaling is the single tile
    assert tiled.aspect_ratio == (1, 1) and tiled.tiles.shape == (1, 3, T, T)


def test_from_hf_preprocessor_config(tmp_path):
    # Llama 3.2 11B Vision's preprocessor_config.json
    config = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "MllamaImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "max_image_tiles": 4,
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 560, "width": 560},
    }
    t = TileTransform.from_hf_preprocessor_config(config)
    assert (t.tile_size, t.max_tiles, t.resample, t.backend) == (560, 4, "bilinear", "torchvision")
    assert t.mean == CLIP_MEAN and t.std == CLIP_STD
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**config, "resample": 3, "max_image_tiles": 2})
    )
    t = TileTransform.from_hf_preprocessor_config(tmp_path)  # the folder of a checkpoint
    assert (t.tile_size, t.max_tiles, t.resample) == (560, 2, "bicubic")
    assert t.grids == [(1, 1), (1, 2), (2, 1)]
    with pytest.raises(ValueError, match="square"):
        TileTransform.from_hf_preprocessor_config({**config, "size": {"height": 560, "width": 448}})
    with pytest.raises(ValueError, match="resample code 9"):
        TileTransform.from_hf_preprocessor_config({**config, "resample": 9})


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        TileTransform(T, 4, backend="cv2")
    with pytest.raises(ValueError, match="resample"):
        TileTransform(T, 4, resample="area")
    with pytest.raises(ValueError, match="tile_size"):
        TileTransform(0, 4)
    with pytest.raises(ValueError, match="empty image"):
        TileTransform(T, 4)(Image.new("RGB", (0, 5)))
    with pytest.raises(TypeError, match="PIL image"):
        TileTransform(T, 4)(np.zeros((4, 4, 3), dtype=np.uint8))


def test_id_max_tiles_keeps_the_encoders_aspect_ratio_ids():
    from PIL import Image

    from mm.datasets.tiling import TileTransform

    tall = Image.new("RGB", (40, 90), (200, 10, 10))
    own = TileTransform(32, 2)(tall)
    enc = TileTransform(32, 2, id_max_tiles=4)(tall)
    assert own.aspect_ratio == enc.aspect_ratio == (2, 1)
    assert own.aspect_ratio_id == 3  # (2, 1) in [(1,1), (1,2), (2,1)]
    assert enc.aspect_ratio_id == 5  # (2, 1) in the 4-tile list [(1,1),(1,2),(1,3),(1,4),(2,1),...]
    import torch

    assert torch.equal(own.tiles, enc.tiles)
