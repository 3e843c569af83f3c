"""`guardrail demo`: the guard on a model that really memorizes, end to end and offline.

The shipped model (`guardrail.memorizing`) reproduces each of its 10 training photos from its class label. The demo
blocklists half of those photos, samples class labels spread over all of them, and generates the same slots twice, with
the same per-slot generators: once with the plain pipeline and once through `GuardedPipeline` (action `"resample"`).
It then counts copies *independently of the embedder*, with the tiled distance of Carlini et al. 2023 ("Extracting
Training Data from Diffusion Models"): an image is a near-copy of a photo when no tile of a 4x4 grid differs from it
by more than 0.15 RMSE on [0, 1] pixels. It writes `report.json` and `grid.png`.

The embedder is open_clip's own code path with a tiny bundled config (`guardrail-tiny-vit`) and seeded random
weights shipped as a local `.safetensors` file: no pretrained CLIP can be downloaded offline. Random weights separate
this model's pixel-exact copies from its other outputs; they are no copy detector for edited copies (a 2-pixel
shift or a flip of a photo can score as low as 0.34 and 0.24). Pass `--model/--pretrained` to run the demo with a
real one. The config is `guardrail/assets/open_clip/guardrail-tiny-vit.json` (32x32 input, 8x8 patches, width 128, 2 layers, average
pooling, 128-d). Its weights file holds seeded random weights, written by
`guardrail.offline.write_seeded_open_clip_weights(DEMO_EMBEDDER_WEIGHTS, "guardrail-tiny-vit", seed=0)` after
`guardrail.embedders.register_bundled_configs()`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .demo_shared import (  # noqa: F401  (re-exported: the demo's public helpers)
    DEMO_EMBEDDER_MODEL,
    DEMO_EMBEDDER_WEIGHTS,
    NEAR_COPY_DISTANCE,
    TILE_GRID,
    DemoRun,
    as_unit_float,
    demo_embedder,
    per_slot_generators,
    slot_seeds,
    tiled_distance,
    write_grid,
)
from .errors import GuardrailError, UsageError
from .scores import score_summary

if TYPE_CHECKING:
    from .blocklist import Blocklist
    from .embedders import Embedder
    from .guard import Guard, Verdict
    from .pipeline import GuardReport

DEMO_THRESHOLD = 0.98
"""Cosine threshold of the bundled embedder, calibrated on the shipped model: its near-copies of blocklisted photos
scored 0.988-0.9995 (30 samples), its other samples at most 0.951 against the blocklist, and other bundled photos at
most 0.975. The demo report repeats the copy and non-copy score ranges of each run."""

MAX_ATTEMPTS = 4
def spread_labels(samples: int, classes: int, seed: int) -> list[int]:
    """`samples` labels that cover all `classes` as evenly as possible, in a seeded random order."""
    labels = np.arange(samples) % classes
    return [int(label) for label in np.random.default_rng(seed).permutation(labels)]


PIPELINES = ("digits", "photos")
"""`digits`: the model that memorizes like Stable Diffusion (`guardrail.demo_digits`); `photos`: the model that
memorized all of its 10 photos (`guardrail.memorizing`), where no escape exists."""


def run_demo(
    out_dir: str | os.PathLike,
    samples: int | None = None,
    model: str | None = None,
    pretrained: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int = 25,
    threshold: float | None = None,
    threads: int | None = 1,
    verbose: bool = True,
    pipeline: str = "digits",
) -> dict:
    """Run the offline demo and write `out_dir/report.json` and `out_dir/grid.png`.

    Args:
        out_dir (`str` or `os.PathLike`):
            Folder for the outputs (created if missing).
        samples (`int`, *optional*, defaults to 128 for `digits`, 64 for `photos`):
            Images per run: for `digits` half memorized prompts and half others, for `photos` class labels spread
            over all of the model's labels.
        model (`str`, *optional*), pretrained (`str` or path, *optional*):
            An open_clip model and its weights (tag or file) to use instead of the bundled tiny embedder.
        seed (`int`, *optional*, defaults to 0):
            Seeds the labels and the per-slot generators.
        steps (`int`, *optional*, defaults to 25):
            DDIM steps per image.
        threshold (`float`, *optional*):
            Cosine match threshold; defaults to `DEMO_THRESHOLD` for the bundled embedder, else the blocklist default.
        threads (`int`, *optional*, defaults to 1):
            torch CPU threads while the demo runs (restored after); `None` keeps torch's setting. One thread is the
            default because on a small machine with another busy process, two threads ran this model 3x slower.
        verbose (`bool`, *optional*, defaults to `True`):
            Print the table.
        pipeline (`str`, *optional*, defaults to `"digits"`):
            Which shipped model to run: `"digits"` or `"photos"` (see `PIPELINES`).

    Returns:
        The report (also written as `report.json`).
    """
    started = time.perf_counter()
    if pipeline not in PIPELINES:
        raise UsageError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    if samples is None:
        samples = 128 if pipeline == "digits" else 64
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UsageError(f"samples must be an integer >= 1, got {samples!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {steps!r}")
    if (model is None) != (pretrained is None):
        raise UsageError("pass --model and --pretrained together (or neither, for the bundled tiny embedder)")

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be an integer >= 1, got {threads!r}")

    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        run = DemoRun(Path(out_dir), samples, model, pretrained, seed, steps, threshold, verbose, started)
        if pipeline == "digits":
            from .demo_digits import run_digits_demo

            return run_digits_demo(run)
        return _run(run)
    finally:
        torch.set_num_threads(previous_threads)


def _run(run: DemoRun) -> dict:
    """The demo's steps in order, each timed: load, blocklist, generate twice, score the slots, report."""
    out, samples, model, pretrained, seed, steps = run.out, run.samples, run.model, run.pretrained, run.seed, run.steps
    threshold, verbose, started = run.threshold, run.verbose, run.started
    import torch

    from .blocklist import DEFAULT_THRESHOLD
    from .guard import Guard
    from .memorizing import MODEL_DIR, load_memorizing_pipeline, training_images

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _timed(timings, "load_model_s"):
        pipe = load_memorizing_pipeline()
        train = training_images()
    with _timed(timings, "load_embedder_s"):
        embedder = demo_embedder(model, pretrained)
    if threshold is None:
        threshold = DEMO_THRESHOLD if model is None else DEFAULT_THRESHOLD
    with _timed(timings, "build_blocklist_s"):
        blocklisted = blocklist_photos(
            [(f"{label:02d}-{name}", name, image, {"label": label}) for label, name, image in train if label % 2 == 0],
            embedder,
            threshold,
        )
        guard = Guard(blocklisted.blocklist, embedder)

    labels = spread_labels(samples, len(train), seed)
    seeds = slot_seeds(samples, seed)
    call = {"class_labels": labels, "num_inference_steps": steps, "output_type": "np"}
    with _timed(timings, "unguarded_s"):
        unguarded = generate_unguarded(pipe, seeds, call)
    first_verdicts = guard.check(unguarded)  # for the report only: what the guard says about each first image
    with _timed(timings, "guarded_s"):
        guarded, guard_report = generate_guarded(pipe, guard, seeds, call)
    check_first_attempts_unchanged(unguarded, guarded, guard_report)

    facts = class_label_slot_facts(labels, seeds, [name for _, name, _ in train], blocklisted.blocklist)
    slots = score_slots(facts, unguarded, first_verdicts, guarded, guard_report, blocklisted)
    result = {
        "samples": samples,
        "seed": seed,
        "num_inference_steps": steps,
        "torch_threads": torch.get_num_threads(),
        "model": {
            "pipeline": "guardrail.memorizing.ClassConditionalPipeline",
            "checkpoint": os.path.relpath(MODEL_DIR, Path(__file__).resolve().parent.parent),
            "classes": len(train),
        },
        "blocklist": {"count": len(blocklisted.blocklist), "ids": [e["id"] for e in blocklisted.blocklist.entries]},
        "embedder": embedder.spec,
        "threshold": guard.threshold,
        "near_copy": {
            "measure": "Carlini et al. 2023 tiled distance: max over a 4x4 grid of per-tile RMSE, [0, 1] pixels",
            "max_distance": NEAR_COPY_DISTANCE,
        },
        **summarize_slots(slots, guard_report, timings),
        "timings": {key: round(value, 3) for key, value in timings.items()},
        "slots": slots,
    }
    result["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    write_outputs(out, result, unguarded, guarded, blocklisted)
    if verbose:
        print(format_table(result, out))
    return result


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the block under `timings[key]`, in seconds."""
    tick = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - tick


@dataclass
class BlocklistedPhotos:
    """The training photos a demo forbids: their blocklist, their names, and their pixels.

    The pixels are kept beside the vectors because the demo counts copies independently of the embedder, with the
    tiled distance on pixels.
    """

    blocklist: Blocklist
    names: list[str]
    images: list[Any]
    pixels: np.ndarray  # (M, H, W, C) float32 in [0, 1]

    def nearest(self, image: Any) -> tuple[float, str]:
        """(tiled distance, name) of the blocklisted photo closest to `image` in pixels."""
        distances = tiled_distance(image, self.pixels)
        return float(distances.min()), self.names[int(distances.argmin())]


def blocklist_photos(
    photos: Sequence[tuple[str, str, Any, dict]], embedder: Embedder, threshold: float
) -> BlocklistedPhotos:
    """Blocklist `photos`, each `(entry id, caption, image, extra record fields)`, at `threshold`."""
    from .blocklist import Blocklist

    blocklist = Blocklist.from_images(
        [image for _, _, image, _ in photos],
        embedder,
        entries=[{"id": entry_id, "caption": caption, **extra} for entry_id, caption, _, extra in photos],
        threshold=threshold,
    )
    images = [image for _, _, image, _ in photos]
    return BlocklistedPhotos(blocklist, [caption for _, caption, _, _ in photos], images, as_unit_float(images))


def generate_unguarded(pipe: Any, seeds: Sequence[int], call: dict) -> np.ndarray:
    """The plain pipeline's images for `call`, one generator per slot (`output_type="np"` in `call`)."""
    return pipe(generator=per_slot_generators(seeds), **call).images


def generate_guarded(
    pipe: Any, guard: Guard, seeds: Sequence[int], call: dict, max_attempts: int = MAX_ATTEMPTS
) -> tuple[np.ndarray, GuardReport]:
    """The same call through `GuardedPipeline` (resample, then black): its images and its `GuardReport`."""
    from .pipeline import GuardedPipeline

    guarded_pipe = GuardedPipeline(pipe, guard, action="resample", max_attempts=max_attempts, on_exhausted="black")
    output = guarded_pipe(generator=per_slot_generators(seeds), **call)
    return output.images, output.guardrail


def check_first_attempts_unchanged(unguarded: np.ndarray, guarded: np.ndarray, report: GuardReport) -> None:
    """Raise when a slot the guard let through at once differs from the plain run: the comparison would be unfair."""
    for slot, attempts in enumerate(report.attempts):
        if attempts == 1 and not np.array_equal(guarded[slot], unguarded[slot]):
            raise GuardrailError(f"slot {slot}: the guarded first attempt differs from the unguarded image")


def class_label_slot_facts(
    labels: Sequence[int], seeds: Sequence[int], names: Sequence[str], blocklist: Blocklist
) -> list[dict]:
    """What each slot of a class-conditional run asked for: its label, the label's photo name, whether that photo is
    blocklisted (entries carry a `label` field), and the slot's seed."""
    blocked_labels = {entry.get("label") for entry in blocklist.entries}
    return [
        {"slot": slot, "label": label, "name": names[label], "label_blocklisted": label in blocked_labels,
         "seed": slot_seed}
        for slot, (label, slot_seed) in enumerate(zip(labels, seeds))
    ]


def score_slots(
    facts: Sequence[dict],
    unguarded: np.ndarray,
    first_verdicts: Sequence[Verdict],
    guarded: np.ndarray,
    report: GuardReport,
    blocklisted: BlocklistedPhotos,
) -> list[dict]:
    """One record per slot: `facts[slot]` (what the model was asked), then what each run returned.

    Each run gets the independent measure (tiled distance to the nearest blocklisted photo, near-copy or not) next
    to what the guard said (score, entry, match); the guarded run adds its attempts and outcome.
    """
    slots = []
    for slot, slot_facts in enumerate(facts):
        before, nearest = blocklisted.nearest(unguarded[slot])
        after, _ = blocklisted.nearest(guarded[slot])
        first, final = first_verdicts[slot], report.verdicts[slot]
        slots.append(
            {
                **slot_facts,
                "unguarded": {
                    "near_copy_of_blocklisted": before <= NEAR_COPY_DISTANCE,
                    "tiled_distance": before,
                    "nearest_blocklisted": nearest,
                    "score": first.score,
                    "entry_id": first.entry_id,
                    "matched": first.matched,
                },
                "guarded": {
                    "near_copy_of_blocklisted": after <= NEAR_COPY_DISTANCE,
                    "tiled_distance": after,
                    "score": final.score,
                    "entry_id": final.entry_id,
                    "matched": final.matched,
                    "attempts": report.attempts[slot],
                    "resampled": report.attempts[slot] > 1,
                    "blocked": report.blocked[slot],
                    "exhausted": report.exhausted[slot],
                },
            }
        )
    return slots


def summarize_slots(slots: Sequence[dict], report: GuardReport, timings: dict[str, float]) -> dict:
    """The report's `unguarded`, `guarded` and `scores` sections: counts over the slots, and each run's seconds."""
    clean_first = [s for s in slots if not s["unguarded"]["near_copy_of_blocklisted"]]
    copies_first = [s for s in slots if s["unguarded"]["near_copy_of_blocklisted"]]
    return {
        "unguarded": {
            "near_copies_of_blocklisted": len(copies_first),
            "guard_would_match": sum(s["unguarded"]["matched"] for s in slots),
            "seconds": round(timings["unguarded_s"], 3),
        },
        "guarded": {
            "near_copies_of_blocklisted": sum(s["guarded"]["near_copy_of_blocklisted"] for s in slots),
            "first_attempt_clean": len(clean_first),
            "false_resamples": sum(s["guarded"]["resampled"] for s in clean_first),
            "missed_first_attempt_copies": sum(not s["guarded"]["resampled"] for s in copies_first),
            "resampled": sum(report.resampled),
            "exhausted": sum(report.exhausted),
            "blocked": sum(report.blocked),
            "generations": sum(report.attempts),
            "max_attempts": MAX_ATTEMPTS,
            "seconds": round(timings["guarded_s"], 3),
        },
        "scores": {
            "first_attempt_copies": score_summary([s["unguarded"]["score"] for s in copies_first]),
            "first_attempt_clean": score_summary([s["unguarded"]["score"] for s in clean_first]),
        },
    }


def write_outputs(
    out: Path, result: dict, unguarded: np.ndarray, guarded: np.ndarray, blocklisted: BlocklistedPhotos
) -> None:
    """Write `out/report.json` and `out/grid.png`."""
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_grid(out / "grid.png", unguarded, guarded, result["slots"], list(zip(blocklisted.names, blocklisted.images)))


def format_table(result: dict, out: Path) -> str:
    """The demo's summary as printable text."""
    n, unguarded, guarded = result["samples"], result["unguarded"], result["guarded"]
    spec = result["embedder"]
    source = spec.get("pretrained") or f"{spec.get('weights_file')} (sha256 {str(spec.get('weights_sha256'))[:12]})"
    lines = [
        f"guardrail demo: {n} samples of a diffusion model that memorized its {result['model']['classes']} training "
        f"photos; {result['blocklist']['count']} of the photos are blocklisted.",
        f"embedder: open_clip {spec['model']} / {source}, dim {spec['dim']}; match threshold: cosine >= "
        f"{result['threshold']}",
        "near-copy (measured independently of the embedder): Carlini et al.'s tiled distance <= "
        f"{NEAR_COPY_DISTANCE} to a blocklisted photo",
        "",
        f"{'':42}{'unguarded':>12}{'guarded':>12}",
        f"{'near-copies of blocklisted photos':42}{_out_of(unguarded['near_copies_of_blocklisted'], n):>12}"
        f"{_out_of(guarded['near_copies_of_blocklisted'], n):>12}",
        f"{'resampled slots':42}{'-':>12}{_out_of(guarded['resampled'], n):>12}",
        f"{'exhausted slots (returned black)':42}{'-':>12}{_out_of(guarded['exhausted'], n):>12}",
        f"{'false resamples (of first-attempt-clean)':42}{'-':>12}"
        f"{_out_of(guarded['false_resamples'], guarded['first_attempt_clean']):>12}",
        f"{'images generated':42}{n:>12}{guarded['generations']:>12}",
        f"{'wall time':42}{unguarded['seconds']:>11.1f}s{guarded['seconds']:>11.1f}s",
        "",
    ]
    if spec.get("pretrained") is None and spec["model"] == DEMO_EMBEDDER_MODEL:
        lines.append(
            "note: the bundled embedder has seeded random weights. It tells this model's exact copies apart; it is "
            "not a copy detector for edited copies. Use a real model in production (--model/--pretrained)."
        )
    lines.append(f"wrote {out / 'report.json'} and {out / 'grid.png'} in {result['timings']['total_s']:.1f} s")
    return "\n".join(lines)


def _out_of(count: int, total: int) -> str:
    """`"count/total"`, the table's way to show a count with what it is out of."""
    return f"{count}/{total}"

