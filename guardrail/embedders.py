"""Images -> L2-normalized float32 vectors, plus a `spec` that pins exactly how they were made.

A blocklist is only meaningful with the embedder that built it: vectors from two models (or two preprocessing
configs) are not comparable. The spec is stored in every blocklist and compared at load time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import EmbedderMismatchError, GuardrailError, UsageError
from .images import ImageInput, to_pil_images

BUNDLED_CONFIGS = Path(__file__).resolve().parent / "assets" / "open_clip"
"""open_clip model configs that ship with guardrail (the demo's `guardrail-tiny-vit`)."""

# Keys of a spec that do not change the vectors, so two specs that differ only there still match.
_NON_IDENTITY_KEYS = frozenset({"weights_file", "precision", "device", "batch_size", "open_clip_version"})
# Keys that name the weights; compared together by `_weights_difference` (a tag or a sha256 can name the same file).
_WEIGHTS_KEYS = frozenset({"pretrained", "weights_sha256", "published_sha256"})
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps images to unit-norm float32 vectors and can say how (`spec`)."""

    spec: dict
    dim: int

    def embed(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Returns float32 `(N, dim)` vectors with unit L2 norm, one per image."""
        ...


def spec_identity(spec: dict) -> dict:
    """The part of a spec that determines the vectors (drops file names, precision, device)."""
    return {key: value for key, value in spec.items() if key not in _NON_IDENTITY_KEYS}


def spec_differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable `key: expected != actual` lines for every identity key that differs.

    The weights match when both specs name the same pretrained tag, or when they share a sha256: a blocklist built
    from the `openai` tag accepts a local copy of the very same file (see `known_weights_sha256s`).
    """
    weights = _weights_difference(expected, actual)
    expected, actual = spec_identity(expected), spec_identity(actual)
    return sorted(([weights] if weights else []) + [
        f"{key}: {expected.get(key)!r} != {actual.get(key)!r}"
        for key in sorted((set(expected) | set(actual)) - _WEIGHTS_KEYS)
        if _json_comparable(expected.get(key)) != _json_comparable(actual.get(key))
    ])


def known_weights_sha256s(spec: dict) -> set[str]:
    """The sha256 digests of weights files that make this spec's vectors.

    For a weights file, its own digest. For a pretrained tag, the digest of the file open_clip loaded (recorded when
    it was found in open_clip's cache) and the one open_clip's config publishes for the tag (OpenAI's URLs carry it).
    """
    return {spec[key] for key in ("weights_sha256", "published_sha256") if isinstance(spec.get(key), str)}


def _weights_difference(expected: dict, actual: dict) -> str | None:
    """None when both specs name the same weights: the same tag, a sha256 they share, or (files) equal digests."""
    expected_tag, actual_tag = expected.get("pretrained"), actual.get("pretrained")
    if expected_tag and expected_tag == actual_tag:
        return None
    if known_weights_sha256s(expected) & known_weights_sha256s(actual):
        return None
    if not expected_tag and not actual_tag:
        if expected.get("weights_sha256") == actual.get("weights_sha256"):
            return None
        return f"weights_sha256: {expected.get('weights_sha256')!r} != {actual.get('weights_sha256')!r}"
    known = sorted(known_weights_sha256s(expected if expected_tag else actual)) or "none recorded"
    return f"pretrained: {expected_tag!r} != {actual_tag!r} (sha256 known for the tag: {known})"


def _json_comparable(value: Any) -> Any:
    # JSON round trips turn tuples into lists; compare them as equal.
    if isinstance(value, (list, tuple)):
        return [_json_comparable(item) for item in value]
    return value


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Row-normalize float vectors to unit L2 norm; raises on NaN or zero rows instead of hiding them."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.isfinite(vectors).all() or (norms <= 1e-12).any():
        raise GuardrailError("the embedder produced NaN, infinite or all-zero vectors; check the model weights")
    return vectors / norms


def move_torch_model(model: Any, current_device: Any, current_dtype: Any, device: Any = None,
                     dtype: Any = None) -> tuple[Any, Any]:
    """Move a torch model as `pipe.to` moves a pipeline's components; returns its new `(device, dtype)`.

    Half precision (float16, bfloat16) is taken on a GPU only: on the CPU the model stays in float32, where
    half-precision kernels are slow or missing.
    """
    import torch

    device = current_device if device is None else torch.device(device)
    dtype = current_dtype if dtype is None else dtype
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    model.to(device=device, dtype=dtype)
    return device, dtype


def torch_precision(dtype: Any) -> str:
    """A spec's `precision` for a torch dtype: `"fp16"`, `"bf16"` or `"fp32"`."""
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(dtype), "fp32")


def register_bundled_configs() -> None:
    """Make open_clip know guardrail's bundled model configs, so specs that name them can be rebuilt; idempotent."""
    import open_clip

    known = set(open_clip.list_models())
    if any(path.stem not in known for path in BUNDLED_CONFIGS.glob("*.json")):
        open_clip.add_model_config(BUNDLED_CONFIGS)


def quick_gelu_required(model: str, pretrained_tag: str | None) -> bool:
    """Whether `model` must run with QuickGELU: its config says so, or its pretrained tag was trained with it.

    open_clip only warns when `openai` weights are loaded into a GELU model (e.g. `ViT-B-32` instead of
    `ViT-B-32-quickgelu`), and the vectors it then makes are quietly worse.
    """
    import open_clip

    config = open_clip.get_model_config(model) or {}
    tag_config = open_clip.get_pretrained_cfg(model, pretrained_tag) if pretrained_tag else {}
    return bool(config.get("quick_gelu", False) or tag_config.get("quick_gelu", False))


class OpenCLIPEmbedder:
    """Embeds images with an open_clip image tower, using the model's own eval preprocessing.

    Args:
        model (`str`):
            An open_clip model name, e.g. `"ViT-L-14-quickgelu"` or `"ViT-B-32"`.
        pretrained (`str`):
            A pretrained tag (`"openai"`, `"laion2b_s34b_b79k"`) or a path to a local weights file
            (`.safetensors`, `.bin`, `.pt`), exactly as `open_clip.create_model_and_transforms` takes it.
        device (`str`, *optional*, defaults to `"cpu"`):
            Torch device for the forward pass.
        batch_size (`int`, *optional*, defaults to 32):
            Images per forward pass.
        precision (`str`, *optional*, defaults to `"fp32"`):
            open_clip precision (`"fp32"`, `"fp16"`, `"bf16"`).
        tensor_preprocess (`bool` or `"auto"`, *optional*, defaults to `"auto"`):
            Resize and normalize torch-tensor inputs (diffusers' `output_type="pt"`) on their own device instead of
            converting them to PIL images first. `"auto"` does so for tensors already on a GPU; CPU inputs then go
            through PIL, which gives the same vectors for `pil`, `np` and `pt` outputs to 1e-6. The tensor path
            skips the 8-bit rounding and PIL's resampler: cosine to the PIL path stays above 0.999 (see tests).
        quick_gelu (`bool`, *optional*):
            Force QuickGELU on or off. By default it follows the model config and the tag (see below). A local copy
            of a QuickGELU tag's weights (`openai`) needs `quick_gelu=True`; `embedder_from_spec` passes it.
        preprocess_cfg (`dict`, *optional*):
            Overrides of `mean`, `std`, `interpolation` and `resize_mode`, for a local copy of a tag's weights whose
            tag config sets them (as `embedder_from_spec` does from the blocklist's spec).

    A spec built from a pretrained tag also records the sha256 of the weights file open_clip loaded (when it is
    found in open_clip's cache) and the sha256 open_clip's config publishes for the tag, so an air-gapped machine can
    load a local copy of that file instead (`embedder_from_spec(spec, pretrained=PATH)`).

    Tags trained with QuickGELU (all `openai` weights) are loaded with QuickGELU even when the model name lacks the
    `-quickgelu` suffix; open_clip would otherwise only warn and silently produce degraded vectors.
    """

    def __init__(
        self,
        model: str,
        pretrained: str | os.PathLike,
        device: str = "cpu",
        batch_size: int = 32,
        precision: str = "fp32",
        tensor_preprocess: bool | str = "auto",
        *,
        quick_gelu: bool | None = None,
        preprocess_cfg: dict | None = None,
    ) -> None:
        import open_clip
        import torch

        if not pretrained:
            raise UsageError(
                "pretrained is required: pass a pretrained tag (e.g. 'openai') or a local weights file; "
                "random weights give vectors no one can reproduce"
            )
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        # Validates the model name, tag or file.
        static_spec = open_clip_spec(model, pretrained, quick_gelu=quick_gelu, preprocess_cfg=preprocess_cfg)
        pretrained = os.fspath(pretrained)
        overrides = {f"image_{key}": static_spec[key] for key in _PREPROCESS_KEYS if key in (preprocess_cfg or {})}
        try:
            clip_model, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained, device=device, precision=precision,
                force_quick_gelu=static_spec["quick_gelu"], **overrides,
            )
        except (RuntimeError, OSError, ValueError) as error:  # missing download, corrupt or mismatched weights
            raise GuardrailError(f"open_clip could not load {model!r} with pretrained={pretrained!r}: {error}") from error
        clip_model.eval()
        self._model = clip_model
        # One PIL image -> CHW tensor: open_clip's eval transform, bounded against absurd aspect ratios.
        resize_mode = clip_model.visual.preprocess_cfg["resize_mode"]
        self.transform = _bounded_aspect(preprocess) if resize_mode == "shortest" else preprocess
        self._torch = torch
        self._device = torch.device(device)
        self._dtype = next(clip_model.parameters()).dtype
        self.batch_size = batch_size
        self.tensor_preprocess = tensor_preprocess
        self.dim = self._output_dim()

        # Static fields (model, weights identity, QuickGELU) from the configs; preprocessing and dim from the model
        # actually built, so the spec describes exactly what made the vectors.
        cfg = clip_model.visual.preprocess_cfg
        self.spec: dict = {
            **static_spec,
            "image_size": list(cfg["size"]) if isinstance(cfg["size"], (list, tuple)) else [cfg["size"]] * 2,
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "interpolation": cfg["interpolation"],
            "resize_mode": cfg["resize_mode"],
            "dim": self.dim,
            "precision": precision,
        }
        loaded = None if static_spec["pretrained"] is None else cached_weights_path(model, static_spec["pretrained"])
        if loaded is not None:  # the file open_clip just loaded for the tag: pin it, for air-gapped copies
            self.spec["weights_sha256"] = file_sha256(loaded)

    @property
    def device(self) -> str:
        return str(self._device)

    def to(self, device: Any = None, dtype: Any = None) -> "OpenCLIPEmbedder":
        """Move the model, as `pipe.to` moves a pipeline's components; returns the embedder.

        Half precision (float16, bfloat16) is taken on a GPU only: on the CPU the model stays in float32, where
        half-precision kernels are slow or missing.
        """
        self._device, self._dtype = move_torch_model(self._model, self._device, self._dtype, device, dtype)
        self.spec["precision"] = torch_precision(self._dtype)
        return self

    def _output_dim(self) -> int:
        size = self._model.visual.preprocess_cfg["size"]
        height, width = size if isinstance(size, (list, tuple)) else (size, size)
        with self._torch.inference_mode():
            probe = self._torch.zeros(1, 3, height, width, device=self._device, dtype=self._dtype)
            return int(self._model.encode_image(probe).shape[-1])

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> "torch.Tensor":  # noqa: F821
        """Images -> the model's input tensor (NCHW, on CPU), with open_clip's own eval transform."""
        return self._torch.stack([self.transform(image) for image in to_pil_images(images)])

    def encode(self, pixels: "torch.Tensor") -> np.ndarray:  # noqa: F821
        """A preprocessed NCHW batch -> unit-norm float32 vectors, in chunks of `batch_size`."""
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                batch = pixels[start : start + self.batch_size].to(self._device, dtype=self._dtype)
                chunks.append(self._model.encode_image(batch).float().cpu().numpy())
        return l2_normalize(np.concatenate(chunks))

    def embed(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Returns float32 `(N, dim)` unit vectors. Raises `ImageDecodeError` for empty or invalid input."""
        if self._use_tensor_path(images):
            return self.encode(self.preprocess_tensor(images))
        return self.encode(self.preprocess(images))

    def embed_with_grad(self, images: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """NCHW float images in [0, 1] -> unit vectors as a torch tensor that gradients flow through.

        The same preprocessing as the tensor path of `embed`; for steering a sampler away from an entry.
        """
        pixels = self.preprocess_tensor(images).to(self._device, dtype=self._dtype)
        vectors = self._model.encode_image(pixels).float()
        return self._torch.nn.functional.normalize(vectors, dim=-1)

    def _use_tensor_path(self, images: Any) -> bool:
        if not (self.tensor_preprocess and hasattr(images, "is_cuda") and getattr(images, "ndim", 0) in (3, 4)):
            return False
        if self.spec["resize_mode"] not in ("shortest", "squash"):
            return False
        return self.tensor_preprocess is True or bool(images.is_cuda)

    def preprocess_tensor(self, images: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """NCHW (or CHW) float images in [0, 1] -> the model's input, on the images' own device, without PIL.

        Mirrors open_clip's eval transform: resize (shortest side, or squash) with the model's antialiased
        interpolation, center crop, normalize. uint8 tensors are read as [0, 255].
        """
        torch = self._torch
        from .errors import ImageDecodeError

        pixels = images[None] if images.ndim == 3 else images
        if pixels.shape[0] == 0:
            raise ImageDecodeError("images is empty; pass at least one image")
        if pixels.shape[1] not in (1, 3):
            raise ImageDecodeError(f"images tensor has shape {tuple(images.shape)}; expected NCHW with 1 or 3 channels")
        if pixels.dtype == torch.uint8:
            pixels = pixels.float() / 255
        else:
            pixels = pixels.float()
            if not torch.isfinite(pixels).all():
                raise ImageDecodeError("images contains NaN or infinite values")
            if pixels.numel() and (pixels.min() < -1e-3 or pixels.max() > 1 + 1e-3):
                raise ImageDecodeError("images tensor has values outside [0, 1]; expected diffusers' output_type='pt'")
        pixels = pixels.clamp(0, 1).expand(-1, 3, -1, -1)
        in_height, in_width = pixels.shape[-2:]
        if max(in_height, in_width) > _MAX_ASPECT * min(in_height, in_width):  # as `_bounded_aspect` does for PIL
            keep = _MAX_ASPECT * min(in_height, in_width)
            top, left = max(0, (in_height - keep) // 2), max(0, (in_width - keep) // 2)
            pixels = pixels[:, :, top : top + keep, left : left + keep]
            in_height, in_width = pixels.shape[-2:]
        height, width = self.spec["image_size"]
        if self.spec["resize_mode"] == "squash":
            size = (height, width)
        else:  # torchvision's Resize(int): the short side to the target, the long side scaled and truncated
            short, long = sorted((in_height, in_width))
            target = min(height, width)
            scaled = int(target * long / short)
            size = (target, scaled) if in_height <= in_width else (scaled, target)
        mode = self.spec["interpolation"] if self.spec["interpolation"] in ("bilinear", "bicubic") else "nearest"
        smooth = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        pixels = torch.nn.functional.interpolate(pixels, size=size, mode=mode, **smooth)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        pixels = pixels[:, :, top : top + height, left : left + width].clamp(0, 1)
        mean = torch.tensor(self.spec["mean"], device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec["std"], device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def __repr__(self) -> str:
        source = self.spec.get("pretrained") or self.spec.get("weights_file")
        return f"OpenCLIPEmbedder({self.spec['model']!r}, pretrained={source!r}, device={str(self._device)!r})"


def open_clip_spec(
    model: str, pretrained: str | os.PathLike, *, quick_gelu: bool | None = None, preprocess_cfg: dict | None = None
) -> dict:
    """The spec `OpenCLIPEmbedder(model, pretrained, ...)` has, from open_clip's configs alone: no weights are loaded.

    For vectors computed elsewhere with that model, such as LAION's precomputed CLIP embeddings. For a tag, the
    spec records the sha256 open_clip's config publishes for its file (`published_sha256`) when it gives a full one.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_bundled_configs()
    config = open_clip.get_model_config(model)
    if config is None:
        raise UsageError(f"unknown open_clip model {model!r}; see open_clip.list_models()")
    pretrained = os.fspath(pretrained)
    is_file = os.path.isfile(pretrained)
    tag_config = {} if is_file else open_clip.get_pretrained_cfg(model, pretrained)
    if not is_file and not tag_config:
        if os.sep in pretrained or Path(pretrained).suffix:
            raise UsageError(f"pretrained weights file {pretrained!r} does not exist")
        raise UsageError(
            f"{pretrained!r} is not a pretrained tag of {model!r}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(model)} (or pass a local weights file)"
        )
    unknown = sorted(set(preprocess_cfg or {}) - set(_PREPROCESS_KEYS))
    if unknown:
        raise UsageError(f"preprocess_cfg may set {list(_PREPROCESS_KEYS)}, not {unknown}")
    preprocess = merge_preprocess_dict(
        PreprocessCfg(), {**config.get("preprocess_cfg", {}), **tag_config, **(preprocess_cfg or {})}
    )
    tag = None if is_file else pretrained
    size = config["vision_cfg"].get("image_size", preprocess["size"])
    spec = {
        "family": "open_clip",
        "model": model,
        "pretrained": tag,
        "quick_gelu": bool(quick_gelu) if quick_gelu is not None else quick_gelu_required(model, tag),
        "image_size": list(size) if isinstance(size, (list, tuple)) else [size, size],
        "mean": list(preprocess["mean"]),
        "std": list(preprocess["std"]),
        "interpolation": preprocess["interpolation"],
        "resize_mode": preprocess["resize_mode"],
        "dim": int(config["embed_dim"]),
        "precision": "fp32",
        "open_clip_version": open_clip.__version__,
    }
    if is_file:
        spec["weights_file"] = os.path.basename(pretrained)
        spec["weights_sha256"] = file_sha256(pretrained)
    elif _published_sha256(tag_config.get("url", "")):
        spec["published_sha256"] = _published_sha256(tag_config["url"])
    return spec


def _published_sha256(url: str) -> str | None:
    """The full sha256 in an open_clip weights URL (OpenAI's: `.../models/<sha256>/ViT-B-32.pt`), else None.

    open_clip's own release URLs carry only an 8-digit prefix: too short to pin a file, so it is not used.
    """
    parts = url.rstrip("/").split("/")
    digest = parts[-2].lower() if len(parts) >= 2 else ""
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def cached_weights_path(model: str, tag: str, cache_dir: str | None = None) -> str | None:
    """The weights file open_clip loads for `(model, tag)` from its caches, found without network access; or None.

    Mirrors `open_clip.pretrained.download_pretrained`: the Hugging Face Hub entry when huggingface_hub is installed
    (its `.safetensors` alternative first), else the URL's file in `~/.cache/clip`.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    config = open_clip.get_pretrained_cfg(model, tag) or {}
    if config.get("file"):
        return config["file"] if os.path.isfile(config["file"]) else None
    if config.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(config["hf_hub"])
            filename = filename or HF_WEIGHTS_NAME
            safe = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else (
                [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
            for name in [*safe, filename]:
                found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
            return None
    if config.get("url"):
        found = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(config["url"]))
        return found if os.path.isfile(found) else None
    return None


_MAX_ASPECT = 16  # far beyond any generated image


def _bounded_aspect(transform):
    """Center-crop strips past 16:1 before `transform`, which keeps only the center square anyway.

    Without it a 1x100000 strip would first be resized to 224 x 22,400,000 pixels (about 15 GB).
    """

    def bounded(image):
        short, long = min(image.size), max(image.size)
        if long > _MAX_ASPECT * short:
            keep = _MAX_ASPECT * short + (long - _MAX_ASPECT * short) % 2  # same parity: the center stays put
            offset = (long - keep) // 2
            if image.width > image.height:
                image = image.crop((offset, 0, offset + keep, image.height))
            else:
                image = image.crop((0, offset, image.width, offset + keep))
        return transform(image)

    return bounded


def open_clip_from_spec(
    spec: dict,
    pretrained: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    precision: str | None = None,
) -> OpenCLIPEmbedder:
    """Rebuild the open_clip embedder a blocklist was built with, from its stored spec (see `embedder_from_spec`).

    A spec that names a pretrained tag is rebuilt from that tag, or from a local copy of its weights file
    (`pretrained=PATH`) whose sha256 the spec records (`known_weights_sha256s`): the air-gapped path. A spec built
    from a weights file needs that file again. QuickGELU and preprocessing follow the spec. Raises
    `EmbedderMismatchError` when it cannot be rebuilt, the file's sha256 is not the spec's, or the result differs.
    """
    if spec.get("family") != "open_clip" or not spec.get("model"):
        raise EmbedderMismatchError(
            f"cannot rebuild an embedder of family {spec.get('family')!r} (model {spec.get('model')!r}); pass one yourself"
        )
    options = {"device": device, "batch_size": batch_size, "precision": precision or spec.get("precision", "fp32")}
    if pretrained is None:
        embedder = _embedder_from_tag(spec, options)
    else:
        if os.path.isfile(pretrained):
            _check_weights_file(spec, pretrained)
            options["quick_gelu"] = spec.get("quick_gelu")
            options["preprocess_cfg"] = {key: spec[key] for key in _PREPROCESS_KEYS if key in spec}
        embedder = OpenCLIPEmbedder(spec["model"], pretrained, **options)
    differences = spec_differences(spec, embedder.spec)
    if differences:
        raise EmbedderMismatchError("the rebuilt embedder differs from the blocklist's: " + "; ".join(differences))
    return embedder


def _embedder_from_tag(spec: dict, options: dict) -> OpenCLIPEmbedder:
    tag = spec.get("pretrained")
    if tag is None:
        raise EmbedderMismatchError(
            f"the blocklist was built from a local weights file ({spec.get('weights_file')!r}, sha256 "
            f"{spec.get('weights_sha256')}); pass that file again (--pretrained PATH on the command line)"
        )
    try:
        return OpenCLIPEmbedder(spec["model"], tag, **options)
    except GuardrailError as error:
        if type(error) is not GuardrailError:  # a usage or mismatch error says what to fix already
            raise
        known = sorted(known_weights_sha256s(spec))
        copy = f"a local copy of its weights file (sha256 {' or '.join(known)})" if known else (
            "no local copy: this blocklist records no sha256 of the tag's weights")
        raise GuardrailError(
            f"{error}. Offline? The blocklist accepts {copy}; pass it with --pretrained PATH (pretrained=PATH)"
        ) from error


def _check_weights_file(spec: dict, path: str | os.PathLike) -> None:
    """Refuse a weights file whose sha256 is not one the spec records for its weights."""
    known = known_weights_sha256s(spec)
    if not known:
        if spec.get("pretrained"):
            raise EmbedderMismatchError(
                f"the blocklist names pretrained tag {spec['pretrained']!r} but records no sha256 of its weights, so "
                f"the local file {os.fspath(path)!r} cannot be verified. Load the tag itself (--pretrained "
                f"{spec['pretrained']}), or rebuild the blocklist with this guardrail, which records it"
            )
        return
    digest = file_sha256(path)
    if digest not in known:
        source = f"tag {spec['pretrained']!r}" if spec.get("pretrained") else repr(spec.get("weights_file"))
        raise EmbedderMismatchError(
            f"weights file {os.fspath(path)!r} does not match the blocklist: its sha256 {digest} is not "
            f"{' or '.join(sorted(known))} ({source})"
        )
