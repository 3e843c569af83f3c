"""Watching a diffusers pipeline while it samples: the memorization score and the early blocklist check.

Two signals arrive long before the last step, at almost no cost:

- **The step-1 memorization score** of Wen et al. (ICLR 2024), d_t = ||ε(x_t, prompt) - ε(x_t, ∅)||₂ per image. The
  pipeline already computes both halves in its classifier-free-guidance batch (`[uncond; cond]`, as SD, SDXL and
  SD3 lay it out), so a forward hook on the denoiser reads it with no extra pass. A memorized prompt pulls the
  conditional prediction far from the unconditional one at the very first step.
- **The early blocklist check**: at chosen fractions of the schedule, the scheduler's own x̂0 prediction
  (`pred_original_sample`) is decoded and checked against the blocklist. A memorized image is recognisable in x̂0
  long before the noise is gone, so a doomed generation can be stopped (the pipeline's `interrupt`) instead of
  finished and thrown away.

`SamplingMonitor` attaches both for one call and always detaches them, whether the call returns or raises.
Pipelines without a CFG batch (guidance_scale <= 1, guidance-distilled models such as Flux, unconditional models) get
`None` scores and nothing breaks. The early check needs x̂0: from the scheduler, or computed from an
`alphas_cumprod` schedule; otherwise it is skipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UsageError

DEFAULT_EARLY_CHECK = (0.2, 0.4)
"""Fractions of the schedule after which x̂0 is checked (steps 5 and 10 of 25)."""


def denoiser_of(pipe: Any) -> Any:
    """The module that predicts the noise: `pipe.unet` (SD, SDXL) or `pipe.transformer` (SD3, Flux, PixArt)."""
    for name in ("unet", "transformer", "prior"):
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "register_forward_hook"):
            return module
    return None


def uses_cfg_batch(pipe: Any) -> bool:
    """Whether the pipeline's current call runs the doubled `[uncond; cond]` batch (diffusers' property)."""
    try:
        return bool(getattr(pipe, "do_classifier_free_guidance", False))
    except (AttributeError, TypeError):  # properties that read call state which is not set
        return False


def denoiser_prediction(output: Any) -> Any:
    """The tensor a denoiser returned: `.sample`, or the first element of a `return_dict=False` tuple."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


@dataclass
class SamplingRecord:
    """What the monitor saw during one generation (one pipeline call), per image of that call."""

    images: int | None = None  # learnt from the first denoiser call
    guidance_differences: list[list[float]] = field(default_factory=list)  # per denoiser call: d per image
    denoiser_calls: int = 0
    denoiser_rows: int = 0  # images evaluated, CFG halves counted: what a denoiser step costs
    early_scores: dict[int, list[float]] = field(default_factory=dict)  # step -> score per image
    stopped_at: list[int | None] = field(default_factory=list)
    early_verdicts: list[Any] = field(default_factory=list)  # the early-check verdict of each stopped image
    triggered: list[bool] = field(default_factory=list)  # stage-0 trigger per image (score or caption)
    trigger_interrupted: bool = False  # every image was triggered, so the generation stopped there

    def memorization(self, steps: int, images: int) -> list[float | None]:
        """Mean d over the first `steps` denoiser calls, per image; None without a CFG batch or for non-finite d."""
        if not self.guidance_differences or self.images != images:
            return [None] * images
        window = np.asarray(self.guidance_differences[:steps], dtype=np.float64)
        means = window.mean(axis=0)
        return [float(value) if math.isfinite(value) else None for value in means]

    def stops(self, images: int) -> list[int | None]:
        return self.stopped_at if len(self.stopped_at) == images else [None] * images

    def denoiser_steps_per_image(self, images: int) -> float:
        return self.denoiser_rows / max(1, images)


class SamplingMonitor:
    """Observes one generation of `pipe`: d_t from the CFG batch, x̂0 checks at `early_check` fractions.

    Args:
        pipe: the diffusers pipeline.
        guard: a `Guard` (anything with `check(images)`); None turns the early check off.
        early_check: fractions of the schedule after which x̂0 is checked; () turns the check off.
        early_margin: an image is stopped when its x̂0 scores at least `guard.threshold - early_margin`.
        stop_after_denoiser_calls: interrupt the pipeline after this many denoiser calls (score-only runs).
        trigger_threshold, trigger_rows: the stage-0 triggers. After `memorization_steps` denoiser calls, an image
            whose memorization score reaches `trigger_threshold`, or whose row is in `trigger_rows` (its prompt is a
            blocklisted caption), is triggered; with `interrupt_when_all_triggered`, a generation whose every image
            is triggered is interrupted there.
    """

    def __init__(
        self,
        pipe: Any,
        guard: Any = None,
        early_check: Sequence[float] = (),
        early_margin: float = 0.0,
        stop_after_denoiser_calls: int | None = None,
        trigger_threshold: float | None = None,
        trigger_rows: Sequence[int] = (),
        memorization_steps: int = 1,
        interrupt_when_all_triggered: bool = False,
    ) -> None:
        self.pipe = pipe
        self.guard = guard
        self.early_check = tuple(early_check) if guard is not None else ()
        self.early_margin = early_margin
        self.stop_after_denoiser_calls = stop_after_denoiser_calls
        self.trigger_threshold = trigger_threshold
        self.trigger_rows = frozenset(trigger_rows)
        self.memorization_steps = memorization_steps
        self.interrupt_when_all_triggered = interrupt_when_all_triggered
        self._triggers_on = trigger_threshold is not None or bool(self.trigger_rows)
        self.record = SamplingRecord()
        self._handles: list[Any] = []
        self._scheduler = None
        self._step = 0

    def __enter__(self) -> "SamplingMonitor":
        denoiser = denoiser_of(self.pipe)
        if denoiser is not None:
            self._handles.append(denoiser.register_forward_hook(self._on_denoiser_output))
        scheduler = getattr(self.pipe, "scheduler", None)
        if self.early_check and scheduler is not None and hasattr(scheduler, "step"):
            original = scheduler.step

            @functools.wraps(original)  # pipelines read step's signature to decide whether to pass eta / generator
            def step(*args: Any, **kwargs: Any) -> Any:
                result = original(*args, **kwargs)
                self._on_scheduler_step(scheduler, args, kwargs, result)
                return result

            scheduler.step = step  # an instance attribute: shadows the class's method for this call only
            self._scheduler = scheduler
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._scheduler is not None:
            del self._scheduler.step
            self._scheduler = None

    # ---- the memorization score ------------------------------------------------------------------------------

    def _on_denoiser_output(self, module: Any, inputs: Any, output: Any) -> None:
        prediction = denoiser_prediction(output)
        rows = int(prediction.shape[0]) if hasattr(prediction, "shape") and prediction.ndim else 0
        record = self.record
        cfg = uses_cfg_batch(self.pipe) and rows % 2 == 0
        if record.images is None:
            record.images = rows // 2 if cfg else rows
            record.stopped_at = [None] * record.images
            record.early_verdicts = [None] * record.images
        record.denoiser_calls += 1
        record.denoiser_rows += rows
        if self.stop_after_denoiser_calls is not None and record.denoiser_calls >= self.stop_after_denoiser_calls:
            self.pipe._interrupt = True
        if cfg and rows == 2 * record.images:
            uncond, cond = prediction.detach().float().chunk(2)
            record.guidance_differences.append((cond - uncond).flatten(1).norm(dim=1).cpu().tolist())
        if self._triggers_on and not record.triggered and (
            len(record.guidance_differences) >= self.memorization_steps or not cfg
        ):
            self._decide_triggers()

    def _decide_triggers(self) -> None:
        record = self.record
        scores = record.memorization(self.memorization_steps, record.images)
        record.triggered = [
            row in self.trigger_rows
            or (self.trigger_threshold is not None and score is not None and score >= self.trigger_threshold)
            for row, score in enumerate(scores)
        ]
        if self.interrupt_when_all_triggered and all(record.triggered):
            record.trigger_interrupted = True
            self.pipe._interrupt = True

    # ---- the early check -------------------------------------------------------------------------------------

    def _check_steps(self, total: int) -> set[int]:
        return {max(0, math.ceil(fraction * total) - 1) for fraction in self.early_check if 0 < fraction < 1}

    def _on_scheduler_step(self, scheduler: Any, args: tuple, kwargs: dict, result: Any) -> None:
        step = self._step
        self._step += 1
        timesteps = getattr(scheduler, "timesteps", None)
        total = 0 if timesteps is None else len(timesteps)
        if step not in self._check_steps(total) or getattr(self.pipe, "_interrupt", False):
            return
        x0 = _predicted_original(scheduler, args, kwargs, result)
        if x0 is None or self.record.images is None or x0.shape[0] != self.record.images:
            return
        spec = getattr(getattr(self.guard, "embedder", None), "spec", None) or {}
        images = decode_x0(self.pipe, x0, preview_side=max(spec.get("image_size") or [0]) or None)
        if images is None:
            return
        record = self.record
        running = [i for i, stopped in enumerate(record.stopped_at) if stopped is None]
        verdicts = _preview_check(self.guard, images[running])
        threshold = getattr(self.guard, "threshold", None)
        scores = [float(v.score) for v in verdicts]
        record.early_scores[step] = [float("nan")] * record.images
        for image, verdict, score in zip(running, verdicts, scores):
            record.early_scores[step][image] = score
            doomed = verdict.matched if threshold is None else score >= threshold - self.early_margin
            if doomed:
                record.stopped_at[image] = step + 1  # steps completed when it was stopped
                record.early_verdicts[image] = verdict
        if all(stopped is not None for stopped in record.stopped_at):
            self.pipe._interrupt = True  # diffusers' pipelines skip the remaining steps


def _preview_check(guard: Any, images: Any) -> list:
    """`guard.check` of unfinished images, kept out of the guard's match statistics where it supports that."""
    import inspect

    try:
        takes_record = "record" in inspect.signature(guard.check).parameters
    except (TypeError, ValueError):
        takes_record = False
    return guard.check(images, record=False) if takes_record else guard.check(images)


def _predicted_original(scheduler: Any, args: tuple, kwargs: dict, result: Any) -> Any:
    """x̂0 of a scheduler step: its `pred_original_sample`, or computed from the step's inputs and ᾱ_t."""
    x0 = getattr(result, "pred_original_sample", None)
    if x0 is None and isinstance(result, tuple) and len(result) > 1:
        x0 = result[1]
    if x0 is not None:
        return x0
    model_output = kwargs.get("model_output", args[0] if args else None)
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    sample = kwargs.get("sample", args[2] if len(args) > 2 else None)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if model_output is None or sample is None or alphas is None or timestep is None:
        return None
    import torch

    alpha = alphas[int(torch.as_tensor(timestep).flatten()[0])].to(sample.device, torch.float32)
    kind = scheduler.config.get("prediction_type", "epsilon")
    model_output, sample = model_output.float(), sample.float()
    if kind == "epsilon":
        return (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
    if kind == "sample":
        return model_output
    if kind == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
    return None


def decode_x0(pipe: Any, x0: Any, grad: bool = False, preview_side: int | None = None) -> Any:
    """x̂0 -> NCHW float images in [0, 1], decoded as the pipeline decodes its latents, or None where that is not
    possible: the VAE (SD, SDXL), the pipeline's own `latents_to_image` (the digits demo), or pixels as they are.

    With `grad`, gradients flow from the images back to `x0` (for steering). With `preview_side` (the embedder's input
    side), latents that would decode to at least twice that side are average-pooled first: the VAE decode, the
    costliest part of a preview, then costs a quarter (SD 1.5: 512 px -> 256 px, still above CLIP's 224).
    """
    import torch

    if x0.ndim != 4:
        return None  # packed latents (Flux) and video: no per-image decode here
    vae = getattr(pipe, "vae", None)
    with torch.enable_grad() if grad else torch.no_grad():
        if vae is not None:
            latents = x0.to(vae.dtype) / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift:
                latents = latents + shift
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            while preview_side and min(latents.shape[-2:]) * factor >= 2 * preview_side:
                latents = torch.nn.functional.avg_pool2d(latents, 2)
            decoded = vae.decode(latents, return_dict=False)[0]
        elif callable(getattr(pipe, "latents_to_image", None)):
            decoded = pipe.latents_to_image(x0)
        elif x0.shape[1] in (1, 3):
            decoded = x0
        else:
            return None
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def check_call_inputs(call: dict) -> None:
    """Refuse inputs that would only fail deep inside a hook: an empty prompt list, non-finite latents."""
    prompt = call.get("prompt")
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise UsageError("prompt is an empty list: pass at least one prompt")
    latents = call.get("latents")
    if latents is not None and hasattr(latents, "isfinite") and not bool(latents.isfinite().all()):
        raise UsageError("latents contain NaN or infinite values: pass finite starting noise (or none)")


def validate_early_check(early_check: Sequence[float] | None, early_margin: float) -> tuple[float, ...]:
    """The early-check fractions as a tuple, each in (0, 1); a clear error otherwise."""
    fractions = tuple(early_check or ())
    for fraction in fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise UsageError(f"early_check must hold fractions of the schedule in (0, 1), got {fraction!r}")
    if not isinstance(early_margin, (int, float)) or not 0 <= early_margin < 1:
        raise UsageError(f"early_margin must be in [0, 1), got {early_margin!r}")
    return fractions
