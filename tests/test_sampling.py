"""Detection while sampling: the step-1 memorization score from the CFG batch, and the early blocklist check.

Through real tiny `StableDiffusionPipeline` and `StableDiffusionXLPipeline` objects built from configs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT, generators

from guardrail import Blocklist, Guard, GuardedPipeline, UsageError, Verdict
from guardrail.offline import tiny_stable_diffusion_xl_pipeline

STEPS = 5


def always_matching_guard(embedder, image):
    return Guard(Blocklist.from_images([image], embedder, threshold=-1.0), embedder)


def hooks_are_gone(pipe):
    return not pipe.unet._forward_hooks and "step" not in vars(pipe.scheduler)


def test_memorization_score_is_the_guidance_difference_at_step_1(sd_pipe, guard):
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = GuardedPipeline(sd_pipe, guard, action="flag")(
        prompt=PROMPT, latents=latents, num_inference_steps=2, guidance_scale=7.5
    )
    cond, uncond = sd_pipe.encode_prompt(PROMPT, "cpu", 1, True)
    sd_pipe.scheduler.set_timesteps(2)
    t = sd_pipe.scheduler.timesteps[0]
    x = sd_pipe.scheduler.scale_model_input(latents * sd_pipe.scheduler.init_noise_sigma, t)
    with torch.no_grad():
        difference = sd_pipe.unet(x, t, encoder_hidden_states=cond).sample - sd_pipe.unet(
            x, t, encoder_hidden_states=uncond).sample
    assert out.guardrail.memorization[0] == pytest.approx(difference.flatten(1).norm(dim=1).item(), rel=1e-4)
    assert hooks_are_gone(sd_pipe)


def test_memorization_score_is_per_image_and_none_without_cfg(sd_pipe, guard):
    guarded = GuardedPipeline(sd_pipe, guard, action="flag")
    batch = guarded(prompt=[PROMPT, "a blue sphere"], num_inference_steps=2, generator=generators(range(2)))
    alone = guarded(prompt=["a blue sphere"], num_inference_steps=2, generator=generators([1]))
    assert batch.guardrail.memorization[1] == pytest.approx(alone.guardrail.memorization[0], rel=1e-4)
    assert batch.guardrail.memorization[0] != pytest.approx(batch.guardrail.memorization[1], rel=1e-3)
    no_cfg = guarded(prompt=PROMPT, num_inference_steps=2, guidance_scale=1.0, generator=generators([0]))
    assert no_cfg.guardrail.memorization == [None]


def test_denoiser_steps_count_the_cfg_batch_as_the_pipeline_runs_it(sd_pipe, guard):
    guarded = GuardedPipeline(sd_pipe, guard, action="flag")
    assert guarded(prompt=PROMPT, num_inference_steps=STEPS).guardrail.denoiser_steps == [2 * STEPS]
    assert guarded(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=1.0).guardrail.denoiser_steps == [STEPS]


def test_early_check_interrupts_a_batch_whose_every_slot_matched(sd_pipe, embedder, unguarded):
    guard = always_matching_guard(embedder, unguarded[0])
    stopped = GuardedPipeline(sd_pipe, guard, action="reject")(
        prompt=PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, generator=generators(range(2)))
    report = stopped.guardrail
    assert report.stopped_at == [1, 1], "0.2 of 5 steps: checked after step 1"
    assert report.denoiser_steps == [2.0, 2.0], "one CFG step instead of five"
    assert report.blocked == [True, True] and all(np.asarray(image).max() == 0 for image in stopped.images)
    assert sum(guard.match_counts().values()) == 2, "early previews stay out of the match counts"
    finished = GuardedPipeline(sd_pipe, guard, action="reject", early_check=())(
        prompt=PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, generator=generators(range(2)))
    assert finished.guardrail.stopped_at == [None, None] and finished.guardrail.denoiser_steps == [10.0, 10.0]
    assert hooks_are_gone(sd_pipe)


class EarlyOnlyGuard:
    """Matches slot 0 of the first check it sees (the early x̂0 check), and nothing afterwards."""

    threshold = 0.5

    def __init__(self):
        self.calls = 0

    def check(self, images):
        self.calls += 1
        first = self.calls == 1
        return [Verdict(first and i == 0, 0.9 if first and i == 0 else 0.1, "e" if first and i == 0 else None, None)
                for i in range(len(images))]


def test_a_slot_stopped_early_keeps_its_early_verdict_and_leaves_the_others_untouched(sd_pipe):
    plain = sd_pipe(prompt=PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, generator=generators(range(2)))
    out = GuardedPipeline(sd_pipe, EarlyOnlyGuard(), action="reject")(
        prompt=PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, generator=generators(range(2)))
    report = out.guardrail
    assert report.stopped_at == [1, None]
    assert report.matched == [True, False] and report.blocked == [True, False]
    assert report.denoiser_steps == [10.0, 10.0], "a mixed batch runs to the end"
    assert np.array_equal(np.asarray(out.images[1]), np.asarray(plain.images[1]))


def test_flag_never_stops_early(sd_pipe, embedder, unguarded):
    out = GuardedPipeline(sd_pipe, always_matching_guard(embedder, unguarded[0]), action="flag")(
        prompt=PROMPT, num_inference_steps=STEPS, generator=generators([0]))
    assert out.guardrail.stopped_at == [None] and out.guardrail.denoiser_steps == [10.0]


def test_hooks_are_removed_when_the_call_raises(sd_pipe, guard):
    def broken(pipe, step, timestep, callback_kwargs):
        raise RuntimeError("caller's callback failed")

    with pytest.raises(RuntimeError, match="caller's callback"):
        GuardedPipeline(sd_pipe, guard)(prompt=PROMPT, num_inference_steps=2, callback_on_step_end=broken)
    assert hooks_are_gone(sd_pipe)


def test_bad_input_gets_a_clear_error_not_a_crash_in_a_hook(sd_pipe, guard):
    guarded = GuardedPipeline(sd_pipe, guard)
    with pytest.raises(UsageError, match="empty list"):
        guarded(prompt=[], num_inference_steps=2)
    with pytest.raises(UsageError, match="NaN"):
        guarded(prompt=PROMPT, num_inference_steps=2, latents=torch.full((1, 4, 32, 32), float("nan")))
    with pytest.raises(UsageError, match="early_check"):
        GuardedPipeline(sd_pipe, guard, early_check=(1.5,))
    assert hooks_are_gone(sd_pipe)


def test_sdxl_gets_a_score_and_the_early_check(embedder):
    pipe = tiny_stable_diffusion_xl_pipeline(seed=0)
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64, generator=generators([0]))
    plain = pipe(**kwargs).images[0]
    flagged = GuardedPipeline(pipe, always_matching_guard(embedder, plain), action="flag")(
        **{**kwargs, "generator": generators([0])})
    assert flagged.guardrail.memorization[0] is not None and flagged.guardrail.memorization[0] > 0
    assert np.array_equal(np.asarray(flagged.images[0]), np.asarray(plain)), "the hooks change no pixel"
    stopped = GuardedPipeline(pipe, always_matching_guard(embedder, plain), action="reject")(
        **{**kwargs, "generator": generators([0])})
    assert stopped.guardrail.stopped_at == [1]
    assert hooks_are_gone(pipe)


def test_a_pipeline_without_cfg_gets_no_score(embedder):
    from guardrail.offline import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline(seed=0)
    plain = pipe(batch_size=2, num_inference_steps=2, generator=generators(range(2)))
    guard = Guard(Blocklist.from_images([plain.images[0]], embedder, threshold=0.9999), embedder)
    out = GuardedPipeline(pipe, guard, action="flag")(batch_size=2, num_inference_steps=2, generator=generators(range(2)))
    assert out.guardrail.memorization == [None, None]
    assert out.guardrail.matched == [True, False]


def test_previews_decode_as_the_pipeline_does_and_pool_large_latents(sd_pipe):
    from guardrail.sampling import decode_x0

    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    full = decode_x0(sd_pipe, latents)
    with torch.no_grad():
        expected = (sd_pipe.vae.decode(latents / sd_pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(full, expected, atol=1e-5), "the preview is the pipeline's own VAE decode"
    assert decode_x0(sd_pipe, latents, preview_side=224).shape[-1] == 64, "no pooling below twice the embedder side"
    assert decode_x0(sd_pipe, latents, preview_side=16).shape[-1] == 16, "pooled until under twice the side"


def test_previews_use_a_pipelines_own_latent_decoder():
    from guardrail.digits import load_digits_pipeline
    from guardrail.sampling import decode_x0

    pipe = load_digits_pipeline()
    latents = torch.rand(1, 1, 8, 8) * 2 - 1
    assert torch.equal(decode_x0(pipe, latents), (pipe.latents_to_image(latents) / 2 + 0.5).clamp(0, 1))
