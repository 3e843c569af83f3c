"""`build --engine ray` against `--engine local` on the same images, in one run: same vectors, and throughput.

Writes N JPEG files (as build_throughput.py does), builds them with the local engine, then starts a local Ray
cluster with `--cpus` CPUs and builds them again with `--engine ray` (actors: one per CPU by default). Ray's
cluster start is timed apart: a real job runs on a cluster that is already up. The Ray build time includes its
actors' start (each imports torch and loads the model).

    python benchmarks/build_engines.py --images 2000 --cpus 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from build_throughput import add_image_arguments, prepared_images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(parser, images=2000)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster, and torch threads")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (local build, and each actor)")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--actors", type=int, default=None)
    args = parser.parse_args(argv)

    import ray

    from guardrail.build import build_blocklist
    from guardrail.engine_ray import build_blocklist_on_ray

    work, weights, embedder = prepared_images(args, args.cpus)

    start = time.perf_counter()
    local = build_blocklist([str(work / "images")], embedder, workers=args.workers)
    local_seconds = time.perf_counter() - start

    # Ray starts its workers at nice 15 (RAY_worker_niceness); the local build runs at 0, so the Ray build does too.
    os.environ.setdefault("RAY_worker_niceness", "0")
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cluster_seconds = time.perf_counter() - start
    start = time.perf_counter()
    distributed = build_blocklist_on_ray([str(work / "images")], embedder, pretrained=str(weights),
                                         shards=str(work / "shards"), shard_size=args.shard_size,
                                         workers=args.workers, actors=args.actors)
    ray_seconds = time.perf_counter() - start
    ray.shutdown()

    result = {
        "images": args.images, "cpus": args.cpus,
        "local_s": round(local_seconds, 1), "ray_s": round(ray_seconds, 1), "ray_cluster_start_s": round(cluster_seconds, 1),
        "local_img_s": round(args.images / local_seconds, 1), "ray_img_s": round(args.images / ray_seconds, 1),
        "throughput_ratio": round(local_seconds / ray_seconds, 2),
        "max_abs_vector_difference": float(np.abs(local.embeddings - distributed.embeddings).max()),
        "same_records": list(local.entries) == list(distributed.entries),
    }
    print("| engine | wall s | images/s | vs local |")
    print("|---|---|---|---|")
    print(f"| local | {result['local_s']} | {result['local_img_s']} | 1.00x |")
    print(f"| ray ({args.cpus} CPUs, cluster already up) | {result['ray_s']} | {result['ray_img_s']} | "
          f"{result['throughput_ratio']}x |")
    print(f"ray cluster start {result['ray_cluster_start_s']} s (not counted); max |local - ray| vector difference "
          f"{result['max_abs_vector_difference']:.1e}; same records: {result['same_records']}")
    return result


if __name__ == "__main__":
    main()
