"""GuardedPipeline through a real (tiny) StableDiffusionPipeline and DDPMPipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import PROMPT, STEPS, TEST_THRESHOLD, generators

from guardrail import Blocklist, Guard, GuardedPipeline, ResampleExhaustedError, UsageError


def pixels(image):
    return np.asarray(image)


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(**kwargs)


def test_resample_regenerates_exactly_the_matched_slot(sd_pipe, guard, unguarded):
    guarded = GuardedPipeline(sd_pipe, guard)
    out = run(guarded, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    report = out.guardrail
    assert report.attempts == [1, 2, 1, 1]
    assert report.resampled == [False, True, False, False]
    assert report.blocked == [False] * 4
    assert not any(report.matched), "the final images must not match"
    assert guard.check([out.images[1]])[0].score < TEST_THRESHOLD
    assert not np.array_equal(pixels(out.images[1]), pixels(unguarded[1]))


def test_resample_keeps_unmatched_images_bit_identical(sd_pipe, guard, unguarded):
    out = run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    for slot in (0, 2, 3):
        assert np.array_equal(pixels(out.images[slot]), pixels(unguarded[slot]))


def test_resampled_slot_equals_a_single_image_run_with_the_derived_seed(sd_pipe, guard):
    from guardrail.pipeline import retry_generator

    out = run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    advanced = generators(range(4))  # the retry seed comes from the state the caller's batch left the generator in
    run(sd_pipe, prompt=PROMPT, num_images_per_prompt=4, generator=advanced)
    alone = run(sd_pipe, prompt=PROMPT, generator=[retry_generator(advanced, 1, 2)]).images[0]
    assert np.array_equal(pixels(out.images[1]), pixels(alone))


def test_a_generator_reused_across_calls_gets_new_retry_noise_each_call(sd_pipe, embedder, unguarded):
    guarded = GuardedPipeline(sd_pipe, always_matching_guard(embedder, unguarded[0]), max_attempts=2,
                              on_exhausted="keep")
    shared = torch.Generator().manual_seed(0)
    first = run(guarded, prompt=PROMPT, generator=shared)
    second = run(guarded, prompt=PROMPT, generator=shared)
    assert first.guardrail.attempts == second.guardrail.attempts == [2]
    assert not np.array_equal(pixels(first.images[0]), pixels(second.images[0]))


def test_guarded_calls_are_deterministic(sd_pipe, guard):
    guarded = GuardedPipeline(sd_pipe, guard)
    first = run(guarded, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    second = run(guarded, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first.images, second.images))
    assert first.guardrail.to_dict() == second.guardrail.to_dict()


def test_reject_returns_a_black_image_and_marks_it_blocked(sd_pipe, guard, unguarded, caplog):
    with caplog.at_level(logging.WARNING, logger="guardrail"):
        out = run(GuardedPipeline(sd_pipe, guard, action="reject"), prompt=PROMPT, num_images_per_prompt=4,
                  generator=generators(range(4)))
    assert out.guardrail.blocked == [False, True, False, False]
    assert out.guardrail.attempts == [1, 1, 1, 1]
    assert out.guardrail.stages == ["first", "refused", "first", "first"]
    assert pixels(out.images[1]).max() == 0 and out.images[1].size == unguarded[1].size
    assert out.nsfw_content_detected is None, "memorization is not NSFW: the pipeline's own flags stay as they were"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_flag_changes_no_image(sd_pipe, guard, unguarded):
    out = run(GuardedPipeline(sd_pipe, guard, action="flag"), prompt=PROMPT, num_images_per_prompt=4,
              generator=generators(range(4)))
    assert out.guardrail.matched == [False, True, False, False]
    assert out.guardrail.blocked == [False] * 4
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(out.images, unguarded))


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_every_output_type_is_guarded_and_keeps_its_type(sd_pipe, guard, output_type):
    plain = run(sd_pipe, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)), output_type=output_type)
    out = run(GuardedPipeline(sd_pipe, guard, action="reject"), prompt=PROMPT, num_images_per_prompt=4,
              generator=generators(range(4)), output_type=output_type)
    assert type(out.images) is type(plain.images)
    assert out.guardrail.blocked == [False, True, False, False]
    as_array = lambda images: np.stack([np.asarray(i) for i in images]) if isinstance(images, list) else np.asarray(images)
    got, want = as_array(out.images), as_array(plain.images)
    assert got[1].max() == 0
    assert np.array_equal(got[[0, 2, 3]], want[[0, 2, 3]])


def test_return_dict_false_keeps_the_tuple_shape(sd_pipe, guard):
    plain = run(sd_pipe, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)), return_dict=False)
    out = run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)),
              return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(plain)
    images, nsfw = out
    assert nsfw == plain[1]
    assert out.guardrail.attempts == [1, 2, 1, 1]
    assert np.array_equal(pixels(images[0]), pixels(plain[0][0]))


def test_prompt_list_with_several_images_per_prompt_resamples_with_the_right_prompt(sd_pipe, embedder):
    prompts = ["a red cube", "a blue sphere"]
    plain = run(sd_pipe, prompt=prompts, num_images_per_prompt=2, generator=generators(range(4)))
    # Slot 2 is the first image of the second prompt.
    blocklist = Blocklist.from_images([plain.images[2]], embedder, threshold=TEST_THRESHOLD)
    calls = []
    original_call = type(sd_pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original_call(self, *args, **kwargs)

    guarded = GuardedPipeline(sd_pipe, Guard(blocklist, embedder))
    try:
        type(sd_pipe).__call__ = spy
        out = run(guarded, prompt=prompts, num_images_per_prompt=2, generator=generators(range(4)))
    finally:
        type(sd_pipe).__call__ = original_call
    assert out.guardrail.attempts == [1, 1, 2, 1]
    assert calls[1]["prompt"] == ["a blue sphere"] and calls[1]["num_images_per_prompt"] == 1
    assert len(calls[1]["generator"]) == 1
    for slot in (0, 1, 3):
        assert np.array_equal(pixels(out.images[slot]), pixels(plain.images[slot]))


def test_prompt_embeds_and_negative_prompt_embeds_are_sliced_to_the_matched_slots(sd_pipe, embedder):
    embeds, negative = sd_pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blurry")
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_images_per_prompt=4)
    plain = run(sd_pipe, generator=generators(range(4)), **kwargs)
    guard = Guard(Blocklist.from_images([plain.images[1]], embedder, threshold=TEST_THRESHOLD), embedder)
    out = run(GuardedPipeline(sd_pipe, guard), generator=generators(range(4)), **kwargs)
    assert out.guardrail.attempts == [1, 2, 1, 1]
    assert not any(out.guardrail.matched)
    for slot in (0, 2, 3):
        assert np.array_equal(pixels(out.images[slot]), pixels(plain.images[slot]))


def test_one_generator_for_the_batch_gives_deterministic_resamples(sd_pipe, embedder):
    plain = run(sd_pipe, prompt=PROMPT, num_images_per_prompt=3, generator=torch.Generator().manual_seed(7))
    guard = Guard(Blocklist.from_images([plain.images[2]], embedder, threshold=TEST_THRESHOLD), embedder)
    first = run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=3,
                generator=torch.Generator().manual_seed(7))
    second = run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=3,
                 generator=torch.Generator().manual_seed(7))
    assert first.guardrail.attempts == [1, 1, 2]
    assert np.array_equal(pixels(first.images[2]), pixels(second.images[2]))
    assert np.array_equal(pixels(first.images[0]), pixels(plain.images[0]))


def always_matching_guard(embedder, image):
    return Guard(Blocklist.from_images([image], embedder, threshold=-1.0), embedder)


def test_exhausted_slots_become_black_by_default(sd_pipe, embedder, unguarded):
    guarded = GuardedPipeline(sd_pipe, always_matching_guard(embedder, unguarded[0]), max_attempts=2)
    out = run(guarded, prompt=PROMPT, num_images_per_prompt=2, generator=generators(range(2)))
    assert out.guardrail.attempts == [2, 2]
    assert out.guardrail.exhausted == [True, True] and out.guardrail.blocked == [True, True]
    assert all(pixels(image).max() == 0 for image in out.images)


def test_exhausted_slots_raise_or_are_kept_when_asked(sd_pipe, embedder, unguarded):
    guard = always_matching_guard(embedder, unguarded[0])
    with pytest.raises(ResampleExhaustedError) as raised:
        run(GuardedPipeline(sd_pipe, guard, max_attempts=2, on_exhausted="raise"), prompt=PROMPT,
            generator=generators([0]))
    assert raised.value.report.exhausted == [True]
    assert pixels(raised.value.output.images[0]).max() == 0, "the exhausted slot is never handed out"
    kept = run(GuardedPipeline(sd_pipe, guard, max_attempts=3, on_exhausted="keep"), prompt=PROMPT,
               generator=generators([0]))
    assert kept.guardrail.attempts == [3] and kept.guardrail.exhausted == [True]
    assert kept.guardrail.blocked == [False] and pixels(kept.images[0]).max() > 0


def test_latent_output_is_refused_with_a_clear_error(sd_pipe, guard):
    with pytest.raises(UsageError, match="latent"):
        run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, output_type="latent")


def test_bad_options_name_the_argument(sd_pipe, guard):
    with pytest.raises(UsageError, match="action"):
        GuardedPipeline(sd_pipe, guard, action="block")
    with pytest.raises(UsageError, match="on_exhausted"):
        GuardedPipeline(sd_pipe, guard, on_exhausted="grey")
    with pytest.raises(UsageError, match="max_attempts"):
        GuardedPipeline(sd_pipe, guard, max_attempts=0)
    with pytest.raises(UsageError, match="guard must be"):
        GuardedPipeline(sd_pipe, object())


def test_attributes_are_forwarded_and_to_returns_the_wrapper(sd_pipe, guard):
    guarded = GuardedPipeline(sd_pipe, guard)
    assert guarded.scheduler is sd_pipe.scheduler
    assert guarded.to("cpu") is guarded
    guarded.set_progress_bar_config(disable=True)
    assert guarded.device == sd_pipe.device


def test_positional_prompt_works_like_the_wrapped_pipeline(sd_pipe, guard):
    out = GuardedPipeline(sd_pipe, guard)(PROMPT, num_inference_steps=STEPS, generator=generators([1]))
    assert out.guardrail.attempts == [2]


def test_ddpm_pipeline_with_batch_size_is_guarded(embedder):
    from guardrail.offline import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline(seed=0)
    plain = pipe(batch_size=3, num_inference_steps=2, generator=generators(range(3)))
    guard = Guard(Blocklist.from_images([plain.images[0]], embedder, threshold=0.9999), embedder)
    out = GuardedPipeline(pipe, guard)(batch_size=3, num_inference_steps=2, generator=generators(range(3)))
    assert out.guardrail.attempts == [2, 1, 1]
    assert not any(out.guardrail.matched)
    assert all(np.array_equal(pixels(out.images[s]), pixels(plain.images[s])) for s in (1, 2))


def test_from_pretrained_loads_a_local_pipeline_and_blocklist_file(sd_pipe, memorized_blocklist, embedder, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "pipe")
    memorized_blocklist.save(tmp_path / "blocklist.safetensors")
    guarded = GuardedPipeline.from_pretrained(
        tmp_path / "pipe", blocklist=tmp_path / "blocklist.safetensors", embedder=embedder, local_files_only=True,
        action="reject",
    )
    guarded.set_progress_bar_config(disable=True)
    out = run(guarded, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    assert out.guardrail.blocked == [False, True, False, False]


class FlaggingPipeline:
    """A stand-in pipeline whose per-image NSFW flag is the parity of the slot's seed (to test field bookkeeping)."""

    def __call__(self, prompt, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True):
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
        from PIL import Image

        seeds = [g.initial_seed() for g in generator]
        images = [Image.new("RGB", (8, 8), (seed % 251, 0, 0)) for seed in seeds]
        flags = [seed % 2 == 1 for seed in seeds]
        return StableDiffusionPipelineOutput(images, flags) if return_dict else (images, flags)


class FirstAttemptGuard:
    """Matches exactly the images of the first call's slot 0 colour (seed 0), like a blocklist of that image."""

    def check(self, images):
        from guardrail import Verdict

        return [Verdict(image.getpixel((0, 0))[0] == 0, 1.0, "x", {"id": "x"}) for image in images]


@pytest.mark.parametrize("return_dict", [True, False])
def test_resampled_slots_take_the_retrys_per_image_fields_too(return_dict):
    from guardrail.pipeline import retry_generator

    guarded = GuardedPipeline(FlaggingPipeline(), FirstAttemptGuard())
    out = guarded("p", num_images_per_prompt=2, generator=generators([0, 3]), return_dict=return_dict)
    images, flags = (out.images, out.nsfw_content_detected) if return_dict else out
    retry_seed = retry_generator(generators([0, 3]), 0, 2).initial_seed()
    assert out.guardrail.attempts == [2, 1]
    assert flags == [retry_seed % 2 == 1, True], "slot 0's flag is the retry's, slot 1's is untouched"


def test_a_single_chw_conditioning_image_is_not_sliced():
    from guardrail.batching import select_rows

    single = torch.zeros(3, 8, 8)
    assert select_rows(single, [0, 0], items=3, min_ndim=4) is single
    assert select_rows(torch.zeros(3, 3, 8, 8), [2], items=3, min_ndim=4).shape == (1, 3, 8, 8)


def test_raise_keeps_the_clean_slots_images_on_the_error(sd_pipe, embedder, unguarded):
    # Only slot 1's image is blocklisted, with a guard that keeps matching it: every retry of slot 1 "matches".
    class StickyGuard:
        def __init__(self, inner):
            self.inner = inner

        def check(self, images):
            verdicts = self.inner.check(images)
            return [v if len(images) == 4 else type(v)(True, v.score, "seed-1", None) for v in verdicts]

    inner = Guard(Blocklist.from_images([unguarded[1]], embedder, threshold=TEST_THRESHOLD), embedder)
    with pytest.raises(ResampleExhaustedError) as raised:
        run(GuardedPipeline(sd_pipe, StickyGuard(inner), max_attempts=2, on_exhausted="raise"), prompt=PROMPT,
            num_images_per_prompt=4, generator=generators(range(4)))
    images = raised.value.output.images
    assert raised.value.report.exhausted == [False, True, False, False]
    assert pixels(images[1]).max() == 0
    for slot in (0, 2, 3):
        assert np.array_equal(pixels(images[slot]), pixels(unguarded[slot]))


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_resample_with_array_and_tensor_output(sd_pipe, guard, unguarded, output_type):
    plain = run(sd_pipe, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)), output_type=output_type)
    out = run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)),
              output_type=output_type)
    assert type(out.images) is type(plain.images)
    assert out.guardrail.attempts == [1, 2, 1, 1] and not any(out.guardrail.matched)
    got, want = np.asarray(out.images), np.asarray(plain.images)
    assert not np.array_equal(got[1], want[1])
    assert np.array_equal(got[[0, 2, 3]], want[[0, 2, 3]])


def test_per_call_overrides_change_only_that_call(sd_pipe, guard):
    guarded = GuardedPipeline(sd_pipe, guard)
    flagged = run(guarded, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)),
                  guardrail_action="flag")
    assert flagged.guardrail.action == "flag" and flagged.guardrail.attempts == [1, 1, 1, 1]
    assert flagged.guardrail.matched == [False, True, False, False]
    once = run(guarded, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)),
               guardrail_max_attempts=1)
    assert once.guardrail.exhausted == [False, True, False, False] and once.guardrail.blocked[1]
    default = run(guarded, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    assert default.guardrail.action == "resample" and default.guardrail.attempts == [1, 2, 1, 1]
    with pytest.raises(UsageError, match="guardrail_max_attempts"):
        run(guarded, prompt=PROMPT, guardrail_max_attempts=0)


def test_step_callbacks_see_every_generation_labelled_with_its_attempt(sd_pipe, guard):
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((callback_kwargs["guardrail_attempt"], callback_kwargs["guardrail_slots"],
                     callback_kwargs["latents"].shape[0]))
        return {}

    run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)),
        callback_on_step_end=callback)
    assert seen == [(1, None, 4)] * STEPS + [(2, [1], 1)] * STEPS


def test_a_diffusers_pipeline_callback_keeps_its_tensor_inputs(sd_pipe, guard):
    from diffusers.callbacks import SDCFGCutoffCallback

    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.5)  # needs prompt_embeds in callback_kwargs
    out = run(GuardedPipeline(sd_pipe, guard), prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)),
              callback_on_step_end=cutoff, guidance_scale=7.5)
    assert out.guardrail.attempts[1] >= 2


def test_to_moves_the_guards_embedder_with_the_pipeline(weights_file):
    from guardrail import OpenCLIPEmbedder
    from guardrail.offline import tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline(seed=0)
    embedder = OpenCLIPEmbedder("ViT-S-32", pretrained=weights_file, batch_size=8)
    image = run(pipe, prompt=PROMPT, generator=generators([1])).images[0]
    guarded = GuardedPipeline(pipe, Guard(Blocklist.from_images([image], embedder, threshold=0.99), embedder))
    assert guarded.to(torch.float64) is guarded
    assert next(embedder._model.parameters()).dtype == torch.float64 and pipe.dtype == torch.float64
    assert guarded.guard.check([image])[0].score == pytest.approx(1.0, abs=1e-5)
    guarded.to(torch.float16)  # half precision stays off the CPU
    assert next(embedder._model.parameters()).dtype == torch.float32


def test_save_pretrained_restores_the_whole_guarded_pipeline(sd_pipe, guard, embedder, tmp_path):
    guarded = GuardedPipeline(sd_pipe, Guard(guard.blocklist, embedder, threshold=0.9999), action="reject",
                              max_attempts=3)
    guarded.save_pretrained(tmp_path / "guarded")
    restored = GuardedPipeline.from_pretrained(tmp_path / "guarded", embedder=embedder, local_files_only=True)
    restored.set_progress_bar_config(disable=True)
    assert (restored.action, restored.max_attempts, restored.guard.threshold) == ("reject", 3, 0.9999)
    assert [e["id"] for e in restored.guard.blocklist.entries] == [e["id"] for e in guard.blocklist.entries]
    out = run(restored, prompt=PROMPT, num_images_per_prompt=4, generator=generators(range(4)))
    assert out.guardrail.blocked == [False, True, False, False]


def test_save_pretrained_refuses_a_guard_it_cannot_save(sd_pipe, tmp_path):
    with pytest.raises(UsageError, match="save the pipeline with .pipe.save_pretrained"):
        GuardedPipeline(sd_pipe, FirstAttemptGuard()).save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_from_pretrained_without_a_blocklist_names_the_argument(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(UsageError, match="blocklist is required"):
        GuardedPipeline.from_pretrained(tmp_path / "plain", local_files_only=True)
