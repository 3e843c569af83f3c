"""Matching in two stages, and over tiles: the main (CLIP) vectors propose entries, a copy descriptor decides.

CLIP finds images that look alike; a copy-detection descriptor (SSCD) tells a copy from a look-alike, but costs a
second forward pass. So the descriptor runs only on images whose main vectors come near an entry: the main index
proposes its `recall_k` nearest entries, those at or above the blocklist's `recall_threshold` go to the
descriptor, and the descriptor's cosine to those entries decides, at the descriptor set's threshold. An image no
entry comes near is cleared by the first stage alone, which is what keeps the cascade cheap when nothing matches.

With tiles, every image is also cut into the crops of `TILE_GRID` (see `guardrail.tiles`): each crop searches the
index too, so an entry pasted into part of an image is proposed, and tile pairs match at the tile threshold.

`Guard.check` calls `staged_verdicts` when a descriptor or tiles are in use; plain whole-image matching stays on
`Guard.check_embeddings`, one index search and no more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .embedders import Embedder
from .embedding_sets import EmbeddingSet
from .errors import UsageError
from .tiles import embed_with_tiles, tile_scores
from .verdict import NO_MATCH_SCORE, Verdict

DEFAULT_RECALL_K = 8
"""Nearest entries the main index proposes per image (and per tile) to the second stage."""


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force for one blocklist (its own, or a guard's overrides)."""

    main: float
    main_tile: float | None = None
    recall: float | None = None
    descriptor: float | None = None
    descriptor_tile: float | None = None


@dataclass
class _Scored:
    """One image's best whole-image and tile scores against some entries of one set."""

    rows: np.ndarray
    whole: np.ndarray
    tile: np.ndarray | None
    tile_labels: list[str] | None

    def best(self) -> np.ndarray:
        return self.whole if self.tile is None else np.maximum(self.whole, self.tile)

    def decision(self, threshold: float, tile_threshold: float | None) -> tuple[bool, int, str | None]:
        """(matched, position of the deciding entry, tile pair that decided or None): whole matches first."""
        whole_matches = self.whole >= threshold
        if whole_matches.any():
            return True, int(np.argmax(np.where(whole_matches, self.whole, -np.inf))), None
        if self.tile is not None and tile_threshold is not None and (self.tile >= tile_threshold).any():
            position = int(np.argmax(self.tile))
            return True, position, self.tile_labels[position]
        return False, int(np.argmax(self.whole)), None


def _scored(embedding_set: EmbeddingSet, rows: np.ndarray, vector: np.ndarray, tiles: np.ndarray | None) -> _Scored:
    """Exact cosines of one image (and its tiles) against the entries at `rows` of `embedding_set`."""
    entries = np.asarray(embedding_set.embeddings[rows], np.float32)
    whole = (entries @ vector).astype(np.float64)
    if tiles is None:
        return _Scored(rows, whole, None, None)
    entry_tiles = None if embedding_set.tiles is None else np.asarray(embedding_set.tiles[rows], np.float32)
    tile, labels = tile_scores(vector, tiles, entries, entry_tiles)
    return _Scored(rows, whole, tile, labels)


def staged_verdicts(snapshot, embedder: Embedder, descriptor: Embedder | None, tiles: bool, recall_k: int,
                    images: Sequence[Image.Image]) -> list:
    """One `Verdict` per image: proposals by the main index, decided by the descriptor (or, without one, by the
    main vectors with tiles). `snapshot` is the guard's (blocklist, index, thresholds, disabled rows)."""
    blocklist, thresholds = snapshot.blocklist, snapshot.thresholds
    main_vectors, main_tiles = embed_with_tiles(embedder, images, tiles)
    queries = main_vectors if main_tiles is None else np.concatenate(
        [main_vectors, main_tiles.reshape(-1, main_vectors.shape[1])])
    _, found = snapshot.index.search(queries, k=recall_k, skip=snapshot.row_filter)
    per_image = [found[i] for i in range(len(images))]
    if main_tiles is not None:  # the tiles' proposals join their image's
        tile_rows = found[len(images):].reshape(len(images), -1)
        per_image = [np.concatenate([rows, tile_rows[i]]) for i, rows in enumerate(per_image)]
    main_set = blocklist.embedding_set()
    verdicts: list = [None] * len(images)
    proposed: dict[int, tuple[_Scored, np.ndarray]] = {}  # image -> its main scores and the rows it proposes
    for i, rows in enumerate(per_image):
        rows = np.unique(rows[rows >= 0])
        rows = rows[[int(row) not in snapshot.disabled_rows for row in rows]] if snapshot.disabled_rows else rows
        if not len(rows):
            verdicts[i] = Verdict(False, NO_MATCH_SCORE, None, None, stage="main", scores={"main": NO_MATCH_SCORE})
            continue
        main = _scored(main_set, rows, main_vectors[i], None if main_tiles is None else main_tiles[i])
        if descriptor is None:
            verdicts[i] = _verdict(blocklist, main, thresholds.main, thresholds.main_tile, "main", {})
            continue
        passes = main.best() >= thresholds.recall
        if not passes.any():
            nearest = int(np.argmax(main.whole))
            entry = blocklist.entries[int(main.rows[nearest])]
            verdicts[i] = Verdict(False, float(main.whole[nearest]), entry["id"], dict(entry), stage="recall",
                                  scores=_scores(main, None))
            continue
        proposed[i] = (main, main.rows[passes])
    if proposed:
        positions = sorted(proposed)
        descriptor_vectors, descriptor_tiles = embed_with_tiles(descriptor, [images[i] for i in positions], tiles)
        for j, i in enumerate(positions):
            main, rows = proposed[i]
            decided = _scored(blocklist.descriptor, rows, descriptor_vectors[j],
                              None if descriptor_tiles is None else descriptor_tiles[j])
            verdicts[i] = _verdict(blocklist, decided, thresholds.descriptor, thresholds.descriptor_tile,
                                   "descriptor", _scores(main, None))
    return verdicts


def _verdict(blocklist, scored: _Scored, threshold: float, tile_threshold: float | None, stage: str, scores: dict):
    matched, position, tile = scored.decision(threshold, tile_threshold)
    entry = blocklist.entries[int(scored.rows[position])]
    key = "main" if stage == "main" else "descriptor"
    all_scores = {**scores, **_scores(scored, key)}
    return Verdict(matched, float(scored.whole[position]), entry["id"], dict(entry), stage=stage, scores=all_scores,
                   tile=tile)


def _scores(scored: _Scored, key: str | None) -> dict:
    """`{main: best whole cosine, main_tile: best tile cosine}` (or `descriptor`, `descriptor_tile`)."""
    key = key or "main"
    scores = {key: float(scored.whole.max())}
    if scored.tile is not None:
        scores[f"{key}_tile"] = float(scored.tile.max())
    return scores


def thresholds_in_force(blocklist, main_override: float | None, descriptor: Embedder | None, tiles: bool) -> Thresholds:
    """The blocklist's thresholds (the main one overridden by `main_override`), checked for what the guard uses."""
    main = blocklist.threshold if main_override is None else main_override
    found = Thresholds(main, blocklist.tile_threshold)
    if descriptor is not None:
        descriptor_set = blocklist.descriptor
        recall = blocklist.recall_threshold if blocklist.recall_threshold is not None else main
        found = Thresholds(main, blocklist.tile_threshold, recall, descriptor_set.threshold,
                           descriptor_set.tile_threshold)
    if tiles:
        needed = found.descriptor_tile if descriptor is not None else found.main_tile
        if needed is None:
            which = "descriptor_tile_threshold" if descriptor is not None else "tile_threshold"
            raise UsageError(
                f"tiles=True needs the blocklist's {which}: tile pairs of unrelated images score higher than whole "
                "images, so they need their own threshold. Run `guardrail calibrate --tiles` on the blocklist"
            )
    return found
