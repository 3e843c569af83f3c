"""Where to check x̂0, and at which margin: measured on the digits demo model, which memorizes as SD does.

For every slot (half memorized prompts, half others) it records the guard's score of the scheduler's x̂0 after each
step and the final image's tiled distance to the blocklisted images (Carlini's near-copy test, independent of the
guard). Then, per checked step and margin below the guard's threshold, it prints how many final near-copies the
check would have stopped (caught) and how many clean images (no near-copy, no final match) it would have stopped.
It also prints the score ranges of final copies and non-copies, which is how `DIGITS_THRESHOLD` was chosen.

    python benchmarks/early_check.py --samples 256 --threads 2
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=None, help="default: the demo's DIGITS_THRESHOLD")
    args = parser.parse_args(argv)

    import torch

    from guardrail import Blocklist, Guard
    from guardrail.demo_digits import DIGITS_THRESHOLD, _spread_prompts, digits_embedder
    from guardrail.demo_shared import NEAR_COPY_DISTANCE, per_slot_generators, slot_seeds, tiled_distance
    from guardrail.digits import digits_training_set, load_digits_pipeline
    from guardrail.sampling import _predicted_original, decode_x0

    torch.set_num_threads(args.threads)
    pipe, training = load_digits_pipeline(), digits_training_set()
    embedder = digits_embedder()
    images = training.duplicated_images()
    threshold = args.threshold if args.threshold is not None else DIGITS_THRESHOLD
    guard = Guard(Blocklist.from_images(images, embedder, threshold=threshold), embedder)
    blocked = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])

    prompts = _spread_prompts(args.samples, training.memorized_prompts, training.other_prompts, args.seed)
    previews: list[np.ndarray] = []
    original_step = pipe.scheduler.step

    def step(*step_args, **step_kwargs):
        result = original_step(*step_args, **step_kwargs)
        x0 = _predicted_original(pipe.scheduler, step_args, step_kwargs, result)
        previews.append(np.array([v.score for v in guard.check(decode_x0(pipe, x0), record=False)]))
        return result

    pipe.scheduler.step = step
    try:
        final = pipe(prompts, num_inference_steps=args.steps, generator=per_slot_generators(slot_seeds(args.samples, args.seed)),
                     output_type="np").images
    finally:
        del pipe.scheduler.step
    scores = np.stack(previews)  # (steps, samples)
    final_scores = np.array([v.score for v in guard.check(final, record=False)])
    copies = np.array([tiled_distance(image, blocked).min() <= NEAR_COPY_DISTANCE for image in final])
    clean = ~copies & (final_scores < threshold)

    print(f"\n{args.samples} samples, DDIM {args.steps} steps, guard threshold {threshold}, {args.threads} threads")
    print(f"final scores: near-copies {final_scores[copies].min():.4f}-{final_scores[copies].max():.4f} "
          f"({copies.sum()}), others {final_scores[~copies].min():.4f}-{final_scores[~copies].max():.4f} "
          f"({(~copies).sum()})" if copies.any() else "no near-copies generated")
    print("\n| after step | margin | copies caught | clean images stopped |")
    print("|---:|---:|---:|---:|")
    table = {}
    for fraction in (0.2, 0.4, 0.6, 0.8):
        index = max(0, int(np.ceil(fraction * args.steps)) - 1)
        for margin in (0.0, 0.01, 0.02, 0.03):
            stopped = scores[index] >= threshold - margin
            caught = (stopped & copies).sum() / max(1, copies.sum())
            false = (stopped & clean).sum() / max(1, clean.sum())
            table[(index + 1, margin)] = (caught, false)
            print(f"| {index + 1} of {args.steps} | {margin} | {caught:.1%} | {false:.1%} |")
    return {"table": table, "copies": int(copies.sum()), "clean": int(clean.sum())}


if __name__ == "__main__":
    main()
