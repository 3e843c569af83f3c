"""Blocklist search from 1k to 10M entries: the automatic index choice against exact flat search, same run.

Synthetic unit vectors; queries are planted near-duplicates of random entries (cosine about 0.95) plus unrelated
vectors. "Recall" is the fraction of threshold matches that exact search finds which the index also returns (its
scores are re-scored exactly, so a found match always has its true score).

    python benchmarks/search_scaling.py                          # 1k, 10k, 100k, 1M at dim 512 and 768
    python benchmarks/search_scaling.py --sizes 10000000 --dims 512 --kind ivf-pq   # on request: ~25 GB RAM
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def unit_rows(rng: np.random.Generator, count: int, dim: int, chunk: int = 1_000_000) -> np.ndarray:
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, chunk):
        block = rng.standard_normal((min(chunk, count - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def planted_queries(rng, base: np.ndarray, count: int, cosine: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    targets = rng.choice(len(base), count, replace=False)
    noise = unit_rows(rng, count, base.shape[1])
    noise -= (noise * base[targets]).sum(1, keepdims=True) * base[targets]  # orthogonal to the target
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    queries = cosine * base[targets] + np.sqrt(1 - cosine**2) * noise
    return queries.astype(np.float32), targets


def latency(index, queries: np.ndarray, batch: int, repeats: int) -> float:
    """Median seconds per search call of `batch` queries."""
    index.search(queries[:batch], k=1)
    samples = []
    for r in range(repeats):
        chunk = queries[(r * batch) % (len(queries) - batch + 1) :][:batch]
        start = time.perf_counter()
        index.search(chunk, k=1)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--kind", default="auto", help="index kind under test (default: the automatic choice)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import faiss

    from guardrail.index import BlocklistIndex, choose_kind

    faiss.omp_set_num_threads(args.threads)
    rows = []
    print(f"faiss {faiss.__version__}, {args.threads} threads, threshold {args.threshold}, {args.queries} planted "
          "near-duplicate queries (cosine 0.95) + as many unrelated ones\n")
    print("| dim | entries | index | build s | ms / query (batch 1) | ms / 8 queries | bytes / entry | recall | flat ms / 8 | speed-up |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        for size in args.sizes:
            rng = np.random.default_rng(size + dim)
            base = unit_rows(rng, size, dim)
            planted, _ = planted_queries(rng, base, min(args.queries, size))
            queries = np.concatenate([planted, unit_rows(rng, len(planted), dim)])

            start = time.perf_counter()
            flat = BlocklistIndex(base, kind="flat")
            flat_build = time.perf_counter() - start
            exact_scores, exact_ids = flat.search(queries, k=1)
            kind = choose_kind(size, dim) if args.kind == "auto" else args.kind
            start = time.perf_counter()
            index = flat if kind == "flat" else BlocklistIndex(base, kind=kind)
            build = flat_build if index is flat else time.perf_counter() - start
            scores, ids = index.search(queries, k=1)
            should = exact_scores[:, 0] >= args.threshold
            found = (ids[:, 0] == exact_ids[:, 0]) & (scores[:, 0] >= args.threshold)
            recall = found[should].mean() if should.any() else float("nan")
            flat8 = latency(flat, queries, 8, args.repeats)
            one, eight = latency(index, queries, 1, args.repeats), latency(index, queries, 8, args.repeats)
            per_entry = (index.memory_bytes + (0 if index.exact else base.nbytes)) / size
            print(f"| {dim} | {size:,} | {index.kind} | {build:.2f} | {one * 1e3:.2f} | {eight * 1e3:.2f} | "
                  f"{per_entry:,.0f} | {recall:.3f} | {flat8 * 1e3:.2f} | {flat8 / eight:.1f}x |")
            rows.append({"dim": dim, "entries": size, "kind": index.kind, "build_s": build, "ms_per_query": one * 1e3,
                         "ms_per_8": eight * 1e3, "bytes_per_entry": per_entry, "recall": recall,
                         "flat_ms_per_8": flat8 * 1e3})
            del base, flat, index
    print("\nbytes / entry counts the faiss index plus, for approximate indexes, the float32 vectors kept for exact "
          "re-scoring.")
    return rows


if __name__ == "__main__":
    main()
