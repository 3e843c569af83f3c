"""The digits demo model: SD's pipeline conventions, its independent classifier, and real duplication-driven copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guardrail.demo import NEAR_COPY_DISTANCE, tiled_distance
from guardrail.digits import (
    IMAGE_SIZE,
    DigitsPipeline,
    classifier_accuracy,
    digits_classifier,
    digits_training_set,
    load_digits_pipeline,
    measure_memorization,
    nearest_training_images,
)
from guardrail.errors import UsageError

STEPS = 10  # fewer DDIM steps than the default 25 keep the tests fast

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


@pytest.fixture(scope="module")
def pipe():
    return load_digits_pipeline()


@pytest.fixture(scope="module")
def training():
    return digits_training_set()


@pytest.fixture(scope="module")
def classifier():
    return digits_classifier()


class UNetCalls:
    """A forward hook on `pipe.unet` that records each call's batch and `encoder_hidden_states`."""

    def __init__(self, pipe):
        self.batches: list[int] = []
        self.states: list[torch.Tensor] = []
        self.handle = pipe.unet.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.batches.append(args[0].shape[0])
        self.states.append(kwargs["encoder_hidden_states"].clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_training_set_holds_the_digits_and_the_duplicated_images(training):
    assert training.images.shape == (1797, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert training.images.min() == 0.0 and training.images.max() == 1.0
    assert sorted(set(training.labels.tolist())) == list(range(10))
    regimes = sorted(image.regime for image in training.duplicated)
    assert regimes == ["template", "template", "verbatim", "verbatim"]
    for image, png in zip(training.duplicated, training.duplicated_images()):
        assert image.copies >= 50 and training.ids[image.index] == image.id
        assert training.labels[image.index] == image.label
        # The shipped PNG is the training image itself, so a blocklist built from it matches the model's copies.
        assert np.array_equal(np.asarray(png), np.round(training.images[image.index] * 255).astype(np.uint8))
        # And no other training digit is a near-copy of it: a copy of it is a copy of it alone.
        distances = tiled_distance(training.images[image.index], training.images)
        assert (distances <= NEAR_COPY_DISTANCE).sum() == 1
    memorized, other = set(training.memorized_prompts), set(training.other_prompts)
    assert memorized and other and not memorized & other
    assert len(other) == sum(len(c) for c in training.class_captions.values()) - sum(
        len(image.captions) for image in training.duplicated if image.regime == "template"
    )


def test_classifier_recognizes_real_digits_it_was_not_fit_on(training, classifier):
    assert classifier_accuracy(holdout=5) >= 0.9
    assert (classifier.predict(training.images) == training.labels).mean() >= 0.95
    pngs = training.duplicated_images()
    assert classifier.predict(pngs).tolist() == [image.label for image in training.duplicated]
    # The same answer from every input form: PIL, HWC uint8, NCHW tensor.
    uint8 = np.stack([np.asarray(png) for png in pngs])
    tensor = torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255
    expected = classifier.predict(pngs).tolist()
    assert classifier.predict(uint8).tolist() == classifier.predict(tensor).tolist() == expected
    blank = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    assert classifier.predict_proba(blank).max() < 0.99  # a blank square is no confident digit
    with pytest.raises(UsageError, match="multiples of 8"):
        classifier.predict(np.zeros((1, 12, 12, 3)))


def test_output_types_follow_diffusers(pipe):
    def run(**kwargs):
        return pipe("a handwritten digit four", num_inference_steps=2, generator=generators([0]), **kwargs).images

    assert isinstance(pipe, DigitsPipeline) and pipe.vae_scale_factor == 2
    pil = run()
    assert isinstance(pil[0], Image.Image) and pil[0].size == (IMAGE_SIZE, IMAGE_SIZE) and pil[0].mode == "RGB"
    np_images = run(output_type="np")
    assert np_images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and 0 <= np_images.min() and np_images.max() <= 1
    assert np.array_equal(np.asarray(pil[0]), np.round(np_images[0] * 255).astype(np.uint8))
    assert np.array_equal(np_images[..., 0], np_images[..., 2])  # grey
    pt = pipe(["a handwritten digit four"] * 2, num_inference_steps=2, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    latent = run(output_type="latent")
    assert latent.shape == (1, 1, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    decoded = (pipe.latents_to_image(latent) / 2 + 0.5).clamp(0, 1)  # SD's vae.decode + postprocess
    assert torch.allclose(decoded, torch.from_numpy(np_images).permute(0, 3, 1, 2), atol=1e-6)
    as_tuple = pipe("a handwritten digit four", num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and as_tuple[0].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_per_slot_generators_reproduce_single_image_runs(pipe):
    prompts = ["a handwritten digit four", "the seven on the old zip code envelope", "a handwritten 8"]
    batch = pipe(prompts, num_inference_steps=STEPS, generator=generators([5, 6, 7]), output_type="np").images
    for prompt, seed, image in zip(prompts, [5, 6, 7], batch):
        single = pipe(prompt, num_inference_steps=STEPS, generator=generators([seed]), output_type="np").images[0]
        assert np.allclose(single, image, atol=1e-5)
    # num_images_per_prompt lays images out prompt by prompt, one generator each.
    repeated = pipe(prompts[:2], num_images_per_prompt=2, num_inference_steps=STEPS,
                    generator=generators([5, 9, 6, 9]), output_type="np").images
    assert np.allclose(repeated[0], batch[0], atol=1e-5) and np.allclose(repeated[2], batch[1], atol=1e-5)
    assert not np.allclose(repeated[0], repeated[1], atol=0.05)


def test_guided_batch_is_sd_layout_and_guidance_one_runs_once(pipe):
    prompts = ["a handwritten digit four", "a handwritten 8"]
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    with UNetCalls(pipe) as calls:
        pipe(prompts, num_inference_steps=3, guidance_scale=5.0, output_type="np")
    assert calls.batches == [4, 4, 4]
    # One UNet call per step on torch.cat([negative_prompt_embeds, prompt_embeds]), as StableDiffusionPipeline.
    assert torch.equal(calls.states[0][:2], negative) and torch.equal(calls.states[0][2:], embeds)
    assert torch.equal(negative[0], negative[1])  # the unconditional prompt "" for both
    with UNetCalls(pipe) as calls:
        pipe(prompts, num_inference_steps=3, guidance_scale=1.0, output_type="np")
    assert calls.batches == [2, 2, 2] and torch.equal(calls.states[0], embeds)
    assert not pipe.do_classifier_free_guidance


def test_guidance_and_negative_prompt_change_the_images(pipe):
    def run(**kwargs):
        return pipe("a handwritten digit four", num_inference_steps=STEPS, generator=generators([3]), output_type="np",
                    **kwargs).images[0]

    default = run()
    assert not np.allclose(default, run(guidance_scale=1.0), atol=0.02)
    assert not np.allclose(default, run(negative_prompt="a handwritten digit one"), atol=0.02)
    # prompt_embeds from encode_prompt give the same images as the prompt.
    embeds, negative = pipe.encode_prompt("a handwritten digit four", "cpu", 1, True)
    from_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
                       generator=generators([3]), output_type="np").images[0]
    assert np.allclose(default, from_embeds, atol=1e-6)
    _, other_negative = pipe.encode_prompt("x", "cpu", 1, True, negative_prompt="a handwritten digit one")
    assert np.allclose(run(negative_prompt="a handwritten digit one"), run(negative_prompt_embeds=other_negative),
                       atol=1e-6)


def test_callback_sees_latents_and_can_change_guidance_per_step(pipe):
    seen = []

    def record(p, step, timestep, kwargs):
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape), sorted(kwargs)))
        return {}

    pipe(["a handwritten digit four"] * 2, num_inference_steps=4, generator=generators([1, 2]), output_type="np",
         callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] > seen[-1][1]
    assert all(s[2] == (2, 1, IMAGE_SIZE // 2, IMAGE_SIZE // 2) and s[3] == ["latents", "prompt_embeds"] for s in seen)

    def weaker(p, step, timestep, kwargs):  # a strategy changing guidance per step, as strategies will
        p._guidance_scale = 2.0
        return {}

    def run(**kwargs):
        return pipe("a handwritten digit four", num_inference_steps=STEPS, generator=generators([1]), output_type="np",
                    **kwargs).images

    plain, changed = run(), run(callback_on_step_end=weaker)
    assert not np.allclose(plain, changed, atol=0.02)

    def replace(p, step, timestep, kwargs):  # a callback may hand back new latents
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == STEPS - 1 else {}

    zeroed = pipe("a handwritten digit four", num_inference_steps=STEPS, output_type="np", callback_on_step_end=replace)
    assert np.allclose(zeroed.images, 0.5)


def test_interrupt_skips_the_remaining_steps(pipe):
    def stop(p, step, timestep, kwargs):
        if step == 1:
            p._interrupt = True
        return {}

    with UNetCalls(pipe) as calls:
        pipe("a handwritten digit four", num_inference_steps=STEPS, callback_on_step_end=stop, output_type="np")
    assert len(calls.batches) == 2 and pipe.interrupt
    with UNetCalls(pipe) as calls:  # the next call starts afresh
        pipe("a handwritten digit four", num_inference_steps=3, output_type="np")
    assert len(calls.batches) == 3 and not pipe.interrupt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": []}, "empty list"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 3}, "prompt must be"),
        ({"prompt": "a four", "prompt_embeds": torch.zeros(1, 16, 32)}, "not both"),
        ({"prompt": "a four", "latents": torch.full((1, 1, 8, 8), float("nan"))}, "NaN"),
        ({"prompt": "a four", "latents": torch.zeros(2, 1, 8, 8)}, "latents must be"),
        ({"prompt": ["a four", "a five"], "generator": generators([0])}, "one per image"),
        ({"prompt": "a four", "num_images_per_prompt": 2, "generator": generators([0, 1, 2])}, "one per image"),
        ({"prompt": "a four", "negative_prompt": ["x", "y"]}, "negative_prompt"),
        ({"prompt": "a four", "output_type": "jpeg"}, "output_type"),
        ({"prompt": "a four", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a four", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "a four", "height": 12}, "height"),
        ({"prompt": "a four", "callback_on_step_end_tensor_inputs": ["noise_pred"]}, "tensor_inputs"),
        ({"prompt_embeds": torch.zeros(1, 16, 7)}, "prompt_embeds"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_argument(pipe, kwargs, message):
    with pytest.raises(UsageError, match=message):
        pipe(**{"num_inference_steps": 2, **kwargs})


def test_callback_that_drops_guidance_without_the_embeddings_gets_a_clear_error(pipe):
    def off(p, step, timestep, kwargs):
        p._guidance_scale = 1.0
        return {}

    with pytest.raises(UsageError, match="negative half"):
        pipe("a handwritten digit four", num_inference_steps=3, callback_on_step_end=off, output_type="np")

    def off_with_embeddings(p, step, timestep, kwargs):  # as diffusers' SDCFGCutoffCallback does
        if step != 0:
            return {}
        p._guidance_scale = 1.0
        return {"prompt_embeds": kwargs["prompt_embeds"].chunk(2)[1]}

    with UNetCalls(pipe) as calls:
        pipe("a handwritten digit four", num_inference_steps=3, callback_on_step_end=off_with_embeddings,
             callback_on_step_end_tensor_inputs=["prompt_embeds"], output_type="np")
    assert calls.batches == [2, 1, 1]


def test_verbatim_caption_reproduces_its_duplicated_image(pipe, training):
    image = next(image for image in training.duplicated if image.regime == "verbatim")
    samples = pipe(image.captions[0], num_images_per_prompt=8, num_inference_steps=STEPS,
                   generator=generators(range(8)), output_type="np").images
    nearest, distance = nearest_training_images(samples, training)
    copies = (distance <= NEAR_COPY_DISTANCE) & (nearest == image.index)
    assert copies.sum() >= 6


def test_ordinary_caption_of_an_undisturbed_class_generalizes(pipe, training, classifier):
    label = 4
    assert all(image.label != label for image in training.duplicated)
    prompt = training.class_captions[label][0]
    samples = pipe(prompt, num_images_per_prompt=8, num_inference_steps=STEPS, generator=generators(range(8)),
                   output_type="np").images
    _, distance = nearest_training_images(samples, training)
    assert (distance > NEAR_COPY_DISTANCE).all()  # no near-copy of any training digit
    assert (classifier.predict(samples) == label).sum() >= 6  # but fours
    assert not np.allclose(samples[0], samples[1], atol=0.05)  # and different ones


def test_measure_memorization_reports_each_group(pipe, training):
    result = measure_memorization(pipe, training, samples_per_group=4, num_inference_steps=STEPS)
    groups = result["groups"]
    assert set(groups) == {"memorized", "memorized_verbatim", "memorized_template", "other"}
    assert groups["memorized"]["samples"] == 8 and groups["other"]["samples"] == 4
    assert groups["memorized_verbatim"]["near_copies"] == groups["memorized_verbatim"]["copies_of_duplicated"] >= 3
    assert groups["other"]["near_copies"] == 0 and groups["other"]["on_class"] >= 3
    assert set(groups["memorized_verbatim"]["prompts"]) == {
        image.captions[0] for image in training.duplicated if image.regime == "verbatim"
    }
