"""`GuardedPipeline`: a drop-in wrapper for any diffusers pipeline that keeps blocklisted images from users.

It calls the wrapped pipeline with the caller's own arguments, checks every image, and then either regenerates only
the matched slots with fresh, deterministically derived seeds (`"resample"`), replaces them with black images
(`"reject"`, as diffusers' safety checker does), or only reports them (`"flag"`). The output is the pipeline's own
output type, with a `guardrail` report attached.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .batching import BatchLayout
from .blocklist import Blocklist, atomic_path
from .embedders import Embedder
from .rebuild import embedder_from_spec
from .errors import GuardrailError, ResampleExhaustedError, UsageError
from .guard import Guard, Verdict
from .detector import MemorizationThreshold
from .mitigation import STAGES, Reseed, Stage, StageAttempt, resolve_stages
from .sampling import DEFAULT_EARLY_CHECK, SamplingMonitor, check_call_inputs, validate_early_check

logger = logging.getLogger(__name__)

ACTIONS = ("resample", "reject", "flag")
DEFAULT_STRATEGIES = ("reseed", "steer_away", "perturb_prompt")
"""Measured best on the digits demo model (`guardrail demo`); `delay_guidance` is there to add where it helps."""
ON_EXHAUSTED = ("black", "raise", "keep")

CAPTION_TRIGGER_LIMIT = 1_000_000
"""Blocklists up to this many entries have their captions read for the caption trigger (`match_captions`)."""
SAVED_FOLDER = "guardrail"
"""`save_pretrained` writes the blocklist and the guard's settings into this subfolder of the pipeline folder."""


@dataclass
class GuardReport:
    """What the guard did to one pipeline call, one list item per output image (in output order).

    Attributes:
        verdicts: the final verdict of each returned image (for a blocked image: of the image that was blocked).
        attempts: how many times each slot was generated, starting at 1.
        blocked: whether each image was replaced with a black image.
        exhausted: whether each slot still matched after `max_attempts` generations.
        action: the action this call ran with.
        memorization: the step-1 memorization score of each slot's first generation (Wen et al.'s d, the norm of
            the conditional minus the unconditional prediction, averaged over the first `memorization_steps`
            denoiser calls); None where the pipeline ran no classifier-free-guidance batch.
        stopped_at: the denoising step at which the early blocklist check stopped the slot's first generation
            (steps completed), or None when it ran to the end.
        denoiser_steps: denoiser evaluations each slot cost over all its generations, CFG halves counted as the
            pipeline runs them (a 25-step CFG generation costs 50).
        stages: what produced each delivered image: `"first"` (the caller's own generation), the name of the
            mitigation stage whose attempt succeeded (`"reseed"`, `"delay_guidance"`, ...), or `"refused"` when every
            attempt matched (the image is black, raised, or kept and flagged, as `on_exhausted` says).
        tried: the stages each slot's retries ran, in order (empty for a slot that was never retried).
        triggered: whether a stage-0 trigger (memorization score at or above `memorization_threshold`, or a prompt
            that is a blocklisted caption) sent the slot straight to the first mitigation stage.
    """

    verdicts: list[Verdict]
    attempts: list[int]
    blocked: list[bool]
    exhausted: list[bool] = field(default_factory=list)
    action: str = "resample"
    memorization: list[float | None] = field(default_factory=list)
    stopped_at: list[int | None] = field(default_factory=list)
    denoiser_steps: list[float] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    tried: list[list[str]] = field(default_factory=list)
    triggered: list[bool] = field(default_factory=list)

    @property
    def resampled(self) -> list[bool]:
        return [count > 1 for count in self.attempts]

    @property
    def matched(self) -> list[bool]:
        return [verdict.matched for verdict in self.verdicts]

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "verdicts": [verdict.to_dict() for verdict in self.verdicts],
            "attempts": self.attempts,
            "blocked": self.blocked,
            "exhausted": self.exhausted,
            "memorization": self.memorization,
            "stopped_at": self.stopped_at,
            "denoiser_steps": self.denoiser_steps,
            "stages": self.stages,
            "tried": self.tried,
            "triggered": self.triggered,
        }


class GuardedTuple(tuple):
    """The wrapped pipeline's `return_dict=False` tuple, unchanged in shape, with the `guardrail` report attached."""

    guardrail: GuardReport


class GuardedPipeline:
    """Wraps a diffusers pipeline so that no returned image matches the blocklist.

    Args:
        pipe (`DiffusionPipeline`):
            Any pipeline whose output has `.images` (or whose `return_dict=False` tuple starts with the images):
            `StableDiffusionPipeline`, SDXL, Flux, `DDPMPipeline`, ...
        guard (`Guard`):
            The guard to check images with (or any object with its `check(images) -> list[Verdict]`, e.g. a wrapper
            that records verdicts).
        action (`str`, *optional*, defaults to `"resample"`):
            `"resample"` regenerates matched slots with fresh seeds; `"reject"` returns black images in their place;
            `"flag"` changes no image and only reports.
        max_attempts (`int`, *optional*, defaults to 4):
            Generations per slot under `"resample"`, the first one included.
        on_exhausted (`str`, *optional*, defaults to `"black"`):
            What `"resample"` does with a slot that still matches after `max_attempts`: `"black"` replaces it,
            `"raise"` raises `ResampleExhaustedError` (with the other slots' images attached), `"keep"` returns it
            flagged in the report.
        strategies (`tuple`, *optional*, defaults to `("reseed", "steer_away", "perturb_prompt")`):
            The escalation stages `"resample"` tries on matched slots, in order, one attempt each (the last one
            repeats while attempts remain): names from `guardrail.mitigation.STAGES` (`"reseed"`,
            `"delay_guidance"`, `"perturb_prompt"`, `"steer_away"`) or your own `Stage` objects. Every result is
            checked by the guard; a slot is refused only when `max_attempts` generations all matched.
        memorization_threshold (`float`, `MemorizationThreshold` or path, *optional*):
            A calibrated threshold on the step-1 memorization score (`guardrail.detector.calibrate_memorization`).
            A slot at or above it is *triggered*: if it then matches, it starts at the first stage that is not a
            plain reseed (a reseed of a memorized prompt gives the same image back).
        match_captions (`bool`, *optional*, defaults to `True`):
            Also trigger a slot whose prompt is, after normalization, the caption of a blocklist entry.
        skip_triggered (`bool`, *optional*, defaults to `False`):
            When every slot of a call is triggered, stop the first generation right after the score's steps and go
            straight to mitigation, instead of finishing it (saves nearly a whole generation of a likely copy). Off
            by default: a trigger is not a verdict, and a triggered slot that would not have matched then changes.
        memorization_steps (`int`, *optional*, defaults to 1):
            Denoiser calls the memorization score (`GuardReport.memorization`) averages over.
        early_check (`tuple[float]`, *optional*, defaults to `(0.2, 0.4)`):
            Fractions of the schedule after which the scheduler's x̂0 prediction is decoded and checked against the
            blocklist; a slot that matches is judged then, and a batch whose every slot matched is interrupted
            instead of finished. `()` turns the check off. It is off for `"flag"`, and for the last attempt under
            `on_exhausted="keep"` (both promise a finished image).
        early_margin (`float`, *optional*, defaults to 0.0):
            The early check stops a slot whose x̂0 scores at least `threshold - early_margin`.

    Each call also takes `guardrail_action=`, `guardrail_max_attempts=` and `guardrail_on_exhausted=`, which override
    the settings above for that call only.

    Every attribute the wrapper does not define is forwarded to `pipe`, so `.scheduler` and `enable_*()` work
    unchanged (methods that return the pipeline return the wrapper instead). `.to(...)` moves the guard too, as
    diffusers moves its safety checker: the embedder follows the pipeline's device and dtype (half precision only
    on a GPU), and the faiss index moves to the GPU when faiss has GPU support.

    A `callback_on_step_end` runs on every generation, retries included. Its `callback_kwargs` carry two extra
    fields: `guardrail_attempt` (1 for the caller's own batch, 2+ for retries) and `guardrail_slots` (the output slots
    that batch generates, in order). Its previews are of images the guard has not judged yet. The legacy `callback`
    sees the first generation only.
    """

    _WRAPPER_ATTRIBUTES = frozenset(
        {"pipe", "guard", "action", "max_attempts", "on_exhausted", "strategies", "memorization_threshold",
         "match_captions", "skip_triggered", "memorization_steps", "early_check", "early_margin", "_signature", "_captions"}
    )

    def __init__(
        self,
        pipe: Any,
        guard: Guard,
        action: str = "resample",
        max_attempts: int = 4,
        on_exhausted: str = "black",
        strategies: Sequence[str | Stage] = DEFAULT_STRATEGIES,
        memorization_threshold: float | MemorizationThreshold | str | os.PathLike | None = None,
        match_captions: bool = True,
        skip_triggered: bool = False,
        memorization_steps: int = 1,
        early_check: Sequence[float] | None = DEFAULT_EARLY_CHECK,
        early_margin: float = 0.0,
    ) -> None:
        if not callable(pipe):
            raise UsageError(f"pipe must be a callable diffusers pipeline, got {type(pipe).__name__}")
        if not callable(getattr(guard, "check", None)):
            raise UsageError(f"guard must be a guardrail.Guard (or have its check(images) method), got {type(guard).__name__}")
        _check_settings(action, max_attempts, on_exhausted)
        if isinstance(memorization_steps, bool) or not isinstance(memorization_steps, int) or memorization_steps < 1:
            raise UsageError(f"memorization_steps must be an integer >= 1, got {memorization_steps!r}")
        if isinstance(memorization_threshold, (str, os.PathLike)):
            memorization_threshold = MemorizationThreshold.load(memorization_threshold)
        if isinstance(memorization_threshold, MemorizationThreshold):
            memorization_threshold = memorization_threshold.threshold
        self.__dict__.update(
            pipe=pipe,
            guard=guard,
            action=action,
            max_attempts=max_attempts,
            on_exhausted=on_exhausted,
            strategies=resolve_stages(strategies),
            memorization_threshold=None if memorization_threshold is None else float(memorization_threshold),
            match_captions=bool(match_captions),
            skip_triggered=bool(skip_triggered),
            memorization_steps=memorization_steps,
            early_check=validate_early_check(early_check, early_margin),
            early_margin=float(early_margin),
            _signature=inspect.signature(pipe.__call__),
            _captions=(None, frozenset()),  # (blocklist, its normalized captions), cached per blocklist
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        blocklist: Blocklist | str | os.PathLike | None = None,
        embedder: Embedder | None = None,
        *,
        action: str | None = None,
        max_attempts: int | None = None,
        on_exhausted: str | None = None,
        strategies: Sequence[str | Stage] | None = None,
        memorization_threshold: float | MemorizationThreshold | str | os.PathLike | None = None,
        threshold: float | None = None,
        embedder_device: str | None = None,
        embedder_pretrained: str | os.PathLike | None = None,
        descriptor: Embedder | None = None,
        tiles: bool | None = None,
        pipeline_class: Any = None,
        **pipeline_kwargs: Any,
    ) -> "GuardedPipeline":
        """Load a diffusers pipeline and guard it, in one call.

        Args:
            pretrained_model_name_or_path: what `DiffusionPipeline.from_pretrained` takes (a hub id or local folder).
                A folder written by `GuardedPipeline.save_pretrained` brings its blocklist and settings along.
            blocklist: a `Blocklist` or the path of a blocklist file; defaults to the one `save_pretrained` saved.
            embedder: the embedder to use; by default it is rebuilt from the blocklist's spec (its pretrained tag,
                or `embedder_pretrained`: the weights file a blocklist built from a local file needs again).
            action, max_attempts, on_exhausted, strategies, memorization_threshold, threshold: as for
                `GuardedPipeline` and `Guard`; by default the saved settings, else the defaults.
            embedder_device: where the rebuilt embedder runs; by default it follows the pipeline's device and dtype.
            descriptor, tiles: as for `Guard`; by default the saved guard's (its descriptor file is saved with it).
            pipeline_class: the pipeline class to load with (defaults to `diffusers.DiffusionPipeline`).
            **pipeline_kwargs: passed to `from_pretrained` (`torch_dtype`, `local_files_only`, `variant`, ...).
        """
        saved = _saved_settings(pretrained_model_name_or_path)
        if blocklist is None:
            blocklist = saved.get("blocklist")
            if blocklist is None:
                raise UsageError(
                    f"blocklist is required: {pretrained_model_name_or_path} holds no guardrail/ folder from "
                    "GuardedPipeline.save_pretrained; pass blocklist=<Blocklist or .safetensors path>"
                )
        if not isinstance(blocklist, Blocklist):
            blocklist = Blocklist.load(blocklist)
        follow_pipeline = embedder is None and embedder_device is None
        if embedder is None:
            embedder = embedder_from_spec(blocklist.spec, pretrained=embedder_pretrained, device=embedder_device or "cpu")
        threshold = saved.get("threshold") if threshold is None else threshold
        if descriptor is None and saved.get("descriptor_file"):
            descriptor = embedder_from_spec(blocklist.descriptor.spec, pretrained=saved["descriptor_file"],
                                            device=embedder_device or "cpu")
        tiles = saved.get("tiles", False) if tiles is None else tiles
        guard = Guard(blocklist, embedder, threshold=threshold, descriptor=descriptor, tiles=tiles)  # checked first
        if pipeline_class is None:
            from diffusers import DiffusionPipeline as pipeline_class
        pipe = pipeline_class.from_pretrained(pretrained_model_name_or_path, **pipeline_kwargs)
        if follow_pipeline:
            guard.to(pipe.device, dtype=pipe.dtype)
        return cls(
            pipe,
            guard,
            action=action or saved.get("action", "resample"),
            max_attempts=max_attempts or saved.get("max_attempts", 4),
            on_exhausted=on_exhausted or saved.get("on_exhausted", "black"),
            strategies=strategies or saved.get("strategies", DEFAULT_STRATEGIES),
            memorization_threshold=(memorization_threshold if memorization_threshold is not None
                                    else saved.get("memorization_threshold")),
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the pipeline (as diffusers does) plus `guardrail/`: the blocklist file and the guard's settings.

        `GuardedPipeline.from_pretrained(save_directory)` then restores the whole guarded pipeline. The embedder is
        rebuilt from the blocklist's spec; one made from a local weights file needs `embedder_pretrained=` again.
        Strategies are saved by name: custom stage objects or parameters must be passed again.
        """
        unknown = [stage.name for stage in self.strategies if stage.name not in STAGES]
        if unknown:
            raise UsageError(f"strategies {unknown} are custom stages that cannot be saved by name: save the pipeline "
                             "with .pipe.save_pretrained(...) and pass strategies= again when loading")
        if not isinstance(self.guard, Guard):
            raise UsageError(
                f"save_pretrained saves a guardrail.Guard's blocklist, and this guard is a {type(self.guard).__name__}: "
                "save the pipeline with .pipe.save_pretrained(...) and your guard's blocklist yourself"
            )
        self.pipe.save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory) / SAVED_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.guard.blocklist.save(folder / "blocklist.safetensors")
        descriptor_file = _saved_descriptor(self.guard.descriptor, folder)
        settings = {
            "action": self.action,
            "max_attempts": self.max_attempts,
            "on_exhausted": self.on_exhausted,
            "threshold": self.guard.threshold,
            "strategies": [stage.name for stage in self.strategies],
            "memorization_threshold": self.memorization_threshold,
            "descriptor_file": descriptor_file,
            "tiles": self.guard.tiles,
        }
        temporary = folder / "guardrail_config.json.tmp"
        temporary.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, folder / "guardrail_config.json")

    # ---- forwarding ------------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name == "pipe" or name.startswith("__"):  # not set up yet (copy, unpickling): no forwarding loop
            raise AttributeError(name)
        attribute = getattr(self.pipe, name)
        if not inspect.ismethod(attribute):
            return attribute

        @functools.wraps(attribute)
        def forwarded(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            return self if result is self.pipe else result  # keep `pipe = pipe.to("cuda")` guarded

        return forwarded

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._WRAPPER_ATTRIBUTES:
            self.__dict__[name] = value
        else:
            setattr(self.pipe, name, value)

    def __repr__(self) -> str:
        return f"GuardedPipeline({type(self.pipe).__name__}, action={self.action!r}, guard={self.guard!r})"

    def to(self, *args: Any, **kwargs: Any) -> "GuardedPipeline":
        """Move the pipeline (diffusers' `to` arguments) and the guard with it; returns the wrapper."""
        self.pipe.to(*args, **kwargs)
        move_guard = getattr(self.guard, "to", None)
        if callable(move_guard):
            move_guard(self.pipe.device, dtype=getattr(self.pipe, "dtype", None))
        return self

    # ---- the call --------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped pipeline with its own arguments; returns its own output type plus `.guardrail`."""
        action, max_attempts, on_exhausted = self._settings_for_call(kwargs)
        call = self._bind(args, kwargs)
        if call.get("output_type") == "latent":
            raise UsageError(
                "output_type='latent' cannot be guarded: latents are not images. Use 'pil', 'np' or 'pt'; with an "
                "SDXL base + refiner, guard the refiner (the call that returns images), not the base"
            )
        check_call_inputs(call)
        escalating = action == "resample" and max_attempts > 1
        early = action != "flag" and not (action == "resample" and on_exhausted == "keep" and max_attempts == 1)
        monitor = self._monitor(early, triggers=self._trigger_rows(call) if escalating else None)
        output, record = self._generate(call, 1, None, monitor)
        images = _writable(_images_of(output))
        count = len(images)
        fields = _per_image_fields(output, count)  # e.g. nsfw_content_detected: kept in step with the images
        verdicts = _judged(self.guard.check(images), record, count)
        slots = _SlotLedger(count, record.denoiser_steps_per_image(count))
        triggered = record.triggered if len(record.triggered) == count else [False] * count

        pending: list[int] = []
        if action == "resample":
            pending = self._escalate(call, images, fields, verdicts, slots, triggered, max_attempts, on_exhausted)
            to_block = pending if on_exhausted in ("black", "raise") else []
        elif action == "reject":
            to_block = [slot for slot, verdict in enumerate(verdicts) if verdict.matched]
        else:
            to_block = []

        for slot in to_block:
            images[slot] = _black_like(images[slot])
        report = GuardReport(
            verdicts,
            slots.attempts,
            blocked=[slot in to_block for slot in range(count)],
            exhausted=[slot in pending for slot in range(count)],
            action=action,
            memorization=record.memorization(self.memorization_steps, count),
            stopped_at=record.stops(count),
            denoiser_steps=slots.steps,
            stages=["refused" if slot in pending or slot in to_block else slots.stages[slot] for slot in range(count)],
            tried=slots.tried,
            triggered=triggered,
        )
        guarded = _with_images(output, images, fields, report)
        if pending and on_exhausted == "raise":
            raise ResampleExhaustedError(
                f"slots {pending} still matched the blocklist after {max_attempts} attempts; the error's `output` "
                "holds the other slots' images (the exhausted ones black)",
                report,
                guarded,
            )
        if to_block:
            logger.warning(
                "guardrail: %d of %d generated images matched the blocklist and were replaced by black images. "
                "Try a different prompt or seed.",
                len(to_block),
                count,
            )
        return guarded

    def _monitor(self, early: bool, triggers: list[int] | None = None) -> SamplingMonitor:
        return SamplingMonitor(
            self.pipe,
            self.guard,
            early_check=self.early_check if early else (),
            early_margin=self.early_margin,
            trigger_threshold=self.memorization_threshold if triggers is not None else None,
            trigger_rows=triggers or (),
            memorization_steps=self.memorization_steps,
            interrupt_when_all_triggered=self.skip_triggered,
        )

    def _generate(
        self, call: dict, attempt: int, slots: list[int] | None, monitor: SamplingMonitor, stage_hooks: Any = None
    ) -> tuple[Any, Any]:
        """One pipeline call with the monitor's hooks (and then a stage's) attached for this call only."""
        with monitor, stage_hooks or contextlib.nullcontext():
            output = self.pipe(**with_attempt_fields(call, attempt, slots))
        return output, monitor.record

    def _escalate(
        self, call: dict, images: Any, fields: dict, verdicts: list, slots: "_SlotLedger", triggered: list[bool],
        max_attempts: int, on_exhausted: str,
    ) -> list[int]:
        """Regenerate matched slots in place, stage after stage; returns the slots that still match at the end.

        Each attempt runs one batched call per stage in use. A slot moves to the next stage after each failed
        attempt (the last stage repeats). A triggered slot starts at the first stage that is not a plain reseed.
        """
        count = len(images)
        pending = [slot for slot, verdict in enumerate(verdicts) if verdict.matched]
        layout = BatchLayout.of(self.pipe, call, count, self._signature) if pending else None
        skip_reseed = next((i for i, stage in enumerate(self.strategies) if not isinstance(stage, Reseed)), 0)
        next_stage = {slot: skip_reseed if triggered[slot] else 0 for slot in pending}
        for attempt in range(2, max_attempts + 1):
            if not pending:
                break
            early = not (attempt == max_attempts and on_exhausted == "keep")
            by_stage: dict[int, list[int]] = {}
            for slot in pending:
                by_stage.setdefault(next_stage[slot], []).append(slot)
            for index, group in sorted(by_stage.items()):
                self._run_stage(call, layout, group, attempt, index, early, images, fields, verdicts, slots)
            pending = [slot for slot in pending if verdicts[slot].matched]
            for slot in pending:
                next_stage[slot] = min(next_stage[slot] + 1, len(self.strategies) - 1)
        return pending

    def _run_stage(
        self, call: dict, layout: BatchLayout, group: list[int], attempt: int, index: int, early: bool,
        images: Any, fields: dict, verdicts: list, slots: "_SlotLedger",
    ) -> None:
        """One attempt of one stage on `group`: the first stage from `index` on that applies (else a reseed)."""
        generators = [retry_generator(call.get("generator"), slot, attempt) for slot in group]
        subcall = layout.subcall(call, group, generators)
        subcall.pop("callback", None)  # the legacy callback sees the caller's own batch only
        context = StageAttempt(group, attempt, [g.initial_seed() for g in generators],
                               [verdicts[slot] for slot in group], self.guard)
        stage, hooks = Reseed(), contextlib.nullcontext()
        for candidate in self.strategies[index:]:
            prepared = candidate.prepare(self.pipe, subcall, context)
            if prepared is not None:
                stage, hooks = candidate, prepared
                break
        retry_output, record = self._generate(subcall, attempt, group, self._monitor(early), hooks)
        retry = _images_of(retry_output)
        if len(retry) != len(group):
            raise GuardrailError(
                f"resampling {len(group)} slots returned {len(retry)} images; this pipeline's batch "
                "layout is not supported by action='resample' (use 'reject' or 'flag')"
            )
        retry_fields = _per_image_fields(retry_output, len(group))
        retry_verdicts = _judged(self.guard.check(retry), record, len(group))
        cost = record.denoiser_steps_per_image(len(group))
        for row, (slot, image, verdict) in enumerate(zip(group, _as_list(retry), retry_verdicts)):
            images[slot], verdicts[slot] = image, verdict
            slots.record(slot, attempt, stage.name, cost)
            for key in fields.keys() & retry_fields.keys():
                fields[key][slot] = retry_fields[key][row]

    def _trigger_rows(self, call: dict) -> list[int] | None:
        """Output slots whose prompt is a blocklisted caption (normalized); None when no trigger is configured."""
        if not self.match_captions and self.memorization_threshold is None:
            return None
        rows: list[int] = []
        prompt = call.get("prompt")
        captions = self._blocklisted_captions() if self.match_captions else frozenset()
        if captions and prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            per_prompt = int(call.get("num_images_per_prompt") or 1)
            for index, text in enumerate(prompts):
                if isinstance(text, str) and normalize_caption(text) in captions:
                    rows.extend(range(index * per_prompt, (index + 1) * per_prompt))
        return rows

    def _blocklisted_captions(self) -> frozenset:
        """The blocklist's normalized captions, read once per blocklist (a swap reads the new one's).

        A list over `CAPTION_TRIGGER_LIMIT` entries is not read: its records are parsed lazily, and reading every
        caption would cost a pass over the file and memory per entry. Use `memorization_threshold` there.
        """
        blocklist = getattr(self.guard, "blocklist", None)
        cached_for, captions = self._captions
        if blocklist is None or blocklist is cached_for:
            return captions
        if len(blocklist) > CAPTION_TRIGGER_LIMIT:
            logger.warning("guardrail: the caption trigger is off for a blocklist of %d entries (over %d)",
                           len(blocklist), CAPTION_TRIGGER_LIMIT)
            captions = frozenset()
        else:
            captions = frozenset(
                normalize_caption(entry["caption"]) for entry in blocklist.entries
                if isinstance(entry.get("caption"), str)
            ) - {""}
        self._captions = (blocklist, captions)
        return captions

    def _settings_for_call(self, kwargs: dict) -> tuple[str, int, str]:
        """This call's action, max_attempts and on_exhausted: the `guardrail_*` overrides, else the wrapper's."""
        action = kwargs.pop("guardrail_action", self.action)
        max_attempts = kwargs.pop("guardrail_max_attempts", self.max_attempts)
        on_exhausted = kwargs.pop("guardrail_on_exhausted", self.on_exhausted)
        _check_settings(action, max_attempts, on_exhausted, prefix="guardrail_")
        return action, max_attempts, on_exhausted

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """Positional and keyword arguments -> one keyword dict, in the wrapped pipeline's own names."""
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError as error:
            raise UsageError(f"{type(self.pipe).__name__} arguments: {error}") from error
        call = dict(bound.arguments)
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in call:
                call.update(call.pop(name))
        return call


def _check_settings(action: Any, max_attempts: Any, on_exhausted: Any, prefix: str = "") -> None:
    if action not in ACTIONS:
        raise UsageError(f"{prefix}action must be one of {ACTIONS}, got {action!r}")
    if on_exhausted not in ON_EXHAUSTED:
        raise UsageError(f"{prefix}on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise UsageError(f"{prefix}max_attempts must be an integer >= 1, got {max_attempts!r}")


def _saved_settings(folder: str | os.PathLike) -> dict:
    """What `save_pretrained` wrote into `folder/guardrail/`: settings plus the blocklist path ({} if none)."""
    saved = Path(folder) / SAVED_FOLDER
    if not (saved / "guardrail_config.json").is_file():
        return {}
    try:
        settings = json.loads((saved / "guardrail_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{saved / 'guardrail_config.json'} is unreadable ({error}); save the pipeline again") from error
    if not isinstance(settings, dict):
        raise UsageError(f"{saved / 'guardrail_config.json'} must hold a JSON object; save the pipeline again")
    descriptor_file = settings.get("descriptor_file")
    return {**settings, "blocklist": saved / "blocklist.safetensors",
            "descriptor_file": saved / descriptor_file if descriptor_file else None}


def _saved_descriptor(descriptor: Embedder | None, folder: Path) -> str | None:
    """Copy the guard's descriptor file into `folder` (atomically), so the saved pipeline is whole; its name."""
    if descriptor is None:
        return None
    source = Path(descriptor.spec["weights_file"])
    name = "descriptor" + "".join(source.suffixes[-1:])
    with atomic_path(folder / name) as temporary:
        shutil.copyfile(source, temporary)
    return name


class _SlotLedger:
    """Per slot: the attempt and stage that made its current image, and the denoiser steps spent on it so far."""

    def __init__(self, count: int, first_cost: float) -> None:
        self.attempts = [1] * count
        self.stages = ["first"] * count
        self.steps = [first_cost] * count
        self.tried: list[list[str]] = [[] for _ in range(count)]

    def record(self, slot: int, attempt: int, stage: str, cost: float) -> None:
        self.attempts[slot], self.stages[slot] = attempt, stage
        self.steps[slot] += cost
        self.tried[slot].append(stage)


def normalize_caption(text: str) -> str:
    """Lower case, letters and digits only, single spaces: how a prompt is compared with blocklisted captions."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def _judged(verdicts: list[Verdict], record: Any, count: int) -> list[Verdict]:
    """Final verdicts of one generation. What the pipeline returned for a stopped image is unfinished: an image the
    early check stopped keeps its early (matching) verdict, and a generation the triggers interrupted counts as
    matched (it is never delivered; the escalation takes over)."""
    if record.trigger_interrupted:
        return [Verdict(True, verdict.score, None, {"trigger": "memorization score or blocklisted caption"})
                for verdict in verdicts]
    stops = record.stops(count)
    return [record.early_verdicts[i] if stops[i] is not None else verdict for i, verdict in enumerate(verdicts)]


def with_attempt_fields(call: dict, attempt: int, slots: list[int] | None) -> dict:
    """`call` with its `callback_on_step_end` wrapped so that its `callback_kwargs` say which generation runs.

    The callback gets `guardrail_attempt` and `guardrail_slots` (None for the caller's own batch: every slot).
    A diffusers `PipelineCallback` keeps its `tensor_inputs`, which the pipeline reads off the callback object.
    """
    callback = call.get("callback_on_step_end")
    if callback is None:
        return call
    tensor_inputs = getattr(callback, "tensor_inputs", None)

    def labelled(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        callback_kwargs = {**callback_kwargs, "guardrail_attempt": attempt, "guardrail_slots": slots}
        return callback(pipe, step, timestep, callback_kwargs)

    labelled_call = {**call, "callback_on_step_end": labelled}
    if tensor_inputs is not None:
        labelled_call["callback_on_step_end_tensor_inputs"] = list(tensor_inputs)
    return labelled_call


def retry_generator(caller: Any, slot: int, attempt: int):
    """A fresh generator for one slot's retry, derived from the caller's generator *state*, the slot and the attempt.

    The state has advanced past the caller's own batch, so a generator reused across requests gives new retry noise
    each time, while the same inputs and freshly seeded generators still give the same retries. Without a caller
    generator the seed is random, as an unseeded pipeline call is.
    """
    import torch

    source = caller[slot] if isinstance(caller, (list, tuple)) else caller
    if source is None:
        return torch.Generator("cpu").manual_seed(secrets.randbits(63))
    digest = hashlib.sha256(source.get_state().cpu().numpy().tobytes())
    digest.update(f"guardrail-resample:{slot}:{attempt}".encode())
    seed = int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)
    return torch.Generator(source.device).manual_seed(seed)


def _images_of(output: Any) -> Any:
    images = output[0] if isinstance(output, tuple) else getattr(output, "images", None)
    if images is None:
        raise GuardrailError(
            f"{type(output).__name__} has no images to check; GuardedPipeline needs an output with `.images`"
        )
    if isinstance(images, tuple):
        images = list(images)
    return images


def _writable(images: Any) -> Any:
    """The images in a container this wrapper may assign slots into."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        return images.copy()
    if hasattr(images, "is_inference") and images.is_inference():
        return images.clone()  # inference tensors refuse in-place writes outside inference mode
    return images


def _as_list(images: Any) -> Sequence:
    return images if isinstance(images, list) else [images[i] for i in range(len(images))]


def _black_like(image: Any) -> Any:
    if isinstance(image, np.ndarray):
        return np.zeros_like(image)
    if hasattr(image, "new_zeros"):  # torch tensor
        return image.new_zeros(image.shape)
    from PIL import Image

    return Image.new(image.mode, image.size)


def _per_image_fields(output: Any, count: int) -> dict:
    """Copies of the output's other per-image lists (key: field name, or tuple position), e.g. NSFW flags."""
    if isinstance(output, tuple):
        items = enumerate(output)
    else:
        items = output.items() if hasattr(output, "items") else ()
    return {key: list(value) for key, value in items
            if key not in (0, "images") and isinstance(value, list) and len(value) == count}


def _with_images(output: Any, images: Any, fields: dict, report: GuardReport) -> Any:
    if isinstance(output, tuple):
        parts = [images, *output[1:]]
        for position, values in fields.items():
            parts[position] = values
        guarded = GuardedTuple(parts)
        guarded.guardrail = report
        return guarded
    output.images = images
    for key, values in fields.items():
        setattr(output, key, values)
    output.guardrail = report
    return output
