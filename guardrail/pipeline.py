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
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blocklist import Blocklist
from .embedders import Embedder, embedder_from_spec
from .errors import GuardrailError, ResampleExhaustedError, UsageError
from .guard import Guard, Verdict

logger = logging.getLogger(__name__)

ACTIONS = ("resample", "reject", "flag")
ON_EXHAUSTED = ("black", "raise", "keep")

# Call arguments that hold one item per prompt (or per image, for unconditional and class-conditional pipelines).
_IMAGE_KEYS = frozenset({"image", "mask_image", "control_image"})  # batched only as lists or NCHW tensors
_PER_ITEM_KEYS = frozenset({"class_labels"}) | _IMAGE_KEYS


def _is_per_item(key: str) -> bool:
    return key != "num_images_per_prompt" and ("prompt" in key or key in _PER_ITEM_KEYS)


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
            `"raise"` raises `ResampleExhaustedError`, `"keep"` returns it flagged in the report.

    Every attribute the wrapper does not define is forwarded to `pipe`, so `.to()`, `.scheduler` and
    `enable_*()` work unchanged (methods that return the pipeline return the wrapper instead).
    """

    _OWN = frozenset({"pipe", "guard", "action", "max_attempts", "on_exhausted", "_signature"})

    def __init__(
        self,
        pipe: Any,
        guard: Guard,
        action: str = "resample",
        max_attempts: int = 4,
        on_exhausted: str = "black",
    ) -> None:
        if action not in ACTIONS:
            raise UsageError(f"action must be one of {ACTIONS}, got {action!r}")
        if on_exhausted not in ON_EXHAUSTED:
            raise UsageError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise UsageError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        if not callable(pipe):
            raise UsageError(f"pipe must be a callable diffusers pipeline, got {type(pipe).__name__}")
        if not callable(getattr(guard, "check", None)):
            raise UsageError(f"guard must be a guardrail.Guard (or have its check(images) method), got {type(guard).__name__}")
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
        blocklist: Blocklist | str | os.PathLike,
        embedder: Embedder | None = None,
        *,
        action: str = "resample",
        max_attempts: int = 4,
        on_exhausted: str = "black",
        threshold: float | None = None,
        embedder_device: str = "cpu",
        embedder_pretrained: str | os.PathLike | None = None,
        pipeline_class: Any = None,
        **pipeline_kwargs: Any,
    ) -> "GuardedPipeline":
        """Load a diffusers pipeline and guard it, in one call.

        Args:
            pretrained_model_name_or_path: what `DiffusionPipeline.from_pretrained` takes (a hub id or local folder).
            blocklist: a `Blocklist` or the path of a blocklist file.
            embedder: the embedder to use; by default it is rebuilt from the blocklist's spec (its pretrained tag,
                or `embedder_pretrained`: the weights file a blocklist built from a local file needs again).
            pipeline_class: the pipeline class to load with (defaults to `diffusers.DiffusionPipeline`).
            **pipeline_kwargs: passed to `from_pretrained` (`torch_dtype`, `local_files_only`, `variant`, ...).
        """
        if not isinstance(blocklist, Blocklist):
            blocklist = Blocklist.load(blocklist)
        if embedder is None:
            embedder = embedder_from_spec(blocklist.spec, pretrained=embedder_pretrained, device=embedder_device)
        guard = Guard(blocklist, embedder, threshold=threshold)  # checked before the (large) pipeline loads
        if pipeline_class is None:
            from diffusers import DiffusionPipeline as pipeline_class
        pipe = pipeline_class.from_pretrained(pretrained_model_name_or_path, **pipeline_kwargs)
        return cls(pipe, guard, action=action, max_attempts=max_attempts, on_exhausted=on_exhausted)

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
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def __repr__(self) -> str:
        return f"GuardedPipeline({type(self.pipe).__name__}, action={self.action!r}, guard={self.guard!r})"

    # ---- the call --------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped pipeline with its own arguments; returns its own output type plus `.guardrail`."""
        call = self._bind(args, kwargs)
        if call.get("output_type") == "latent":
            raise UsageError(
                "output_type='latent' cannot be guarded: latents are not images. Use 'pil', 'np' or 'pt'"
            )
        output = self.pipe(**call)
        images = _writable(_images_of(output))
        count = len(images)
        fields = _per_image_fields(output, count)  # e.g. nsfw_content_detected: kept in step with the images
        verdicts = self.guard.check(images)
        attempts, blocked, exhausted = [1] * count, [False] * count, [False] * count

        if self.action == "resample":
            pending = self._resample(call, images, fields, verdicts, attempts)
            for slot in pending:
                exhausted[slot] = True
            if pending and self.on_exhausted == "raise":
                report = GuardReport(verdicts, attempts, blocked, exhausted, self.action)
                raise ResampleExhaustedError(
                    f"slots {pending} still matched the blocklist after {self.max_attempts} attempts", report
                )
            to_block = pending if self.on_exhausted == "black" else []
        elif self.action == "reject":
            to_block = [slot for slot, verdict in enumerate(verdicts) if verdict.matched]
        else:
            to_block = []

        for slot in to_block:
            images[slot] = _black_like(images[slot])
            blocked[slot] = True
        if to_block:
            logger.warning(
                "guardrail: %d of %d generated images matched the blocklist and were replaced by black images. "
                "Try a different prompt or seed.",
                len(to_block),
                count,
            )
        report = GuardReport(verdicts, attempts, blocked, exhausted, self.action)
        return _with_images(output, images, fields, report)

    def _resample(self, call: dict, images: Any, fields: dict, verdicts: list, attempts: list[int]) -> list[int]:
        """Regenerate matched slots in place, one batched call per attempt; returns the slots still matching."""
        count = len(images)
        pending = [slot for slot, verdict in enumerate(verdicts) if verdict.matched]
        layout = _BatchLayout.of(call, count, self._signature) if pending else None
        for attempt in range(2, self.max_attempts + 1):
            if not pending:
                break
            generators = [_derived_generator(call.get("generator"), slot, attempt) for slot in pending]
            retry_output = self.pipe(**layout.subcall(call, pending, generators))
            retry = _images_of(retry_output)
            if len(retry) != len(pending):
                raise GuardrailError(
                    f"resampling {len(pending)} slots returned {len(retry)} images; this pipeline's batch "
                    "layout is not supported by action='resample' (use 'reject' or 'flag')"
                )
            retry_fields = _per_image_fields(retry_output, len(pending))
            for row, (slot, image, verdict) in enumerate(zip(pending, _items(retry), self.guard.check(retry))):
                images[slot], verdicts[slot], attempts[slot] = image, verdict, attempt
                for key in fields.keys() & retry_fields.keys():
                    fields[key][slot] = retry_fields[key][row]
            pending = [slot for slot in pending if verdicts[slot].matched]
        return pending

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


@dataclass(frozen=True)
class _BatchLayout:
    """How a call's output slots map back to its per-prompt arguments (diffusers orders images prompt-major)."""

    items: int  # prompts (or labels, or unconditional images)
    per_item: int  # num_images_per_prompt
    parameters: frozenset  # the names the pipeline's __call__ accepts

    @classmethod
    def of(cls, call: dict, count: int, signature: inspect.Signature) -> "_BatchLayout":
        items = _item_count(call, count)
        if items == 0 or count % items:
            raise GuardrailError(
                f"cannot map {count} output images onto {items} prompts; action='resample' needs the standard "
                "diffusers batch layout (use 'reject' or 'flag')"
            )
        return cls(items, count // items, frozenset(signature.parameters))

    def subcall(self, call: dict, slots: list[int], generators: list) -> dict:
        """The call that regenerates exactly `slots`, one image each, with the given generators."""
        rows = [slot // self.per_item for slot in slots]
        sub = {
            key: _take(value, rows, self.items, min_ndim=4 if key in _IMAGE_KEYS else 1) if _is_per_item(key) else value
            for key, value in call.items()
        }
        sub.pop("latents", None)  # the caller's latents would give back the same image
        if "num_images_per_prompt" in self.parameters:
            sub["num_images_per_prompt"] = 1
        if "batch_size" in self.parameters:  # unconditional pipelines (DDPM, DDIM)
            sub["batch_size"] = len(slots)
        sub["generator"] = generators
        return sub


def _item_count(call: dict, count: int) -> int:
    prompt = call.get("prompt")
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    for key in ("prompt_embeds", "class_labels"):
        value = call.get(key)
        if value is not None:
            return 1 if isinstance(value, int) else len(value)
    return count  # unconditional: one item per image


def _take(value: Any, rows: list[int], items: int, min_ndim: int = 1) -> Any:
    """Select `rows` of a per-item argument; a scalar (one prompt for all) is repeated for each row.

    Arrays and tensors count as batched only with at least `min_ndim` dimensions (a CHW image is one image).
    """
    if value is None:
        return None
    if isinstance(value, (str, int)):
        return [value] * len(rows)
    if isinstance(value, (list, tuple)) and len(value) == items:
        return [value[row] for row in rows]
    if hasattr(value, "shape") and getattr(value, "ndim", 0) >= min_ndim and value.shape[0] == items:
        if isinstance(value, np.ndarray):
            return value[rows]
        import torch

        return value[torch.as_tensor(rows, device=value.device)]
    return value  # one shared value (e.g. a single conditioning image)


def _derived_generator(caller: Any, slot: int, attempt: int):
    """A fresh generator for one slot's retry: derived from the caller's seed, the slot and the attempt.

    Without a caller generator the seed is random, as an unseeded pipeline call is.
    """
    import torch

    source = caller[slot] if isinstance(caller, (list, tuple)) else caller
    if source is None:
        return torch.Generator("cpu").manual_seed(secrets.randbits(63))
    material = f"guardrail-resample:{source.initial_seed()}:{slot}:{attempt}".encode()
    seed = int.from_bytes(hashlib.sha256(material).digest()[:8], "little") & (2**63 - 1)
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


def _items(images: Any) -> Sequence:
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
