"""What a blocklist may hold beside its main vectors: a copy-detection descriptor set, and the vectors of tiles.

CLIP finds semantically close images; a copy-detection descriptor (SSCD) tells a copy from a look-alike. A
blocklist can therefore hold a second embedding of the same entries, with its own embedder spec and threshold, and
`Guard` runs the two as a cascade: CLIP proposes, the descriptor decides. Tiles are the vectors of a fixed grid of
crops of each entry (`TILE_GRID`): they catch partial copies and "template verbatims" (the same layout, some regions
different), which score low as whole images.

Everything here is stored as extra tensors and metadata in the blocklist's one safetensors file, so its checksum
covers them. A file without them is a plain single-set blocklist, as before:

| tensor | shape | metadata |
|---|---|---|
| `embeddings.descriptor` | `(N, d)` | `descriptor_spec`, `descriptor_threshold`, `recall_threshold` |
| `tiles` | `(N, T, dim)` | `tile_grid`, `tile_threshold` |
| `tiles.descriptor` | `(N, T, d)` | `tile_grid`, `descriptor_tile_threshold` |
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import BlocklistError
from .scores import check_threshold, check_unit_vectors

TILE_GRID = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
"""The crops a tile grid takes of every image, beside the whole image: the four quarters and the centre half."""

TILE_BOXES = {
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "centre": (0.25, 0.25, 0.75, 0.75),
}
"""Each tile as (left, top, right, bottom) fractions of the image."""

DEFAULT_DESCRIPTOR_THRESHOLD = 0.75
"""Descriptor cosine at or above which an image is a copy: the value SSCD's authors suggest; calibrate yours."""

DESCRIPTOR = "descriptor"
EXTRA_TENSORS = ("embeddings.descriptor", "tiles", "tiles.descriptor")
_FLOAT_METADATA = ("descriptor_threshold", "recall_threshold", "tile_threshold", "descriptor_tile_threshold")


@dataclass
class EmbeddingSet:
    """One embedding of every entry of a blocklist, and how to match against it.

    Attributes:
        embeddings: `(N, dim)` unit-norm vectors, one per entry, in the blocklist's row order.
        spec: the spec of the embedder that made them (`Embedder.spec`).
        threshold: cosine at or above which a whole image matches an entry.
        tiles: `(N, len(TILE_GRID), dim)` unit-norm vectors of each entry's tiles, or None.
        tile_threshold: cosine at or above which a tile pair matches (see `guardrail.tiles.tile_scores`); None
            when tiles are not matched with this set.
    """

    embeddings: np.ndarray
    spec: dict
    threshold: float
    tiles: np.ndarray | None = None
    tile_threshold: float | None = None

    @property
    def dim(self) -> int:
        return int(self.spec["dim"])


def check_embedding_set(name: str, embedding_set: EmbeddingSet, count: int) -> None:
    """Shapes and unit norms of one set against the blocklist's `count` entries, or a `BlocklistError` naming `name`."""
    if not isinstance(embedding_set.spec, dict) or "dim" not in embedding_set.spec:
        raise BlocklistError(f"the {name} set's spec must be its embedder's spec dict (with 'dim')")
    shape = np.shape(embedding_set.embeddings)
    if shape != (count, embedding_set.dim):
        raise BlocklistError(f"the {name} set holds vectors of shape {shape}; expected ({count}, {embedding_set.dim})")
    check_unit_vectors(np.asarray(embedding_set.embeddings, np.float32))
    check_threshold(embedding_set.threshold)
    if embedding_set.tiles is not None:
        check_tiles(f"the {name} set's tiles", embedding_set.tiles, count, embedding_set.dim)
    if embedding_set.tile_threshold is not None:
        check_threshold(embedding_set.tile_threshold)


def check_tiles(name: str, tiles: np.ndarray, count: int, dim: int) -> None:
    """One unit vector per entry and tile of `TILE_GRID`, or a `BlocklistError` naming `name`."""
    check_tile_shape("tiles", name, np.shape(tiles), count, dim)
    check_unit_vectors(np.asarray(tiles, np.float32).reshape(-1, dim))


def extra_tensors(primary: EmbeddingSet, descriptor: EmbeddingSet | None, dtype: str) -> dict[str, np.ndarray]:
    """The extra tensors to store, in `dtype`."""
    tensors = {}
    if primary.tiles is not None:
        tensors["tiles"] = np.asarray(primary.tiles).astype(dtype)
    if descriptor is not None:
        tensors["embeddings.descriptor"] = np.asarray(descriptor.embeddings).astype(dtype)
        if descriptor.tiles is not None:
            tensors["tiles.descriptor"] = np.asarray(descriptor.tiles).astype(dtype)
    return tensors


def extra_metadata(
    primary: EmbeddingSet, descriptor: EmbeddingSet | None, recall_threshold: float | None
) -> dict[str, str]:
    """The extra metadata to store (strings, as safetensors metadata must be)."""
    values: dict[str, object] = {"tile_threshold": primary.tile_threshold}
    if descriptor is not None:
        values.update(descriptor_spec=json.dumps(descriptor.spec, sort_keys=True),
                      descriptor_threshold=descriptor.threshold,
                      descriptor_tile_threshold=descriptor.tile_threshold, recall_threshold=recall_threshold)
    if primary.tiles is not None or (descriptor is not None and descriptor.tiles is not None):
        values["tile_grid"] = json.dumps(list(TILE_GRID))
    return {key: value if isinstance(value, str) else repr(float(value))
            for key, value in values.items() if value is not None}


def check_extra_layout(where: str, shapes: dict[str, tuple], metadata: dict[str, str], count: int) -> dict:
    """The extras a file declares, checked against its tensor shapes: `{descriptor_spec, thresholds...}` parsed.

    Raises `BlocklistError` when a tensor comes without its metadata (or the reverse), a shape does not fit the
    entry count or the spec's dim, or the file's tile grid is not this guardrail's.
    """
    try:
        parsed = {key: float(metadata[key]) for key in _FLOAT_METADATA if key in metadata}
        for key, value in parsed.items():
            check_threshold(value)
        descriptor_spec = json.loads(metadata["descriptor_spec"]) if "descriptor_spec" in metadata else None
        tile_grid = json.loads(metadata["tile_grid"]) if "tile_grid" in metadata else None
    except (ValueError, RecursionError) as error:
        raise BlocklistError(f"{where} has unreadable descriptor or tile metadata: {error}") from error
    has_descriptor = "embeddings.descriptor" in shapes
    if has_descriptor != (descriptor_spec is not None) or has_descriptor != ("descriptor_threshold" in parsed):
        raise BlocklistError(
            f"{where}: the 'embeddings.descriptor' tensor and its 'descriptor_spec' and 'descriptor_threshold' "
            "metadata come together"
        )
    if "tiles.descriptor" in shapes and not has_descriptor:
        raise BlocklistError(f"{where}: 'tiles.descriptor' without an 'embeddings.descriptor' set")
    has_tiles = "tiles" in shapes or "tiles.descriptor" in shapes
    if has_tiles and tile_grid != list(TILE_GRID):
        raise BlocklistError(
            f"{where}: its tile grid {tile_grid} is not this guardrail's {list(TILE_GRID)}; rebuild the tiles "
            "with this version"
        )
    if descriptor_spec is not None:
        if not isinstance(descriptor_spec, dict) or not isinstance(descriptor_spec.get("dim"), int):
            raise BlocklistError(f"{where}: descriptor_spec must be a JSON object with an integer 'dim'")
        if shapes["embeddings.descriptor"] != (count, descriptor_spec["dim"]):
            raise BlocklistError(
                f"{where}: embeddings.descriptor has shape {shapes['embeddings.descriptor']}; its spec and the "
                f"entry count say ({count}, {descriptor_spec['dim']})"
            )
    return {"descriptor_spec": descriptor_spec, **parsed}


def check_tile_shape(where: str, name: str, shape: tuple, count: int, dim: int) -> None:
    """One vector per entry and tile of `TILE_GRID`, or a `BlocklistError` naming `where` and `name`."""
    if shape != (count, len(TILE_GRID), dim):
        raise BlocklistError(f"{where}: {name} has shape {shape}; expected ({count}, {len(TILE_GRID)}, {dim}): one "
                             f"vector per entry and tile of {TILE_GRID}")
