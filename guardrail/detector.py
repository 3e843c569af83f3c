"""A memorization-score threshold for one pipeline, calibrated on benign prompts, saved where a deployment finds it.

Wen et al.'s step-1 score (see `guardrail.sampling`) has no universal scale: about 1 on SD 1.x, about 10 on SD 2,
something else again on every fine-tune. So a threshold is calibrated per pipeline, at a target false-positive rate,
on prompts known not to be memorized, and stored in a small JSON file keyed by the pipeline and the sampling
settings that make the score. A score above it is a *trigger* (mitigate early, check harder), never a verdict: an
unusual but novel concept can score high too.

Calibration runs only the first denoiser call(s) of each prompt and interrupts the rest, so it costs about one
step per prompt.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GuardrailError, UsageError
from .sampling import SamplingMonitor

FORMAT = "guardrail.memorization-threshold"


@dataclass(frozen=True)
class MemorizationThreshold:
    """A calibrated threshold on the step-1 memorization score of one pipeline and sampling setting.

    Attributes:
        threshold: a score at or above it flags the prompt.
        fpr: the false-positive rate it was calibrated for, on `benign_prompts` prompts.
        pipeline: the pipeline's class and name or path: the key a deployment looks it up by.
        guidance_scale, num_inference_steps, memorization_steps: the settings the score was measured with.
        benign_prompts: how many benign prompts (x images each) calibrated it.
        benign_max: the highest benign score seen.
    """

    threshold: float
    fpr: float
    pipeline: str
    guidance_scale: float
    num_inference_steps: int
    memorization_steps: int
    benign_prompts: int
    benign_max: float

    def flags(self, score: float | None) -> bool | None:
        """Whether `score` reaches the threshold (None when there is no score: no CFG batch)."""
        return None if score is None else bool(score >= self.threshold)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically (temp file, then rename)."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemorizationThreshold":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise GuardrailError(f"cannot read the memorization threshold {path}: {error}") from error
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise GuardrailError(f"{path} is not a guardrail memorization threshold (format {FORMAT!r})")
        try:
            return cls(**data)
        except TypeError as error:
            raise GuardrailError(f"{path} has unexpected fields ({error}); calibrate it again") from error


def pipeline_key(pipe: Any) -> str:
    """`ClassName:name_or_path` of a diffusers pipeline (the name_or_path diffusers recorded at load, if any)."""
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(pipe, "_name_or_path", None)
    return f"{type(pipe).__name__}:{name or 'unnamed'}"


def memorization_scores(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 8,
    memorization_steps: int = 1,
    **call_kwargs: Any,
) -> np.ndarray:
    """The step-1 memorization score of each prompt's images, `(len(prompts) * images_per_prompt,)`, prompt-major.

    Only the first `memorization_steps` denoiser calls run: the monitor interrupts the pipeline after them.
    `call_kwargs` go to the pipeline (`guidance_scale`, `num_inference_steps`, ...).
    """
    import torch

    if not prompts:
        raise UsageError("prompts is empty: pass at least one prompt")
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [
            torch.Generator().manual_seed(seed + (start + row) * images_per_prompt + image)
            for row in range(len(chunk))
            for image in range(images_per_prompt)
        ]
        monitor = SamplingMonitor(pipe, stop_after_denoiser_calls=memorization_steps)
        with monitor:
            pipe(prompt=chunk, num_images_per_prompt=images_per_prompt, generator=generators, **call_kwargs)
        values = monitor.record.memorization(memorization_steps, len(generators))
        if any(value is None for value in values):
            raise UsageError(
                f"{type(pipe).__name__} ran no classifier-free-guidance batch: the memorization score needs "
                "guidance_scale > 1 on a pipeline that batches [uncond; cond]"
            )
        scores.extend(values)
    return np.asarray(scores, dtype=np.float64)


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """The lowest threshold that flags at most `fpr` of `benign_scores` (flagged: score >= threshold)."""
    scores = np.sort(np.asarray(benign_scores, dtype=np.float64))
    allowed = math.floor(fpr * len(scores) + 1e-9)
    if allowed == 0:
        return float(np.nextafter(scores[-1], np.inf))
    return float(scores[len(scores) - allowed])


def calibrate_memorization(
    pipe: Any,
    benign_prompts: Sequence[str],
    fpr: float = 0.01,
    *,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    memorization_steps: int = 1,
    images_per_prompt: int = 1,
    seed: int = 0,
    **call_kwargs: Any,
) -> MemorizationThreshold:
    """Calibrate the memorization-score threshold of `pipe` at `fpr` on prompts known not to be memorized.

    Use a varied benign set (hundreds of prompts: COCO captions, your own traffic), not one style: a distinctive
    concept can score as high as a memorized prompt.
    """
    if not 0 < fpr < 1:
        raise UsageError(f"fpr must be in (0, 1), got {fpr!r}")
    settings = {key: value for key, value in
                (("guidance_scale", guidance_scale), ("num_inference_steps", num_inference_steps)) if value is not None}
    scores = memorization_scores(
        pipe, benign_prompts, seed=seed, images_per_prompt=images_per_prompt,
        memorization_steps=memorization_steps, **settings, **call_kwargs,
    )
    if len(scores) * fpr < 1:
        raise UsageError(
            f"{len(scores)} benign scores cannot calibrate an FPR of {fpr}: pass at least {math.ceil(1 / fpr)} "
            "prompts (or more images_per_prompt)"
        )
    return MemorizationThreshold(
        threshold=threshold_at_fpr(scores, fpr),
        fpr=fpr,
        pipeline=pipeline_key(pipe),
        guidance_scale=float(getattr(pipe, "guidance_scale", guidance_scale or 0.0)),
        num_inference_steps=int(num_inference_steps or 0),
        memorization_steps=memorization_steps,
        benign_prompts=len(benign_prompts),
        benign_max=float(scores.max()),
    )


def detection_metrics(memorized: Sequence[float], benign: Sequence[float], fpr: float = 0.01) -> dict:
    """AUC of the score separating memorized from benign generations, and the TPR at `fpr` (threshold from benign)."""
    positives = np.asarray(memorized, dtype=np.float64)
    negatives = np.asarray(benign, dtype=np.float64)
    if not len(positives) or not len(negatives):
        raise UsageError("detection_metrics needs at least one memorized and one benign score")
    # AUC = P(positive > negative) + 0.5 P(tie), by ranks (Mann-Whitney U).
    greater = (positives[:, None] > negatives[None, :]).mean()
    ties = (positives[:, None] == negatives[None, :]).mean()
    threshold = threshold_at_fpr(negatives, fpr)
    return {
        "auc": float(greater + 0.5 * ties),
        "tpr_at_1pct_fpr" if fpr == 0.01 else f"tpr_at_{fpr:g}_fpr": float((positives >= threshold).mean()),
        "threshold": threshold,
        "false_positive_rate": float((negatives >= threshold).mean()),
        "memorized": len(positives),
        "benign": len(negatives),
    }
