"""The demo model: a small class-conditional diffusers pipeline that reproduces its training photos.

It exists so that `guardrail demo` and the tests can show the guard on real memorization, offline. The UNet in
`guardrail/assets/memorizing-unet/` was trained by `examples/train_memorizing_model.py` on 10 photos bundled with
scikit-image, one class label per photo, until every label reproduces its own photo (Carlini et al.'s tiled distance
<= 0.15). `ClassConditionalPipeline` is an ordinary `diffusers.DiffusionPipeline`, so `GuardedPipeline` wraps it as
it wraps any other: `class_labels` holds one label per image and `generator` may be one generator per image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .errors import UsageError

MODEL_DIR = Path(__file__).resolve().parent / "assets" / "memorizing-unet"
"""The shipped checkpoint: `UNet2DModel.save_pretrained` files, `scheduler_config.json`, `train/` and `train.json`."""

OUTPUT_TYPES = ("pil", "np", "pt")


class ClassConditionalPipeline(DiffusionPipeline):
    """Generates one image per class label with a class-conditional `UNet2DModel` (DDIM sampling by default).

    Args:
        unet (`UNet2DModel`):
            A UNet with `num_class_embeds` set; it predicts the clean sample or the noise, as its scheduler says.
        scheduler (`SchedulerMixin`):
            The sampling scheduler; `load_memorizing_pipeline` gives a `DDIMScheduler` made from the training
            `DDPMScheduler`'s config.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 25,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per label.

        Args:
            class_labels (`int`, `list[int]` or 1-D `torch.Tensor`):
                The class of each image, each in `[0, unet.config.num_class_embeds)`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator for the batch, or one per image (then image `i` is the same as a one-image call with
                `generator[i]`).
            num_inference_steps (`int`, *optional*, defaults to 25):
                Denoising steps.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (list of PIL images), `"np"` (NHWC float array in [0, 1]) or `"pt"` (NCHW tensor in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an `ImagePipelineOutput` rather than a one-element tuple.
        """
        labels = self._check_inputs(class_labels, generator, num_inference_steps, output_type)
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, int) else tuple(config.sample_size)
        shape = (len(labels), config.in_channels, *((size, size) if isinstance(size, int) else size))
        sample = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        labels = labels.to(self._execution_device)

        self.scheduler.set_timesteps(num_inference_steps)
        sample = sample * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(sample, t)
            model_output = self.unet(model_input, t, class_labels=labels).sample
            sample = self.scheduler.step(model_output, t, sample).prev_sample

        images = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = images.cpu()
        else:
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _check_inputs(
        self, class_labels: Any, generator: Any, num_inference_steps: int, output_type: str
    ) -> torch.Tensor:
        classes = self.unet.config.num_class_embeds
        if classes is None:
            raise UsageError("this pipeline needs a class-conditional UNet (num_class_embeds is not set)")
        if isinstance(class_labels, bool):
            raise UsageError(f"class_labels must be ints, got {class_labels!r}")
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            if class_labels.ndim != 1 or class_labels.dtype.is_floating_point:
                raise UsageError(f"class_labels must be a 1-D integer tensor, got {class_labels.dtype} {tuple(class_labels.shape)}")
            class_labels = class_labels.tolist()
        if not isinstance(class_labels, Sequence) or isinstance(class_labels, str) or not class_labels:
            raise UsageError(f"class_labels must be a non-empty list of ints, got {class_labels!r}")
        for label in class_labels:
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
                raise UsageError(f"class_labels must be ints in [0, {classes}), got {label!r}")
        if isinstance(generator, list) and len(generator) != len(class_labels):
            raise UsageError(f"got {len(generator)} generators for {len(class_labels)} class labels; pass one per label")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise UsageError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return torch.tensor(class_labels, dtype=torch.long)


def load_memorizing_pipeline(path: str | os.PathLike | None = None, device: str = "cpu") -> ClassConditionalPipeline:
    """The shipped memorizing model as a `ClassConditionalPipeline` with a DDIM scheduler, progress bar off.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A folder written by `examples/train_memorizing_model.py`; defaults to the one in guardrail's assets.
        device (`str`, *optional*, defaults to `"cpu"`):
            Torch device for the UNet.
    """
    folder = Path(path) if path is not None else MODEL_DIR
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{folder} holds no memorizing model (config.json is missing); run examples/train_memorizing_model.py"
        )
    unet = UNet2DModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False).eval()
    training_scheduler = DDPMScheduler.from_pretrained(folder, local_files_only=True)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=DDIMScheduler.from_config(training_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_images(path: str | os.PathLike | None = None) -> list[tuple[int, str, Image.Image]]:
    """The model's training photos as `(label, name, 32x32 RGB PIL image)`, in label order."""
    folder = Path(path) if path is not None else MODEL_DIR
    meta_path = folder / "train.json"
    if not meta_path.is_file():
        raise UsageError(f"{meta_path} is missing; run examples/train_memorizing_model.py")
    records = json.loads(meta_path.read_text(encoding="utf-8"))["labels"]
    images = []
    for record in sorted(records, key=lambda record: record["label"]):
        with Image.open(folder / record["file"]) as image:
            images.append((int(record["label"]), str(record["name"]), image.convert("RGB")))
    return images
