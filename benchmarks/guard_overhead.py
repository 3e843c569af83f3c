"""What `Guard.check` costs per image beyond the bare open_clip forward pass, at several blocklist sizes.

Baselines in the same run: `model.encode_image` on a preprocessed batch (the forward pass alone), and open_clip's
own preprocess + encode_image (what any caller of the model pays). Seeded random weights: the cost of a forward
pass does not depend on the weight values. Blocklists are synthetic unit vectors.

    python benchmarks/guard_overhead.py --model ViT-S-32 --batch 8 --threads 2 --sizes 1000 100000 1000000
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from timing import median_seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=512, help="generated image side (SD 1.5: 512)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import faiss
    import torch

    from guardrail import Blocklist, Guard, OpenCLIPEmbedder
    from guardrail.offline import write_seeded_open_clip_weights

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    weights = write_seeded_open_clip_weights(tempfile.mkdtemp() + "/weights.safetensors", model=args.model)
    embedder = OpenCLIPEmbedder(args.model, pretrained=weights, batch_size=args.batch)
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8))
              for _ in range(args.batch)]
    pixels = embedder.preprocess(images)
    model = embedder._model

    def bare_forward():
        with torch.inference_mode():
            model.encode_image(pixels)

    def preprocess_and_forward():
        with torch.inference_mode():
            model.encode_image(embedder.preprocess(images))

    rows = [("encode_image (bare forward)", median_seconds(bare_forward, args.repeats)),
            ("open_clip preprocess + encode_image", median_seconds(preprocess_and_forward, args.repeats))]
    for size in args.sizes:
        vectors = rng.standard_normal((size, embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        guard = Guard(Blocklist(vectors, spec=embedder.spec), embedder)
        rows.append((f"Guard.check, {size:,} entries", median_seconds(lambda: guard.check(images), args.repeats)))
        queries = embedder.embed(images)
        rows.append((f"  of which search, {size:,} entries", median_seconds(lambda: guard.check_embeddings(queries), args.repeats)))

    # diffusers output_type="pt": NCHW float tensors. Through PIL (the CPU default) vs resized on tensors.
    tensors = torch.stack([torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in images]).float() / 255
    guard = Guard(Blocklist(np.zeros((0, embedder.dim), np.float32), [], spec=embedder.spec), embedder)
    rows.append(("Guard.check, NCHW tensor via PIL", median_seconds(lambda: guard.check(tensors), args.repeats)))
    embedder.tensor_preprocess = True
    rows.append(("Guard.check, NCHW tensor, tensor resize", median_seconds(lambda: guard.check(tensors), args.repeats)))
    embedder.tensor_preprocess = "auto"

    bare = rows[0][1]
    print(f"\n{args.model}, batch {args.batch}, {args.image_size}x{args.image_size} PIL inputs, "
          f"{args.threads} threads, median of {args.repeats}\n")
    print(f"| {'step':<40} | ms / batch | ms / image | x bare forward |")
    print(f"|{'-' * 42}|-----------:|-----------:|---------------:|")
    results = []
    for name, seconds in rows:
        print(f"| {name:<40} | {seconds * 1e3:10.1f} | {seconds * 1e3 / args.batch:10.2f} | {seconds / bare:14.2f} |")
        results.append({"step": name, "seconds_per_batch": seconds})
    return results


if __name__ == "__main__":
    main()
