"""`GuardedPipeline` against the bare pipeline when nothing matches, and a projection to Stable Diffusion 1.5.

Measured, same run, interleaved: the tiny offline StableDiffusionPipeline bare; with the sampling hooks alone (the
memorization score from the CFG batch); with the early x̂0 check; and the whole `GuardedPipeline` (seeded ViT-S-32
embedder, a blocklist of synthetic vectors that nothing matches). Because the tiny pipeline costs far less than a real one,
the measured ratio overstates the guard's share; so the script also times `Guard.check` per image with the
production embedder's architecture (ViT-L-14, random weights: a forward pass costs the same whatever the weights)
and projects it onto a cited SD 1.5 generation time.

    python benchmarks/pipeline_overhead.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from timing import interleaved_median_seconds, median_seconds

# Stable Diffusion v1.5, 512x512, 50 steps, PyTorch fp16 on an NVIDIA A10: 2.95 s per image. Source: the
# DeciDiffusion-v1-0 model card (huggingface.co/Deci/DeciDiffusion-v1-0), latency comparison table.
SD15_A10_SECONDS_PER_IMAGE = 2.95


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images per call")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--entries", type=int, default=100_000, help="blocklist size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--production-model", default="ViT-L-14-quickgelu")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                        help="count FLOPs of the guard and of SD 1.5 (builds SD 1.5's UNet and VAE: ~4 GB RAM)")
    args = parser.parse_args(argv)

    import faiss
    import torch
    from PIL import Image

    from guardrail import Blocklist, Guard, GuardedPipeline, OpenCLIPEmbedder
    from guardrail.offline import tiny_stable_diffusion_pipeline, write_seeded_open_clip_weights
    from guardrail.sampling import DEFAULT_EARLY_CHECK, SamplingMonitor

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    folder = tempfile.mkdtemp(prefix="guardrail-bench-")
    rng = np.random.default_rng(0)

    def guard_for(model: str) -> Guard:
        embedder = OpenCLIPEmbedder(model, write_seeded_open_clip_weights(f"{folder}/{model}.safetensors", model))
        vectors = rng.standard_normal((args.entries, embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return Guard(Blocklist(vectors, spec=embedder.spec, threshold=0.99), embedder)

    pipe = tiny_stable_diffusion_pipeline()
    guarded = GuardedPipeline(pipe, guard_for("ViT-S-32"))
    call = dict(prompt="a photograph of an astronaut riding a horse", num_images_per_prompt=args.images,
                num_inference_steps=args.steps)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in range(args.images)]  # noqa: E731
    def hooked(early_check: tuple) -> None:
        with SamplingMonitor(pipe, guarded.guard, early_check=early_check):
            pipe(**call, generator=seeds())

    bare, hooks, early, wrapped = interleaved_median_seconds(
        [lambda: pipe(**call, generator=seeds()), lambda: hooked(()), lambda: hooked(DEFAULT_EARLY_CHECK),
         lambda: guarded(**call, generator=seeds())],
        args.repeats,
    )
    assert not any(guarded(**call, generator=seeds()).guardrail.matched), "the benchmark assumes no match"

    production = guard_for(args.production_model)
    images = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(args.images)]
    per_image = median_seconds(lambda: production.check(images), args.repeats) / args.images

    print(f"\n{args.threads} threads, {args.images} images per call, blocklist of {args.entries:,} entries, "
          f"median of {args.repeats}\n")
    print("| measured on this CPU | s / call | ratio |")
    print("|---|---:|---:|")
    print(f"| tiny SD pipeline, {args.steps} steps, bare | {bare:.3f} | 1.00 |")
    print(f"| same + sampling hooks (memorization score, step counter) | {hooks:.3f} | {hooks / bare:.3f} |")
    print(f"| same + early x̂0 check at {DEFAULT_EARLY_CHECK} of the schedule | {early:.3f} | {early / bare:.3f} |")
    print(f"| same, `GuardedPipeline` (ViT-S-32 guard), nothing matches | {wrapped:.3f} | {wrapped / bare:.2f} |")
    print(f"\n`Guard.check` with {args.production_model} on this CPU: {per_image * 1e3:.0f} ms per 512x512 image.")
    print(f"Projection: SD 1.5 at 50 steps takes {SD15_A10_SECONDS_PER_IMAGE} s per image on an A10 (fp16, cited); "
          f"a CPU-side guard adds {per_image / SD15_A10_SECONDS_PER_IMAGE:.1%} to that when run serially, nothing "
          "when it overlaps the next generation.")
    result = {"bare_s": bare, "hooks_s": hooks, "early_check_s": early, "guarded_s": wrapped, "ratio": wrapped / bare,
              "production_check_s_per_image": per_image}
    if args.flops:
        guard_flops, sd_flops, preview_flops = count_flops(production, args.production_model)
        print(f"On one device, by FLOPs counted here: one {args.production_model} image forward is "
              f"{guard_flops / 1e9:.0f} GFLOPs; one SD 1.5 image (50 UNet steps with classifier-free guidance + VAE "
              f"decode) is {sd_flops / 1e12:.1f} TFLOPs: the guard is {guard_flops / sd_flops:.2%} of generation.")
        checks = len(DEFAULT_EARLY_CHECK)
        early_flops = checks * (guard_flops + preview_flops)
        print(f"The early check decodes x̂0 at 256 px and embeds it {checks} times: {early_flops / 1e12:.2f} TFLOPs, "
              f"{early_flops / sd_flops:.1%} of an SD 1.5 generation that runs to the end; a copy stopped at 20% of "
              f"the schedule costs {(0.2 * sd_flops + early_flops / checks) / sd_flops:.0%} of one.")
        result.update(guard_gflops=guard_flops / 1e9, sd15_tflops=sd_flops / 1e12,
                      early_check_share_of_sd15=early_flops / sd_flops)
    return result


def count_flops(guard, model: str) -> tuple[float, float, float]:
    """FLOPs of one guard image forward, of one SD 1.5 image, and of the early check's preview decode (latents
    pooled to 32x32, as `guardrail.sampling.decode_x0` does for a 224-px embedder), with torch's FlopCounterMode.

    The SD 1.5 UNet and VAE are built from their published configs with random weights (FLOPs do not depend on
    weight values).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    def flops(function) -> float:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            function()
        return float(counter.get_total_flops())

    pixels = torch.zeros(1, 3, *guard.embedder.spec["image_size"])
    guard_flops = flops(lambda: guard.embedder._model.encode_image(pixels))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    ).eval()
    step = flops(lambda: unet(torch.zeros(2, 4, 64, 64), 500, encoder_hidden_states=torch.zeros(2, 77, 768)))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    ).eval()
    decode = flops(lambda: vae.decode(torch.zeros(1, 4, 64, 64)))
    preview = flops(lambda: vae.decode(torch.zeros(1, 4, 32, 32)))  # the early check pools 64x64 latents to 32x32
    return guard_flops, 50 * step + decode, preview


if __name__ == "__main__":
    main()
