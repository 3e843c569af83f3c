"""`guardrail build` throughput against the raw `encode_image` throughput of the same model on the same batches.

Writes N JPEG files (real photos from scikit-image, cropped and tinted), then in one run measures:
- raw: `model.encode_image` on the already-preprocessed batches (decoding and preprocessing excluded);
- build: `build_blocklist` on the folder: read, hash, decode, preprocess (worker threads) and encode.
With `--peak-memory` it also runs the CLI build in a child process and reports its peak RSS.

    python benchmarks/build_throughput.py --images 512 --batch 32 --threads 2 --workers 2
    python benchmarks/build_throughput.py --images 10000 --peak-memory
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_images(folder: Path, count: int, size: int) -> None:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(count):
        source = photos[i % 4]
        top, left = rng.integers(0, 120, 2)
        crop = source[top : top + 256, left : left + 256].astype(np.float32) * rng.uniform(0.6, 1.0, 3)
        Image.fromarray(crop.astype(np.uint8)).resize((size, size)).save(folder / f"{i:06d}.jpg", quality=90)


def add_image_arguments(parser: argparse.ArgumentParser, images: int) -> None:
    """The options of `prepared_images` (shared with build_engines.py)."""
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)


def prepared_images(args: argparse.Namespace, threads: int):
    """(work folder, weights file, embedder): `args.images` JPEGs in work/images and a seeded model to embed them."""
    import torch

    from guardrail import OpenCLIPEmbedder
    from guardrail.offline import write_seeded_open_clip_weights

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="guardrail-bench-"))
    (work / "images").mkdir()
    write_images(work / "images", args.images, args.image_size)
    weights = write_seeded_open_clip_weights(work / "weights.safetensors", model=args.model)
    return work, weights, OpenCLIPEmbedder(args.model, pretrained=weights, batch_size=args.batch)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(parser, images=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workers", type=int, default=2, help="decode threads of the build")
    parser.add_argument("--peak-memory", action="store_true", help="also measure the CLI build's peak RSS")
    args = parser.parse_args(argv)

    from guardrail.build import build_blocklist

    work, weights, embedder = prepared_images(args, args.threads)

    # Raw: the same model on the same kind of batches, preprocessed beforehand (at most 512 images held in memory).
    files = sorted((work / "images").iterdir())[:512]
    batches = [embedder.preprocess(files[i : i + args.batch]) for i in range(0, len(files), args.batch)]
    embedder.encode(batches[0])  # warm-up
    start = time.perf_counter()
    for pixels in batches:
        embedder.encode(pixels)
    raw_rate = len(files) / (time.perf_counter() - start)
    del batches

    build_blocklist([str(work / "images")], embedder, batch_size=args.batch, workers=args.workers)  # warm-up
    start = time.perf_counter()
    blocklist = build_blocklist([str(work / "images")], embedder, batch_size=args.batch, workers=args.workers)
    build_seconds = time.perf_counter() - start
    assert len(blocklist) == args.images

    build_rate = args.images / build_seconds
    print(f"\n{args.model}, batch {args.batch}, {args.images} JPEGs of {args.image_size}px, "
          f"{args.threads} torch threads, {args.workers} decode workers\n")
    print("| path | images/s | ratio to raw |")
    print("|---|---:|---:|")
    print(f"| raw `encode_image` on preprocessed batches | {raw_rate:.1f} | 1.00 |")
    print(f"| `build_blocklist` (read, hash, decode, preprocess, encode) | {build_rate:.1f} | {build_rate / raw_rate:.2f} |")
    result = {"raw_images_per_second": raw_rate, "build_images_per_second": build_rate, "ratio": build_rate / raw_rate}

    if args.peak_memory:
        # The child reports its own peak RSS: RUSAGE_CHILDREN would also count the parent's pages at fork time.
        cli_args = ["build", str(work / "images"), "-o", str(work / "bl.safetensors"), "--model", args.model,
                    "--pretrained", str(weights), "--batch-size", str(args.batch), "--workers", str(args.workers),
                    "--no-progress"]
        child = ("import resource, sys; from guardrail.cli import main; code = main(sys.argv[1:]); "
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
        start = time.perf_counter()
        output = subprocess.run([sys.executable, "-c", child, *cli_args], check=True, capture_output=True, text=True)
        peak_mib = int(output.stdout.strip().splitlines()[-1]) / 1024
        print(f"\nCLI build of {args.images} images: {time.perf_counter() - start:.1f} s wall, peak RSS {peak_mib:.0f} MiB")
        result["peak_rss_mib"] = peak_mib
    return result


if __name__ == "__main__":
    main()
