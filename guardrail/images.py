"""Turn whatever a caller passes as "images" into validated RGB PIL images, or raise `ImageDecodeError`.

Diffusers returns PIL images, float numpy arrays (NHWC in [0, 1]) or torch tensors (NCHW in [0, 1]) depending on
`output_type`; serving code also passes uint8 arrays and image files. All of them are converted exactly the way
diffusers' own `numpy_to_pil` converts, so one image gets the same embedding whatever type it arrived as.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image

from .errors import ImageDecodeError

ImageInput = Union[Image.Image, np.ndarray, "torch.Tensor", str, os.PathLike]  # noqa: F821
"""One image (PIL, HWC array, CHW tensor, file path) or a batch (list of those, NHWC array, NCHW tensor)."""

_CHANNELS = (1, 3, 4)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def load_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """Decode an image file (or an open binary stream) fully into an RGB PIL image.

    Raises `ImageDecodeError` for unreadable paths, non-images, truncated files and decompression bombs
    (PIL's `MAX_IMAGE_PIXELS` limit). `name` is what error messages call the image (defaults to the path).
    """
    name = name or (os.fspath(path) if isinstance(path, (str, os.PathLike)) else "<stream>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file must fail here, not later
                rgb = _to_rgb(image)
                rgb.info["source_mode"] = image.mode  # builders report conversions (CMYK, 16-bit, palette)
                return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"{name!r} is a decompression bomb: {error}") from error
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as error:
        raise ImageDecodeError(f"cannot decode image {name!r}: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ImageDecodeError(f"image has zero size {image.size}")
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "La":  # premultiplied alpha; PIL converts it to nothing but "LA"
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white, as browsers show transparent images, instead of PIL's black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(array / scale * 255.0, 0, 255).round().astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:  # a mode PIL cannot convert to RGB
        raise ImageDecodeError(f"image mode {image.mode!r} cannot be converted to RGB: {error}") from error


def _array_to_pil(array: np.ndarray, where: str) -> Image.Image:
    """An HWC array (uint8 in [0, 255], or float in [0, 1]) -> RGB PIL image, the way diffusers converts."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in _CHANNELS:
        raise ImageDecodeError(
            f"{where} has shape {array.shape}; expected HWC with 1, 3 or 4 channels (or NHWC for a batch)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(f"{where} has zero size {array.shape[:2]}")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all():
            raise ImageDecodeError(f"{where} contains NaN or infinite values")
        if array.size and max(abs(float(array.min())), abs(float(array.max()))) > _FLOAT32_MAX:
            low, high = float(array.min()), float(array.max())  # the float32 cast below would overflow
            raise ImageDecodeError(
                f"{where} has values in [{low:.3g}, {high:.3g}]; expected [0, 1] floats or [0, 255] values"
            )
        values = array.astype(np.float32, copy=False)
        low, high = float(values.min()), float(values.max())
        unit_range = np.issubdtype(array.dtype, np.floating) and high <= 1.0  # diffusers' output_type="np"
        if low < 0.0 or (not unit_range and high > 255.0):
            raise ImageDecodeError(
                f"{where} has values in [{low:.3g}, {high:.3g}]; expected [0, 1] floats or [0, 255] values"
            )
        pixels = np.clip(values * 255.0 if unit_range else values, 0, 255).round().astype(np.uint8)
    else:
        raise ImageDecodeError(f"{where} has dtype {array.dtype}; expected uint8 or float")
    channels = pixels.shape[-1]
    if channels == 1:
        return Image.fromarray(pixels[:, :, 0]).convert("RGB")
    return _to_rgb(Image.fromarray(pixels))  # PIL infers RGB or RGBA from the channel count


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_pil_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """Normalize a single image or a batch into a non-empty list of RGB PIL images.

    Raises:
        ImageDecodeError: the batch is empty, or an item is corrupt, NaN, out of range, or of an unknown type.
    """
    if _is_tensor(images):
        array = images.detach().float().cpu().numpy()
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1] not in _CHANNELS:
            raise ImageDecodeError(
                f"images tensor has shape {tuple(images.shape)}; expected NCHW (or CHW) with values in [0, 1]"
            )
        items: Sequence[Any] = list(array.transpose(0, 2, 3, 1))
    elif isinstance(images, np.ndarray):
        items = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, (Image.Image, str, os.PathLike)):
        items = [images]
    elif isinstance(images, Sequence):
        items = images
    else:
        raise ImageDecodeError(
            f"images has type {type(images).__name__}; pass PIL images, numpy arrays, torch tensors or file paths"
        )
    if len(items) == 0:
        raise ImageDecodeError("images is empty; pass at least one image")
    return [_one_to_pil(item, f"images[{i}]") for i, item in enumerate(items)]


def _one_to_pil(item: Any, where: str) -> Image.Image:
    if isinstance(item, Image.Image):
        try:
            item.load()
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for broken PNG chunks
            raise ImageDecodeError(f"{where} cannot be decoded: {error}") from error
        return _to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if _is_tensor(item):
        array = item.detach().float().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in _CHANNELS:
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        return _array_to_pil(array, where)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, where)
    raise ImageDecodeError(
        f"{where} has type {type(item).__name__}; pass PIL images, numpy arrays, torch tensors or file paths"
    )
