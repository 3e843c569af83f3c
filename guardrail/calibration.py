"""Pick a blocklist threshold from measured copies and non-copies, and say honestly what it catches.

Copies are made by transforming the blocklist's own source images (resize, crop, JPEG, colour, blur, noise, flip,
rotation, and pairs of those); non-copies are images the caller knows are not in the blocklist. The threshold is the
smallest cosine whose false-positive rate on the non-copies is at most the target, and the true-positive rate it
gives is reported per transform family, so a family the embedder cannot see through shows up as a low number
instead of hiding in an average.

Negatives that score at or above the median transformed copy are flagged as suspect: by the embedder's own measure
they are closer to an entry than half of the real copies are, so they are most likely copies that slipped into the
negatives (memorized images are the heavily duplicated ones, so a scraped negatives folder often holds some). Left
in, a single one at cosine 0.9999 would lift the threshold above almost every copy. By default they are left out
of the threshold and reported; `on_suspect` chooses otherwise.

The `guardrail calibrate` verb lives in `guardrail.cli`; this module never parses arguments.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from .blocklist import Blocklist
from .embedders import Embedder
from .errors import ImageDecodeError, UsageError
from .images import ImageInput, to_pil_images
from .scores import score_summary

Transform = Callable[[Image.Image, random.Random], Image.Image]

DEFAULT_COPIES_PER_IMAGE = 3
SUSPECT_ACTIONS = ("exclude", "keep", "raise")
_BATCH = 32


def _resize(image: Image.Image, rng: random.Random) -> Image.Image:
    scale = rng.uniform(0.5, 0.9)
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return small.resize(image.size, Image.BICUBIC)


def _crop(image: Image.Image, rng: random.Random) -> Image.Image:
    keep = rng.uniform(0.80, 0.95)
    width, height = max(1, round(image.width * keep)), max(1, round(image.height * keep))
    left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    return image.crop((left, top, left + width, top + height))


def _jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=rng.randint(30, 90))
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _color_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.7, 1.3))
    return image


def _blur(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0)))


def _noise(image: Image.Image, rng: random.Random) -> Image.Image:
    sigma = rng.uniform(5.0, 20.0)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).round().astype(np.uint8))


def _hflip(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _rotate(image: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.uniform(5.0, 10.0) * rng.choice((-1, 1))
    return image.rotate(angle, resample=Image.BICUBIC, fillcolor=(0, 0, 0))


_SINGLE: dict[str, Transform] = {
    "resize": _resize,
    "crop": _crop,
    "jpeg": _jpeg,
    "color_jitter": _color_jitter,
    "blur": _blur,
    "noise": _noise,
    "hflip": _hflip,
    "rotate": _rotate,
}


def _pair(image: Image.Image, rng: random.Random) -> Image.Image:
    first, second = rng.sample(sorted(_SINGLE), 2)
    return _SINGLE[second](_SINGLE[first](image, rng), rng)


TRANSFORM_FAMILIES: dict[str, Transform] = {**_SINGLE, "pair": _pair}
"""Name -> `transform(rgb_image, rng) -> rgb_image`: the edits a near-copy of a training image may have.

`resize` (0.5-0.9x and back), `crop` (80-95% at a random position), `jpeg` (quality 30-90), `color_jitter`
(brightness, contrast, saturation 0.7-1.3x), `blur` (gaussian, radius 0.5-2), `noise` (gaussian, sigma 5-20),
`hflip`, `rotate` (5-10 degrees either way), and `pair` (two different ones of these, chained).
"""


@dataclass
class CalibrationResult:
    """What `calibrate` measured and chose.

    Attributes:
        threshold: the smallest cosine whose false-positive rate on the counted negatives is at most `target_fpr`.
        fpr: the false-positive rate on the counted negatives at `threshold`.
        tpr: the share of transformed copies of the positives scoring at or above `threshold`.
        tpr_by_family: that share for each transform family.
        negatives: how many negatives set the threshold (the decoded ones, less suspects left out).
        positives: how many positive (blocklisted) images were transformed.
        target_fpr: the false-positive rate asked for.
        fpr_resolution: `1 / negatives`, the smallest FPR step the negatives can measure. A target below it is
            met only by the threshold lying above every negative, which says nothing about the true FPR.
        copies_per_image: transformed copies per positive and family.
        scores: `{"negatives": {min, median, max}, "positives": {family: {min, median, max}}}` (cosines, every
            decoded negative included).
        suspect_negatives: negatives scoring at or above the median transformed copy, highest first, each
            `{"negative": path or "#index", "score": cosine, "entry_id": nearest entry}`: probably copies of that
            entry. `on_suspect` said whether they counted.
        suspects_counted: whether the suspects counted toward the threshold (`on_suspect="keep"`).
        skipped: inputs that could not be decoded, with the reason (`on_error="skip"`).
        notes: caveats, in words.
    """

    threshold: float
    fpr: float
    tpr: float
    tpr_by_family: dict[str, float]
    negatives: int
    positives: int
    target_fpr: float
    fpr_resolution: float
    copies_per_image: int
    scores: dict = field(default_factory=dict)
    suspect_negatives: list[dict] = field(default_factory=list)
    suspects_counted: bool = False
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The TPR per transform family, with score quantiles, as a plain-text table."""
        rows = [f"{'family':<14} {'TPR':>6}  {'min':>7} {'median':>7} {'max':>7}"]
        positive_scores = self.scores.get("positives", {})
        for family, tpr in self.tpr_by_family.items():
            stats = positive_scores.get(family) or {}
            rows.append(f"{family:<14} {tpr:>6.2f}  " + " ".join(f"{stats.get(k, math.nan):>7.4f}" for k in _STATS))
        rows.append(f"{'all copies':<14} {self.tpr:>6.2f}")
        negative = self.scores.get("negatives") or {}
        quantiles = " ".join(f"{negative.get(k, math.nan):>7.4f}" for k in _STATS)
        rows.append(f"{'negatives':<14} {self.fpr:>6.3f}  {quantiles}   (FPR)")
        return "\n".join(rows)


_STATS = ("min", "median", "max")


def calibrate(
    blocklist: Blocklist,
    embedder: Embedder,
    positives: Sequence[ImageInput],
    negatives: Sequence[ImageInput],
    target_fpr: float = 0.01,
    copies_per_image: int = DEFAULT_COPIES_PER_IMAGE,
    *,
    seed: int = 0,
    on_error: str = "raise",
    on_suspect: str = "exclude",
) -> CalibrationResult:
    """Choose the threshold of `blocklist` that keeps false positives on `negatives` at or below `target_fpr`.

    Args:
        blocklist (`Blocklist`):
            The blocklist to calibrate; its own threshold is ignored.
        embedder (`Embedder`):
            The embedder that built the blocklist (same spec).
        positives (`list` of PIL images or paths):
            Source images of blocklist entries (all of them or a subset). Each is transformed
            `copies_per_image` times by every family of `TRANSFORM_FAMILIES`; a copy counts as caught when its best
            cosine to any entry reaches the threshold, as `Guard.check` decides.
        negatives (`list` of PIL images or paths):
            Images that are not copies of any entry; their best cosine to any entry sets the threshold.
        target_fpr (`float`, *optional*, defaults to 0.01):
            The highest acceptable share of negatives that match, in (0, 1).
        copies_per_image (`int`, *optional*, defaults to 3):
            Transformed copies per positive and family.
        seed (`int`, *optional*, defaults to 0):
            Seeds every random transform, so a run is reproducible.
        on_error (`str`, *optional*, defaults to `"raise"`):
            `"raise"` stops at an undecodable input with `ImageDecodeError`; `"skip"` leaves it out and lists it in
            `CalibrationResult.skipped`.
        on_suspect (`str`, *optional*, defaults to `"exclude"`):
            What to do with negatives scoring at or above the median transformed copy (likely copies of an entry).
            `"exclude"` leaves them out of the threshold and lists them in `CalibrationResult.suspect_negatives`;
            `"keep"` counts them (lifting the threshold) and still lists them; `"raise"` stops with `UsageError`.

    Raises:
        UsageError: empty positives or negatives, `target_fpr` outside (0, 1), negatives that are exact copies of
            entries (`on_suspect="keep"`), or suspect negatives (`on_suspect="raise"`).
        EmbedderMismatchError: `embedder` did not build `blocklist`.
    """
    from .guard import Guard

    _check_arguments(blocklist, positives, negatives, target_fpr, copies_per_image, on_error, on_suspect)
    guard = Guard(blocklist, embedder, threshold=1.0)  # refuses an embedder with another spec
    skipped: list[str] = []

    labels, negative_scores, nearest = _score_negatives(guard, negatives, skipped, on_error)
    family_scores, decoded_positives = _score_copies(guard, positives, copies_per_image, seed, skipped, on_error)
    if len(negative_scores) == 0 or decoded_positives == 0:
        which = "negatives" if len(negative_scores) == 0 else "positives"
        raise UsageError(f"no decodable {which}; skipped: {skipped}")
    copy_scores = np.array([score for scores in family_scores.values() for score in scores], np.float64)

    suspect = negative_scores >= np.median(copy_scores)
    suspects = sorted(
        ({"negative": labels[i], "score": float(negative_scores[i]), "entry_id": nearest[i]}
         for i in np.flatnonzero(suspect)),
        key=lambda found: -found["score"],
    )
    if suspects and on_suspect == "raise":
        raise UsageError(
            f"{len(suspects)} negatives score at or above the median transformed copy ({np.median(copy_scores):.4f}): "
            f"they look like copies of entries: {_listed(suspects)}. Remove them, or pass on_suspect='exclude' "
            "(--suspect-negatives exclude)"
        )
    counted = negative_scores if on_suspect == "keep" else negative_scores[~suspect]
    if len(counted) == 0:
        raise UsageError(
            f"every negative scores at or above the median transformed copy ({np.median(copy_scores):.4f}); either "
            "they are all copies of entries, or this embedder cannot tell these images from copies"
        )

    threshold = _smallest_threshold(counted, target_fpr)
    resolution = 1.0 / len(counted)
    return CalibrationResult(
        threshold=threshold,
        fpr=float(np.mean(counted >= threshold)),
        tpr=float(np.mean(copy_scores >= threshold)),
        tpr_by_family={family: float(np.mean(np.array(s) >= threshold)) for family, s in family_scores.items()},
        negatives=len(counted),
        positives=decoded_positives,
        target_fpr=target_fpr,
        fpr_resolution=resolution,
        copies_per_image=copies_per_image,
        scores={"negatives": score_summary(negative_scores),
                "positives": {family: score_summary(np.array(scores)) for family, scores in family_scores.items()}},
        suspect_negatives=suspects,
        suspects_counted=on_suspect == "keep",
        skipped=skipped,
        notes=_notes(target_fpr, len(counted), suspects, on_suspect, float(np.mean(negative_scores >= threshold)),
                     float(np.median(copy_scores))),
    )


def _check_arguments(
    blocklist: Blocklist,
    positives: Sequence[ImageInput],
    negatives: Sequence[ImageInput],
    target_fpr: float,
    copies_per_image: int,
    on_error: str,
    on_suspect: str,
) -> None:
    """Refuse bad arguments up front, before any image is embedded."""
    if not 0.0 < target_fpr < 1.0:
        raise UsageError(f"target_fpr must be in (0, 1), e.g. 0.01 for 1%; got {target_fpr}")
    if copies_per_image < 1:
        raise UsageError(f"copies_per_image must be >= 1, got {copies_per_image}")
    if on_error not in ("raise", "skip"):
        raise UsageError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if on_suspect not in SUSPECT_ACTIONS:
        raise UsageError(f"on_suspect must be one of {', '.join(map(repr, SUSPECT_ACTIONS))}, got {on_suspect!r}")
    if len(positives) == 0:
        raise UsageError("positives is empty; pass source images of blocklist entries (PIL images or paths)")
    if len(negatives) == 0:
        raise UsageError("negatives is empty; pass images that are not in the blocklist (PIL images or paths)")
    if len(blocklist) == 0:
        raise UsageError("the blocklist is empty; there is nothing to calibrate")


def _score_negatives(
    guard, negatives: Sequence[ImageInput], skipped: list[str], on_error: str
) -> tuple[list[str], np.ndarray, list[str | None]]:
    """(label, best cosine, nearest entry id) of every decodable negative, embedded a batch at a time."""
    labels: list[str] = []
    scores: list[float] = []
    nearest: list[str | None] = []
    for batch in _batches(_decoded(negatives, skipped, on_error), _BATCH):
        labels += [label for label, _ in batch]
        for verdict in guard.check([image for _, image in batch]):
            scores.append(verdict.score)
            nearest.append(verdict.entry_id)
    return labels, np.array(scores, np.float64), nearest


def _score_copies(
    guard, positives: Sequence[ImageInput], copies_per_image: int, seed: int, skipped: list[str], on_error: str
) -> tuple[dict[str, list[float]], int]:
    """({family: best cosine of each transformed copy}, how many positives decoded)."""
    family_scores: dict[str, list[float]] = {family: [] for family in TRANSFORM_FAMILIES}
    decoded = 0
    for index, (_, image) in enumerate(_decoded(positives, skipped, on_error)):
        decoded += 1
        copies, families = [], []
        for family, transform in TRANSFORM_FAMILIES.items():
            for copy in range(copies_per_image):
                copies.append(transform(image, random.Random(f"{seed}:{index}:{family}:{copy}")).convert("RGB"))
                families.append(family)
        for family, verdict in zip(families, guard.check(copies)):
            family_scores[family].append(verdict.score)
    return family_scores, decoded


def _notes(
    target_fpr: float, counted: int, suspects: list[dict], on_suspect: str, fpr_all: float, copy_median: float
) -> list[str]:
    notes = []
    if target_fpr < 1.0 / counted:
        notes.append(
            f"target_fpr {target_fpr} is below the resolution 1/{counted} of the negatives: the threshold lies above "
            f"every negative, and the true FPR is unmeasured. Pass at least {math.ceil(1 / target_fpr)} negatives"
        )
    if suspects and on_suspect == "exclude":
        notes.append(
            f"{len(suspects)} negatives scored at or above the median transformed copy ({copy_median:.4f}) and were "
            f"left out of the threshold as probable copies of entries: {_listed(suspects)}. If they are not copies, "
            f"this embedder cannot tell them from copies, and the FPR counting them is {fpr_all:.4f}"
        )
    elif suspects:
        notes.append(
            f"{len(suspects)} negatives scored at or above the median transformed copy ({copy_median:.4f}) and were "
            f"counted: they lifted the threshold. Probable copies of entries: {_listed(suspects)}"
        )
    notes.append("the threshold sits just above a measured negative score; FPR on new images will be somewhat higher")
    return notes


def _listed(suspects: list[dict], limit: int = 5) -> str:
    """The first `limit` suspects as text, so a message names the files to look at without flooding the terminal."""
    shown = ", ".join(f"{item['negative']} ({item['score']:.4f} to {item['entry_id']})" for item in suspects[:limit])
    return shown + (f" and {len(suspects) - limit} more" if len(suspects) > limit else "")


def _smallest_threshold(negative_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest cosine t with #(negatives >= t) <= floor(target_fpr * n): just above the (k+1)-th highest."""
    allowed = math.floor(target_fpr * len(negative_scores) + 1e-9)
    ranked = np.sort(negative_scores)[::-1]
    threshold = float(np.nextafter(ranked[allowed], np.inf))
    if threshold > 1.0:
        raise UsageError(
            f"{allowed + 1} negatives score 1.0 against the blocklist: they are copies of its entries. Remove them "
            "from the negatives"
        )
    return threshold


def _decoded(items: Sequence[ImageInput], skipped: list[str], on_error: str) -> Iterator[tuple[str, Image.Image]]:
    """(label, RGB image) one at a time, so a folder of negatives is never all in memory.

    The label names the input in reports: its path, or `#index` for an in-memory image.
    """
    for index, item in enumerate(items):
        label = str(item) if isinstance(item, (str, os.PathLike)) else f"#{index}"
        try:
            (image,) = to_pil_images([item])
        except ImageDecodeError as error:
            if on_error == "raise":
                raise
            skipped.append(f"{item if isinstance(item, (str, os.PathLike)) else type(item).__name__}: {error}")
            continue
        yield label, image


def _batches(images: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
