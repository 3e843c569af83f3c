"""Quickstart 2: `Guard.check` in your own serving code.

Offline by default: seeded open_clip ViT-S-32 weights in a local file, and a blocklist of two synthetic "training
images". A slightly re-encoded copy of one of them is caught; an unrelated image is not.

    python examples/quickstart_guard.py
    python examples/quickstart_guard.py --model ViT-L-14-quickgelu --pretrained openai \
        --blocklist my-blocklist.safetensors generated1.png generated2.png
"""

from __future__ import annotations

import argparse
import io
import tempfile

import numpy as np
from PIL import Image

from guardrail import Blocklist, Guard, OpenCLIPEmbedder
from guardrail.offline import write_seeded_open_clip_weights


def synthetic_photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, 128)[None, :, None] * rng.random(3)
    blobs = rng.integers(0, 255, (8, 8, 3)).repeat(16, 0).repeat(16, 1)
    return Image.fromarray(((gradient + blobs) / 2).astype(np.uint8))


def jpeg_copy(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="image files to check (default: two built-in examples)")
    parser.add_argument("--model", default="ViT-S-32", help="open_clip model name")
    parser.add_argument("--pretrained", help="open_clip pretrained tag or weights file (default: seeded weights)")
    parser.add_argument("--blocklist", help="blocklist file (default: two synthetic training images)")
    args = parser.parse_args(argv)

    pretrained = args.pretrained or write_seeded_open_clip_weights(tempfile.mkdtemp() + "/vit-s-32.safetensors")
    embedder = OpenCLIPEmbedder(args.model, pretrained=pretrained)
    if args.blocklist:
        blocklist = Blocklist.load(args.blocklist)
    else:
        training = [synthetic_photo(0), synthetic_photo(1)]
        blocklist = Blocklist.from_images(training, embedder, entries=[{"id": "photo-0"}, {"id": "photo-1"}],
                                          threshold=0.98)
    guard = Guard(blocklist, embedder)  # build once at startup; check() is thread-safe

    images = args.images or [jpeg_copy(synthetic_photo(1)), synthetic_photo(7)]
    verdicts = guard.check(images)
    for verdict in verdicts:
        print(f"matched={verdict.matched} score={verdict.score:.4f} entry={verdict.entry_id}")
    return [verdict.to_dict() for verdict in verdicts]


if __name__ == "__main__":
    main()
