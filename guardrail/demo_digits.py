"""`guardrail demo` on the model that memorizes the way Stable Diffusion does: detect, escape, verify.

The model (`guardrail.digits`) generalizes over 1,797 handwritten digits and memorized the few images its training
set duplicated, each under its captions. The demo blocklists those duplicated images and generates the same slots
(half memorized prompts, half other prompts, one seeded generator per slot) three times:

1. plain (the unguarded baseline);
2. through `GuardedPipeline` with reseeding only (`strategies=("reseed",)`, as guardrail 0.1 did);
3. through `GuardedPipeline` with the full escalation policy and the stage-0 triggers (a memorization-score
   threshold calibrated here on the other prompts at 1% FPR, and blocklisted captions).

Copies are counted independently of the guard, with Carlini et al.'s tiled distance (<= 0.15 to a blocklisted
image), and whether a replacement is still on prompt is decided by an independent digit classifier that the guard
never sees. It also measures the step-1 memorization score as a detector (AUC, TPR at 1% FPR) and the early x̂0
check (copies caught before the last step, clean images stopped). Everything lands in `report.json`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .demo_shared import NEAR_COPY_DISTANCE, DemoRun, demo_embedder, per_slot_generators, slot_seeds, tiled_distance, write_grid
from .embedders import BUNDLED_CONFIGS

DIGITS_EMBEDDER_MODEL = "guardrail-pixel-vit"
DIGITS_EMBEDDER_WEIGHTS = BUNDLED_CONFIGS / "guardrail-pixel-vit-seed0.safetensors"
"""The digits demo's embedder: open_clip's ViT code with one 32x32 patch (the whole image), width 128, one layer,
seeded random weights written by `guardrail.offline.write_seeded_open_clip_weights(..., "guardrail-pixel-vit",
seed=0)`. A random projection of the whole image keeps pixel-level similarity, which is what separates this
model's copies from its other digits; the photos demo's 8x8-patch embedder averages patches and cannot (measured:
its copies scored 0.994-1.000 and other digits up to 0.998). It is no copy detector for edited copies."""
DIGITS_THRESHOLD = 0.975
"""Cosine threshold of `DIGITS_EMBEDDER_MODEL` on this model's outputs (`python benchmarks/early_check.py`): every
near-copy of a duplicated image scored at least 0.986 over 256 samples, and the few other samples above 0.985 all
lay within tiled distance 0.2 of a duplicated image."""
MAX_ATTEMPTS = 4
STAGES_ALONE = ("reseed", "delay_guidance", "steer_away", "perturb_prompt")
"""Each stage is also run alone on the slots whose first image matched, so that its own success rate is reported."""
DETECTOR_GENERATIONS = 128
"""Step-1 scores per group (memorized prompts, other prompts) for the detector's AUC and TPR at 1% FPR."""


def run_digits_demo(run: DemoRun) -> dict:
    """Run the three generations, measure them, write `report.json` and `grid.png` into `run.out`; returns the report.

    The pipeline's "replaced by black images" warnings are kept quiet meanwhile: the report counts every refusal.
    """
    with _quiet(logging.getLogger("guardrail.pipeline")):
        return _run_digits_demo(run)


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_digits_demo(run: DemoRun) -> dict:
    out, samples, model, pretrained, seed, steps = run.out, run.samples, run.model, run.pretrained, run.seed, run.steps
    threshold, verbose, started = run.threshold, run.verbose, run.started
    import torch

    from .blocklist import DEFAULT_THRESHOLD, Blocklist
    from .detector import calibrate_memorization, detection_metrics, memorization_scores
    from .digits import DEFAULT_GUIDANCE_SCALE, MODEL_DIR, digits_classifier, digits_training_set, load_digits_pipeline
    from .guard import Guard
    from .pipeline import GuardedPipeline
    from .sampling import DEFAULT_EARLY_CHECK, SamplingMonitor

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    pipe = load_digits_pipeline()
    training = digits_training_set()
    classifier = digits_classifier()
    embedder = digits_embedder() if model is None else demo_embedder(model, pretrained)
    threshold = threshold if threshold is not None else (DIGITS_THRESHOLD if model is None else DEFAULT_THRESHOLD)
    duplicated = training.duplicated
    blocklisted_images = training.duplicated_images()
    blocklist = Blocklist.from_images(
        blocklisted_images,
        embedder,
        entries=[{"id": image.id, "caption": image.captions[0], "label": image.label, "regime": image.regime,
                  "duplicates": image.copies} for image in duplicated],
        threshold=threshold,
    )
    guard = Guard(blocklist, embedder)
    blocked_pixels = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in blocklisted_images])
    timings["load_s"] = time.perf_counter() - tick

    # Stage-0 trigger: a memorization-score threshold calibrated on prompts that are not memorized (1% FPR).
    tick = time.perf_counter()
    other, memorized = training.other_prompts, training.memorized_prompts
    per_prompt = -(-DETECTOR_GENERATIONS // len(other))
    calibrated = calibrate_memorization(pipe, other, fpr=0.01, images_per_prompt=per_prompt, seed=seed + 10_000,
                                        num_inference_steps=steps)
    benign_scores = memorization_scores(pipe, other, images_per_prompt=per_prompt, seed=seed + 30_000,
                                        num_inference_steps=steps)
    detector = detection_metrics(
        memorization_scores(pipe, memorized, images_per_prompt=-(-DETECTOR_GENERATIONS // len(memorized)),
                            seed=seed + 20_000, num_inference_steps=steps),
        benign_scores,
    )
    detector["by_regime"] = {  # unique captions vs a duplicated image among its class's ordinary captions
        regime: detection_metrics(
            memorization_scores(pipe, captions, images_per_prompt=-(-DETECTOR_GENERATIONS // len(captions)),
                                seed=seed + 40_000, num_inference_steps=steps),
            benign_scores,
        )
        for regime in ("verbatim", "template")
        if (captions := [c for image in training.duplicated if image.regime == regime for c in image.captions])
    }
    timings["detector_s"] = time.perf_counter() - tick

    prompts = _spread_prompts(samples, memorized, other, seed)
    seeds = slot_seeds(samples, seed)
    call = {"prompt": prompts, "num_inference_steps": steps, "output_type": "np"}

    tick = time.perf_counter()
    with SamplingMonitor(pipe) as monitor:
        unguarded = pipe(**call, generator=per_slot_generators(seeds)).images
    unguarded_steps = monitor.record.denoiser_rows
    timings["unguarded_s"] = time.perf_counter() - tick
    first_verdicts = guard.check(unguarded)

    runs = {}
    for name, options in (
        ("reseed_only", {"strategies": ("reseed",), "match_captions": False}),
        ("guarded", {"memorization_threshold": calibrated}),
    ):
        tick = time.perf_counter()
        guarded_pipe = GuardedPipeline(pipe, guard, max_attempts=MAX_ATTEMPTS, **options)
        output = guarded_pipe(**call, generator=per_slot_generators(seeds))
        timings[f"{name}_s"] = time.perf_counter() - tick
        runs[name] = (output.images, output.guardrail)

    tick = time.perf_counter()
    matched_slots = [slot for slot, verdict in enumerate(first_verdicts) if verdict.matched]
    stages_alone = {}
    for stage in STAGES_ALONE:
        if not matched_slots:
            break
        alone = GuardedPipeline(pipe, guard, max_attempts=2, strategies=(stage,), match_captions=False, early_check=())
        report = alone(**{**call, "prompt": [prompts[slot] for slot in matched_slots]},
                       generator=per_slot_generators([seeds[slot] for slot in matched_slots])).guardrail
        retried = sum(report.attempts[row] == 2 and stage in report.tried[row] for row in range(len(matched_slots)))
        escaped = sum(report.stages[row] == stage for row in range(len(matched_slots)))
        stages_alone[stage] = {"retried": retried, "escaped": escaped,
                               "rate": round(escaped / retried, 4) if retried else None}
    timings["stages_alone_s"] = time.perf_counter() - tick

    def copies_of_blocklisted(images: np.ndarray) -> np.ndarray:
        return np.array([tiled_distance(image, blocked_pixels).min() <= NEAR_COPY_DISTANCE for image in images])

    labels = np.array([training.prompt_label(prompt) for prompt in prompts])
    unguarded_copies = copies_of_blocklisted(unguarded)
    memorized_slots = np.array([prompt in set(memorized) for prompt in prompts])
    matched_first = np.array([verdict.matched for verdict in first_verdicts])
    result: dict[str, Any] = {
        "samples": samples,
        "seed": seed,
        "num_inference_steps": steps,
        "torch_threads": torch.get_num_threads(),
        "model": {
            "pipeline": "guardrail.digits.DigitsPipeline",
            "checkpoint": os.path.relpath(MODEL_DIR, Path(__file__).resolve().parent.parent),
            "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "memorized_prompts": memorized,
        },
        "blocklist": {"count": len(blocklist), "ids": [entry["id"] for entry in blocklist.entries]},
        "embedder": embedder.spec,
        "threshold": guard.threshold,
        "near_copy": {
            "measure": "Carlini et al. 2023 tiled distance: max over a 4x4 grid of per-tile RMSE, [0, 1] pixels",
            "max_distance": NEAR_COPY_DISTANCE,
        },
        "detector": {**detector, "calibrated_threshold": calibrated.threshold,
                     "signal": "Wen et al. d = ||model(x_T, prompt) - model(x_T, empty)||, first denoiser call"},
        "unguarded": {
            "near_copies_of_blocklisted": int(unguarded_copies.sum()),
            "guard_would_match": int(matched_first.sum()),
            "memorized_prompt_slots": int(memorized_slots.sum()),
            "on_prompt": _on_prompt(classifier, unguarded, labels, np.ones(samples, bool)),
            "denoiser_steps": int(unguarded_steps),
            "seconds": round(timings["unguarded_s"], 3),
        },
    }
    for name, (images, report) in runs.items():
        result[name] = _run_summary(
            images, report, unguarded, labels, memorized_slots, matched_first, unguarded_copies,
            copies_of_blocklisted(images), classifier, unguarded_steps, timings[f"{name}_s"],
        )
    report = runs["guarded"][1]
    stopped = np.array([stop is not None for stop in report.stopped_at])
    clean_first = ~matched_first & ~unguarded_copies
    result["stages_alone"] = {
        "about": "each stage alone, one retry of every slot whose first image matched the blocklist",
        **stages_alone,
    }
    result["early_check"] = {
        "fractions": list(DEFAULT_EARLY_CHECK),
        "copies": int(unguarded_copies.sum()),
        "caught": _rate(stopped & unguarded_copies, unguarded_copies),
        "clean": int(clean_first.sum()),
        "false_stops": _rate(stopped & clean_first, clean_first),
    }
    result["timings"] = {key: round(value, 3) for key, value in timings.items()}
    result["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    slots = _slot_facts(prompts, seeds, unguarded_copies, runs["guarded"][1], copies_of_blocklisted(runs["guarded"][0]))
    result["slots"] = slots
    _write(out, result, unguarded, runs["guarded"][0], slots, duplicated, blocklisted_images)
    if verbose:
        print(format_digits_table(result, out))
    return result


def digits_embedder():  # -> OpenCLIPEmbedder
    """The digits demo's bundled embedder (see `DIGITS_EMBEDDER_MODEL`)."""
    from .embedders import OpenCLIPEmbedder

    return OpenCLIPEmbedder(DIGITS_EMBEDDER_MODEL, pretrained=DIGITS_EMBEDDER_WEIGHTS, batch_size=64)


def _spread_prompts(samples: int, memorized: list[str], other: list[str], seed: int) -> list[str]:
    """Half the slots memorized prompts, half other prompts, each list cycled, in a seeded random order."""
    half = samples // 2
    prompts = [memorized[i % len(memorized)] for i in range(half)] + [other[i % len(other)] for i in range(samples - half)]
    order = np.random.default_rng(seed).permutation(samples)
    return [prompts[i] for i in order]


def _rate(hits: np.ndarray, of: np.ndarray) -> float | None:
    total = int(np.sum(of))
    return None if total == 0 else round(int(np.sum(hits)) / total, 4)


def _on_prompt(classifier: Any, images: np.ndarray, labels: np.ndarray, which: np.ndarray) -> float | None:
    if not which.any():
        return None
    return round(float((classifier.predict(images[which]) == labels[which]).mean()), 4)


def _run_summary(
    images: np.ndarray, report: Any, unguarded: np.ndarray, labels: np.ndarray, memorized_slots: np.ndarray,
    matched_first: np.ndarray, unguarded_copies: np.ndarray, copies: np.ndarray, classifier: Any,
    unguarded_steps: int, seconds: float,
) -> dict:
    stages = np.array(report.stages)
    refused = stages == "refused"
    replaced = ~np.isin(stages, ("first", "refused"))
    changed = np.array([not np.array_equal(a, b) for a, b in zip(images, unguarded)])
    steps = float(sum(report.denoiser_steps))
    blocklisted_prompt_slots = memorized_slots | matched_first
    tried = Counter(stage for slot_stages in report.tried for stage in slot_stages)
    worked = Counter(stage for stage in report.stages if stage not in ("first", "refused"))
    return {
        "near_copies_of_blocklisted": int(copies.sum()),
        "first_attempt_clean": int((~matched_first).sum()),
        "false_resamples": int((np.array(report.resampled) & ~matched_first & ~unguarded_copies).sum()),
        "resampled": int(sum(report.resampled)),
        "exhausted": int(sum(report.exhausted)),
        "blocked": int(sum(report.blocked)),
        "matched_first": int(matched_first.sum()),
        "refused": int(refused.sum()),
        "refused_of_blocklisted_prompt_slots": _rate(refused & blocklisted_prompt_slots, blocklisted_prompt_slots),
        "replaced": int(replaced.sum()),
        "replacements_on_prompt": _on_prompt(classifier, images, labels, replaced),
        "changed_but_matched_nothing": int((changed & ~matched_first & ~unguarded_copies).sum()),
        "triggered": int(sum(report.triggered)),
        "stopped_early": int(sum(stop is not None for stop in report.stopped_at)),
        "denoiser_steps": int(round(steps)),
        "denoiser_steps_ratio": round(steps / max(1, unguarded_steps), 3),
        "stages": dict(Counter(report.stages)),
        "stage_success": {stage: {"attempts": tried[stage], "succeeded": worked[stage],
                                  "rate": round(worked[stage] / tried[stage], 4) if tried[stage] else None}
                          for stage in tried},
        "generations": int(sum(report.attempts)),
        "seconds": round(seconds, 3),
    }


def _slot_facts(prompts: list[str], seeds: list[int], unguarded_copies: np.ndarray, report: Any,
                guarded_copies: np.ndarray) -> list[dict]:
    return [
        {
            "slot": slot,
            "prompt": prompt,
            "seed": seeds[slot],
            "unguarded": {"near_copy_of_blocklisted": bool(unguarded_copies[slot])},
            "guarded": {
                "near_copy_of_blocklisted": bool(guarded_copies[slot]),
                "stage": report.stages[slot],
                "attempts": report.attempts[slot],
                "resampled": report.attempts[slot] > 1,
                "blocked": report.blocked[slot],
                "memorization": report.memorization[slot],
                "triggered": report.triggered[slot],
                "stopped_at": report.stopped_at[slot],
                "score": report.verdicts[slot].score,
                "denoiser_steps": report.denoiser_steps[slot],
            },
        }
        for slot, prompt in enumerate(prompts)
    ]


def _write(out: Path, result: dict, unguarded: np.ndarray, guarded: np.ndarray, slots: list[dict],
           duplicated: list, images: list) -> None:
    import json

    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_grid(out / "grid.png", unguarded, guarded, slots, [(image.id, picture) for image, picture in
                                                              zip(duplicated, images)])


def format_digits_table(result: dict, out: Path) -> str:
    """The digits demo's summary as printable text."""
    n = result["samples"]
    unguarded, reseed, guarded = result["unguarded"], result["reseed_only"], result["guarded"]
    detector, early = result["detector"], result["early_check"]
    slots = unguarded["memorized_prompt_slots"]

    def row(label: str, a: Any, b: Any, c: Any) -> str:
        return f"{label:44}{a!s:>12}{b!s:>14}{c!s:>14}"

    lines = [
        f"guardrail demo: {n} samples of a text-to-image model that memorized the {result['blocklist']['count']} "
        f"images its training set duplicated ({slots} slots use a memorized prompt); all {result['blocklist']['count']}"
        " are blocklisted.",
        f"match threshold: cosine >= {result['threshold']}; near-copy: Carlini's tiled distance <= "
        f"{result['near_copy']['max_distance']} (independent of the guard)",
        "",
        row("", "unguarded", "reseed only", "full policy"),
        row("near-copies of blocklisted images", f"{unguarded['near_copies_of_blocklisted']}/{n}",
            f"{reseed['near_copies_of_blocklisted']}/{n}", f"{guarded['near_copies_of_blocklisted']}/{n}"),
        row("refused slots (black)", "-", f"{reseed['refused']}/{n}", f"{guarded['refused']}/{n}"),
        row("replacements on prompt (classifier)", "-", _percent(reseed["replacements_on_prompt"]),
            _percent(guarded["replacements_on_prompt"])),
        row("unmatched images changed", "-", reseed["changed_but_matched_nothing"],
            guarded["changed_but_matched_nothing"]),
        row("denoiser steps (x unguarded)", unguarded["denoiser_steps"], f"{reseed['denoiser_steps_ratio']:.2f}x",
            f"{guarded['denoiser_steps_ratio']:.2f}x"),
        row("wall time", f"{unguarded['seconds']:.1f}s", f"{reseed['seconds']:.1f}s", f"{guarded['seconds']:.1f}s"),
        "",
        "full policy stages: " + ", ".join(f"{stage} {count}" for stage, count in sorted(guarded["stages"].items())),
        "in the full policy: " + ", ".join(f"{stage} escaped {info['succeeded']}/{info['attempts']}"
                                           for stage, info in guarded["stage_success"].items()),
        "each stage alone, one retry of the matched slots: " + ", ".join(
            f"{stage} {info['escaped']}/{info['retried']}" for stage, info in result["stages_alone"].items()
            if stage != "about"),
        f"step-1 memorization score: AUC {detector['auc']:.3f}, TPR {detector['tpr_at_1pct_fpr']:.3f} at 1% FPR "
        f"({detector['memorized']} memorized vs {detector['benign']} other generations); "
        + ", ".join(f"{regime} prompts alone: AUC {m['auc']:.3f}, TPR {m['tpr_at_1pct_fpr']:.3f}"
                    for regime, m in detector.get("by_regime", {}).items()),
        f"early check at {early['fractions']}: {_percent(early['caught'])} of {early['copies']} copies stopped before "
        "the last step; "
        f"{_percent(early['false_stops'])} of {early['clean']} clean images stopped",
        f"wrote {out / 'report.json'} and {out / 'grid.png'} in {result['timings']['total_s']:.1f} s",
    ]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
