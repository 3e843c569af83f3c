"""Ways out of a memorized image: the stages `GuardedPipeline` escalates through before it refuses a slot.

On a prompt the model has memorized, a new seed gives the same image back: early in denoising, classifier-free
guidance pulls every starting noise into one "attraction basin" (Jain et al., CVPR 2025). Each stage here leaves that
basin a different way, and every result is still checked against the blocklist by the `Guard`:

- `Reseed` ("reseed"): a fresh, deterministically derived seed. Enough when the copy is one mode among many.
- `DelayGuidance` ("delay_guidance", Jain et al.): no guidance (the conditional prediction alone, or the
  unconditional one) until a transition step, then normal CFG. The transition is a fixed fraction of the schedule or
  the first local minimum of d_t. No extra denoiser pass. It cannot help when the conditional distribution itself
  is the one image (a caption seen only with that image).
- `PerturbPrompt` ("perturb_prompt", Somepalli et al., NeurIPS 2023): random words added to the prompt, which
  moves the condition off the memorized caption. Noise on the text embedding does almost nothing (Chen et al.'s
  re-implementation: 42.75% copies against 44.85%), so it is not offered.
- `SteerAway` ("steer_away", after Chen et al.'s AMG similarity guidance, CVPR 2024): at every step, x̂0 is decoded,
  embedded with the guard's own embedder, and pushed down the gradient of its cosine to the blocklist entry the slot
  matched. Only a blocklist-aware library can offer it. Its cost is honest: one decoder and one embedder forward and
  backward per step and image (no extra denoiser pass).

A stage is any object with a `name` and `prepare(pipe, call, attempt) -> context manager | None`: it may edit the
retry's call (the prompt) and returns the hooks to hold during the call, or None when it cannot apply to this call
(then the policy moves on to the next stage). Hooks registered here run after `SamplingMonitor`'s, so the reported
scores are those of the unmodified model.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import UsageError
from .sampling import decode_x0, denoiser_of, denoiser_prediction, uses_cfg_batch


@dataclass
class StageAttempt:
    """What a stage knows about the retry it prepares: which slots, which attempt, and why they are retried."""

    slots: list[int]
    attempt: int
    seeds: list[int]  # one deterministic seed per slot (derived from the caller's generators)
    verdicts: list[Any]  # each slot's last verdict (the matched entry, for steering)
    guard: Any = None
    notes: dict = field(default_factory=dict)


@runtime_checkable
class Stage(Protocol):
    name: str

    def prepare(self, pipe: Any, call: dict, attempt: StageAttempt) -> contextlib.AbstractContextManager | None: ...


class Reseed:
    """A fresh seed, nothing else (the generators are already fresh): today's resampling."""

    name = "reseed"

    def prepare(self, pipe: Any, call: dict, attempt: StageAttempt) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _replace_prediction(output: Any, prediction: Any) -> Any:
    if isinstance(output, tuple):
        return (prediction, *output[1:])
    if hasattr(output, "sample"):
        output.sample = prediction
        return output
    return prediction


@contextlib.contextmanager
def _denoiser_hook(pipe: Any, hook: Any, with_kwargs: bool = False) -> Iterator[None]:
    denoiser = denoiser_of(pipe)
    handle = denoiser.register_forward_hook(hook, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


class DelayGuidance:
    """Jain et al.'s delayed guidance: weight `before` on (cond - uncond) until the transition, then normal CFG.

    Args:
        until: the transition, as a fraction of the schedule (e.g. 0.3), or `"transition"` for the first local
            minimum of d_t per image (Jain's dynamic transition point), latched, and at the latest at `latest`.
        before: the guidance weight before the transition: 1.0 is the conditional prediction alone (the original
            DTP), 0.0 the unconditional one (static STP); negative values guide away from the prompt.
        latest: with `until="transition"`, the fraction by which guidance switches on whatever d_t does.

    The pipeline keeps its doubled CFG batch; the hook rewrites the unconditional half so that the pipeline's own
    combination `uncond + g (cond - uncond)` yields weight `before` (exact for any g > 1).
    """

    name = "delay_guidance"

    def __init__(self, until: float | str = 0.3, before: float = 1.0, latest: float = 0.6) -> None:
        if until != "transition" and not (isinstance(until, (int, float)) and 0 < until < 1):
            raise UsageError(f"until must be a fraction in (0, 1) or 'transition', got {until!r}")
        self.until, self.before, self.latest = until, float(before), float(latest)

    def prepare(self, pipe: Any, call: dict, attempt: StageAttempt) -> contextlib.AbstractContextManager | None:
        if denoiser_of(pipe) is None or not hasattr(pipe, "do_classifier_free_guidance"):
            return None
        import torch

        steps = int(call.get("num_inference_steps") or _default_steps(pipe))
        state = {"calls": 0, "history": [], "switched": None}

        def hook(module: Any, inputs: Any, output: Any) -> Any:
            prediction = denoiser_prediction(output)
            if not uses_cfg_batch(pipe) or prediction.shape[0] % 2:
                return output
            step = state["calls"]
            state["calls"] += 1
            uncond, cond = prediction.chunk(2)
            rows = uncond.shape[0]
            if state["switched"] is None:
                state["switched"] = [False] * rows
            delayed = self._delayed_rows(step, steps, (cond - uncond).flatten(1).norm(dim=1).tolist(), state)
            if not any(delayed):
                return output
            scale = float(pipe.guidance_scale)
            target = uncond + self.before * (cond - uncond)
            rewritten = (target - scale * cond) / (1 - scale)
            mask = prediction.new_tensor(delayed).view(-1, *[1] * (uncond.ndim - 1)).bool()
            return _replace_prediction(output, torch.cat([torch.where(mask, rewritten, uncond), cond]))

        return _denoiser_hook(pipe, hook)

    def _delayed_rows(self, step: int, steps: int, differences: list[float], state: dict) -> list[bool]:
        if self.until != "transition":
            return [step < math.ceil(self.until * steps)] * len(differences)
        history = state["history"]
        history.append(differences)
        switched = state["switched"]
        for row in range(len(differences)):
            if switched[row]:
                continue
            if step >= math.ceil(self.latest * steps):
                switched[row] = True
            elif len(history) >= 3 and history[-3][row] > history[-2][row] < history[-1][row]:
                switched[row] = True  # d_t passed its first local minimum: out of the basin
        return [not value for value in switched]


def _default_steps(pipe: Any) -> int:
    import inspect

    parameter = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return int(parameter.default) if parameter is not None and isinstance(parameter.default, int) else 50


_WORD = re.compile(r"^[a-z]{3,10}</w>$")


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Plain whole words of a CLIP-style tokenizer's vocabulary (sorted, so a seed picks the same words everywhere)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else dict(getattr(tokenizer, "encoder", {}))
    return sorted(token[:-4] for token in vocab if _WORD.match(token))


class PerturbPrompt:
    """Somepalli et al.'s random token addition: `words` random vocabulary words added to each retried prompt.

    The words are drawn per slot and attempt from the slot's deterministic seed, so a retry is reproducible and every
    attempt perturbs differently (fresh perturbations compound). It applies to calls with text prompts; a call with
    only `prompt_embeds` has no tokens to perturb.
    """

    name = "perturb_prompt"

    def __init__(self, words: int = 2, position: str = "end") -> None:
        if words < 1:
            raise UsageError(f"words must be >= 1, got {words}")
        if position not in ("end", "random"):
            raise UsageError(f"position must be 'end' or 'random', got {position!r}")
        self.words, self.position = words, position
        self._vocabulary: list[str] | None = None

    def prepare(self, pipe: Any, call: dict, attempt: StageAttempt) -> contextlib.AbstractContextManager | None:
        prompts = call.get("prompt")
        tokenizer = getattr(pipe, "tokenizer", None)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or tokenizer is None:
            return None
        if self._vocabulary is None:
            self._vocabulary = vocabulary_words(tokenizer)
        call["prompt"] = [self.perturb(prompt, seed) for prompt, seed in zip(prompts, attempt.seeds)]
        attempt.notes["prompts"] = call["prompt"]
        return contextlib.nullcontext()

    def perturb(self, prompt: str, seed: int) -> str:
        rng = np.random.default_rng(seed)
        added = [self._vocabulary[i] for i in rng.integers(0, len(self._vocabulary), self.words)]
        words = prompt.split()
        for word in added:
            position = len(words) if self.position == "end" else int(rng.integers(0, len(words) + 1))
            words.insert(position, word)
        return " ".join(words)


class SteerAway:
    """Push x̂0 away from the blocklist entry each slot matched, by the gradient of their cosine (after AMG).

    Args:
        strength: the step along the normalized negative gradient, as a fraction of x̂0's RMS, per steered step.
        start, stop: the steered part of the schedule, as fractions.
        margin: steer only while the cosine is above `guard.threshold - margin` (AMG's gating): far from the entry,
            nothing changes.

    Needs a pipeline whose scheduler has `alphas_cumprod` and leaves `scale_model_input` as the identity (DDIM, DDPM,
    PNDM, DPM-Solver, UniPC: the SD 1.x defaults), and an embedder with `embed_with_grad` (`OpenCLIPEmbedder`).
    """

    name = "steer_away"

    def __init__(self, strength: float = 1.0, start: float = 0.0, stop: float = 1.0, margin: float = 0.1) -> None:
        self.strength, self.start, self.stop, self.margin = float(strength), start, stop, margin

    def prepare(self, pipe: Any, call: dict, attempt: StageAttempt) -> contextlib.AbstractContextManager | None:
        scheduler = getattr(pipe, "scheduler", None)
        embedder = getattr(attempt.guard, "embedder", None)
        blocklist = getattr(attempt.guard, "blocklist", None)
        if (getattr(scheduler, "alphas_cumprod", None) is None or getattr(scheduler, "sigmas", None) is not None
                or not hasattr(embedder, "embed_with_grad") or blocklist is None):
            return None
        import torch

        matched_ids = [getattr(verdict, "entry_id", None) for verdict in attempt.verdicts]
        rows = blocklist.rows_of([entry_id for entry_id in matched_ids if entry_id is not None])
        targets = [rows.get(entry_id) for entry_id in matched_ids]
        if all(target is None for target in targets):
            return None
        dim = blocklist.embeddings.shape[1]  # only the matched entries' rows are read (the file may be mapped)
        target_vectors = torch.stack([
            torch.from_numpy(np.array(blocklist.embeddings[t], dtype=np.float32)) if t is not None else torch.zeros(dim)
            for t in targets
        ])
        steps = int(call.get("num_inference_steps") or _default_steps(pipe))
        threshold = float(getattr(attempt.guard, "threshold", 1.0)) - self.margin
        kind = scheduler.config.get("prediction_type", "epsilon")
        state = {"calls": 0, "steered": 0}
        attempt.notes["steer_away"] = state

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            step = state["calls"]
            state["calls"] += 1
            if not self.start * steps <= step < self.stop * steps:
                return output
            prediction = denoiser_prediction(output)
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            cfg = uses_cfg_batch(pipe) and prediction.shape[0] == 2 * len(targets)
            x_t = sample.chunk(2)[1] if cfg else sample
            alpha = scheduler.alphas_cumprod[int(torch.as_tensor(timestep).flatten()[0])].to(x_t.device).float()
            halves = list(prediction.chunk(2)) if cfg else [prediction]
            x0 = _to_x0(halves[-1].float(), x_t.float(), alpha, kind)
            shift = self._shift(pipe, embedder, x0, target_vectors.to(x0.device), threshold)
            if shift is None:
                return output
            state["steered"] += 1
            moved = [_from_x0(_to_x0(h.float(), x_t.float(), alpha, kind) + shift, x_t.float(), alpha, kind).to(h.dtype)
                     for h in halves]
            return _replace_prediction(output, torch.cat(moved))

        return _denoiser_hook(pipe, hook, with_kwargs=True)

    def _shift(self, pipe: Any, embedder: Any, x0: Any, targets: Any, threshold: float) -> Any:
        import torch

        with torch.enable_grad():
            x0 = x0.detach().requires_grad_(True)
            images = decode_x0(pipe, x0, grad=True)
            if images is None:
                return None
            similarity = (embedder.embed_with_grad(images) * targets).sum(dim=1)
            active = (similarity >= threshold) & (targets.abs().sum(dim=1) > 0)
            if not bool(active.any()):
                return None
            (gradient,) = torch.autograd.grad(similarity[active].sum(), x0)
        norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x0.ndim - 1))
        rms = x0.detach().flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-3).view(-1, *[1] * (x0.ndim - 1))
        scale = self.strength * rms * math.sqrt(x0[0].numel())
        return -(gradient / norm) * scale * active.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)


def _to_x0(prediction: Any, x_t: Any, alpha: Any, kind: str) -> Any:
    if kind == "sample":
        return prediction
    if kind == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * prediction
    return (x_t - (1 - alpha).sqrt() * prediction) / alpha.sqrt()


def _from_x0(x0: Any, x_t: Any, alpha: Any, kind: str) -> Any:
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return (alpha.sqrt() * x_t - x0) / (1 - alpha).sqrt()
    return (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt()


STAGES = {"reseed": Reseed, "delay_guidance": DelayGuidance, "perturb_prompt": PerturbPrompt, "steer_away": SteerAway}
"""The built-in stages by name; `GuardedPipeline(strategies=...)` takes these names or `Stage` objects."""


def resolve_stages(strategies: Sequence[str | Stage]) -> tuple[Stage, ...]:
    """Names and objects -> stage objects, in order; a clear error for an unknown name or a non-stage."""
    stages = []
    for strategy in strategies:
        if isinstance(strategy, str):
            if strategy not in STAGES:
                raise UsageError(f"unknown strategy {strategy!r}; choose from {sorted(STAGES)} or pass a Stage object")
            stages.append(STAGES[strategy]())
        elif isinstance(strategy, Stage):
            stages.append(strategy)
        else:
            raise UsageError(f"strategies take names or objects with name and prepare(); got {type(strategy).__name__}")
    if not stages:
        raise UsageError("strategies is empty: pass at least one, e.g. ('reseed',)")
    return tuple(stages)
