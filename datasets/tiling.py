"""Aspect-ratio tiling of images, as in Llama 3.2 Vision (paper-notes.md section 3, "Tiling").

An image is resized without distortion to fit the best canvas of up to `max_tiles` square tiles, padded at the
bottom and right, normalised, and cut into tiles in row-major order. This follows transformers'
`MllamaImageProcessor` (models/mllama/image_processing_mllama.py) step by step and matches its numbers:

1. Colour: any PIL mode becomes RGB; an image with an alpha channel (RGBA, LA, PA, or a palette/grey image
   with a `transparency` key) is composited on white first, as transformers' `convert_to_rgb` does.
   Deviation: 16-bit grey (`I;16*` modes) is scaled to 8 bits (value / 257) where PIL's `convert("RGB")`
   would clip everything above 255 to white.
   `colour_conversion="meta"` (needs `backend="pil"`) does instead what Meta's reference transform
   (llama_models' `VariableSizeImageTransform`) does: resize in the image's own mode, then let PIL convert to RGB
   while pasting onto the black canvas -- alpha is dropped (after PIL's premultiplied-alpha resize), P and 1
   images are resampled with NEAREST (PIL forces it for those modes), 16-bit grey is clipped. RGB, L and
   opaque RGBA images give the same numbers either way.
2. Canvas (`optimal_canvas`): among the tile grids (h_tiles, w_tiles) with h_tiles * w_tiles <= max_tiles, take
   the one needing the smallest upscaling (scale >= 1), or, if every grid needs downscaling, the largest
   downscaling; ties go to the smallest canvas area, then to the earlier grid in `supported_aspect_ratios`.
   An image more elongated than every grid still gets the best-fitting grid.
3. Resize (`fit_to_canvas`): each side is clipped to [tile_size, canvas side], then the image is scaled by the
   smaller of the two factors (sides floored, at least 1 px, as transformers; Meta's reference transform floors
   to 0 px and raises there).
4. Resample: `backend="torchvision"` (default) resizes the uint8 tensor with
   `torchvision.transforms.v2.functional.resize(..., antialias=True)`, exactly what transformers 5.x's default
   `MllamaImageProcessor` does; `backend="pil"` uses `PIL.Image.resize`, as `MllamaImageProcessorPil` and
   Meta's reference transform do (equal to both bit for bit on RGB images). The two backends differ by at most
   1/255 on some pixels.
5. Pad bottom/right with 0 (in uint8, before normalisation: padded pixels become -mean/std), rescale by 1/255,
   normalise with mean/std, split into tiles; `aspect_ratio_id` is the 1-based index of the grid in
   `supported_aspect_ratios(max_tiles)` (0 is reserved for padding images in a batch).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BACKENDS",
    "CLIP_MEAN",
    "CLIP_STD",
    "COLOUR_CONVERSIONS",
    "RESAMPLE_MODES",
    "TileTransform",
    "TiledImage",
    "fit_to_canvas",
    "optimal_canvas",
    "supported_aspect_ratios",
    "to_rgb",
]

# OpenAI CLIP's normalisation (Llama 3.2 Vision's preprocessor_config.json uses these).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
BACKENDS: tuple[str, ...] = ("torchvision", "pil")
COLOUR_CONVERSIONS: tuple[str, ...] = ("hf", "meta")
RESAMPLE_MODES: tuple[str, ...] = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
# PIL's integer resample codes, as written in a preprocessor_config.json ("resample": 2 is bilinear).
_PIL_CODES: dict[int, str] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@cache
def _supported(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Cached grid list (see `supported_aspect_ratios`)."""
    return tuple(
        (h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles
    )


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (h_tiles, w_tiles) with h*w <= max_tiles, in Mllama's order (4: (1,1),(1,2),(1,3),(1,4),(2,1),...)."""
    if not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"max_tiles must be a positive int, got {max_tiles!r}")
    return list(_supported(max_tiles))


def optimal_canvas(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """The (canvas_height, canvas_width) in pixels an image of (height, width) is fitted into."""
    best: tuple[float, int, int, int] | None = None  # (key for min, area, canvas_h, canvas_w)
    grids = supported_aspect_ratios(max_tiles)
    scales = []
    for h_tiles, w_tiles in grids:
        scale_h = (h_tiles * tile_size) / height
        scale_w = (w_tiles * tile_size) / width
        scales.append(scale_h if scale_w > scale_h else scale_w)
    upscaling = [s for s in scales if s >= 1]
    selected = min(upscaling) if upscaling else max(scales)
    for (h_tiles, w_tiles), scale in zip(grids, scales):
        if scale != selected:
            continue
        area = h_tiles * w_tiles * tile_size * tile_size
        if best is None or area < best[1]:  # first grid wins among equal areas (numpy argmin)
            best = (scale, area, h_tiles * tile_size, w_tiles * tile_size)
    assert best is not None
    return best[2], best[3]


def fit_to_canvas(
    height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """The (new_height, new_width) of an image resized without distortion into the canvas."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in mode RGB; transparency is composited on white, 16-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class TiledImage:
    """One image as tiles: `tiles` (n_tiles, 3, S, S) float32, its grid and the grid's 1-based id."""

    tiles: torch.Tensor  # (n_tiles, 3, tile_size, tile_size)
    aspect_ratio_id: int  # 1-based index into supported_aspect_ratios(max_tiles)
    aspect_ratio: tuple[int, int]  # (h_tiles, w_tiles)

    @property
    def n_tiles(self) -> int:
        """Number of real tiles (h_tiles * w_tiles)."""
        return self.tiles.shape[0]


@cache
def _tv_functional() -> Any:
    """torchvision.transforms.v2.functional, imported on first use (it is slow to import)."""
    from torchvision.transforms.v2 import functional

    return functional


class TileTransform:
    """PIL image -> `TiledImage` (see the module docstring for the exact algorithm and its reference)."""

    def __init__(
        self,
        tile_size: int,
        max_tiles: int,
        mean: tuple[float, ...] | list[float] = CLIP_MEAN,
        std: tuple[float, ...] | list[float] = CLIP_STD,
        resample: str = "bilinear",
        backend: str = "torchvision",
        id_max_tiles: int | None = None,
        colour_conversion: str = "hf",
    ) -> None:
        """`id_max_tiles`: number the aspect-ratio ids by the grid list of this many tiles (default max_tiles),
        so that a stage tiling with fewer tiles than its encoder supports keeps the encoder's id meaning.
        `colour_conversion`: "hf" (RGB before resizing, alpha on white) or "meta" (Meta's reference: convert
        after resizing; needs backend="pil"); see the module docstring."""
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        self.grids = supported_aspect_ratios(max_tiles)
        if id_max_tiles is not None and id_max_tiles < max_tiles:
            raise ValueError(f"id_max_tiles={id_max_tiles} must be >= max_tiles={max_tiles}")
        self.id_max_tiles = id_max_tiles or max_tiles
        self.id_grids = supported_aspect_ratios(self.id_max_tiles)
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample {resample!r}; expected one of {', '.join(RESAMPLE_MODES)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if colour_conversion not in COLOUR_CONVERSIONS:
            raise ValueError(
                f"unknown colour_conversion {colour_conversion!r}; expected one of {', '.join(COLOUR_CONVERSIONS)}"
            )
        if colour_conversion == "meta" and backend != "pil":
            raise ValueError(
                'colour_conversion="meta" resizes in the image\'s own mode: it needs backend="pil"'
            )
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean!r} std={std!r}")
        self.tile_size = tile_size
        self.max_tiles = max_tiles
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = resample
        self.backend = backend
        self.colour_conversion = colour_conversion

    def __repr__(self) -> str:
        return (
            f"TileTransform(tile_size={self.tile_size}, max_tiles={self.max_tiles}, mean={self.mean}, "
            f"std={self.std}, resample={self.resample!r}, backend={self.backend!r}, "
            f"id_max_tiles={self.id_max_tiles}, colour_conversion={self.colour_conversion!r})"
        )

    @classmethod
    def from_hf_preprocessor_config(
        cls, config: dict[str, Any] | str | os.PathLike[str], backend: str = "torchvision"
    ) -> TileTransform:
        """Build from a Mllama `preprocessor_config.json` (a dict, or the file / its folder)."""
        source = "config dict"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "preprocessor_config.json"
            source = str(path)
            config = json.loads(path.read_text(encoding="utf-8"))
        size = config.get("size", {})
        if not isinstance(size, dict) or "height" not in size:
            raise ValueError(f"{source}: 'size' must be a dict with 'height' (and 'width'), got {size!r}")
        if size.get("width", size["height"]) != size["height"]:
            raise ValueError(f"{source}: tiles must be square, got size={size!r}")
        for key in ("do_resize", "do_pad", "do_rescale", "do_normalize"):
            if config.get(key, True) is False:
                raise ValueError(f"{source}: {key}=false is not supported (Mllama always does it)")
        factor = config.get("rescale_factor", 1 / 255)
        if not math.isclose(factor, 1 / 255, rel_tol=1e-6):
            raise ValueError(f"{source}: rescale_factor must be 1/255, got {factor!r}")
        resample = config.get("resample", 2)
        if isinstance(resample, int):
            if resample not in _PIL_CODES:
                raise ValueError(
                    f"{source}: unknown resample code {resample}; expected one of {sorted(_PIL_CODES)}"
                )
            resample = _PIL_CODES[resample]
        return cls(
            tile_size=int(size["height"]),
            max_tiles=int(config.get("max_image_tiles", 4)),
            mean=config.get("image_mean", CLIP_MEAN),
            std=config.get("image_std", CLIP_STD),
            resample=str(resample).lower(),
            backend=backend,
        )

    def grid_for(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((h_tiles, w_tiles), (new_height, new_width)) for an image of that size."""
        canvas_h, canvas_w = optimal_canvas(height, width, self.max_tiles, self.tile_size)
        new_size = fit_to_canvas(height, width, canvas_h, canvas_w, self.tile_size)
        return (canvas_h // self.tile_size, canvas_w // self.tile_size), new_size

    def __call__(self, image: Image.Image) -> TiledImage:
        """Tile one image."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"TileTransform takes a PIL image, got {type(image).__name__}")
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"cannot tile an empty image of size {width}x{height}")
        # "meta": the image keeps its mode until after the resize (`_tiles_pil` converts it)
        rgb = image if self.colour_conversion == "meta" else to_rgb(image)
        (h_tiles, w_tiles), (new_h, new_w) = self.grid_for(height, width)
        s = self.tile_size
        if self.backend == "torchvision":
            tiles = self._tiles_torchvision(rgb, new_h, new_w, h_tiles, w_tiles)
        else:
            tiles = self._tiles_pil(rgb, new_h, new_w, h_tiles, w_tiles)
        assert tiles.shape == (h_tiles * w_tiles, 3, s, s)
        grid = (h_tiles, w_tiles)
        return TiledImage(tiles=tiles, aspect_ratio_id=self.id_grids.index(grid) + 1, aspect_ratio=grid)

    def _tiles_torchvision(
        self, rgb: Image.Image, new_h: int, new_w: int, h_tiles: int, w_tiles: int
    ) -> torch.Tensor:
        """Resize the uint8 tensor with torchvision (as transformers' MllamaImageProcessor), then pad/normalise."""
        tvf = _tv_functional()
        chw = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)
        x = torch.from_numpy(chw)
        mode = "NEAREST_EXACT" if self.resample == "nearest" else self.resample.upper()
        x = tvf.resize(x, [new_h, new_w], interpolation=getattr(tvf.InterpolationMode, mode), antialias=True)
        s = self.tile_size
        canvas = np.zeros((3, h_tiles * s, w_tiles * s), dtype=np.uint8)  # zero padding bottom/right
        canvas[:, :new_h, :new_w] = x.numpy()
        # Rescale and normalise fused as transformers does, (x - mean * 255) / (std * 255) in float32. Copies and
        # element-wise ops are done in numpy (the same IEEE float32 ops, so the same bits): torch's multi-threaded
        # kernels are ~100x slower on tiny tensors when the cores are busy.
        mean = (torch.tensor(self.mean, dtype=torch.float32) * (1.0 / (1 / 255))).numpy()[:, None, None]
        std = (torch.tensor(self.std, dtype=torch.float32) * (1.0 / (1 / 255))).numpy()[:, None, None]
        return _split((canvas.astype(np.float32) - mean) / std, h_tiles, w_tiles)

    def _tiles_pil(
        self, rgb: Image.Image, new_h: int, new_w: int, h_tiles: int, w_tiles: int
    ) -> torch.Tensor:
        """Resize with PIL, then pad/rescale/normalise in numpy (as transformers' MllamaImageProcessorPil)."""
        resized = rgb.resize((new_w, new_h), resample=_PIL_FILTERS[self.resample])
        if resized.mode != "RGB":  # colour_conversion="meta": PIL's conversion on pasting, as Meta's `_pad`
            pasted = Image.new("RGB", resized.size, (0, 0, 0))
            pasted.paste(resized)
            resized = pasted
        s = self.tile_size
        canvas = np.zeros((3, h_tiles * s, w_tiles * s), dtype=np.uint8)
        canvas[:, :new_h, :new_w] = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
        x = (canvas.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.array(self.mean, dtype=np.float32)[:, None, None]
        std = np.array(self.std, dtype=np.float32)[:, None, None]
        return _split((x - mean) / std, h_tiles, w_tiles)


def _split(x: np.ndarray, h_tiles: int, w_tiles: int) -> torch.Tensor:
    """(C, h_tiles*S, w_tiles*S) -> (h_tiles*w_tiles, C, S, S), tiles in row-major order."""
    c, height, width = x.shape
    th, tw = height // h_tiles, width // w_tiles
    x = x.reshape(c, h_tiles, th, w_tiles, tw).transpose(1, 3, 0, 2, 4)  # (h_tiles, w_tiles, C, S, S)
    return torch.from_numpy(np.ascontiguousarray(x.reshape(h_tiles * w_tiles, c, th, tw)))
