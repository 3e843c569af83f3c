"""The escalation policy and each stage's mechanics, on real tiny StableDiffusion and SDXL pipelines."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import PROMPT, TEST_THRESHOLD, generators

from guardrail import Blocklist, Guard, GuardedPipeline, UsageError, Verdict
from guardrail.mitigation import DelayGuidance, PerturbPrompt, StageAttempt, SteerAway, vocabulary_words
from guardrail.offline import tiny_stable_diffusion_xl_pipeline
from guardrail.sampling import denoiser_prediction

STEPS = 4


def no_hooks_left(pipe):
    return not pipe.unet._forward_hooks and "step" not in vars(pipe.scheduler)


class MatchFirstCalls:
    """Matches every image of the first `calls` final checks (early x̂0 checks are off in these tests)."""

    threshold = 0.5

    def __init__(self, calls):
        self.calls, self.seen = calls, 0

    def check(self, images):
        self.seen += 1
        hit = self.seen <= self.calls
        return [Verdict(hit, 0.9 if hit else 0.1, "e" if hit else None, None) for _ in range(len(images))]


class Recording:
    """A user-defined stage (the Stage protocol): records the calls it prepared."""

    name = "recording"

    def __init__(self):
        self.prepared = []

    def prepare(self, pipe, call, attempt):
        self.prepared.append((attempt.attempt, list(attempt.slots)))
        return contextlib.nullcontext()


ORDERED = ("reseed", "delay_guidance", "perturb_prompt")


def guarded(pipe, guard, **options):
    return GuardedPipeline(pipe, guard, early_check=(), **{"strategies": ORDERED, **options})


@pytest.mark.parametrize("matched_calls, stage", [(1, "reseed"), (2, "delay_guidance"), (3, "perturb_prompt")])
def test_stages_are_tried_in_order_and_the_report_names_the_one_that_worked(sd_pipe, matched_calls, stage):
    out = guarded(sd_pipe, MatchFirstCalls(matched_calls))(prompt=PROMPT, num_inference_steps=STEPS,
                                                             generator=generators([0]))
    assert out.guardrail.stages == [stage] and out.guardrail.attempts == [matched_calls + 1]


def test_a_slot_is_refused_only_when_every_attempt_matched(sd_pipe):
    out = guarded(sd_pipe, MatchFirstCalls(99))(prompt=PROMPT, num_inference_steps=STEPS, generator=generators([0]))
    assert out.guardrail.stages == ["refused"] and out.guardrail.blocked == [True] and out.guardrail.attempts == [4]


def test_slots_that_never_matched_are_bit_identical_and_marked_first(sd_pipe, guard, unguarded):
    out = GuardedPipeline(sd_pipe, guard)(prompt=PROMPT, num_images_per_prompt=4, num_inference_steps=2,
                                         generator=generators(range(4)))
    assert out.guardrail.stages == ["first", "reseed", "first", "first"]
    for slot in (0, 2, 3):
        assert np.array_equal(np.asarray(out.images[slot]), np.asarray(unguarded[slot]))


def test_user_stages_follow_the_protocol_and_the_last_stage_repeats(sd_pipe):
    recording = Recording()
    out = guarded(sd_pipe, MatchFirstCalls(3), strategies=("reseed", recording))(
        prompt=PROMPT, num_inference_steps=STEPS, generator=generators([0]))
    assert recording.prepared == [(3, [0]), (4, [0])]
    assert out.guardrail.stages == ["recording"]


def test_unknown_strategies_name_the_choices(sd_pipe, guard):
    with pytest.raises(UsageError, match="unknown strategy 'jitter'"):
        GuardedPipeline(sd_pipe, guard, strategies=("reseed", "jitter"))
    with pytest.raises(UsageError, match="strategies is empty"):
        GuardedPipeline(sd_pipe, guard, strategies=())


def test_the_default_policy_steers_away_when_it_can_and_skips_it_when_it_cannot(sd_pipe, embedder, unguarded):
    guard = always_matching_guard_for(embedder, unguarded[1])
    out = GuardedPipeline(sd_pipe, guard, early_check=(), max_attempts=3)(
        prompt=PROMPT, num_inference_steps=STEPS, generator=generators([0]))
    assert out.guardrail.tried == [["reseed", "steer_away"]]
    fake = GuardedPipeline(sd_pipe, MatchFirstCalls(99), early_check=(), max_attempts=3)(
        prompt=PROMPT, num_inference_steps=STEPS, generator=generators([0]))
    assert fake.guardrail.tried == [["reseed", "perturb_prompt"]], "no embedder to steer with: the next stage runs"


def always_matching_guard_for(embedder, image):
    return Guard(Blocklist.from_images([image], embedder, entries=[{"id": "x"}], threshold=-1.0), embedder)


def test_a_blocklisted_caption_skips_the_reseed(sd_pipe, embedder, unguarded):
    blocklist = Blocklist.from_images([unguarded[1]], embedder, entries=[{"id": "m", "caption": PROMPT.upper() + "!"}],
                                      threshold=TEST_THRESHOLD)
    out = GuardedPipeline(sd_pipe, Guard(blocklist, embedder))(prompt=PROMPT, num_images_per_prompt=4,
                                                              num_inference_steps=2, generator=generators(range(4)))
    assert out.guardrail.triggered == [True] * 4
    assert out.guardrail.stages == ["first", "steer_away", "first", "first"], "only the copy changes"
    for slot in (0, 2, 3):
        assert np.array_equal(np.asarray(out.images[slot]), np.asarray(unguarded[slot]))


def test_skip_triggered_stops_the_first_generation_of_a_fully_triggered_call(sd_pipe):
    out = guarded(sd_pipe, MatchFirstCalls(0), memorization_threshold=0.0, skip_triggered=True)(
        prompt=PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, generator=generators(range(2)))
    report = out.guardrail
    assert report.triggered == [True, True]
    assert report.stages == ["delay_guidance"] * 2, "the first stage that is not a reseed"
    assert report.denoiser_steps == [2 + 2 * STEPS] * 2, "one CFG step of the first generation, then a full one"


def raw_and_guided(pipe, stage, attempt, **call):
    """Run `pipe` under `stage`: the denoiser's own output per step, and what the scheduler received."""
    raw, guided = [], []
    handle = pipe.unet.register_forward_hook(lambda m, i, o: raw.append(denoiser_prediction(o).detach().clone()))
    original = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        guided.append(model_output.detach().clone())
        return original(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    try:
        with stage.prepare(pipe, call, attempt):
            pipe(**call)
    finally:
        handle.remove()
        del pipe.scheduler.step
    return raw, guided


def test_delay_guidance_turns_cfg_off_before_the_transition_and_on_after(sd_pipe):
    attempt = StageAttempt([0], 2, [5], [None])
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=generators([0]))
    raw, guided = raw_and_guided(sd_pipe, DelayGuidance(until=0.5, before=1.0), attempt, **call)
    for step, (output, used) in enumerate(zip(raw, guided)):
        uncond, cond = output.chunk(2)
        expected = cond if step < 2 else uncond + 7.5 * (cond - uncond)
        assert torch.allclose(used, expected, atol=1e-4), f"step {step}"
    assert no_hooks_left(sd_pipe)


def test_delay_guidance_with_a_dynamic_transition_switches_at_the_first_local_minimum():
    stage = DelayGuidance(until="transition", latest=0.9)
    state = {"history": [], "switched": [False, False]}
    delayed = [stage._delayed_rows(step, 10, d, state) for step, d in
               enumerate([[5, 5], [4, 6], [3, 7], [4, 8], [2, 9]])]
    assert delayed[3] == [False, True], "image 0 passed its minimum at step 2 (3 < 4)"
    assert delayed[4] == [False, True], "switched stays switched; image 1 is still rising"


def test_perturb_prompt_adds_seeded_vocabulary_words(sd_pipe):
    stage = PerturbPrompt(words=2)
    call = {"prompt": [PROMPT, PROMPT]}
    assert stage.prepare(sd_pipe, call, StageAttempt([0, 1], 3, [11, 12], [None, None])) is not None
    words = set(vocabulary_words(sd_pipe.tokenizer))
    for prompt in call["prompt"]:
        added = prompt.split()[len(PROMPT.split()):]
        assert prompt.startswith(PROMPT) and len(added) == 2 and set(added) <= words
    assert call["prompt"][0] != call["prompt"][1], "each slot's seed draws its own words"
    again = {"prompt": [PROMPT, PROMPT]}
    stage.prepare(sd_pipe, again, StageAttempt([0, 1], 3, [11, 12], [None, None]))
    assert again == call, "deterministic from the seeds"
    assert stage.prepare(sd_pipe, {"prompt_embeds": torch.zeros(1, 77, 32)}, StageAttempt([0], 3, [1], [None])) is None


def test_steer_away_lowers_the_similarity_to_the_matched_entry(sd_pipe, embedder):
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, output_type="pt")
    plain = sd_pipe(**call, generator=generators([3])).images
    guard = Guard(Blocklist.from_images(plain, embedder, entries=[{"id": "copy"}], threshold=0.99), embedder)
    before = guard.check(plain)[0]
    attempt = StageAttempt([0], 2, [3], [before], guard)
    stage = SteerAway(strength=0.5, margin=1.0)
    with stage.prepare(sd_pipe, {**call}, attempt):
        steered = sd_pipe(**call, generator=generators([3])).images
    assert attempt.notes["steer_away"]["steered"] >= 1
    assert guard.check(steered)[0].score < before.score - 1e-3
    assert no_hooks_left(sd_pipe)


def test_the_whole_policy_runs_on_sdxl():
    pipe = tiny_stable_diffusion_xl_pipeline(seed=0)
    out = GuardedPipeline(pipe, MatchFirstCalls(3), early_check=(), strategies=ORDERED)(
        prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64, generator=generators([0]))
    assert out.guardrail.stages == ["perturb_prompt"] and out.guardrail.attempts == [4]
    assert no_hooks_left(pipe)


def test_the_caption_trigger_skips_blocklists_too_large_to_read(sd_pipe, embedder, unguarded, monkeypatch, caplog):
    import guardrail.pipeline

    blocklist = Blocklist.from_images([unguarded[1]], embedder, entries=[{"id": "m", "caption": PROMPT}],
                                      threshold=TEST_THRESHOLD)
    monkeypatch.setattr(guardrail.pipeline, "CAPTION_TRIGGER_LIMIT", 0)
    out = GuardedPipeline(sd_pipe, Guard(blocklist, embedder), early_check=())(
        prompt=PROMPT, num_images_per_prompt=4, num_inference_steps=2, generator=generators(range(4)))
    assert out.guardrail.triggered == [False] * 4 and out.guardrail.stages[1] == "reseed"
    assert "caption trigger is off" in caplog.text
