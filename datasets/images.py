"""Images as media of the media-text source (`mm.datasets.media`): safe decoding and the image sample.

Decoding (`decode_image`) opens the header first and rejects images with 0 pixels or more than `max_pixels`
(default 64 megapixels) before decoding any pixel data, so a decompression bomb costs nothing; EXIF orientation
is applied, as transformers' `load_image` does. Colour-mode conversion is the transform's job (`TileTransform`).

`image_decoder(transform)` is the `MediaDecoder` of image-text pairs: JSONL manifests with an `image` field and
WebDataset shards with a `.jpg`, `.jpeg` or `.png` member per sample. An image that cannot be used (missing,
zero-byte, zero-size, corrupt or truncated, too many pixels, a colour mode PIL cannot convert) is skipped and
counted under the readers' policy (`mm.datasets.skips`).
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .media import MediaDecoder
from .skips import BadSample, read_media_file
from .tiling import TiledImage

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "decode_image", "image_decoder", "image_sample"]

DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png")


# What PIL raises for bytes it cannot use (UnidentifiedImageError is an OSError; plugins raise SyntaxError for a
# broken header or chunk, struct.error / EOFError for data that ends early, zlib.error for a corrupt stream).
# Anything else (TypeError, AttributeError, ...) is a bug and propagates.
_PIL_DATA_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
)
# PIL's EXIF parser on a malformed EXIF block (tag tables indexed with bad offsets, rationals with 0 denominators).
_EXIF_ERRORS: tuple[type[Exception], ...] = (
    *_PIL_DATA_ERRORS,
    KeyError,
    IndexError,
    TypeError,
    ZeroDivisionError,
)
# What PIL raises when a decoded image cannot be converted (e.g. `convert("RGB")` of a mode it has no conversion
# for: ValueError) or a lazily read part of the file fails (OSError) inside the transform.
_PIL_CONVERT_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes safely (size checked from the header first); raise BadSample if unusable."""
    if len(data) == 0:
        raise BadSample("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS)
        raise BadSample("too_large", str(e)) from None
    except _PIL_DATA_ERRORS as e:  # UnidentifiedImageError, or a plugin's error parsing a broken header
        raise BadSample("corrupt", f"{type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height == 0:
        raise BadSample("empty", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise BadSample("too_large", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    try:
        image.load()
    except Image.DecompressionBombError as e:  # a plugin that learns the true size only while loading
        raise BadSample("too_large", str(e)) from None
    except _PIL_DATA_ERRORS as e:  # truncated or corrupt pixel data
        raise BadSample("corrupt", f"{type(e).__name__}: {e}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except _EXIF_ERRORS:  # a broken EXIF block (PIL's parser only; no code of ours runs here): keep the image
        pass
    return image


def _make_sample(image: Image.Image, transform: Callable[[Image.Image], Any] | None) -> dict[str, Any]:
    """The image part of a sample: a TiledImage's fields, or the transform's output under `image`.

    Only PIL's errors for an image it cannot convert count as a bad sample ("transform"); any other error of the
    transform (TypeError, AttributeError, ...) is a bug and propagates."""
    if transform is None:
        return {"image": image}
    try:
        out = transform(image)
    except _PIL_CONVERT_ERRORS as e:  # e.g. a colour mode PIL cannot convert to RGB
        raise BadSample("transform", f"{type(e).__name__}: {e}") from None
    if isinstance(out, TiledImage):
        return {"tiles": out.tiles, "aspect_ratio_id": out.aspect_ratio_id, "aspect_ratio": out.aspect_ratio}
    return {"image": out}


def image_sample(
    media: str | os.PathLike[str] | bytes,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """The image fields of a sample from a file path or the file's bytes; raise BadSample if unusable."""
    data = media if isinstance(media, bytes) else read_media_file(Path(media))
    return _make_sample(decode_image(data, max_pixels), transform)


def image_decoder(
    transform: Callable[[Image.Image], Any] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> MediaDecoder:
    """The media-text source's decoder of images: `tiles`, `aspect_ratio_id`, `aspect_ratio` with a
    `TileTransform`, else the decoded PIL image (`transform=None`) or the transform's output under `image`."""
    decode = functools.partial(image_sample, transform=transform, max_pixels=max_pixels)
    return MediaDecoder("image", IMAGE_EXTENSIONS, decode, "mm.images.order", transform=transform)
