"""Blocklist search at scale: recall on real-shaped data, latency and resident memory, against exact flat search.

Recall (default mode). Three data shapes, each against exact flat search over the same float32 vectors in the
same run:
  uniform     unit vectors spread evenly over the sphere (the easiest case for IVF);
  clustered   a mixture of anisotropic clusters (a few strong directions each), like real CLIP embeddings;
  duplicates  clustered, plus planted near-duplicate groups of 2-200 members (cosine 0.93-0.99 to their anchor),
              about a tenth of the entries, as training sets repeat images.
Queries sit just above and just below the threshold (threshold +/- 0.005) to random entries (half of them in
duplicate groups, where there are some), plus unrelated vectors. "recall" is the fraction of queries that exact
search matches (best cosine >= threshold) that the index also matches; "top-1" the fraction where the index returns
the exact best score; "false" the queries the index matches and exact search does not (float16 rounding only).

    python benchmarks/search_scaling.py                                  # 100k and 1M at dim 768, all shapes
    python benchmarks/search_scaling.py --sizes 100000 --nprobe 16 32    # recall against nprobe

Memory (--memory N). Builds an N x dim blocklist of the duplicates shape with an IVF-PQ index stored in the file,
then measures, each in a fresh process: resident memory per entry after load (VmRSS growth over the count), time
until the index is ready, and per-query latency, for
  mapped    this guardrail: vectors re-scored through the file's memory map, records parsed when read;
  in-RAM    float32 vectors and parsed records in RAM (what Blocklist.load did before memory-mapping);
  flat      the raw baseline: exact IndexFlatIP search over float32 vectors in RAM.
`--old-code DIR` runs the in-RAM row with the guardrail package found in DIR (e.g. `git archive` of an older
commit), to check it reproduces the old loader.

    python benchmarks/search_scaling.py --memory 200000 --dims 768
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = ("uniform", "clustered", "duplicates")


# ---- data ----------------------------------------------------------------------------------------------------------


def normalized(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def uniform(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 1 << 18):
        out[start : start + (1 << 18)] = normalized(rng.standard_normal((min(1 << 18, count - start), dim), np.float32))
    return out


def clustered(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """Anisotropic clusters: a centre, 8 strong directions with decaying scale, and weak isotropic noise."""
    clusters = max(8, count // 2000)
    centres = uniform(rng, clusters, dim)
    bases = rng.standard_normal((clusters, 8, dim), np.float32) * (0.6 / np.sqrt(dim))
    bases *= np.geomspace(1.0, 0.2, 8, dtype=np.float32)[None, :, None] * np.sqrt(dim) / 4
    sizes = rng.dirichlet(np.full(clusters, 0.7)) * count  # uneven cluster sizes, as real data has
    label = np.minimum(np.searchsorted(np.cumsum(sizes), rng.uniform(0, count, count)), clusters - 1)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 1 << 16):
        part = label[start : start + (1 << 16)]
        z = rng.standard_normal((len(part), 8), np.float32)
        rows = centres[part] + np.einsum("nk,nkd->nd", z, bases[part])
        rows += rng.standard_normal(rows.shape, np.float32) * (0.35 / np.sqrt(dim))
        out[start : start + len(part)] = normalized(rows)
    return out


def at_cosine(rng: np.random.Generator, targets: np.ndarray, cosine: np.ndarray | float) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each target, in a random direction."""
    noise = rng.standard_normal(targets.shape, np.float32)
    noise -= (noise * targets).sum(1, keepdims=True) * targets
    noise = normalized(noise)
    cosine = np.broadcast_to(np.asarray(cosine, np.float32), (len(targets),))[:, None]
    return normalized(cosine * targets + np.sqrt(1 - cosine**2) * noise)


def dataset(shape: str, count: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, rows that belong to planted duplicate groups)."""
    rng = np.random.default_rng(seed)
    if shape == "uniform":
        return uniform(rng, count, dim), np.zeros(0, np.int64)
    base = clustered(rng, count, dim)
    if shape == "clustered":
        return base, np.zeros(0, np.int64)
    planted, position = [], 0
    budget = count // 10
    while position < budget:  # group sizes log-uniform in 2..200
        size = int(min(budget - position + 1, np.exp(rng.uniform(np.log(2), np.log(200)))))
        size = max(size, 2)
        anchor = rng.integers(0, count)
        rows = np.arange(position, position + size - 1) % count
        base[rows] = at_cosine(rng, np.repeat(base[anchor][None], len(rows), 0), rng.uniform(0.93, 0.99, len(rows)))
        planted.append(np.append(rows, anchor))
        position += size - 1
    return base, np.unique(np.concatenate(planted))


def threshold_queries(rng, base: np.ndarray, planted: np.ndarray, count: int, threshold: float) -> np.ndarray:
    """`count` queries 0.005 above and `count` 0.005 below the threshold to random entries, + `count` unrelated."""
    pool = planted if len(planted) else np.arange(len(base))
    targets = np.concatenate([rng.choice(pool, count // 2), rng.integers(0, len(base), count - count // 2)])
    above = at_cosine(rng, base[targets], threshold + 0.005)
    below = at_cosine(rng, base[targets], threshold - 0.005)
    return np.concatenate([above, below, uniform(rng, count, base.shape[1])])


# ---- recall ----------------------------------------------------------------------------------------------------


def median_ms(function, repeats: int) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from timing import median_seconds

    return median_seconds(function, repeats) * 1e3


def recall_rows(args) -> list[dict]:
    import faiss

    from guardrail.index import BlocklistIndex, choose_kind

    rows = []
    print("| shape | dim | entries | index | nprobe | matches | recall | top-1 | false | ms / 8 queries | "
          "flat ms / 8 | speed-up |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        for size in args.sizes:
            for shape in args.shapes:
                base, planted = dataset(shape, size, dim, seed=size + dim)
                queries = threshold_queries(np.random.default_rng(1), base, planted, args.queries, args.threshold)
                flat = faiss.IndexFlatIP(dim)
                flat.add(base)
                exact, _ = flat.search(queries, 1)
                flat_ms = median_ms(lambda: flat.search(queries[:8], 1), args.repeats)
                kind = choose_kind(size, dim) if args.kind == "auto" else args.kind
                trained = BlocklistIndex(base, kind=kind)
                for nprobe in args.nprobe or ["auto"]:
                    trained.set_search_params(nprobe=nprobe)
                    found, _ = trained.search(queries, k=1)
                    should, did = exact[:, 0] >= args.threshold, found[:, 0] >= args.threshold
                    recall = float(did[should].mean()) if should.any() else float("nan")
                    top1 = float((np.abs(found[should, 0] - exact[should, 0]) < 1e-5).mean()) if should.any() else 0
                    false = int((did & ~should).sum())
                    ms = median_ms(lambda: trained.search(queries[:8], k=1), args.repeats)
                    row = {"shape": shape, "dim": dim, "entries": size, "kind": trained.kind,
                           "nprobe": trained.nprobe, "matches": int(should.sum()), "recall": recall, "top1": top1,
                           "false": false, "ms_per_8": ms, "flat_ms_per_8": flat_ms}
                    rows.append(row)
                    print(f"| {shape} | {dim} | {size:,} | {trained.kind} | {trained.nprobe} | {row['matches']} | "
                          f"{recall:.3f} | {top1:.3f} | {false} | {ms:.2f} | {flat_ms:.1f} | {flat_ms / ms:.0f}x |",
                          flush=True)
    return rows


# ---- memory ------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_child(mode: str, path: str, queries_path: str, threads: int) -> dict:
    """Runs in a fresh process: load `path` the `mode` way, then time queries. Prints one JSON line."""
    import faiss

    import guardrail  # noqa: F401 - imported before the baseline, as a server would have
    from guardrail import Blocklist, BlocklistIndex

    faiss.omp_set_num_threads(threads)
    queries = np.load(queries_path)
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    if mode == "flat":
        loaded = Blocklist.load(path)
        index = faiss.IndexFlatIP(loaded.dim)
        for start in range(0, len(loaded), 1 << 16):
            index.add(np.ascontiguousarray(loaded.embeddings[start : start + (1 << 16)], np.float32))
        entries = list(loaded.entries)  # noqa: F841 - parsed records held, as an exact-search service would
        loaded = None
        search = lambda q: index.search(q, 1)  # noqa: E731
    elif mode == "in-RAM":
        loaded = Blocklist.load(path)
        if getattr(loaded, "path", None) is not None:  # this guardrail: copy out of the maps, as the old loader did
            loaded = Blocklist(np.array(loaded.embeddings, np.float32), list(loaded.entries), spec=loaded.spec,
                               threshold=loaded.threshold, faiss_index=np.array(loaded.faiss_index),
                               index_kind=loaded.index_kind)
            index = BlocklistIndex.from_blocklist(loaded, rescore="memory")
        else:
            index = BlocklistIndex.from_blocklist(loaded)
        search = lambda q: index.search(q, 1)  # noqa: E731
    else:
        loaded = Blocklist.load(path, verify=mode != "mapped, verify=False")
        index = BlocklistIndex.from_blocklist(loaded)
        search = lambda q: index.search(q, 1)  # noqa: E731
    ready = time.perf_counter() - started
    after_load = _status_kib("VmRSS")
    anon_before = _status_kib("RssAnon")

    def timed_pass() -> list[float]:
        latencies = []
        for row in range(len(queries)):
            start = time.perf_counter()
            search(queries[row : row + 1])
            latencies.append(time.perf_counter() - start)
        return latencies

    first, warm = timed_pass(), timed_pass()  # first touch of each candidate's page, then every page mapped
    result = {
        "mode": mode, "ready_s": ready, "rss_growth_kib": after_load - before,
        "rss_after_queries_kib": _status_kib("VmRSS") - before,
        "anon_growth_during_queries_kib": _status_kib("RssAnon") - anon_before,
        "first_p50_ms": float(np.percentile(first, 50) * 1e3),
        "p50_ms": float(np.percentile(warm, 50) * 1e3), "p99_ms": float(np.percentile(warm, 99) * 1e3),
    }
    if mode.startswith("mapped"):  # cold: the file's pages dropped from the page cache before each query
        descriptor = os.open(path, os.O_RDONLY)
        cold = []
        for row in range(min(50, len(queries))):
            loaded.release_pages()
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            search(queries[row : row + 1])
            cold.append(time.perf_counter() - start)
        os.close(descriptor)
        result["cold_p50_ms"] = float(np.percentile(cold, 50) * 1e3)
    print(json.dumps(result))
    return result


def memory_rows(args) -> list[dict]:
    from guardrail import Blocklist
    from guardrail.index import store_trained_index

    size, dim = args.memory, args.dims[0]
    folder = Path(tempfile.mkdtemp(prefix="guardrail-bench-"))
    started = time.perf_counter()
    base, planted = dataset("duplicates", size, dim, seed=7)
    records = [{"id": f"laion/{i:09d}", "caption": f"a photo of thing number {i} on a plain background",
                "source": f"s3://bucket/shard-{i // 10000:05d}.tar/{i:09d}.jpg", "sha256": f"{i:064x}"}
               for i in range(size)]
    blocklist = store_trained_index(Blocklist(base, records, spec={"dim": dim}, threshold=args.threshold), "ivf-pq")
    path = blocklist.save(folder / "blocklist.safetensors", dtype=args.dtype)
    queries = threshold_queries(np.random.default_rng(2), base, planted, args.queries, args.threshold)
    np.save(folder / "queries.npy", queries)
    built = time.perf_counter() - started
    del base, blocklist, records
    print(f"{size:,} x {dim} ({args.dtype} on disk, {path.stat().st_size / 2**20:,.0f} MiB file, IVF-PQ stored; "
          f"built in {built:.0f} s); {len(queries)} single queries, {args.threads} threads\n")
    modes = ["mapped", "mapped, verify=False", "in-RAM", "flat"]
    results = []
    for mode in modes:
        env = dict(os.environ)
        if mode == "in-RAM" and args.old_code:
            env["PYTHONPATH"] = os.pathsep.join([args.old_code, env.get("PYTHONPATH", "")])
        command = [sys.executable, __file__, "--child", mode, str(path), str(folder / "queries.npy"),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    flat = results[-1]
    print("| load | ready s | RSS / entry after load | RSS vs flat | after 2x queries (of which anon) | "
          "first-touch p50 ms | warm p50 ms | warm p99 ms | cold p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        per_entry = result["rss_growth_kib"] * 1024 / size
        after = result["rss_after_queries_kib"] * 1024 / size
        anon = result["anon_growth_during_queries_kib"] * 1024 / size
        cold = f"{result['cold_p50_ms']:.2f}" if "cold_p50_ms" in result else ""
        print(f"| {result['mode']} | {result['ready_s']:.2f} | {per_entry:,.0f} B | "
              f"{result['rss_growth_kib'] / max(1, flat['rss_growth_kib']):.2f}x | {after:,.0f} B (+{anon:,.0f} B) | "
              f"{result['first_p50_ms']:.2f} | {result['p50_ms']:.2f} | {result['p99_ms']:.2f} | {cold} |")
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[768])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--kind", default="auto", help="index kind under test (default: the automatic choice)")
    parser.add_argument("--nprobe", type=lambda text: text if text == "auto" else int(text), nargs="+",
                        help="nprobe values to measure (default: auto)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--queries", type=int, default=200, help="queries above, as many below, as many unrelated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--memory", type=int, metavar="N", help="measure resident memory at N entries instead")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="for --memory")
    parser.add_argument("--old-code", metavar="DIR", help="for --memory: the in-RAM row imports guardrail from DIR")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return [measure_child(*args.child, threads=args.threads)]

    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {args.threads} threads, threshold {args.threshold}\n")
    return memory_rows(args) if args.memory else recall_rows(args)


if __name__ == "__main__":
    main()
