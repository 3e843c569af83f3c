"""What both demo models share: the demo's embedder, per-slot seeds, Carlini's near-copy measure and the grid.

The near-copy measure is the one Carlini et al. 2023 used to count extracted training images ("Extracting Training
Data from Diffusion Models"): an image is a near-copy of another when no tile of a 4x4 grid differs by more than 0.15
RMSE on [0, 1] pixels. It is independent of the guard's embedder, which is why the demos count copies with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embedders import BUNDLED_CONFIGS
from .errors import UsageError


@dataclass(frozen=True)
class DemoRun:
    """One `guardrail demo` run's validated options, as `run_demo` hands them to the model's own runner."""

    out: Path
    samples: int
    model: str | None
    pretrained: str | os.PathLike | None
    seed: int
    steps: int
    threshold: float | None
    verbose: bool
    started: float  # perf_counter() when the run began, for the report's total time

DEMO_EMBEDDER_MODEL = "guardrail-tiny-vit"


DEMO_EMBEDDER_WEIGHTS = BUNDLED_CONFIGS / "guardrail-tiny-vit-seed0.safetensors"


NEAR_COPY_DISTANCE = 0.15
"""Carlini et al.'s threshold on the tiled distance: at or below it, an image is a near-copy."""


TILE_GRID = 4


_UPSCALE = 3


def demo_embedder(model: str | None = None, pretrained: str | os.PathLike | None = None):  # -> OpenCLIPEmbedder
    """The demo's embedder: the bundled tiny open_clip model by default, or `model` with `pretrained`."""
    from .embedders import OpenCLIPEmbedder

    if model is None:
        return OpenCLIPEmbedder(DEMO_EMBEDDER_MODEL, pretrained=DEMO_EMBEDDER_WEIGHTS, batch_size=64)
    return OpenCLIPEmbedder(model, pretrained=pretrained)


def tiled_distance(image: Any, photos: Any, grid: int = TILE_GRID) -> float | np.ndarray:
    """Carlini et al.'s tiled distance: the largest per-tile RMSE over a `grid` x `grid` tiling, on [0, 1] pixels.

    Args:
        image (`np.ndarray` or `PIL.Image.Image`):
            One HWC image: float in [0, 1], or uint8 / PIL (divided by 255).
        photos (`np.ndarray`, `PIL.Image.Image` or a list of them):
            One image of the same shape, or a batch `(M, H, W, C)` of them.
        grid (`int`, *optional*, defaults to 4):
            Tiles per side.

    Returns:
        A float for one photo, or an `(M,)` array for a batch. `<= 0.15` means near-copy.

    Example:
        >>> tiled_distance(photo, photo)
        0.0
    """
    a = as_unit_float(image)
    b = as_unit_float(photos)
    single = b.ndim == a.ndim
    if single:
        b = b[None]
    if a.ndim != 3 or b.shape[1:] != a.shape:
        raise UsageError(f"tiled_distance needs HWC images of one shape; got {a.shape} and {b.shape[1:]}")
    height, width = a.shape[:2]
    if height < grid or width < grid:
        raise UsageError(f"images of {height}x{width} pixels cannot be cut into a {grid}x{grid} grid")
    edges_y = np.linspace(0, height, grid + 1).astype(int)
    edges_x = np.linspace(0, width, grid + 1).astype(int)
    squared = (b - a[None]) ** 2
    worst = np.zeros(len(b), dtype=np.float64)
    for y0, y1 in zip(edges_y[:-1], edges_y[1:]):
        for x0, x1 in zip(edges_x[:-1], edges_x[1:]):
            worst = np.maximum(worst, np.sqrt(squared[:, y0:y1, x0:x1].mean(axis=(1, 2, 3))))
    return float(worst[0]) if single else worst


def as_unit_float(images: Any) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        return np.stack([as_unit_float(image) for image in images])
    array = np.asarray(images)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def slot_seeds(samples: int, seed: int) -> list[int]:
    """One generator seed per slot, derived from `seed`."""
    return [int(value) for value in np.random.SeedSequence(seed).generate_state(samples, dtype=np.uint64) >> 1]


def per_slot_generators(seeds: Sequence[int]) -> list[Any]:  # -> list[torch.Generator]
    """One CPU generator per slot: a slot's image then depends on its seed alone, not on the batch around it."""
    import torch

    return [torch.Generator().manual_seed(seed) for seed in seeds]


def write_grid(
    path: Path,
    unguarded: np.ndarray,
    guarded: np.ndarray,
    slots: list[dict],
    blocklisted: list[tuple[str, Any]],
) -> Path:
    """Blocklisted photos on top; unguarded and guarded samples side by side below, marked by a coloured border.

    Red: a near-copy of a blocklisted photo (unguarded) or a slot returned black (guarded); orange: resampled.
    """
    from PIL import Image, ImageDraw

    cell = 32 * _UPSCALE
    pad = 6
    columns = 8
    rows = -(-len(slots) // columns)
    panel_w = columns * (cell + pad) + pad
    header = 22
    top_rows = -(-len(blocklisted) // columns)
    top_h = header + top_rows * (cell + pad + 14) + pad
    width = 2 * panel_w + 3 * pad
    height = top_h + header + rows * (cell + pad) + pad + header
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    draw.text((pad, 4), "blocklisted training photos (the model must not return these)", fill=(0, 0, 0))
    for i, (name, image) in enumerate(blocklisted):
        x = pad + (i % columns) * (cell + pad)
        y = header + (i // columns) * (cell + pad + 14)
        canvas.paste(_upscaled(image, cell), (x, y))
        draw.text((x, y + cell + 1), name[:14], fill=(0, 0, 0))

    titles = ("unguarded (red: near-copy of a blocklisted photo)", "guarded (orange: resampled, red: black)")
    for panel, (images, title) in enumerate(zip((unguarded, guarded), titles)):
        x0 = pad + panel * (panel_w + pad)
        draw.text((x0, top_h + 4), title, fill=(0, 0, 0))
        for slot, info in enumerate(slots):
            x = x0 + pad + (slot % columns) * (cell + pad)
            y = top_h + header + (slot // columns) * (cell + pad)
            if panel == 0:
                colour = (220, 0, 0) if info["unguarded"]["near_copy_of_blocklisted"] else None
            elif info["guarded"]["blocked"]:
                colour = (220, 0, 0)
            elif info["guarded"]["resampled"]:
                colour = (255, 150, 0)
            else:
                colour = None
            if colour is not None:
                draw.rectangle((x - 3, y - 3, x + cell + 2, y + cell + 2), fill=colour)
            canvas.paste(_upscaled(images[slot], cell), (x, y))
    draw.text((pad, height - header + 4), "guardrail demo: report.json has the per-slot scores", fill=(90, 90, 90))
    path = Path(path)
    canvas.save(path)
    return path


def _upscaled(image: Any, size: int):
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    return image.convert("RGB").resize((size, size), Image.NEAREST)
