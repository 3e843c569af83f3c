"""Crops of a fixed grid, and the best cosine over the crop pairs that reveal a partial copy.

A whole-image vector scores a partial copy low: an entry pasted into part of another image, a crop of an entry, or
a "template verbatim" (Webster et al.: the layout of a training image with some regions different; 215 of the 219
memorized SD 2 prompts they found). Tiles compare parts: every image is cut into the crops of `TILE_GRID`, and a
tile pair scores as the cosine of its two vectors. Three kinds of pair count, each for one kind of partial copy:

- a tile of the checked image against a whole entry: the entry pasted into part of the image;
- the whole checked image against a tile of an entry: the image is a crop of the entry;
- a tile against the entry's tile at the same place: the same layout with other regions changed.

Tile pairs of unrelated images score higher than whole images do (two patches of sky look alike), so they are
matched at their own threshold (`tile_threshold`, set by `guardrail calibrate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .embedding_sets import TILE_BOXES, TILE_GRID


def tile_crops(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The crops of `TILE_GRID` of every image, image by image (`len(images) * len(TILE_GRID)` crops)."""
    crops = []
    for image in images:
        width, height = image.size
        for name in TILE_GRID:
            left, top, right, bottom = TILE_BOXES[name]
            box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
            crops.append(image.crop((box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1))))
    return crops


def tile_scores(
    query: np.ndarray, query_tiles: np.ndarray, entries: np.ndarray, entry_tiles: np.ndarray | None
) -> tuple[np.ndarray, list[str]]:
    """The best tile-pair cosine of one image against each of some entries, and which pair gave it.

    Args:
        query: `(dim,)` the whole image's vector.
        query_tiles: `(T, dim)` its tiles' vectors, in `TILE_GRID` order.
        entries: `(c, dim)` the entries' whole vectors.
        entry_tiles: `(c, T, dim)` the entries' tiles' vectors, or None (then only image tiles against whole
            entries are compared).

    Returns:
        `(c,)` scores, and for each a label such as `"image centre ~ entry"` or `"image top-left ~ entry top-left"`.
    """
    tiles_vs_entries = entries @ query_tiles.T  # (c, T): a tile of the image against whole entries
    candidates = [tiles_vs_entries]
    labels = [f"image {name} ~ entry" for name in TILE_GRID]
    if entry_tiles is not None:
        candidates.append(entry_tiles @ query)  # (c, T): the whole image against the entries' tiles
        candidates.append(np.einsum("ctd,td->ct", entry_tiles, query_tiles))  # the same tile of both
        labels += [f"image ~ entry {name}" for name in TILE_GRID] + [f"image {name} ~ entry {name}" for name in TILE_GRID]
    pairs = np.concatenate(candidates, axis=1)
    best = np.argmax(pairs, axis=1)
    return pairs[np.arange(len(pairs)), best].astype(np.float64), [labels[i] for i in best]


def embed_with_tiles(embedder, images: Sequence[Image.Image], tiles: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """`(n, dim)` whole-image vectors and, with `tiles`, `(n, T, dim)` tile vectors, in one embedding call."""
    crops = tile_crops(images) if tiles else []
    vectors = embedder.embed(list(images) + crops)
    whole = vectors[: len(images)]
    return whole, (vectors[len(images):].reshape(len(images), len(TILE_GRID), -1) if tiles else None)
