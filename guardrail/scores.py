"""Cosine scores and unit vectors: the checks every embedding set and threshold goes through, and summaries.

It lives on its own so that modules can share it without importing each other: the blocklist and its extra
embedding sets check vectors and thresholds alike, and calibration and the demo report summarize scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import BlocklistError, UsageError

UNIT_NORM_TOLERANCE = 1e-2  # float16 storage rounds norms to about 1e-3


def score_summary(scores: Sequence[float] | np.ndarray) -> dict[str, float] | None:
    """`{min, median, max}` of cosine scores, or None when there are none (an empty group has no range to report)."""
    if len(scores) == 0:
        return None
    return {"min": float(np.min(scores)), "median": float(np.median(scores)), "max": float(np.max(scores))}


def check_unit_vectors(embeddings: np.ndarray) -> None:
    if not np.isfinite(embeddings).all():
        raise BlocklistError("embeddings contain NaN or infinite values")
    if len(embeddings):
        norms = np.linalg.norm(embeddings, axis=1)
        worst = int(np.argmax(np.abs(norms - 1.0)))
        if abs(norms[worst] - 1.0) > UNIT_NORM_TOLERANCE:
            raise BlocklistError(f"embedding {worst} has L2 norm {norms[worst]:.4f}; every vector must be unit-norm")


def check_threshold(threshold: float) -> float:
    """`threshold` as a float in [-1, 1], or a UsageError."""
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as error:
        raise UsageError(f"threshold must be a number, got {threshold!r}") from error
    if not math.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    return threshold
