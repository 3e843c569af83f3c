"""Copy-detection descriptors loaded from TorchScript and ONNX files (`guardrail.descriptors`).

The models are examples/export_descriptor.py's seeded GeM descriptor, exported for real in both formats, and tiny
hand-written modules for the files that must be refused.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guardrail import (
    Blocklist,
    EmbedderMismatchError,
    Guard,
    GuardrailError,
    ImageDecodeError,
    ModelFileError,
    ONNXEmbedder,
    TorchScriptEmbedder,
    UsageError,
    embedder_from_spec,
)
from guardrail.descriptors import IMAGENET_MEAN, IMAGENET_STD
from guardrail.embedders import Embedder, file_sha256, spec_differences

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = {"torchscript": TorchScriptEmbedder, "onnx": ONNXEmbedder}
FORMATS = sorted(CLASSES)
SMALL = 96  # short side for tests that do not need SSCD's 288


def picture(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random picture (a few colored blobs), `size` = (width, height)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.BICUBIC)


def jpeg_copy(image: Image.Image, quality: int = 70, scale: float = 0.8) -> Image.Image:
    """A lightly degraded copy: downscaled and saved as JPEG."""
    smaller = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def save_model(module: torch.nn.Module, path, format: str):
    """Write a small module as TorchScript (scripted) or ONNX (dynamic batch, height, width)."""
    module.eval()
    if format == "torchscript":
        torch.jit.save(torch.jit.script(module), str(path))
    else:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        torch.onnx.export(module, (torch.rand(2, 3, 32, 32),), str(path), input_names=["images"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    return path


class MeanColor(torch.nn.Module):
    """(batch, 3) mean color: a valid, if weak, descriptor."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)) + 3.0


class FourD(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0


class AllNaN(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)) * float("nan")


class AllZero(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)) * 0.0


class OneRow(torch.nn.Module):
    """Returns one vector for the whole batch: the batch size does not match."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(0, 2, 3)).unsqueeze(0) + 3.0


class ReportsShape(torch.nn.Module):
    """(batch, 2) = (height, width) of its input, so tests can read the preprocessing's size from the vectors."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ones = images.new_ones(images.shape[0], 1)
        return torch.cat([ones * images.shape[2], ones * images.shape[3]], dim=1)


class NaNForWideInputs(torch.nn.Module):
    """Fine on the probe images, NaN for inputs wider than 1000 pixels."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vectors = images.mean(dim=(2, 3)) + 3.0
        if images.shape[3] > 1000:
            return vectors * float("nan")
        return vectors


@pytest.fixture(scope="module")
def descriptors(descriptor_files):
    """Both exports of the seed-0 descriptor, with SSCD's default preprocessing (short side 288, ImageNet stats)."""
    return {format: CLASSES[format](path) for format, path in descriptor_files.items()}


@pytest.fixture(scope="module")
def pictures():
    return [picture(seed) for seed in range(4)]


@pytest.mark.parametrize("format", FORMATS)
def test_each_backend_loads_an_exported_model_and_makes_unit_vectors(descriptors, pictures, format):
    embedder = descriptors[format]
    assert isinstance(embedder, Embedder)
    vectors = embedder.embed(pictures[:3])
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    assert embedder.dim == 512
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.device == "cpu"
    assert repr(embedder).startswith(f"{type(embedder).__name__}(")


def test_the_torchscript_and_onnx_exports_of_one_model_make_the_same_vectors(descriptors, pictures):
    torchscript = descriptors["torchscript"].embed(pictures)
    onnx = descriptors["onnx"].embed(pictures)
    agreement = (torchscript * onnx).sum(axis=1)
    assert (agreement > 1 - 1e-4).all(), agreement
    # ...and they agree far more closely than two different pictures do, so the agreement says something.
    across = torchscript @ torchscript.T
    assert across[~np.eye(len(pictures), dtype=bool)].max() < 1 - 1e-3


@pytest.mark.parametrize("format", FORMATS)
def test_a_lightly_degraded_copy_scores_above_every_unrelated_picture(descriptors, pictures, format):
    embedder = descriptors[format]
    original, copy = embedder.embed([pictures[0], jpeg_copy(pictures[0])])
    unrelated = embedder.embed(pictures[1:])
    assert float(original @ copy) > float((unrelated @ original).max())


def test_one_picture_gives_one_vector_whatever_type_it_arrives_as(descriptors, pictures, tmp_path):
    embedder = descriptors["onnx"]
    image = pictures[0]
    path = tmp_path / "picture.png"
    image.save(path)
    pixels = np.array(image)
    as_pil = embedder.embed(image)
    for other in (pixels, pixels.astype(np.float32) / 255, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
                  str(path), path):
        np.testing.assert_allclose(embedder.embed(other), as_pil, atol=1e-6)


@pytest.mark.parametrize("format", FORMATS)
def test_moving_to_the_cpu_in_half_precision_keeps_float32(tmp_path, format):
    """`Guard.to` passes the pipeline's device and dtype on; half precision is for GPUs only, as with open_clip."""
    embedder = CLASSES[format](save_model(MeanColor(), tmp_path / f"mean.{format}", format), image_size=SMALL)
    before = embedder.embed(Image.new("RGB", (64, 64), (10, 200, 30)))
    assert embedder.to(torch.device("cpu"), dtype=torch.float16) is embedder
    assert (embedder.device, embedder.spec["precision"]) == ("cpu", "fp32")
    np.testing.assert_allclose(embedder.embed(Image.new("RGB", (64, 64), (10, 200, 30))), before, atol=1e-6)


def test_onnx_on_a_device_onnxruntime_cannot_use_warns_and_runs_on_the_cpu(tmp_path, monkeypatch):
    import onnxruntime

    embedder = ONNXEmbedder(save_model(MeanColor(), tmp_path / "mean.onnx", "onnx"), image_size=SMALL)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.warns(RuntimeWarning, match="onnxruntime-gpu"):
        embedder.to("cuda:1")
    assert embedder.device == "cpu" and embedder.embed(Image.new("RGB", (64, 64))).shape == (1, 3)


def test_an_empty_batch_is_refused_like_any_embedder(descriptors):
    with pytest.raises(ImageDecodeError, match="empty"):
        descriptors["torchscript"].embed([])


@pytest.mark.parametrize("format", FORMATS)
def test_shortest_keeps_the_aspect_ratio_and_squash_makes_a_fixed_size(tmp_path, format):
    path = save_model(ReportsShape(), tmp_path / f"shape.{format}", format)
    wide, tall = Image.new("RGB", (150, 100)), Image.new("RGB", (100, 200))

    def sizes(embedder, images):
        vectors = embedder.embed(images)  # unit (height, width): the ratio survives normalization
        return [round(float(width / height), 3) for height, width in vectors]

    shortest = CLASSES[format](path, image_size=SMALL, resize_mode="shortest")
    assert sizes(shortest, [wide, tall, wide]) == [1.5, 0.5, 1.5]  # batched by shape, returned in order
    square = CLASSES[format](path, image_size=SMALL, resize_mode="squash")
    assert sizes(square, [wide, tall]) == [1.0, 1.0]
    pair = CLASSES[format](path, image_size=(64, 128), resize_mode="squash")
    assert sizes(pair, [tall]) == [2.0]
    assert (shortest.spec["image_size"], square.spec["image_size"], pair.spec["image_size"]) == (
        SMALL, [SMALL, SMALL], [64, 128])


def test_a_mixed_batch_gives_each_picture_the_vector_it_gets_alone(descriptors):
    embedder = descriptors["torchscript"]
    images = [picture(0, (160, 120)), picture(1, (120, 160)), picture(2, (160, 120)), picture(3, (100, 100))]
    together = embedder.embed(images)
    alone = np.concatenate([embedder.embed(image) for image in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_an_extreme_strip_is_cropped_to_16_to_1_before_the_shortest_side_resize(tmp_path):
    embedder = TorchScriptEmbedder(save_model(ReportsShape(), tmp_path / "shape.pt", "torchscript"), image_size=SMALL)
    height, width = embedder.embed(Image.new("RGB", (10000, 1)))[0]
    assert round(float(width / height)) == 16


def test_the_spec_pins_the_file_by_sha256_and_the_preprocessing_by_value(descriptors, descriptor_files):
    for format, embedder in descriptors.items():
        assert embedder.spec == {
            "family": format,
            "weights_file": str(descriptor_files[format]),
            "weights_sha256": file_sha256(descriptor_files[format]),
            "dim": 512,
            "image_size": 288,
            "resize_mode": "shortest",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bilinear",
            "precision": "fp32",
        }
        assert json.loads(json.dumps(embedder.spec)) == embedder.spec  # blocklists store it as JSON


def test_a_renamed_copy_of_the_file_matches_the_original(descriptors, descriptor_files, tmp_path, pictures):
    copy = shutil.copy(descriptor_files["onnx"], tmp_path / "renamed-model.onnx")
    renamed = ONNXEmbedder(copy)
    assert renamed.spec["weights_file"] != descriptors["onnx"].spec["weights_file"]
    assert spec_differences(descriptors["onnx"].spec, renamed.spec) == []
    np.testing.assert_allclose(renamed.embed(pictures[0]), descriptors["onnx"].embed(pictures[0]), atol=1e-6)


def test_another_model_or_other_preprocessing_is_a_mismatch(descriptors, descriptor_files, export_descriptor, tmp_path):
    original = descriptors["torchscript"].spec
    reseeded = TorchScriptEmbedder(export_descriptor(tmp_path / "gem-seed1.pt", "torchscript", seed=1))
    assert [line.split(":")[0] for line in spec_differences(original, reseeded.spec)] == ["weights_sha256"]
    other_stats = TorchScriptEmbedder(descriptor_files["torchscript"], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert [line.split(":")[0] for line in spec_differences(original, other_stats.spec)] == ["mean", "std"]
    squash = TorchScriptEmbedder(descriptor_files["torchscript"], image_size=320, resize_mode="squash")
    assert [line.split(":")[0] for line in spec_differences(original, squash.spec)] == ["image_size", "resize_mode"]
    # The ONNX export of the very same weights is another file, so another spec: build and guard with one format.
    assert "family" in [line.split(":")[0] for line in spec_differences(original, descriptors["onnx"].spec)]


def test_a_guard_refuses_a_descriptor_that_did_not_build_its_blocklist(descriptors, export_descriptor, tmp_path,
                                                                       pictures):
    blocklist = Blocklist.from_images(pictures[:2], descriptors["onnx"], threshold=0.99)
    model_file = descriptors["onnx"].path
    guard = Guard(blocklist, ONNXEmbedder(shutil.copy(model_file, tmp_path / "renamed.onnx")))
    assert guard.check(jpeg_copy(pictures[0]))[0].matched
    reseeded = ONNXEmbedder(export_descriptor(tmp_path / "gem-seed1.onnx", "onnx", seed=1))
    with pytest.raises(EmbedderMismatchError, match="weights_sha256"):
        Guard(blocklist, reseeded)
    with pytest.raises(EmbedderMismatchError, match="std"):
        Guard(blocklist, ONNXEmbedder(model_file, std=(0.25, 0.25, 0.25)))


@pytest.mark.parametrize("format", FORMATS)
def test_embedder_from_spec_rebuilds_a_descriptor_from_its_file(descriptors, descriptor_files, pictures, tmp_path,
                                                                format):
    original = descriptors[format]
    squash = CLASSES[format](descriptor_files[format], image_size=SMALL, resize_mode="squash", batch_size=2)
    for embedder in (original, squash):
        rebuilt = embedder_from_spec(embedder.spec)  # the spec's own weights_file
        assert type(rebuilt) is CLASSES[format] and spec_differences(embedder.spec, rebuilt.spec) == []
        np.testing.assert_allclose(rebuilt.embed(pictures[:2]), embedder.embed(pictures[:2]), atol=1e-6)
    moved = shutil.copy(descriptor_files[format], tmp_path / "moved")
    spec = {**squash.spec, "weights_file": str(tmp_path / "gone" / "model")}  # built on another machine
    with pytest.raises(EmbedderMismatchError, match="--descriptor FILE"):
        embedder_from_spec(spec)
    assert spec_differences(spec, embedder_from_spec(spec, pretrained=moved).spec) == []


def test_embedder_from_spec_refuses_another_file_naming_both_digests(descriptors, descriptor_files):
    spec = descriptors["onnx"].spec
    wrong = descriptor_files["torchscript"]
    with pytest.raises(EmbedderMismatchError) as caught:
        embedder_from_spec(spec, pretrained=wrong)
    assert spec["weights_sha256"] in str(caught.value) and file_sha256(wrong) in str(caught.value)


def test_a_missing_file_is_refused_at_construction(tmp_path):
    for cls in CLASSES.values():
        with pytest.raises(ModelFileError, match="does not exist"):
            cls(tmp_path / "sscd_disc_mixup.torchscript.pt")


def _text_file(tmp_path, format):
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n")
    return path


def _safetensors_file(tmp_path, format):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(path))
    return path


def _truncated(tmp_path, format):
    whole = save_model(MeanColor(), tmp_path / f"whole.{format}", format).read_bytes()
    path = tmp_path / f"truncated.{format}"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _other_format(tmp_path, format):
    return save_model(MeanColor(), tmp_path / "other", "onnx" if format == "torchscript" else "torchscript")


def _module(module):
    return lambda tmp_path, format: save_model(module, tmp_path / f"model.{format}", format)


NOT_A_MODEL = r"is not a (usable )?(TorchScript|ONNX) model"
BAD_FILES = {
    "text file": (_text_file, NOT_A_MODEL),
    "safetensors file": (_safetensors_file, NOT_A_MODEL),
    "truncated file": (_truncated, NOT_A_MODEL),
    "the other format": (_other_format, NOT_A_MODEL),
    "4-D output": (_module(FourD()), r"returned shape \(2, 3, \d+, \d+\)"),
    "one row for two images": (_module(OneRow()), r"returned shape \(1, 3\)"),
    "NaN output": (_module(AllNaN()), "NaN, infinite or all-zero"),
    "all-zero output": (_module(AllZero()), "NaN, infinite or all-zero"),
}


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_an_unusable_model_file_is_refused_at_construction_naming_the_file(tmp_path, case, format):
    make, message = BAD_FILES[case]
    path = make(tmp_path, format)
    with pytest.raises(ModelFileError, match=message) as caught:
        CLASSES[format](path, image_size=SMALL)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("format", FORMATS)
def test_a_dim_the_model_does_not_make_is_refused(tmp_path, format):
    path = save_model(MeanColor(), tmp_path / f"mean.{format}", format)
    assert CLASSES[format](path, image_size=SMALL, dim=3).dim == 3
    with pytest.raises(ModelFileError, match="makes 3-d vectors, not dim=512"):
        CLASSES[format](path, image_size=SMALL, dim=512)


def test_nan_vectors_at_request_time_raise_instead_of_matching_nothing(tmp_path):
    embedder = TorchScriptEmbedder(save_model(NaNForWideInputs(), tmp_path / "nan.pt", "torchscript"), image_size=SMALL)
    assert embedder.embed(Image.new("RGB", (100, 100))).shape == (1, 3)
    with pytest.raises(GuardrailError, match="NaN"):
        embedder.embed(Image.new("RGB", (2000, 100)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"resize_mode": "crop"}, "resize_mode"),
        ({"image_size": (64, 96)}, "image_size"),  # a pair needs squash
        ({"image_size": 0}, "image_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"interpolation": "area"}, "interpolation"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_preprocessing_arguments_are_usage_errors(descriptor_files, options, message):
    with pytest.raises(UsageError, match=message):
        TorchScriptEmbedder(descriptor_files["torchscript"], **options)


def test_without_onnxruntime_the_error_says_what_to_install(descriptor_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(GuardrailError, match=r'pip install "guardrail\[onnx\]"'):
        ONNXEmbedder(descriptor_files["onnx"])


def test_import_guardrail_loads_neither_torch_nor_onnxruntime():
    code = (
        "import sys, guardrail\n"
        "assert guardrail.ONNXEmbedder and guardrail.TorchScriptEmbedder and guardrail.ModelFileError\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
