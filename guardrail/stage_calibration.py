"""Calibrate a two-stage blocklist (and tiles), and report what each stage catches alone and in the cascade.

`guardrail.calibration` picks one threshold for one set of vectors. A blocklist with a descriptor set needs three
(the main threshold, the recall threshold at which the main vectors propose entries, the descriptor threshold),
and tiles need their own (`guardrail.tiles`). Each is chosen the same way, as the smallest cosine whose
false-positive rate on the negatives meets its target, and the true-positive rate each configuration gives is
reported per transform family:

- `main`: the main (CLIP) vectors alone, as a single-stage guard matches;
- `descriptor`: the descriptor alone, against every entry (what the cascade would be with no recall stage);
- `cascade`: entries proposed by the main vectors at the recall threshold, decided by the descriptor;
- `cascade+tiles` (or `main+tiles` without a descriptor): the same with tiles, each at half the FPR budget.

The families are calibration's, plus `partial`: the entry shrunk into 50-70% of the side of another image (a
negative), at a random place, as a memorized object pasted into a new scene. The cascade's speed is measured too:
images per second through `Guard.check` for the main vectors alone and for the cascade, on the negatives (where
nothing matches, the case a serving guard spends its time on).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .blocklist import Blocklist
from .calibration import TRANSFORM_FAMILIES, _batches, _check_arguments, _decoded, _smallest_threshold
from .cascade import DEFAULT_RECALL_K
from .embedders import Embedder
from .errors import UsageError
from .images import ImageInput
from .tiles import embed_with_tiles, tile_scores

DEFAULT_RECALL_FPR = 0.2
"""Share of negatives the recall stage may propose to the descriptor: more catches more, and costs more."""
_BATCH = 16


def paste_into(image: Image.Image, background: Image.Image, rng: random.Random) -> Image.Image:
    """`image` resized to 50-70% of `background`'s side and pasted at a random place: a partial copy."""
    canvas = background.convert("RGB").resize(image.size, Image.BICUBIC)
    fraction = rng.uniform(0.5, 0.7)
    width, height = max(1, round(image.width * fraction)), max(1, round(image.height * fraction))
    left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    canvas.paste(image.resize((width, height), Image.BICUBIC), (left, top))
    return canvas


@dataclass
class StageCalibration:
    """What `calibrate_stages` measured and chose.

    Attributes:
        thresholds: the chosen `threshold` (main), and with a descriptor `recall_threshold` and
            `descriptor_threshold`; with tiles `tile_threshold` (main) or `descriptor_tile_threshold`, and the
            whole-image threshold used beside it (`tiled_threshold` or `tiled_descriptor_threshold`).
        tpr_by_family: `{configuration: {family: TPR}}` for `main`, `descriptor`, `cascade`, `cascade+tiles`
            (or `main+tiles`), whichever apply.
        tpr: `{configuration: TPR over every copy}`.
        fpr: `{configuration: FPR on the negatives}` at the chosen thresholds.
        proposed: the share of negatives the recall stage sent to the descriptor (its cost on clean images).
        images_per_second: `Guard.check` throughput on the negatives, `{"main": ..., "cascade": ...}`.
        negatives, positives, copies_per_image, target_fpr, recall_fpr: what the measurement rests on.
        skipped: inputs that could not be decoded.
    """

    thresholds: dict[str, float]
    tpr_by_family: dict[str, dict[str, float]]
    tpr: dict[str, float]
    fpr: dict[str, float]
    proposed: float | None
    images_per_second: dict[str, float]
    negatives: int
    positives: int
    copies_per_image: int
    target_fpr: float
    recall_fpr: float
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """TPR per family (rows) and configuration (columns), then TPR, FPR and speed."""
        configurations = list(self.tpr_by_family)
        families = list(next(iter(self.tpr_by_family.values())))
        rows = [f"{'family':<14}" + "".join(f"{name:>15}" for name in configurations)]
        for family in families:
            rows.append(f"{family:<14}" + "".join(f"{self.tpr_by_family[c][family]:>15.2f}" for c in configurations))
        rows.append(f"{'all copies':<14}" + "".join(f"{self.tpr[c]:>15.2f}" for c in configurations))
        rows.append(f"{'FPR':<14}" + "".join(f"{self.fpr[c]:>15.3f}" for c in configurations))
        speed = "  ".join(f"{name} {value:.1f} img/s" for name, value in self.images_per_second.items())
        if speed:
            rows.append(f"speed on negatives: {speed}")
        return "\n".join(rows)


@dataclass
class _SetScores:
    """Cosines of every image against every entry for one set: whole images, and the best tile pair."""

    whole: list[np.ndarray] = field(default_factory=list)
    tile: list[np.ndarray] = field(default_factory=list)

    def add(self, embedder: Embedder, embedding_set, images: list[Image.Image], tiles: bool) -> None:
        vectors, tile_vectors = embed_with_tiles(embedder, images, tiles)
        entries = np.asarray(embedding_set.embeddings, np.float32)
        self.whole.append(vectors @ entries.T)
        if tiles:
            entry_tiles = None if embedding_set.tiles is None else np.asarray(embedding_set.tiles, np.float32)
            self.tile.append(np.stack([tile_scores(vector, tile, entries, entry_tiles)[0]
                                       for vector, tile in zip(vectors, tile_vectors)]))

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        return np.concatenate(self.whole), (np.concatenate(self.tile) if self.tile else None)


def calibrate_stages(
    blocklist: Blocklist,
    embedder: Embedder,
    positives: Sequence[ImageInput],
    negatives: Sequence[ImageInput],
    descriptor: Embedder | None = None,
    *,
    tiles: bool = False,
    target_fpr: float = 0.01,
    recall_fpr: float = DEFAULT_RECALL_FPR,
    recall_k: int = DEFAULT_RECALL_K,
    copies_per_image: int = 3,
    seed: int = 0,
    on_error: str = "raise",
    measure_speed: bool = True,
) -> StageCalibration:
    """Choose every threshold of a two-stage (or tiled) blocklist at `target_fpr`, and report TPR per stage.

    Args:
        blocklist, embedder: the blocklist and the main embedder that built it.
        positives: source images of blocklist entries; each is transformed `copies_per_image` times by every family
            of `TRANSFORM_FAMILIES` and by `partial`.
        negatives: images that are not copies of any entry (also the backgrounds of `partial` copies).
        descriptor: the descriptor that built the blocklist's descriptor set, to calibrate the cascade.
        tiles: also calibrate the tile threshold (the blocklist's tile vectors are used when it has them).
        target_fpr: the false-positive rate each configuration may have on the negatives.
        recall_fpr: the share of negatives the recall stage may propose to the descriptor.
        recall_k: the entries proposed per image, as `Guard(recall_k=...)`.
        measure_speed: time `Guard.check` on the negatives for the main vectors alone and the cascade.

    Raises:
        UsageError: bad arguments (as `calibrate`), a descriptor for a blocklist without a descriptor set, or
            neither a descriptor nor tiles (use `calibrate`).
        EmbedderMismatchError: an embedder did not build its set.
    """
    from .guard import Guard

    _check_arguments(blocklist, positives, negatives, target_fpr, copies_per_image, on_error, "exclude")
    if not 0.0 < recall_fpr < 1.0:
        raise UsageError(f"recall_fpr must be in (0, 1), got {recall_fpr}")
    if descriptor is None and not tiles:
        raise UsageError("calibrate_stages needs a descriptor or tiles; for the main threshold alone use calibrate")
    Guard(blocklist, embedder, descriptor=descriptor)  # refuses mismatched embedders before any work
    skipped: list[str] = []
    negative_images = [image for _, image in _decoded(negatives, skipped, on_error)]
    if not negative_images:
        raise UsageError(f"no decodable negatives; skipped: {skipped}")
    copies, families = _copies(positives, negative_images, copies_per_image, seed, skipped, on_error)
    if not copies:
        raise UsageError(f"no decodable positives; skipped: {skipped}")

    main, described = _SetScores(), _SetScores()
    images = negative_images + copies
    for batch in _batches(iter(images), _BATCH):
        main.add(embedder, blocklist.embedding_set(), batch, tiles)
        if descriptor is not None:
            described.add(descriptor, blocklist.descriptor, batch, tiles)
    is_negative = np.arange(len(images)) < len(negative_images)
    decisions = _Decisions(is_negative, target_fpr)

    main_whole, main_tile = main.arrays()
    thresholds = {"threshold": decisions.add("main", main_whole.max(axis=1))}
    proposed = None
    if descriptor is None:
        tiled = decisions.add_pair("main+tiles", main_whole.max(axis=1), main_tile.max(axis=1))
        thresholds.update(tiled_threshold=tiled[0], tile_threshold=tiled[1])
    else:
        descriptor_whole, descriptor_tile = described.arrays()
        decisions.add("descriptor", descriptor_whole.max(axis=1))
        recall_scores = main_whole if main_tile is None else np.maximum(main_whole, main_tile)
        recall = _smallest_threshold(recall_scores[is_negative].max(axis=1), recall_fpr)
        ranked = np.argsort(-recall_scores, axis=1)[:, :recall_k]
        in_top_k = np.zeros_like(recall_scores, dtype=bool)
        np.put_along_axis(in_top_k, ranked, True, axis=1)
        passes = in_top_k & (recall_scores >= recall)
        proposed = float(passes[is_negative].any(axis=1).mean())
        thresholds.update(recall_threshold=recall, descriptor_threshold=decisions.add(
            "cascade", np.where(passes, descriptor_whole, -1.0).max(axis=1)))
        if tiles:
            tiled = decisions.add_pair("cascade+tiles", np.where(passes, descriptor_whole, -1.0).max(axis=1),
                                       np.where(passes, descriptor_tile, -1.0).max(axis=1))
            thresholds.update(tiled_descriptor_threshold=tiled[0], descriptor_tile_threshold=tiled[1])

    copy_families = np.array(families)
    return StageCalibration(
        thresholds=thresholds,
        tpr_by_family={name: {family: float(caught[~is_negative][copy_families == family].mean())
                              for family in dict.fromkeys(families)}
                       for name, caught in decisions.caught.items()},
        tpr={name: float(caught[~is_negative].mean()) for name, caught in decisions.caught.items()},
        fpr={name: float(caught[is_negative].mean()) for name, caught in decisions.caught.items()},
        proposed=proposed,
        images_per_second=_speeds(blocklist, embedder, descriptor, thresholds, negative_images, recall_k)
        if measure_speed else {},
        negatives=len(negative_images),
        positives=len(copies) // (copies_per_image * (len(TRANSFORM_FAMILIES) + 1)),
        copies_per_image=copies_per_image,
        target_fpr=target_fpr,
        recall_fpr=recall_fpr,
        skipped=skipped,
    )


class _Decisions:
    """Thresholds chosen on the negatives' scores, and which images each configuration then catches."""

    def __init__(self, is_negative: np.ndarray, target_fpr: float) -> None:
        self.is_negative, self.target_fpr = is_negative, target_fpr
        self.caught: dict[str, np.ndarray] = {}

    def add(self, name: str, scores: np.ndarray) -> float:
        threshold = _smallest_threshold(scores[self.is_negative], self.target_fpr)
        self.caught[name] = scores >= threshold
        return threshold

    def add_pair(self, name: str, whole: np.ndarray, tile: np.ndarray) -> tuple[float, float]:
        """Whole images and tile pairs at half the FPR budget each; caught when either reaches its threshold."""
        whole_threshold = _smallest_threshold(whole[self.is_negative], self.target_fpr / 2)
        tile_threshold = _smallest_threshold(tile[self.is_negative], self.target_fpr / 2)
        self.caught[name] = (whole >= whole_threshold) | (tile >= tile_threshold)
        return whole_threshold, tile_threshold


def _copies(positives, backgrounds, copies_per_image, seed, skipped, on_error) -> tuple[list[Image.Image], list[str]]:
    copies, families = [], []
    for index, (_, image) in enumerate(_decoded(positives, skipped, on_error)):
        for family, transform in TRANSFORM_FAMILIES.items():
            for copy in range(copies_per_image):
                copies.append(transform(image, random.Random(f"{seed}:{index}:{family}:{copy}")).convert("RGB"))
                families.append(family)
        for copy in range(copies_per_image):
            rng = random.Random(f"{seed}:{index}:partial:{copy}")
            copies.append(paste_into(image, rng.choice(backgrounds), rng))
            families.append("partial")
    return copies, families


def _speeds(blocklist, embedder, descriptor, thresholds, negatives, recall_k) -> dict[str, float]:
    """`Guard.check` images per second on the negatives: the main vectors alone, and the calibrated cascade."""
    from .guard import Guard

    guards = {"main": Guard(blocklist.with_thresholds(threshold=thresholds["threshold"]), embedder)}
    if descriptor is not None:
        calibrated = blocklist.with_thresholds(recall_threshold=thresholds["recall_threshold"],
                                               descriptor_threshold=thresholds["descriptor_threshold"])
        guards["cascade"] = Guard(calibrated, embedder, descriptor=descriptor, recall_k=recall_k)
    speeds = {}
    for name, guard in guards.items():
        guard.check(negatives[:2], record=False)  # warm up
        started = time.perf_counter()
        for batch in _batches(iter(negatives), _BATCH):
            guard.check(batch, record=False)
        speeds[name] = len(negatives) / (time.perf_counter() - started)
    return speeds
