"""`mine` on planted data: group recall, precision and size error, and wall time by engine and size.

For each size it writes an embedding folder of N float16 vectors (dim 768, a clustered background, and `--groups`
planted groups of 5-500 members, log-uniform, at pairwise cosine 0.95-0.99; `guardrail.planted`) under `--work`,
then runs `mine --min-duplicates 5` on it in a child process per engine, so each run's peak RSS is its own. The
scaling exponent is log(t2 / t1) / log(N2 / N1) between the smallest and largest size of an engine.

    python benchmarks/mine_planted.py --sizes 1000000 4000000 --engines local ray
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 768


def child(folder: str, engine: str, similarity: float, cpus: int) -> dict:
    """One mining run, stage by stage (the stages `mine_duplicates` runs), scored against the planted truth."""
    from guardrail import mine
    from guardrail.planted import PlantedTruth, score_mined

    spec = {"family": "open_clip", "model": "planted", "pretrained": "planted", "dim": DIM}
    times = {}
    start = time.perf_counter()
    if engine == "ray":
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        times["cluster_start"] = time.perf_counter() - start
        start = time.perf_counter()
    plan = mine.plan_mine([folder], spec)
    centroids = mine.train_quantizer(plan)
    times["plan_and_train"] = time.perf_counter() - start
    pairs = (mine._pairs_on_ray(plan, centroids, similarity, None) if engine == "ray"
             else mine._pairs_locally(plan, centroids, similarity, str(Path(folder).parent)))
    times["assign_shuffle_pairs"] = time.perf_counter() - start - times["plan_and_train"]
    mined = mine.candidates_blocklist(plan, mine.groups_from_pairs(pairs), 5)
    times["total"] = time.perf_counter() - start
    rows = np.load(Path(folder).parent / "truth_rows.npy")
    bounds = np.load(Path(folder).parent / "truth_bounds.npy")
    truth = PlantedTruth([rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])], [], plan.total)
    score = score_mined(list(mined.entries), truth, 5)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux reports kB)
    return {"engine": engine, "vectors": plan.total, "lists": plan.lists, "pairs": int(len(pairs)),
            **{f"{k}_s": round(v, 1) for k, v in times.items()}, "peak_rss_gib": round(peak, 2), **score}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--engines", nargs="+", default=["local", "ray"])
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--similarity", type=float, default=0.93)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--work", default="/tmp/guardrail-mine-bench")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.similarity, args.cpus)))
        return []

    from guardrail.planted import write_planted_folder

    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(math.log(5), math.log(501), args.groups)).astype(int).tolist()
    results = []
    for total in args.sizes:
        work = Path(args.work) / str(total)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        start = time.perf_counter()
        truth = write_planted_folder(work / "emb", total, DIM, sizes, clusters=max(100, total // 1000), seed=1)
        np.save(work / "truth_rows.npy", np.concatenate(truth.groups))
        np.save(work / "truth_bounds.npy", np.concatenate([[0], np.cumsum([len(g) for g in truth.groups])]))
        print(f"wrote {total:,} vectors ({sum(sizes):,} planted in {len(sizes)} groups) in "
              f"{time.perf_counter() - start:.0f}s", flush=True)
        for engine in args.engines:
            output = subprocess.run(
                [sys.executable, __file__, "--child", str(work / "emb"), engine, "--similarity", str(args.similarity),
                 "--cpus", str(args.cpus)], capture_output=True, text=True, check=False)
            if output.returncode:
                print(f"{engine} at {total:,} failed:\n{output.stderr[-3000:]}", flush=True)
                continue
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    print("\n| engine | vectors | wall s | recall | precision | max size error | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['vectors']:,} | {r['total_s']} | {r['recall']:.3f} | {r['precision']:.3f} | "
              f"{r['max_size_error']} | {r['peak_rss_gib']} |")
    for engine in args.engines:
        runs = sorted((r["vectors"], r["total_s"]) for r in results if r["engine"] == engine)
        if len(runs) >= 2:
            (n1, t1), (n2, t2) = runs[0], runs[-1]
            print(f"{engine}: wall time grows as N^{math.log(t2 / t1) / math.log(n2 / n1):.2f} from {n1:,} to {n2:,}")
    return results


if __name__ == "__main__":
    main()
