"""Embed -> search -> a `Verdict` per image. The one object serving code calls.

`Guard` refuses an embedder whose spec differs from the blocklist's (vectors of two models must never be compared)
and keeps its blocklist and index in one immutable snapshot, so concurrent `check` calls need no lock.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .blocklist import Blocklist, _check_threshold
from .embedders import Embedder, spec_differences
from .errors import EmbedderMismatchError, UsageError
from .images import ImageInput
from .index import BlocklistIndex

NO_MATCH_SCORE = -1.0
"""`Verdict.score` when the blocklist is empty: the lowest possible cosine."""


@dataclass(frozen=True)
class Verdict:
    """The guard's decision for one image.

    Attributes:
        matched: whether the best cosine similarity reached the threshold.
        score: the best cosine similarity against the blocklist (`NO_MATCH_SCORE` when it is empty).
        entry_id: id of the nearest entry, or None when the blocklist is empty.
        entry: that entry's record (id, caption, source, sha256, duplicates, ...), or None.
    """

    matched: bool
    score: float
    entry_id: str | None
    entry: dict | None

    def to_dict(self) -> dict:
        return {"matched": self.matched, "score": self.score, "entry_id": self.entry_id, "entry": self.entry}


class _Snapshot(NamedTuple):
    blocklist: Blocklist
    index: BlocklistIndex
    threshold: float


class Guard:
    """Checks images against a blocklist.

    Args:
        blocklist (`Blocklist` or path):
            The blocklist, or a path to its `.safetensors` file.
        embedder (`Embedder`):
            Must have the same spec as the embedder that built the blocklist.
        threshold (`float`, *optional*):
            Overrides the blocklist's own threshold.

    Raises:
        EmbedderMismatchError: the embedder's spec differs from the blocklist's.
    """

    def __init__(
        self,
        blocklist: Blocklist | str | os.PathLike,
        embedder: Embedder,
        threshold: float | None = None,
    ) -> None:
        if not isinstance(blocklist, Blocklist):
            blocklist = Blocklist.load(blocklist)
        if not isinstance(embedder, Embedder):
            raise UsageError(f"embedder must provide spec, dim and embed(); got {type(embedder).__name__}")
        differences = spec_differences(blocklist.spec, embedder.spec)
        if differences:
            raise EmbedderMismatchError(
                "the embedder does not match the one that built the blocklist ("
                + "; ".join(differences)
                + "). Use the blocklist's model and weights, or rebuild the blocklist with this embedder"
            )
        self.embedder = embedder
        self._snapshot = _Snapshot(
            blocklist,
            BlocklistIndex.from_blocklist(blocklist),
            blocklist.threshold if threshold is None else _check_threshold(threshold),
        )

    @property
    def blocklist(self) -> Blocklist:
        return self._snapshot.blocklist

    @property
    def threshold(self) -> float:
        return self._snapshot.threshold

    def __repr__(self) -> str:
        return f"Guard({self.blocklist!r}, {self.embedder!r}, threshold={self.threshold})"

    def check(self, images: ImageInput | Sequence[ImageInput]) -> list[Verdict]:
        """One `Verdict` per image, in order.

        Accepts PIL images, numpy arrays (HWC/NHWC, uint8 or float in [0, 1]), torch tensors (CHW/NCHW in [0, 1])
        and image file paths. Raises `ImageDecodeError` for an empty batch or an invalid image.
        """
        return self.check_embeddings(self.embedder.embed(images))

    def check_embeddings(self, vectors: np.ndarray) -> list[Verdict]:
        """Verdicts for vectors already made by this guard's embedder (unit-norm float32 `(n, dim)`)."""
        snapshot = self._snapshot  # read once: the verdicts all come from one blocklist
        scores, ids = snapshot.index.search(vectors, k=1)
        verdicts = []
        for score, row in zip(scores[:, 0].tolist(), ids[:, 0].tolist()):
            if row < 0:
                verdicts.append(Verdict(False, NO_MATCH_SCORE, None, None))
                continue
            entry = snapshot.blocklist.entries[row]
            verdicts.append(Verdict(bool(score >= snapshot.threshold), float(score), entry["id"], entry))
        return verdicts
