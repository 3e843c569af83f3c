"""Which call arguments are batch-shaped, and how to cut a call down to a few output slots.

`GuardedPipeline` regenerates only the matched slots, so it must rebuild the wrapped pipeline's call for a subset of
the batch. Guessing ("any list as long as the prompt list is per-prompt") breaks on real pipelines: a
MultiControlNet `image` list holds one entry per ControlNet, and `ip_adapter_image_embeds` holds one tensor per
IP-Adapter whose rows are per prompt (negatives first under CFG). The rules below follow the arguments that diffusers'
pipelines document, keyed by name and by the pipeline's own components.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GuardrailError

PROMPT_ROW_ARGUMENTS = frozenset(
    {
        "prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3",
        "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "prompt_attention_mask", "negative_prompt_attention_mask", "class_labels",
    }
)
"""One row per prompt (or one string / int shared by all prompts)."""

IMAGE_BATCH_ARGUMENTS = frozenset({"image", "mask_image", "control_image", "masked_image_latents"})
"""A batch of images with one per prompt (a list, or an NCHW array / tensor), or one image shared by all prompts."""

PER_ADAPTER_ROW_ARGUMENTS = frozenset({"ip_adapter_image_embeds"})
"""A list with one tensor per IP-Adapter; each tensor has one row per prompt, `[negatives, positives]` under CFG."""


def control_argument(pipe: Any, parameters: frozenset) -> str | None:
    """The argument that holds a ControlNet pipeline's conditioning images (`image` for text-to-image ControlNet)."""
    if getattr(pipe, "controlnet", None) is None:
        return None
    return "control_image" if "control_image" in parameters else "image"


def has_several_controlnets(pipe: Any) -> bool:
    """Whether the pipeline holds a MultiControlNet, whose conditioning argument is a list with one entry each."""
    controlnet = getattr(pipe, "controlnet", None)
    return isinstance(controlnet, (list, tuple)) or hasattr(controlnet, "nets")


@dataclass(frozen=True)
class BatchLayout:
    """How a call's output slots map back to its per-prompt arguments (diffusers orders images prompt-major)."""

    items: int  # prompts (or labels, or unconditional images)
    per_item: int  # num_images_per_prompt
    parameters: frozenset  # the names the pipeline's __call__ accepts
    per_controlnet: str | None = None  # the argument with one entry per ControlNet, if any

    @classmethod
    def of(cls, pipe: Any, call: dict, count: int, signature: inspect.Signature) -> "BatchLayout":
        items = item_count(call, count)
        if items == 0 or count % items:
            raise GuardrailError(
                f"cannot map {count} output images onto {items} prompts; action='resample' needs the standard "
                "diffusers batch layout (use 'reject' or 'flag')"
            )
        parameters = frozenset(signature.parameters)
        per_controlnet = control_argument(pipe, parameters) if has_several_controlnets(pipe) else None
        return cls(items, count // items, parameters, per_controlnet)

    def subcall(self, call: dict, slots: list[int], generators: list) -> dict:
        """The call that regenerates exactly `slots`, one image each, with the given generators."""
        rows = [slot // self.per_item for slot in slots]
        sub = {key: self._select(key, value, rows) for key, value in call.items()}
        sub.pop("latents", None)  # the caller's latents would give back the same image
        if "num_images_per_prompt" in self.parameters:
            sub["num_images_per_prompt"] = 1
        if "batch_size" in self.parameters:  # unconditional pipelines (DDPM, DDIM)
            sub["batch_size"] = len(slots)
        sub["generator"] = generators
        return sub

    def _select(self, key: str, value: Any, rows: list[int]) -> Any:
        if key == self.per_controlnet and isinstance(value, (list, tuple)):
            return [select_rows(entry, rows, self.items, min_ndim=4) for entry in value]
        if key in PROMPT_ROW_ARGUMENTS:
            return select_rows(value, rows, self.items)
        if key in IMAGE_BATCH_ARGUMENTS:
            return select_rows(value, rows, self.items, min_ndim=4)
        if key in PER_ADAPTER_ROW_ARGUMENTS and isinstance(value, (list, tuple)):
            return [select_cfg_rows(tensor, rows, self.items) for tensor in value]
        return value


def item_count(call: dict, count: int) -> int:
    """How many prompts (or labels) the call has; an unconditional call has one item per image."""
    prompt = call.get("prompt")
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    for key in ("prompt_embeds", "class_labels"):
        value = call.get(key)
        if value is not None:
            return 1 if isinstance(value, int) else len(value)
    return count


def select_rows(value: Any, rows: list[int], items: int, min_ndim: int = 1) -> Any:
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


def select_cfg_rows(tensor: Any, rows: list[int], items: int) -> Any:
    """Select `rows` of a tensor that is per prompt, or `[negatives; positives]` per prompt under CFG."""
    if not hasattr(tensor, "shape") or tensor.ndim == 0:
        return tensor
    if tensor.shape[0] == 2 * items:
        import torch

        negatives, positives = tensor.chunk(2)
        return torch.cat([select_rows(negatives, rows, items), select_rows(positives, rows, items)])
    return select_rows(tensor, rows, items)
