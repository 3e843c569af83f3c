"""Quickstart 1: the drop-in GuardedPipeline.

Offline by default: a tiny seeded StableDiffusionPipeline and a seeded open_clip ViT-S-32 saved to a local weights
file. One image the pipeline really generates plays the "memorized training image"; the guarded call resamples it.

    python examples/quickstart_pipeline.py
    python examples/quickstart_pipeline.py --sd stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --model ViT-L-14-quickgelu --pretrained openai --blocklist blocklists/sd-v1-memorized.safetensors
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from guardrail import Blocklist, Guard, GuardedPipeline, OpenCLIPEmbedder
from guardrail.offline import tiny_stable_diffusion_pipeline, write_seeded_open_clip_weights


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", help="diffusers pipeline id or folder (default: a tiny offline pipeline)")
    parser.add_argument("--model", default="ViT-S-32", help="open_clip model name")
    parser.add_argument("--pretrained", help="open_clip pretrained tag or weights file (default: seeded weights)")
    parser.add_argument("--blocklist", help="blocklist file (default: one image this script generates)")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    args = parser.parse_args(argv)

    if args.sd:
        from diffusers import StableDiffusionPipeline

        pipe, steps = StableDiffusionPipeline.from_pretrained(args.sd), 50
    else:
        pipe, steps = tiny_stable_diffusion_pipeline(), 2
    pretrained = args.pretrained or write_seeded_open_clip_weights(tempfile.mkdtemp() + "/vit-s-32.safetensors")
    embedder = OpenCLIPEmbedder(args.model, pretrained=pretrained)
    seeds = lambda: [torch.Generator().manual_seed(seed) for seed in range(4)]  # noqa: E731

    if args.blocklist:
        blocklist = Blocklist.load(args.blocklist)
    else:  # pretend the image of seed 2 is a memorized training image
        image = pipe(args.prompt, num_inference_steps=steps, generator=seeds()[2:3]).images[0]
        blocklist = Blocklist.from_images([image], embedder, entries=[{"id": "memorized-0"}], threshold=0.995)

    guarded = GuardedPipeline(pipe, Guard(blocklist, embedder))  # action="resample" by default
    out = guarded(args.prompt, num_images_per_prompt=4, num_inference_steps=steps, generator=seeds())
    report = out.guardrail
    for slot, (verdict, attempts) in enumerate(zip(report.verdicts, report.attempts)):
        print(f"image {slot}: attempts={attempts} blocked={report.blocked[slot]} score={verdict.score:.4f}")
    return report.to_dict()


if __name__ == "__main__":
    main()
