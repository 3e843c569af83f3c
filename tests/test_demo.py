"""The offline demo: the shipped model really memorizes, the guard removes the blocklisted copies, and little else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from guardrail.demo import NEAR_COPY_DISTANCE, run_demo, spread_labels, tiled_distance
from guardrail.errors import UsageError
from guardrail.memorizing import ClassConditionalPipeline, load_memorizing_pipeline, training_images

STEPS = 10  # fewer DDIM steps than the demo's 25 keep the tests fast; the model still returns its photos


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def memorizing_pipe():
    return load_memorizing_pipeline()


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, samples=16, steps=STEPS, verbose=False, pipeline="photos")


def test_tiled_distance_is_zero_for_a_copy_and_large_for_another_photo():
    (_, _, astronaut), (_, _, camera) = training_images()[:2]
    assert tiled_distance(astronaut, astronaut) == 0.0
    noisy = np.clip(np.asarray(astronaut, dtype=np.float32) / 255 + 0.02, 0, 1)
    assert tiled_distance(noisy, astronaut) <= NEAR_COPY_DISTANCE
    assert tiled_distance(camera, astronaut) > NEAR_COPY_DISTANCE
    distances = tiled_distance(astronaut, [astronaut, camera])
    assert distances.shape == (2,) and distances[0] == 0.0 and distances[1] > NEAR_COPY_DISTANCE


def test_tiled_distance_counts_the_worst_tile_not_the_average():
    base = np.zeros((32, 32, 3), dtype=np.float32)
    one_tile_differs = base.copy()
    one_tile_differs[:8, :8] = 0.5  # one tile of 16 is off by 0.5; the mean RMSE would be only 0.125
    assert tiled_distance(one_tile_differs, base) == pytest.approx(0.5)


def test_tiled_distance_rejects_images_of_different_shapes():
    with pytest.raises(UsageError):
        tiled_distance(np.zeros((32, 32, 3)), np.zeros((16, 16, 3)))


def test_spread_labels_covers_every_label():
    labels = spread_labels(32, 16, seed=0)
    assert sorted(labels) == sorted(list(range(16)) * 2)


def test_per_slot_generators_reproduce_single_image_runs(memorizing_pipe):
    labels, seeds, steps = [0, 5, 9], [11, 12, 13], 4
    batch = memorizing_pipe(
        class_labels=labels,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        num_inference_steps=steps,
        output_type="np",
    ).images
    for row, (label, seed) in enumerate(zip(labels, seeds)):
        single = memorizing_pipe(
            class_labels=[label], generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
            output_type="np",
        ).images
        np.testing.assert_allclose(batch[row], single[0], atol=1e-5)


def test_each_label_reproduces_its_own_training_photo(memorizing_pipe):
    train = training_images()
    photos = np.stack([np.asarray(image, dtype=np.float32) / 255 for _, _, image in train])
    images = memorizing_pipe(
        class_labels=[label for label, _, _ in train],
        generator=[torch.Generator().manual_seed(100 + label) for label, _, _ in train],
        num_inference_steps=STEPS,
        output_type="np",
    ).images
    for (label, name, _), image in zip(train, images):
        distances = tiled_distance(image, photos)
        assert distances.argmin() == label and distances[label] <= NEAR_COPY_DISTANCE, name


def test_pipeline_output_types(memorizing_pipe):
    call = {"class_labels": [1, 2], "num_inference_steps": 2}
    pil = memorizing_pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    pt = memorizing_pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert tuple(pt.shape) == (2, 3, 32, 32) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    (np_images,) = memorizing_pipe(**call, output_type="np", return_dict=False, generator=torch.Generator().manual_seed(0))
    assert np_images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"class_labels": [16]}, {"class_labels": []}, {"class_labels": [0.5]}, {"class_labels": [0], "output_type": "latent"},
     {"class_labels": [0, 1], "generator": [torch.Generator()]}],
)
def test_pipeline_rejects_bad_arguments(memorizing_pipe, kwargs):
    with pytest.raises(UsageError):
        memorizing_pipe(num_inference_steps=1, **kwargs)


def test_pipeline_is_a_diffusers_pipeline(memorizing_pipe):
    assert isinstance(memorizing_pipe, ClassConditionalPipeline)
    assert set(memorizing_pipe.components) == {"unet", "scheduler"}
    assert type(memorizing_pipe.scheduler).__name__ == "DDIMScheduler"


def test_demo_report_has_the_promised_keys(demo_report):
    out, report = demo_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["samples"] == report["samples"] == 16
    for key in ("near_copies_of_blocklisted",):
        assert isinstance(on_disk["unguarded"][key], int) and isinstance(on_disk["guarded"][key], int)
    for key in ("first_attempt_clean", "false_resamples", "resampled", "exhausted"):
        assert isinstance(on_disk["guarded"][key], int)
    assert 0 < on_disk["threshold"] <= 1 and on_disk["embedder"]["family"] == "open_clip"
    assert len(on_disk["slots"]) == 16
    slot = on_disk["slots"][0]
    assert {"score", "matched", "entry_id", "attempts", "blocked"} <= set(slot["guarded"])
    assert {"score", "matched", "near_copy_of_blocklisted"} <= set(slot["unguarded"])


def test_demo_guard_removes_every_blocklisted_copy(demo_report):
    _, report = demo_report
    assert report["unguarded"]["near_copies_of_blocklisted"] >= 0.3 * report["samples"]
    assert report["guarded"]["near_copies_of_blocklisted"] == 0


def test_demo_rarely_resamples_clean_images(demo_report):
    _, report = demo_report
    guarded = report["guarded"]
    assert guarded["false_resamples"] <= 0.05 * guarded["first_attempt_clean"]


def test_demo_writes_a_viewable_grid(demo_report):
    out, _ = demo_report
    with Image.open(out / "grid.png") as grid:
        grid.load()
        assert grid.width >= 600 and grid.height >= 300


def test_demo_rejects_half_an_embedder(tmp_path):
    with pytest.raises(UsageError):
        run_demo(tmp_path, samples=2, model="ViT-B-32", pipeline="photos")
