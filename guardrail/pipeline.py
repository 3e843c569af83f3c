"""`GuardedPipeline`: a drop-in wrapper for any diffusers pipeline that keeps blocklisted images from users.

It calls the wrapped pipeline with the caller's own arguments, checks every image, and then either regenerates only
the matched slots with fresh, deterministically derived seeds (`"resample"`), replaces them with black images
(`"reject"`, as diffusers' safety checker does), or only reports them (`"flag"`). The output is the pipeline's own
output type, with a `guardrail` report attached.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .batching import BatchLayout
from .blocklist import Blocklist
from .embedders import Embedder, embedder_from_spec
from .errors import GuardrailError, ResampleExhaustedError, UsageError
from .guard import Guard, Verdict

logger = logging.getLogger(__name__)

ACTIONS = ("resample", "reject", "flag")
ON_EXHAUSTED = ("black", "raise", "keep")

SAVED_FOLDER = "guardrail"
"""`save_pretrained` writes the blocklist and the guard's settings into this subfolder of the pipeline folder."""
CALL_OPTIONS = ("guardrail_action", "guardrail_max_attempts", "guardrail_on_exhausted")
"""Per-call overrides of the wrapper's settings, taken out of the call before the wrapped pipeline sees it."""


@dataclass
class GuardReport:
    """What the guard did to one pipeline call, one list item per output image (in output order).

    Attributes:
        verdicts: the final verdict of each returned image (for a blocked image: of the image that was blocked).
        attempts: how many times each slot was generated, starting at 1.
        blocked: whether each image was replaced with a black image.
        exhausted: whether each slot still matched after `max_attempts` generations.
        action: the action the pipeline was configured with.
    """

    verdicts: list[Verdict]
    attempts: list[int]
    blocked: list[bool]
    exhausted: list[bool] = field(default_factory=list)
    action: str = "resample"

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

    _WRAPPER_ATTRIBUTES = frozenset({"pipe", "guard", "action", "max_attempts", "on_exhausted", "_signature"})

    def __init__(
        self,
        pipe: Any,
        guard: Guard,
        action: str = "resample",
        max_attempts: int = 4,
        on_exhausted: str = "black",
    ) -> None:
        if not callable(pipe):
            raise UsageError(f"pipe must be a callable diffusers pipeline, got {type(pipe).__name__}")
        if not callable(getattr(guard, "check", None)):
            raise UsageError(f"guard must be a guardrail.Guard (or have its check(images) method), got {type(guard).__name__}")
        _check_settings(action, max_attempts, on_exhausted)
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "guard", guard)
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "max_attempts", max_attempts)
        object.__setattr__(self, "on_exhausted", on_exhausted)
        object.__setattr__(self, "_signature", inspect.signature(pipe.__call__))

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
        threshold: float | None = None,
        embedder_device: str | None = None,
        embedder_pretrained: str | os.PathLike | None = None,
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
            action, max_attempts, on_exhausted, threshold: as for `GuardedPipeline` and `Guard`; by default the
                saved settings, else the defaults.
            embedder_device: where the rebuilt embedder runs; by default it follows the pipeline's device and dtype.
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
        guard = Guard(blocklist, embedder, threshold=threshold)  # checked before the (large) pipeline loads
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
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the pipeline (as diffusers does) plus `guardrail/`: the blocklist file and the guard's settings.

        `GuardedPipeline.from_pretrained(save_directory)` then restores the whole guarded pipeline. The embedder is
        rebuilt from the blocklist's spec; one made from a local weights file needs `embedder_pretrained=` again.
        """
        if not isinstance(self.guard, Guard):
            raise UsageError(
                f"save_pretrained saves a guardrail.Guard's blocklist, and this guard is a {type(self.guard).__name__}: "
                "save the pipeline with .pipe.save_pretrained(...) and your guard's blocklist yourself"
            )
        self.pipe.save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory) / SAVED_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.guard.blocklist.save(folder / "blocklist.safetensors")
        settings = {
            "action": self.action,
            "max_attempts": self.max_attempts,
            "on_exhausted": self.on_exhausted,
            "threshold": self.guard.threshold,
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
            object.__setattr__(self, name, value)
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
        output = self.pipe(**with_attempt_fields(call, attempt=1, slots=None))
        images = _writable(_images_of(output))
        count = len(images)
        fields = _per_image_fields(output, count)  # e.g. nsfw_content_detected: kept in step with the images
        verdicts = self.guard.check(images)
        attempts, blocked, exhausted = [1] * count, [False] * count, [False] * count

        pending: list[int] = []
        if action == "resample":
            pending = self._resample(call, images, fields, verdicts, attempts, max_attempts)
            for slot in pending:
                exhausted[slot] = True
            to_block = pending if on_exhausted in ("black", "raise") else []
        elif action == "reject":
            to_block = [slot for slot, verdict in enumerate(verdicts) if verdict.matched]
        else:
            to_block = []

        for slot in to_block:
            images[slot] = _black_like(images[slot])
            blocked[slot] = True
        report = GuardReport(verdicts, attempts, blocked, exhausted, action)
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

    def _resample(
        self, call: dict, images: Any, fields: dict, verdicts: list, attempts: list[int], max_attempts: int
    ) -> list[int]:
        """Regenerate matched slots in place, one batched call per attempt; returns the slots still matching."""
        count = len(images)
        pending = [slot for slot, verdict in enumerate(verdicts) if verdict.matched]
        layout = BatchLayout.of(self.pipe, call, count, self._signature) if pending else None
        for attempt in range(2, max_attempts + 1):
            if not pending:
                break
            generators = [retry_generator(call.get("generator"), slot, attempt) for slot in pending]
            subcall = with_attempt_fields(layout.subcall(call, pending, generators), attempt, pending)
            subcall.pop("callback", None)  # the legacy callback sees the caller's own batch only
            retry_output = self.pipe(**subcall)
            retry = _images_of(retry_output)
            if len(retry) != len(pending):
                raise GuardrailError(
                    f"resampling {len(pending)} slots returned {len(retry)} images; this pipeline's batch "
                    "layout is not supported by action='resample' (use 'reject' or 'flag')"
                )
            retry_fields = _per_image_fields(retry_output, len(pending))
            for row, (slot, image, verdict) in enumerate(zip(pending, _as_list(retry), self.guard.check(retry))):
                images[slot], verdicts[slot], attempts[slot] = image, verdict, attempt
                for key in fields.keys() & retry_fields.keys():
                    fields[key][slot] = retry_fields[key][row]
            pending = [slot for slot in pending if verdicts[slot].matched]
        return pending

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
    return {**settings, "blocklist": saved / "blocklist.safetensors"}


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
