"""Every image type diffusers and serving code hand us becomes the same RGB image, or a clear ImageDecodeError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guardrail import ImageDecodeError
from guardrail.images import load_image, to_pil_images


@pytest.fixture
def rgb():
    return np.random.default_rng(0).random((16, 24, 3), dtype=np.float32)


def test_pil_np_float_uint8_and_tensor_inputs_give_identical_pixels(rgb):
    from diffusers.image_processor import VaeImageProcessor

    as_pil = VaeImageProcessor.numpy_to_pil(rgb[None])[0]  # what output_type="pil" returns
    variants = [as_pil, rgb, rgb[None], (rgb * 255).round().astype(np.uint8), torch.from_numpy(rgb).permute(2, 0, 1),
                torch.from_numpy(rgb).permute(2, 0, 1)[None]]
    for variant in variants:
        (image,) = to_pil_images(variant)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(as_pil))


def test_batches_keep_their_order_and_size(rgb):
    batch = np.stack([rgb, rgb * 0.5, rgb * 0.25])
    images = to_pil_images(batch)
    assert len(images) == 3
    assert np.asarray(images[0]).mean() > np.asarray(images[2]).mean()


def test_grey_and_transparent_images_become_rgb():
    grey = Image.fromarray(np.full((8, 8), 128, np.uint8))
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    grey_rgb, composited = to_pil_images([grey, transparent])
    assert grey_rgb.mode == "RGB" and np.asarray(grey_rgb)[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(composited)[0, 0].tolist() == [255, 255, 255], "transparent pixels are shown on white"


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "empty"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 3), -0.5, np.float32), "values"),
        (np.zeros((4, 4, 7), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "zero size"),
        (torch.zeros(2, 5, 4, 4), "shape"),
        (np.zeros((4, 4, 3), np.complex64), "dtype"),
        ([42], "type"),
        ({"image": 1}, "type"),
    ],
)
def test_invalid_inputs_raise_image_decode_error_naming_the_problem(bad, message):
    with pytest.raises(ImageDecodeError, match=message):
        to_pil_images(bad)


def test_corrupt_and_truncated_files_raise_image_decode_error(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert load_image(good).size == (64, 64)
    for path in (truncated, text, tmp_path / "missing.png"):
        with pytest.raises(ImageDecodeError, match=path.name):
            load_image(path)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL warns at the limit and fails at twice it
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(path)
