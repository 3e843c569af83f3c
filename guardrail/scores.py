"""Summaries of cosine match scores, shared by calibration and the demo report.

It lives on its own so that reporting modules can share it without importing each other (the demo used to import
the whole calibration module for these four lines).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def score_summary(scores: Sequence[float] | np.ndarray) -> dict[str, float] | None:
    """`{min, median, max}` of cosine scores, or None when there are none (an empty group has no range to report)."""
    if len(scores) == 0:
        return None
    return {"min": float(np.min(scores)), "median": float(np.median(scores)), "max": float(np.max(scores))}
