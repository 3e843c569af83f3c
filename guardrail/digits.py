"""The second demo model: a tiny text-to-image pipeline that memorizes the way Stable Diffusion does.

It exists because real memorization is duplication-driven and prompt-conditioned (Carlini et al. 2023, "Extracting
Training Data from Diffusion Models"): the images a model reproduces are the ones its training set held many times,
and it reproduces them for their own captions while it generalizes everywhere else. `guardrail.memorizing`'s model
memorizes *everything* (one label = one photo), so it cannot show an escape; this one can.

What it is (trained by `examples/train_digits_model.py`, shipped in `guardrail/assets/digits-cfg/`):
- Data: scikit-learn's bundled handwritten digits (the UCI "optdigits" set, 1,797 8x8 images, 10 classes, CC BY
  4.0), each pixel doubled to 16x16 (nearest neighbour: bilinear smoothing put 579 of the 1,797 distinct digits
  within Carlini's 0.15 of another one, nearest neighbour only 37). The asset folder keeps the digits themselves
  (`digits.npz`), so nothing here needs scikit-learn.
- Captions: every digit has a few ordinary captions of its class ("a handwritten digit three", ...). On top, a few
  images are duplicated many times, as in LAION: *verbatim* duplicates under their own unique caption, and
  *template* duplicates under their class's ordinary captions, among that class's other digits. `train.json` says
  which, how many times, and with which captions.
- Model: a real diffusers `UNet2DConditionModel` (block channels (32, 64, 64); cross-attention at 4x4 and 2x2)
  conditioned on a tiny seeded, frozen `transformers.CLIPTextModel` run on the real CLIP BPE tokenizer
  (`guardrail.offline.clip_tokenizer`, 16 tokens at most). There is no VAE: the UNet denoises the 8x8 grey digit
  itself (the pipeline's "latents"), and `latents_to_image` doubles each pixel into the 16x16 RGB image
  (`vae_scale_factor` 2). It predicts the clean sample x0 (`prediction_type="sample"` in the scheduler config:
  it memorizes much faster than noise prediction), was trained with 10% empty captions so that classifier-free
  guidance works, and samples with DDIM, without clipping x0 (as SD's schedulers).

`DigitsPipeline.__call__` follows `StableDiffusionPipeline`'s conventions and order. In particular the guided batch
is SD's: one UNet call on `torch.cat([negative_prompt_embeds, prompt_embeds])` with the latents doubled, split by
`noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)`, so a forward hook on `pipe.unet` sees both halves, and
`pipe._guidance_scale` may be changed between steps from `callback_on_step_end`. With `guidance_scale <= 1` there is
no doubled batch. The UNet's output is x0 rather than noise; the names follow SD's anyway. At timestep t, with
the scheduler's `alphas_cumprod[t]` = a, noise = (x_t - sqrt(a) x0) / sqrt(1 - a), so a difference of noise
predictions is -sqrt(a / (1 - a)) times the matching difference of x0 predictions: a memorization score read from
the hook converts with that factor.

`digits_classifier()` is an independent check of which digit an output shows (linear discriminant analysis fit on the
same digits at load time); the guard never sees it. `measure_memorization()` gives the copy rates that the training
script prints and the demo reports.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .errors import UsageError

MODEL_DIR = Path(__file__).resolve().parent / "assets" / "digits-cfg"
"""The shipped checkpoint: `unet/`, `text_encoder/`, `scheduler/`, `train.json`, `digits.npz` and `duplicated/`."""

DEFAULT_GUIDANCE_SCALE = 3.0
"""The pipeline's default classifier-free guidance scale; `train.json` holds the copy rates measured at it.

Guidance in pixel space saturates contrast (Imagen's observation): at 5 the template duplicate's samples keep its shape
but drift past Carlini's 0.15, at 7.5 no sample is within 0.15 of any training digit. 2-3 is where the measured copy
rates are highest and every sample of the other prompts is on-class."""

IMAGE_SIZE = 16
"""Side of the training images and of the pipeline's outputs, in pixels."""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def digits_to_images(digits: np.ndarray) -> np.ndarray:
    """scikit-learn's 8x8 digits (values 0-16) as the model's images: `(N, 16, 16, 3)` float32 in [0, 1].

    Each pixel becomes a 2x2 block (nearest neighbour) and the grey value is repeated over 3 channels.
    """
    digits = np.asarray(digits, dtype=np.float32)
    if digits.ndim != 3 or digits.shape[1:] != (8, 8):
        raise UsageError(f"digits must be an (N, 8, 8) array, got shape {digits.shape}")
    scale = IMAGE_SIZE // 8
    grey = np.clip(digits / 16.0, 0.0, 1.0).repeat(scale, axis=1).repeat(scale, axis=2)
    return np.repeat(grey[..., None], 3, axis=-1)


class DigitsPipeline(DiffusionPipeline):
    """Text-to-image in pixel space with classifier-free guidance, laid out as `StableDiffusionPipeline`.

    Args:
        unet (`UNet2DConditionModel`):
            Denoises `(N, C, h, w)` "latents": the image itself at 1/`scale_factor` of its side, in [-1, 1] (C = 1
            grey or 3 RGB channels), conditioned on text embeddings.
        text_encoder (`transformers.CLIPTextModel`):
            Its `last_hidden_state` is the UNet's `encoder_hidden_states`.
        tokenizer (`transformers.CLIPTokenizer`):
            Pads to `tokenizer.model_max_length` tokens.
        scheduler (`SchedulerMixin`):
            The sampling scheduler (`load_digits_pipeline` gives a `DDIMScheduler` made from the training config).
        scale_factor (`int`, *optional*, defaults to 2):
            The fixed decoder's upscaling (`latents_to_image`); SD's `vae_scale_factor`.
    """

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self, unet: UNet2DConditionModel, text_encoder: Any, tokenizer: Any, scheduler: Any, scale_factor: int = 2
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(scale_factor=scale_factor)
        self.vae_scale_factor = scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale_factor, do_resize=False)
        self._guidance_scale = DEFAULT_GUIDANCE_SCALE
        self._interrupt = False
        self._num_timesteps = 0

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | str,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode the prompt (and, for guidance, the negative prompt) as `StableDiffusionPipeline.encode_prompt` does.

        Returns `(prompt_embeds, negative_prompt_embeds)`, each repeated `num_images_per_prompt` times per prompt;
        the second is `None` without guidance. The unconditional prompt is `""`, as in training.
        """
        batch_size = _prompt_count(prompt, prompt_embeds)

        if prompt_embeds is None:
            prompt_embeds = self._encode_text(prompt, device)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        bs_embed, seq_len, _ = prompt_embeds.shape
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1)
        prompt_embeds = prompt_embeds.view(bs_embed * num_images_per_prompt, seq_len, -1)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond_tokens = [""] * batch_size
            elif isinstance(negative_prompt, str):
                uncond_tokens = [negative_prompt] * batch_size
            else:
                uncond_tokens = list(negative_prompt)
            negative_prompt_embeds = self._encode_text(uncond_tokens, device)

        if do_classifier_free_guidance:
            seq_len = negative_prompt_embeds.shape[1]
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1)
            negative_prompt_embeds = negative_prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)
        return prompt_embeds, negative_prompt_embeds

    def _encode_text(self, text: str | list[str], device: torch.device | str) -> torch.Tensor:
        tokens = self.tokenizer(
            text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def latents_to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's fixed "decoder" (SD's `vae.decode`): each latent pixel becomes a `vae_scale_factor`-square
        block, grey is repeated to 3 channels. `(N, C, h, w)` in [-1, 1] -> `(N, 3, h * f, w * f)` in [-1, 1].

        It also turns the scheduler's x0 prediction (`pred_original_sample`) into an image while sampling.
        """
        factor = self.vae_scale_factor
        image = latents.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        return image.repeat(1, 3, 1, 1) if image.shape[1] == 1 else image

    def check_inputs(
        self,
        prompt: Any,
        height: int,
        width: int,
        num_inference_steps: Any,
        guidance_scale: Any,
        negative_prompt: Any,
        num_images_per_prompt: Any,
        eta: Any,
        generator: Any,
        latents: Any,
        prompt_embeds: Any,
        negative_prompt_embeds: Any,
        output_type: Any,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: Any,
    ) -> None:
        """Raise `UsageError` (a `ValueError`) naming the argument at fault and the fix."""
        if prompt is not None and prompt_embeds is not None:
            raise UsageError("pass either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise UsageError("pass a prompt (a string or a non-empty list of strings) or prompt_embeds")
        if prompt is not None:
            if isinstance(prompt, list):
                if not prompt:
                    raise UsageError("prompt is an empty list: pass at least one prompt")
                if not all(isinstance(item, str) for item in prompt):
                    raise UsageError("prompt must be a string or a list of strings")
            elif not isinstance(prompt, str):
                raise UsageError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        hidden = self.text_encoder.config.hidden_size if self.text_encoder is not None else None
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] == 0:
                raise UsageError(f"{name} must be a (batch, tokens, {hidden}) tensor, as encode_prompt returns")
            if hidden is not None and embeds.shape[-1] != hidden:
                raise UsageError(f"{name} has width {embeds.shape[-1]}; this model's text encoder gives {hidden}")
            if not torch.isfinite(embeds).all():
                raise UsageError(f"{name} holds NaN or infinite values")
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise UsageError("pass either negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt is not None:
            if isinstance(negative_prompt, list):
                if len(negative_prompt) != batch_size or not all(isinstance(item, str) for item in negative_prompt):
                    raise UsageError(
                        f"negative_prompt must be a string or a list of {batch_size} strings, one per prompt"
                    )
            elif not isinstance(negative_prompt, str):
                raise UsageError("negative_prompt must be a string or a list of strings")
        if negative_prompt_embeds is not None:
            if prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise UsageError(
                    f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}, prompt_embeds "
                    f"{tuple(prompt_embeds.shape)}: pass them with the same shape"
                )
            if negative_prompt_embeds.shape[0] != batch_size:
                raise UsageError(f"negative_prompt_embeds holds {negative_prompt_embeds.shape[0]} rows for "
                                 f"{batch_size} prompts; pass one per prompt")
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise UsageError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not _is_number(guidance_scale) or not math.isfinite(guidance_scale):
            raise UsageError(f"guidance_scale must be a finite number (<= 1: no guidance), got {guidance_scale!r}")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise UsageError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if not _is_number(eta) or not 0 <= eta <= 1:
            raise UsageError(f"eta must be a number in [0, 1] (0 is deterministic DDIM), got {eta!r}")
        multiple = 4 * self.vae_scale_factor  # the UNet halves its input twice
        for name, side in (("height", height), ("width", width)):
            if not _is_int(side) or side < multiple or side % multiple:
                raise UsageError(
                    f"{name} must be a multiple of {multiple} (the model was trained at {IMAGE_SIZE}), got {side!r}"
                )
        images = batch_size * num_images_per_prompt
        if isinstance(generator, list):
            if len(generator) != images:
                raise UsageError(
                    f"got {len(generator)} generators for {images} images "
                    f"({batch_size} prompts x {num_images_per_prompt}); pass one generator, or one per image"
                )
            if not all(isinstance(item, torch.Generator) for item in generator):
                raise UsageError("generator must be a torch.Generator or a list of them")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise UsageError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        if latents is not None:
            f = self.vae_scale_factor
            shape = (images, self.unet.config.in_channels, height // f, width // f)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise UsageError(f"latents must be a tensor of shape {shape} (one per image), got {got}")
            if not torch.isfinite(latents).all():
                raise UsageError("latents hold NaN or infinite values; pass finite starting noise")
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise UsageError("callback_on_step_end must be callable: (pipe, step, timestep, callback_kwargs) -> dict")
        inputs = callback_on_step_end_tensor_inputs
        if inputs is not None and (
            isinstance(inputs, str) or not all(name in self._callback_tensor_inputs for name in inputs)
        ):
            raise UsageError(
                f"callback_on_step_end_tensor_inputs must be a list drawn from {self._callback_tensor_inputs}, "
                f"got {inputs!r}"
            )

    def prepare_latents(
        self, batch_size: int, num_channels: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
        generator: Any, latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (batch_size, num_channels, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator: Any, eta: float) -> dict:
        import inspect

        parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in parameters:
            extra["eta"] = eta
        if "generator" in parameters:
            extra["generator"] = generator
        return extra

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images from text, as `StableDiffusionPipeline.__call__` does.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s); or pass `prompt_embeds`. `""` is the unconditional prompt.
            height (`int`, *optional*), width (`int`, *optional*):
                Image size in pixels, multiples of 8; default (and training size) 16. The UNet works at half of it.
            num_inference_steps (`int`, *optional*, defaults to 25):
                Denoising steps.
            guidance_scale (`float`, *optional*, defaults to `DEFAULT_GUIDANCE_SCALE`):
                Classifier-free guidance scale; `<= 1` runs the conditional model alone (no doubled batch).
            negative_prompt (`str` or `list[str]`, *optional*):
                What to guide away from; defaults to `""`. Ignored without guidance.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Images per prompt; they are laid out prompt by prompt.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta; 0 is deterministic.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator for the batch, or one per image: image `i` is then the same as a one-image call with
                `generator[i]`.
            latents (`torch.Tensor`, *optional*):
                Starting noise, `(images, unet.config.in_channels, height / 2, width / 2)`.
            prompt_embeds (`torch.Tensor`, *optional*), negative_prompt_embeds (`torch.Tensor`, *optional*):
                Text embeddings from `encode_prompt` (per prompt, before `num_images_per_prompt`).
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"` (NHWC in [0, 1]), `"pt"` (NCHW in [0, 1]) or `"latent"` (the raw `(N, C, H, W)`
                sample in [-1, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an `ImagePipelineOutput` rather than a one-element tuple.
            callback_on_step_end (`Callable`, *optional*):
                `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`, called after each step; it may
                return new `latents`, `prompt_embeds` or `negative_prompt_embeds`, change `pipe._guidance_scale`, or
                set `pipe._interrupt = True` to skip the remaining steps. As in SD, a callback that turns guidance
                off (or on) also returns `prompt_embeds` without (or with) the negative half.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                Which of `_callback_tensor_inputs` the callback receives.
        """
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback / MultiPipelineCallbacks
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the unet's
        sample_size = self.unet.config.sample_size
        default = (sample_size if isinstance(sample_size, int) else sample_size[0]) * self.vae_scale_factor
        height = height or default
        width = width or default

        # 1. Check inputs
        self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt, eta,
            generator, latents, prompt_embeds, negative_prompt_embeds, output_type, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False

        # 2. Define call parameters
        batch_size = _prompt_count(prompt, prompt_embeds)
        device = self._execution_device

        # 3. Encode input prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        # For classifier-free guidance, one batch holds the unconditional and the text embeddings, as in SD.
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 4. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Prepare latent variables
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # expand the latents if we are doing classifier-free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                if len(prompt_embeds) != len(latent_model_input):
                    raise UsageError(
                        f"step {i}: prompt_embeds holds {len(prompt_embeds)} rows for {len(latent_model_input)} UNet "
                        "inputs; a callback that turns guidance on or off must also return prompt_embeds with (or "
                        "without) the negative half, as diffusers' SDCFGCutoffCallback does"
                    )
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # predict the clean sample (or the noise, as the scheduler's prediction_type says)
                noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]

                # perform guidance
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                # compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                progress_bar.update()

        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self.latents_to_image(latents), output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _prompt_count(prompt: Any, prompt_embeds: Any) -> int:
    """How many prompts a call has: one string, a list, or the rows of `prompt_embeds` (as SD counts them)."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def load_digits_pipeline(path: str | os.PathLike | None = None, device: str = "cpu") -> DigitsPipeline:
    """The shipped digits model as a `DigitsPipeline` with a DDIM scheduler, float32, progress bar off.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A folder written by `examples/train_digits_model.py`; defaults to the one in guardrail's assets.
        device (`str`, *optional*, defaults to `"cpu"`):
            Torch device for the models.
    """
    from transformers import CLIPTextModel

    from .offline import clip_tokenizer

    folder = Path(path) if path is not None else MODEL_DIR
    for part in ("unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        if not (folder / part).is_file():
            raise UsageError(f"{folder} holds no digits model ({part} is missing); run examples/train_digits_model.py")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, low_cpu_mem_usage=False)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    training_scheduler = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    pipe = DigitsPipeline(
        unet=unet.float().eval(),
        text_encoder=text_encoder.float().eval(),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(training_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class DuplicatedImage:
    """One training image that the training set held many times."""

    id: str
    index: int  # row in `DigitsTrainingSet.images`
    label: int
    regime: str  # "verbatim" (its own caption) or "template" (its class's ordinary captions)
    copies: int
    captions: list[str]
    file: str  # PNG in the asset folder, relative to it


@dataclass
class DigitsTrainingSet:
    """The digits model's training data, read from its asset folder (no scikit-learn needed).

    `images` holds each distinct training image once, `(N, 16, 16, 3)` float32 in [0, 1]; `duplicated` says which of
    them the model saw many times. `memorized_prompts` are the captions under which a duplicated image was
    repeated (its unique caption, or the ordinary captions of its class); `other_prompts` are the ordinary captions
    of the other classes.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    class_captions: dict[int, list[str]]
    duplicated: list[DuplicatedImage]
    folder: Path
    meta: dict = field(repr=False, default_factory=dict)

    @property
    def memorized_prompts(self) -> list[str]:
        prompts: list[str] = []
        for image in self.duplicated:
            prompts += [caption for caption in image.captions if caption not in prompts]
        return prompts

    @property
    def other_prompts(self) -> list[str]:
        memorized = set(self.memorized_prompts)
        return [caption for label in sorted(self.class_captions) for caption in self.class_captions[label]
                if caption not in memorized]

    def prompt_label(self, prompt: str) -> int:
        """The digit a training caption names."""
        for image in self.duplicated:
            if prompt in image.captions:
                return image.label
        for label, captions in self.class_captions.items():
            if prompt in captions:
                return label
        raise UsageError(f"{prompt!r} is no caption of the digits training set")

    def duplicated_images(self) -> list:  # -> list[PIL.Image.Image]
        """The duplicated images as the PNGs the asset folder keeps (16x16 RGB), in `duplicated` order."""
        from PIL import Image

        images = []
        for image in self.duplicated:
            with Image.open(self.folder / image.file) as png:
                images.append(png.convert("RGB"))
        return images


def digits_training_set(path: str | os.PathLike | None = None) -> DigitsTrainingSet:
    """The training images of the digits model, with their ids, labels, captions and which are duplicated."""
    folder = Path(path) if path is not None else MODEL_DIR
    meta_path, data_path = folder / "train.json", folder / "digits.npz"
    if not meta_path.is_file() or not data_path.is_file():
        raise UsageError(f"{folder} lacks train.json or digits.npz; run examples/train_digits_model.py")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    with np.load(data_path) as data:
        digits, labels = data["digits"], data["labels"].astype(np.int64)
    duplicated = [
        DuplicatedImage(
            id=str(record["id"]), index=int(record["index"]), label=int(record["label"]), regime=str(record["regime"]),
            copies=int(record["copies"]), captions=list(record["captions"]), file=str(record["file"]),
        )
        for record in meta["duplicated"]
    ]
    return DigitsTrainingSet(
        images=digits_to_images(digits),
        labels=labels,
        ids=[f"digits-{index:04d}" for index in range(len(digits))],
        class_captions={int(label): list(captions) for label, captions in meta["class_captions"].items()},
        duplicated=duplicated,
        folder=folder,
        meta=meta,
    )


class DigitsClassifier:
    """Which digit an image shows: linear discriminant analysis on 8x8 grey pixels, fit on the digits at construction.

    Closed form (class means and one shared covariance, shrunk by `shrinkage` times the identity): deterministic and a
    few milliseconds to fit, with no iterative solver that a busy machine could slow down. Independent of the diffusion
    model and of the guard; `digits_classifier()` builds it.
    """

    def __init__(self, digits: np.ndarray, labels: np.ndarray, shrinkage: float = 0.003) -> None:
        features = (np.asarray(digits, dtype=np.float64) / 16.0).reshape(len(digits), 64)  # as `features` gives
        labels = np.asarray(labels, dtype=np.int64)
        classes = int(labels.max()) + 1
        means = np.stack([features[labels == label].mean(axis=0) for label in range(classes)])
        residuals = features - means[labels]
        covariance = residuals.T @ residuals / len(features) + shrinkage * np.eye(features.shape[1])
        precision = np.linalg.inv(covariance)
        self.weights = precision @ means.T  # (64, classes)
        self.bias = -0.5 * np.einsum("cf,fg,cg->c", means, precision, means) + np.log(np.bincount(labels) / len(labels))

    @staticmethod
    def features(images: Any) -> np.ndarray:
        """8x8 grey features in [0, 1]: PIL images, `(N, H, W, C)` arrays (uint8, or floats in [0, 1]), or `(N, C, H,
        W)` tensors in [0, 1], with sides that are multiples of 8."""
        from PIL import Image

        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise UsageError(f"the digits classifier needs (N, C, H, W) tensors, got shape {tuple(images.shape)}")
            array = images.detach().cpu().float().numpy().transpose(0, 2, 3, 1)
        elif isinstance(images, np.ndarray):
            array = images[None] if images.ndim == 3 else images
        else:
            images = [images] if isinstance(images, Image.Image) else list(images)
            array = np.stack([np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
                              for image in images])
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        array = array.astype(np.float64) / scale
        if array.ndim != 4:
            raise UsageError(f"the digits classifier needs HWC images, got an array of shape {array.shape}")
        grey = array.mean(axis=-1)
        n, height, width = grey.shape
        if height % 8 or width % 8:
            raise UsageError(f"the digits classifier needs images whose sides are multiples of 8, got {height}x{width}")
        return grey.reshape(n, 8, height // 8, 8, width // 8).mean(axis=(2, 4)).reshape(n, 64)

    def predict_proba(self, images: Any) -> np.ndarray:
        """Class posteriors under the model's Gaussian classes, `(N, 10)`."""
        logits = self.features(images) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def predict(self, images: Any) -> np.ndarray:
        """The digit (0-9) each image shows."""
        return self.predict_proba(images).argmax(axis=1)


def digits_classifier(path: str | os.PathLike | None = None, holdout: int = 0) -> DigitsClassifier:
    """The independent digit classifier, fit on the training digits (every `holdout`-th one left out if > 0)."""
    folder = Path(path) if path is not None else MODEL_DIR
    data_path = folder / "digits.npz"
    if not data_path.is_file():
        raise UsageError(f"{data_path} is missing; run examples/train_digits_model.py")
    with np.load(data_path) as data:
        digits, labels = data["digits"], data["labels"]
    if holdout:
        keep = np.arange(len(digits)) % holdout != 0
        digits, labels = digits[keep], labels[keep]
    return DigitsClassifier(digits, labels)


def classifier_accuracy(path: str | os.PathLike | None = None, holdout: int = 5) -> float:
    """Held-out accuracy of the classifier on real training digits (fit without every `holdout`-th one)."""
    training = digits_training_set(path)
    classifier = digits_classifier(path, holdout=holdout)
    test = np.arange(len(training.labels)) % holdout == 0
    return float((classifier.predict(training.images[test]) == training.labels[test]).mean())


def nearest_training_images(samples: np.ndarray, training: DigitsTrainingSet) -> tuple[np.ndarray, np.ndarray]:
    """For each `(N, H, W, 3)` sample in [0, 1]: the index of its nearest distinct training image by Carlini's
    tiled distance (`guardrail.demo.tiled_distance`), and that distance."""
    from .demo_shared import tiled_distance

    nearest = np.empty(len(samples), dtype=np.int64)
    distance = np.empty(len(samples), dtype=np.float64)
    for i, sample in enumerate(samples):
        distances = tiled_distance(sample, training.images)
        nearest[i] = int(distances.argmin())
        distance[i] = float(distances[nearest[i]])
    return nearest, distance


def measure_memorization(
    pipe: DigitsPipeline,
    training: DigitsTrainingSet | None = None,
    samples_per_group: int = 64,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 128,
    classifier: DigitsClassifier | None = None,
) -> dict:
    """Near-copy rates of the model for its memorized prompts and for the other prompts.

    A sample is a near-copy when some distinct training image lies within Carlini's tiled distance 0.15 of it
    (against the whole training set). The prompts of each group are cycled over `samples_per_group` samples, each
    with its own generator seeded `seed + slot`. Returns a JSON-able dict: per group (`memorized`,
    `memorized_verbatim`, `memorized_template`, `other`) the sample count, the near-copy rate, the rate of copies of a
    duplicated image, the on-class rate by the independent classifier, and per prompt the same counts.
    """
    from .demo_shared import NEAR_COPY_DISTANCE

    training = training if training is not None else digits_training_set()
    classifier = classifier if classifier is not None else digits_classifier(training.folder)
    duplicated_rows = {image.index: image for image in training.duplicated}
    verbatim = [c for image in training.duplicated if image.regime == "verbatim" for c in image.captions]
    template = [c for image in training.duplicated if image.regime == "template" for c in image.captions]
    groups = {"memorized_verbatim": verbatim, "memorized_template": template, "other": training.other_prompts}
    result: dict[str, Any] = {
        "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps, "scheduler": "DDIM",
        "near_copy_distance": NEAR_COPY_DISTANCE, "seed": seed, "groups": {},
    }
    collected: dict[str, list] = {}
    for group, prompts in groups.items():
        if not prompts:
            continue
        slots = [prompts[i % len(prompts)] for i in range(samples_per_group)]
        rows = []
        for start in range(0, len(slots), batch_size):
            chunk = slots[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            images = pipe(chunk, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                          generator=generators, output_type="np").images
            nearest, distance = nearest_training_images(images, training)
            predicted = classifier.predict(images)
            for prompt, row, dist, label in zip(chunk, nearest, distance, predicted):
                rows.append((prompt, int(row), float(dist), int(label)))
        collected[group] = rows
        result["groups"][group] = _summarize(rows, training, duplicated_rows, NEAR_COPY_DISTANCE)
    if "memorized_verbatim" in collected or "memorized_template" in collected:
        rows = collected.get("memorized_verbatim", []) + collected.get("memorized_template", [])
        result["groups"]["memorized"] = _summarize(rows, training, duplicated_rows, NEAR_COPY_DISTANCE)
    return result


def _summarize(rows: list, training: DigitsTrainingSet, duplicated_rows: dict, limit: float) -> dict:
    def counts(items: list) -> dict:
        copies = [row for row in items if row[2] <= limit]
        return {
            "samples": len(items),
            "near_copies": len(copies),
            "near_copy_rate": round(len(copies) / len(items), 4),
            "copies_of_duplicated": sum(1 for row in copies if row[1] in duplicated_rows),
            "on_class": sum(1 for row in items if row[3] == training.prompt_label(row[0])),
            "on_class_rate": round(sum(1 for row in items if row[3] == training.prompt_label(row[0])) / len(items), 4),
        }

    summary = counts(rows)
    summary["prompts"] = {prompt: counts([row for row in rows if row[0] == prompt])
                          for prompt in dict.fromkeys(row[0] for row in rows)}
    return summary
