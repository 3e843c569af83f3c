"""`Verdict`: what the guard decided for one image, with the scores and the entry behind the decision."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

NO_MATCH_SCORE = -1.0
"""`Verdict.score` when no (enabled) entry exists: the lowest possible cosine."""


@dataclass(frozen=True)
class Verdict:
    """The guard's decision for one image.

    Attributes:
        matched: whether the deciding stage's cosine reached its threshold.
        score: the deciding stage's whole-image cosine to `entry` (`NO_MATCH_SCORE` when no enabled entry exists).
        entry_id: id of the entry that matched, else of the nearest enabled entry; or None.
        entry: that entry's record (id, caption, source, sha256, duplicates, ...), or None.
        stage: which stage decided: `"main"` (the blocklist's main vectors alone), `"recall"` (a two-stage guard
            whose first stage proposed no entry, so the descriptor did not run) or `"descriptor"`.
        scores: every stage's best cosine: `{"main": ..., "descriptor": ...}`, plus `"main_tile"` and
            `"descriptor_tile"` for the best tile pair when tiles are matched. A stage that did not run is absent.
        tile: the tile pair that matched (e.g. `"image centre ~ entry"`) when a tile pair, not the whole image,
            decided the match; else None.
    """

    matched: bool
    score: float
    entry_id: str | None
    entry: dict | None
    stage: str = "main"
    scores: dict = field(default_factory=dict)
    tile: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
