"""Copy-detection descriptors (SSCD and the like) as embedders, loaded from a TorchScript or ONNX file.

CLIP vectors say what an image shows; a copy-detection descriptor says whether it is the same picture, through
crops, JPEG and resizing. Meta's SSCD models ship as TorchScript files, and any model can be exported to ONNX, so
both formats load here behind the `Embedder` protocol. The spec pins the file by its sha256 and the preprocessing
by value: a renamed copy of the file matches a blocklist, another file or other preprocessing does not.

Every file is checked when it is loaded, before any request: it must exist, be a model of its format, and turn
two small probe images into finite, nonzero `(2, dim)` vectors. The probe's output gives `dim`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .embedders import _bounded_aspect, file_sha256, l2_normalize, move_torch_model, spec_differences, torch_precision
from .errors import EmbedderMismatchError, GuardrailError, ModelFileError, UsageError
from .images import ImageInput, to_pil_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESIZE_MODES = ("shortest", "squash")
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_PROBE_SIZE = (48, 64)  # (height, width): small, and not square, so "shortest" really keeps an aspect ratio


def _probe_images() -> list[Image.Image]:
    """Two small deterministic images that differ: gradients in opposite directions."""
    height, width = _PROBE_SIZE
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    first = np.stack([rows + 0 * cols, cols + 0 * rows, (rows + cols) / 2], axis=-1)
    second = 255 - first[:, :, ::-1]
    return [Image.fromarray(np.ascontiguousarray(image).astype(np.uint8)) for image in (first, second)]


class _DescriptorEmbedder:
    """Preprocessing, load-time checks and the spec shared by `TorchScriptEmbedder` and `ONNXEmbedder`.

    Subclasses load the file in `_load` and run one NCHW float32 batch in `_forward`.
    """

    family = ""
    _format = ""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_size: int | Sequence[int] = 288,
        resize_mode: str = "shortest",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        batch_size: int = 32,
        device: str = "cpu",
        dim: int | None = None,
    ) -> None:
        self.image_size = _check_image_size(image_size, resize_mode)
        if interpolation not in _INTERPOLATIONS:
            raise UsageError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
        self.mean, self.std = _check_channels("mean", mean), _check_channels("std", std)
        if any(value <= 0 for value in self.std):
            raise UsageError(f"std must be positive, got {list(self.std)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise UsageError(f"dim must be a positive int (or None to take it from the model), got {dim!r}")
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelFileError(
                f"{self._format} model file {self.path!r} does not exist; pass the path of the exported model "
                f"(see examples/export_descriptor.py)"
            )
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self.batch_size = batch_size
        self._load(device)
        self.dim = self._probe(dim)
        self.spec: dict = {
            "family": self.family,
            "weights_file": self.path,
            "weights_sha256": file_sha256(self.path),
            "dim": self.dim,
            "image_size": self.image_size if isinstance(self.image_size, int) else list(self.image_size),
            "resize_mode": resize_mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": interpolation,
            "precision": self._precision(),
        }

    # -- subclass hooks -------------------------------------------------------------------------------------------
    def _load(self, device: str) -> None:
        raise NotImplementedError

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        """One NCHW float32 batch -> the model's raw output as a numpy array."""
        raise NotImplementedError

    def _precision(self) -> str:
        return "fp32"

    # -- preprocessing --------------------------------------------------------------------------------------------
    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, as torchvision's `Resize` computes it (the long side truncated)."""
        if self.resize_mode == "squash":
            target_height, target_width = self.image_size
            return target_width, target_height
        short, long = min(width, height), max(width, height)
        scaled = int(self.image_size * long / short)
        return (self.image_size, scaled) if width <= height else (scaled, self.image_size)

    def _pixels(self, images: list[Image.Image]) -> np.ndarray:
        """Same-size RGB images -> the model's NCHW float32 input: resize, scale to [0, 1], normalize."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        arrays = [np.asarray(self._resize(image), dtype=np.float32) for image in images]
        pixels = np.stack(arrays).transpose(0, 3, 1, 2) / np.float32(255.0)
        return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)

    def _resize(self, image: Image.Image) -> Image.Image:
        return image.resize(self._resized_size(*image.size), _INTERPOLATIONS[self.interpolation])

    def _bounded(self, images: list[Image.Image]) -> list[Image.Image]:
        """Center-crop strips past 16:1 before a shortest-side resize, which would otherwise make them enormous."""
        if self.resize_mode != "shortest":
            return images
        keep = _bounded_aspect(lambda image: image)
        return [keep(image) for image in images]

    # -- embedding ------------------------------------------------------------------------------------------------
    def _run(self, images: list[Image.Image]) -> np.ndarray:
        """Raw model outputs, one row per image: images of one resized shape go through the model together."""
        images = self._bounded(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for position, image in enumerate(images):
            groups.setdefault(self._resized_size(*image.size), []).append(position)
        rows: list[np.ndarray | None] = [None] * len(images)
        for positions in groups.values():
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                pixels = self._pixels([images[i] for i in chunk])
                try:
                    output = np.asarray(self._forward(pixels))
                except GuardrailError:
                    raise
                except Exception as error:  # the runtime's own error type (RuntimeError, onnxruntime's Fail, ...)
                    raise GuardrailError(
                        f"{self._format} model {self.path!r} failed on a batch of shape {pixels.shape}: {error}"
                    ) from error
                if output.ndim != 2 or output.shape[0] != len(chunk) or output.shape[1] != self.dim:
                    raise GuardrailError(
                        f"{self._format} model {self.path!r} returned shape {output.shape} for {len(chunk)} images; "
                        f"expected ({len(chunk)}, {self.dim})"
                    )
                for row, i in zip(output, chunk):
                    rows[i] = row
        return np.stack(rows).astype(np.float32, copy=False)

    def embed(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Returns float32 `(N, dim)` unit vectors. Raises `ImageDecodeError` for empty or invalid input."""
        return l2_normalize(self._run(to_pil_images(images)))

    def _probe(self, dim: int | None) -> int:
        """Run the probe images; the output must be a finite, nonzero `(2, D)` array. Returns D."""
        fix = "Export a model that maps NCHW float32 images to (batch, dim) vectors (see examples/export_descriptor.py)"
        images = _probe_images()
        pixels = self._pixels(self._bounded(images))
        try:
            output = self._forward(pixels)
        except ModelFileError:
            raise
        except Exception as error:  # the runtimes raise their own types (RuntimeError, onnxruntime's Fail, ...)
            raise ModelFileError(
                f"{self._format} model {self.path!r} failed on a probe batch of shape {pixels.shape} "
                f"({self.resize_mode!r} resize to {self.image_size}): {error}. If the model takes a fixed input size, "
                f"pass resize_mode='squash' with that image_size. {fix}"
            ) from error
        output = np.asarray(output)
        if output.ndim != 2 or output.shape[0] != len(images) or output.shape[1] < 1:
            raise ModelFileError(
                f"{self._format} model {self.path!r} returned shape {output.shape} for a batch of {len(images)} "
                f"probe images; expected ({len(images)}, dim). {fix}"
            )
        if not np.issubdtype(output.dtype, np.floating):
            raise ModelFileError(f"{self._format} model {self.path!r} returned dtype {output.dtype}, not floats. {fix}")
        if not np.isfinite(output).all() or (np.abs(output).max(axis=1) == 0).any():
            raise ModelFileError(
                f"{self._format} model {self.path!r} returned NaN, infinite or all-zero vectors for the probe "
                f"images; check the exported weights. {fix}"
            )
        if dim is not None and output.shape[1] != dim:
            raise ModelFileError(
                f"{self._format} model {self.path!r} makes {output.shape[1]}-d vectors, not dim={dim}; pass the "
                f"model that makes {dim}-d vectors, or dim={output.shape[1]} (or no dim)"
            )
        return int(output.shape[1])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, image_size={self.image_size!r}, "
            f"resize_mode={self.resize_mode!r}, device={self.device!r})"
        )

    @property
    def device(self) -> str:
        raise NotImplementedError


class TorchScriptEmbedder(_DescriptorEmbedder):
    """Embeds images with a TorchScript model file, such as Meta's SSCD copy-detection descriptors.

    Args:
        path (`str` or `os.PathLike`):
            A TorchScript file (`torch.jit.save`), whose forward maps NCHW float images to `(batch, dim)` vectors,
            e.g. `sscd_disc_mixup.torchscript.pt`.
        image_size (`int` or `(height, width)`, *optional*, defaults to 288):
            With `resize_mode="shortest"`, the length of the short side (an int); with `"squash"`, the fixed size
            (an int for a square, or a pair).
        resize_mode (`str`, *optional*, defaults to `"shortest"`):
            `"shortest"` resizes the short side to `image_size` and keeps the aspect ratio (SSCD's recommended 288;
            images of different resulting sizes run in separate batches, and strips past 16:1 are center-cropped
            first); `"squash"` resizes every image to `image_size` (SSCD's 320x320 option).
        mean (`Sequence[float]`, *optional*, defaults to ImageNet's):
            Per-channel mean subtracted after scaling pixels to [0, 1].
        std (`Sequence[float]`, *optional*, defaults to ImageNet's):
            Per-channel standard deviation the pixels are divided by.
        interpolation (`str`, *optional*, defaults to `"bilinear"`):
            PIL resampling filter: `"bilinear"`, `"bicubic"`, `"nearest"` or `"lanczos"`.
        batch_size (`int`, *optional*, defaults to 32):
            Images per forward pass.
        device (`str`, *optional*, defaults to `"cpu"`):
            Torch device for the forward pass.
        dim (`int`, *optional*):
            The dimension the vectors must have; loading fails when the model makes another. By default it is read
            from the model's output.

    Raises:
        ModelFileError: the file is missing, is not a TorchScript model, or its output on two probe images is not a
            finite, nonzero `(2, dim)` array.
    """

    family = "torchscript"
    _format = "TorchScript"

    def _load(self, device: str) -> None:
        import torch

        self._torch = torch
        self._device = torch.device(device)
        self._dtype = torch.float32
        try:
            with warnings.catch_warnings():  # the user's model format: torch's deprecation note is not theirs to act on
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load. is deprecated", category=FutureWarning)
                model = torch.jit.load(self.path, map_location=self._device)
        except (RuntimeError, ValueError, OSError) as error:
            raise ModelFileError(
                f"{self.path!r} is not a TorchScript model ({error}). Pass a file saved with torch.jit.save (SSCD's "
                f"*.torchscript.pt files are); a state dict, a safetensors file or a truncated download will not load"
            ) from error
        model.eval()
        self._model = model
        for parameter in model.parameters():
            self._dtype = parameter.dtype
            break

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(self._device, dtype=self._dtype)
            output = self._model(batch)
            if not isinstance(output, torch.Tensor):
                raise ModelFileError(
                    f"TorchScript model {self.path!r} returned {type(output).__name__}, not a tensor; its forward must "
                    f"return one (batch, dim) tensor"
                )
            return output.float().cpu().numpy()

    def _precision(self) -> str:
        return torch_precision(self._dtype)

    @property
    def device(self) -> str:
        return str(self._device)

    def to(self, device: Any = None, dtype: Any = None) -> "TorchScriptEmbedder":
        """Move the model, as `pipe.to` moves a pipeline's components; returns the embedder.

        Half precision (float16, bfloat16) is taken on a GPU only: on the CPU the model stays in float32.
        """
        self._device, self._dtype = move_torch_model(self._model, self._device, self._dtype, device, dtype)
        self.spec["precision"] = self._precision()
        return self


class ONNXEmbedder(_DescriptorEmbedder):
    """Embeds images with an ONNX model file through onnxruntime (`pip install "guardrail[onnx]"`).

    Takes the same arguments as `TorchScriptEmbedder`; `path` is an `.onnx` file with one NCHW image input (float32
    or float16) and a `(batch, dim)` first output. Export it with dynamic batch, height and width axes to use
    `resize_mode="shortest"`; a model with a fixed input size needs `resize_mode="squash"` and that `image_size`.
    `device="cuda"` (or `"cuda:N"`) runs on onnxruntime's CUDAExecutionProvider when it is installed
    (`onnxruntime-gpu`), else on the CPU with a warning.

    Raises:
        ModelFileError: the file is missing, is not an ONNX model, or its output on two probe images is not a finite,
            nonzero `(2, dim)` array.
        GuardrailError: onnxruntime is not installed.
    """

    family = "onnx"
    _format = "ONNX"

    def _load(self, device: str) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise GuardrailError(
                f"ONNXEmbedder needs onnxruntime to run {self.path!r}: pip install \"guardrail[onnx]\" "
                f"(or onnxruntime-gpu for CUDA)"
            ) from error
        self._ort = onnxruntime
        self._session = None
        self._make_session(device)
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelFileError(
                f"ONNX model {self.path!r} has {len(inputs)} inputs ({[i.name for i in inputs]}); an image descriptor "
                f"takes exactly one NCHW image input"
            )
        self._input = inputs[0]
        if self._input.type not in ("tensor(float)", "tensor(float16)"):
            raise ModelFileError(
                f"ONNX model {self.path!r} takes {self._input.type} input {self._input.name!r}; "
                f"expected float NCHW images"
            )
        self._input_dtype = np.float16 if self._input.type == "tensor(float16)" else np.float32

    def _make_session(self, device: str) -> None:
        ort = self._ort
        wanted = str(device)
        providers: list[Any] = ["CPUExecutionProvider"]
        cuda = wanted.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
        if cuda:
            index = int(wanted.split(":", 1)[1]) if ":" in wanted else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        elif wanted != "cpu":  # a pipeline moved to a device onnxruntime cannot use here: keep working on the CPU
            fix = "install onnxruntime-gpu" if wanted.startswith("cuda") else "ONNXEmbedder runs on 'cpu' or 'cuda[:N]'"
            warnings.warn(
                f"onnxruntime cannot run {self.path!r} on {wanted!r} here, so ONNXEmbedder runs it on the CPU "
                f"({fix})",
                RuntimeWarning,
                stacklevel=3,
            )
            wanted = "cpu"
        try:
            session = ort.InferenceSession(self.path, providers=providers)
        except Exception as error:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
            raise ModelFileError(
                f"{self.path!r} is not a usable ONNX model ({error}). Pass a file written by torch.onnx.export or "
                f"onnx.save; a TorchScript, safetensors or truncated file will not load"
            ) from error
        self._session, self._device = session, wanted

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        outputs = self._session.run(None, {self._input.name: pixels.astype(self._input_dtype, copy=False)})
        return np.asarray(outputs[0]).astype(np.float32, copy=False)

    def _precision(self) -> str:
        return "fp16" if self._input_dtype == np.float16 else "fp32"

    @property
    def device(self) -> str:
        return self._device

    def to(self, device: Any = None, dtype: Any = None) -> "ONNXEmbedder":
        """Run on `device` (`"cpu"` or `"cuda[:N]"`); returns the embedder. The dtype is the ONNX graph's own."""
        if device is not None and str(device) != self._device:
            self._make_session(str(device))
        return self


DESCRIPTOR_FAMILIES = {TorchScriptEmbedder.family: TorchScriptEmbedder, ONNXEmbedder.family: ONNXEmbedder}
"""Spec `family` -> the class that rebuilds it."""


def descriptor_from_file(path: str | os.PathLike, **options: Any) -> TorchScriptEmbedder | ONNXEmbedder:
    """An `ONNXEmbedder` for a `.onnx` file, else a `TorchScriptEmbedder`; `options` as theirs."""
    embedder_class = ONNXEmbedder if os.fspath(path).lower().endswith(".onnx") else TorchScriptEmbedder
    return embedder_class(path, **options)


def descriptor_from_spec(
    spec: dict,
    pretrained: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    precision: str | None = None,
) -> TorchScriptEmbedder | ONNXEmbedder:
    """Rebuild a `TorchScriptEmbedder` or `ONNXEmbedder` from its spec; `embedder_from_spec` calls this.

    The file is `pretrained` when given, else the spec's `weights_file`; its sha256 must be the spec's. The
    preprocessing comes from the spec. Raises `EmbedderMismatchError` when the file is missing or another file.
    `precision` is accepted for `embedder_from_spec`'s signature; a TorchScript model is moved to it on a GPU.
    """
    family = spec.get("family")
    classes = DESCRIPTOR_FAMILIES
    if family not in classes:
        raise EmbedderMismatchError(
            f"cannot rebuild a descriptor of family {family!r}; expected one of {sorted(classes)}"
        )
    path = pretrained if pretrained is not None else spec.get("weights_file")
    if not path or not os.path.isfile(path):
        raise EmbedderMismatchError(
            f"the blocklist was built with the {family} model {spec.get('weights_file')!r} (sha256 "
            f"{spec.get('weights_sha256')}), which is not at {os.fspath(path) if path else path!r}; pass that file "
            f"(--descriptor FILE on the command line, pretrained=PATH in Python)"
        )
    digest = file_sha256(path)
    if digest != spec.get("weights_sha256"):
        raise EmbedderMismatchError(
            f"{family} model {os.fspath(path)!r} does not match the blocklist: its sha256 {digest} is not "
            f"{spec.get('weights_sha256')} ({spec.get('weights_file')!r})"
        )
    image_size = spec.get("image_size", 288)
    embedder = classes[family](
        path,
        image_size=image_size if isinstance(image_size, int) else tuple(image_size),
        resize_mode=spec.get("resize_mode", "shortest"),
        mean=spec.get("mean", IMAGENET_MEAN),
        std=spec.get("std", IMAGENET_STD),
        interpolation=spec.get("interpolation", "bilinear"),
        batch_size=batch_size,
        device=device,
        dim=spec.get("dim"),
    )
    wanted = precision or spec.get("precision")
    if isinstance(embedder, TorchScriptEmbedder) and wanted in ("fp16", "bf16"):
        torch = embedder._torch
        embedder.to(dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[wanted])
    differences = spec_differences(spec, embedder.spec)
    if differences:
        raise EmbedderMismatchError("the rebuilt embedder differs from the blocklist's: " + "; ".join(differences))
    return embedder


def _check_image_size(image_size: Any, resize_mode: str) -> int | tuple[int, int]:
    if resize_mode not in _RESIZE_MODES:
        raise UsageError(f"resize_mode must be one of {list(_RESIZE_MODES)}, got {resize_mode!r}")
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1:
        return image_size if resize_mode == "shortest" else (image_size, image_size)
    if (
        resize_mode == "squash" and isinstance(image_size, Sequence) and len(image_size) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in image_size)
    ):
        return (int(image_size[0]), int(image_size[1]))
    expected = "a positive int (the short side)" if resize_mode == "shortest" else "a positive int or (height, width)"
    raise UsageError(f"image_size must be {expected} with resize_mode={resize_mode!r}, got {image_size!r}")


def _check_channels(name: str, values: Any) -> tuple[float, float, float]:
    try:
        floats = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != 3 or not all(np.isfinite(floats)):
        raise UsageError(f"{name} must be three finite floats (one per RGB channel), got {values!r}")
    return floats  # type: ignore[return-value]
