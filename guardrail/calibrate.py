"""Pick a blocklist threshold from measured copies and non-copies, and say honestly what it catches.

Copies are made by transforming the blocklist's own source images (resize, crop, JPEG, colour, blur, noise, flip,
rotation, and pairs of those); non-copies are images the caller knows are not in the blocklist. The threshold is the
smallest cosine whose false-positive rate on the non-copies is at most the target, and the true-positive rate it
gives is reported per transform family, so a family the embedder cannot see through shows up as a low number
instead of hiding in an average.
"""

from __future__ import annotations

import argparse
import io
import json
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

Transform = Callable[[Image.Image, random.Random], Image.Image]

DEFAULT_COPIES_PER_IMAGE = 3
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
        threshold: the smallest cosine whose false-positive rate on the negatives is at most `target_fpr`.
        fpr: the false-positive rate on the negatives at `threshold`.
        tpr: the share of transformed copies of the positives scoring at or above `threshold`.
        tpr_by_family: that share for each transform family.
        negatives: how many negative images were scored.
        positives: how many positive (blocklisted) images were transformed.
        target_fpr: the false-positive rate asked for.
        fpr_resolution: `1 / negatives`, the smallest FPR step the negatives can measure. A target below it is
            met only by the threshold lying above every negative, which says nothing about the true FPR.
        copies_per_image: transformed copies per positive and family.
        scores: `{"negatives": {min, median, max}, "positives": {family: {min, median, max}}}` (cosines).
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
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The TPR per transform family, with score quantiles, as a plain-text table."""
        rows = [f"{'family':<14} {'TPR':>6}  {'min':>7} {'median':>7} {'max':>7}"]
        positive_scores = self.scores.get("positives", {})
        for family, tpr in self.tpr_by_family.items():
            stats = positive_scores.get(family, {})
            rows.append(f"{family:<14} {tpr:>6.2f}  " + " ".join(f"{stats.get(k, math.nan):>7.4f}" for k in _STATS))
        rows.append(f"{'all copies':<14} {self.tpr:>6.2f}")
        negative = self.scores.get("negatives", {})
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

    Raises:
        UsageError: empty positives or negatives, `target_fpr` outside (0, 1), or negatives that are copies of entries.
        EmbedderMismatchError: `embedder` did not build `blocklist`.
    """
    from .guard import Guard

    if not 0.0 < target_fpr < 1.0:
        raise UsageError(f"target_fpr must be in (0, 1), e.g. 0.01 for 1%; got {target_fpr}")
    if copies_per_image < 1:
        raise UsageError(f"copies_per_image must be >= 1, got {copies_per_image}")
    if on_error not in ("raise", "skip"):
        raise UsageError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if len(positives) == 0:
        raise UsageError("positives is empty; pass source images of blocklist entries (PIL images or paths)")
    if len(negatives) == 0:
        raise UsageError("negatives is empty; pass images that are not in the blocklist (PIL images or paths)")
    if len(blocklist) == 0:
        raise UsageError("the blocklist is empty; there is nothing to calibrate")
    guard = Guard(blocklist, embedder, threshold=1.0)  # refuses an embedder with another spec
    skipped: list[str] = []

    batches = _batches(_decoded(negatives, skipped, on_error), _BATCH)
    negative_scores = np.array([score for batch in batches for score in _best_scores(guard, batch)], np.float64)
    family_scores: dict[str, list[float]] = {family: [] for family in TRANSFORM_FAMILIES}
    decoded_positives = 0
    for index, image in enumerate(_decoded(positives, skipped, on_error)):
        decoded_positives += 1
        copies, families = [], []
        for family, transform in TRANSFORM_FAMILIES.items():
            for copy in range(copies_per_image):
                copies.append(transform(image, random.Random(f"{seed}:{index}:{family}:{copy}")).convert("RGB"))
                families.append(family)
        for family, score in zip(families, _best_scores(guard, copies)):
            family_scores[family].append(score)
    if len(negative_scores) == 0 or decoded_positives == 0:
        which = "negatives" if len(negative_scores) == 0 else "positives"
        raise UsageError(f"no decodable {which}; skipped: {skipped}")

    threshold = _smallest_threshold(negative_scores, target_fpr)
    all_scores = np.array([score for scores in family_scores.values() for score in scores], np.float64)
    fpr = float(np.mean(negative_scores >= threshold))
    resolution = 1.0 / len(negative_scores)
    notes = []
    if target_fpr < resolution:
        notes.append(
            f"target_fpr {target_fpr} is below the resolution 1/{len(negative_scores)} of the negatives: the threshold "
            f"lies above every negative, and the true FPR is unmeasured. Pass at least {math.ceil(1 / target_fpr)} "
            "negatives"
        )
    notes.append("the threshold sits just above a measured negative score; FPR on new images will be somewhat higher")
    return CalibrationResult(
        threshold=threshold,
        fpr=fpr,
        tpr=float(np.mean(all_scores >= threshold)),
        tpr_by_family={family: float(np.mean(np.array(s) >= threshold)) for family, s in family_scores.items()},
        negatives=len(negative_scores),
        positives=decoded_positives,
        target_fpr=target_fpr,
        fpr_resolution=resolution,
        copies_per_image=copies_per_image,
        scores={"negatives": score_summary(negative_scores),
                "positives": {family: score_summary(np.array(scores)) for family, scores in family_scores.items()}},
        skipped=skipped,
        notes=notes,
    )


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


def score_summary(scores: Sequence[float] | np.ndarray) -> dict[str, float] | None:
    """`{min, median, max}` of cosine scores, or None when there are none."""
    if len(scores) == 0:
        return None
    return {"min": float(np.min(scores)), "median": float(np.median(scores)), "max": float(np.max(scores))}


def _decoded(items: Sequence[ImageInput], skipped: list[str], on_error: str) -> Iterator[Image.Image]:
    """One RGB image at a time, so a folder of negatives is never all in memory."""
    for item in items:
        try:
            (image,) = to_pil_images([item])
        except ImageDecodeError as error:
            if on_error == "raise":
                raise
            skipped.append(f"{item if isinstance(item, (str, os.PathLike)) else type(item).__name__}: {error}")
            continue
        yield image


def _batches(images: Iterator[Image.Image], size: int) -> Iterator[list[Image.Image]]:
    batch: list[Image.Image] = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _best_scores(guard, images: list[Image.Image]) -> list[float]:
    return [verdict.score for verdict in guard.check(images)]


# ---- the `guardrail calibrate` verb ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `guardrail calibrate`."""
    parser.add_argument("-b", "--blocklist", required=True, metavar="FILE", help="the blocklist to calibrate")
    parser.add_argument("--negatives", required=True, nargs="+", metavar="DIR",
                        help="folders of images that are NOT in the blocklist (sets the false-positive rate)")
    parser.add_argument("--positives", nargs="+", metavar="DIR",
                        help="folders of the blocklisted images (default: the entries' source files, when they exist)")
    parser.add_argument("--target-fpr", type=float, default=0.01,
                        help="highest acceptable false-positive rate on the negatives (default 0.01)")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES_PER_IMAGE,
                        help=f"transformed copies per image and family (default {DEFAULT_COPIES_PER_IMAGE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random transforms (default 0)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                        help="where to write the blocklist with the chosen threshold")
    from .cli import add_embedder_arguments

    add_embedder_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def main(args: argparse.Namespace) -> int:
    """Run `guardrail calibrate`: measure, print the TPR table, write the blocklist with the chosen threshold."""
    from .embedders import embedder_from_spec

    blocklist = Blocklist.load(args.blocklist)
    positives = _image_paths(args.positives, "--positives") if args.positives else _entry_sources(blocklist)
    negatives = _image_paths(args.negatives, "--negatives")
    embedder = embedder_from_spec(blocklist.spec, pretrained=args.pretrained, device=args.device)
    result = calibrate(blocklist, embedder, positives, negatives, target_fpr=args.target_fpr,
                       copies_per_image=args.copies, seed=args.seed, on_error="skip")
    _save_like(blocklist.with_threshold(result.threshold), args.blocklist, args.output)
    if args.json:
        print(json.dumps({**result.to_dict(), "output": args.output}, indent=2))
        return 0
    print(result.table())
    print(
        f"wrote {args.output}: threshold {result.threshold:.6f} (was {blocklist.threshold}) at FPR {result.fpr:.4f} "
        f"on {result.negatives} negatives (resolution {result.fpr_resolution:.4f}), TPR {result.tpr:.2f} over "
        f"{result.positives} positives x {len(TRANSFORM_FAMILIES)} families x {result.copies_per_image} copies"
    )
    evading = [family for family, tpr in result.tpr_by_family.items() if tpr < 0.5]
    if evading:
        print(f"  copies made by {', '.join(evading)} mostly evade this embedder (TPR < 0.5)")
    for line in result.skipped:
        print(f"  skipped {line}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _image_paths(folders: Sequence[str], flag: str) -> list[str]:
    from .sources import IMAGE_EXTENSIONS

    paths = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder!r} is not a folder of images")
        for root, _, names in os.walk(folder):
            paths += [os.path.join(root, name) for name in sorted(names)
                      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    if not paths:
        raise UsageError(f"{flag} {', '.join(folders)} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(paths)


def _entry_sources(blocklist: Blocklist) -> list[str]:
    sources = [entry.get("source") for entry in blocklist.entries]
    present = [source for source in sources if isinstance(source, str) and os.path.isfile(source)]
    if not present:
        raise UsageError(
            "none of the blocklist entries' source files exist here (they are not local files, or were moved); "
            "pass the blocklisted images with --positives DIR"
        )
    return present


def _save_like(blocklist: Blocklist, original: str, output: str) -> None:
    """Save with the original file's vector dtype, so a float16 blocklist stays half the size."""
    from safetensors import safe_open

    with safe_open(original, framework="numpy") as handle:
        dtype = "float16" if handle.get_slice("embeddings").get_dtype() == "F16" else "float32"
    blocklist.save(output, dtype=dtype)
