"""Nearest-neighbour search over blocklist vectors with faiss, from a studio catalogue to LAION-scale blocklists.

Vectors are unit-norm, so inner product is cosine similarity. The index kind is chosen from the entry count and a
memory budget: exact `IndexFlatIP` while exact search is cheap, then IVF with 8-bit scalar quantization, then
IVF-PQ when even one byte per dimension is too much (HNSW on request). Approximate indexes only propose
candidates: every candidate is re-scored exactly against the stored float32 vectors, so a returned score is always
the true cosine and a match can only be missed if it is not among `candidates` proposals (benchmarks measure this
recall against exact search).

A stored index (the `index` tensor of a blocklist file) is untrusted bytes: its checksum proves nothing, since anyone
can re-sign a file. faiss 1.15 turns most garbage into a RuntimeError, but a few hostile bytes can make its reader
allocate and zero gigabytes, point inverted lists at files on disk, or hold ids past the end of the blocklist. So it
is first read, checked and searched in a throwaway subprocess with a memory cap; only bytes that pass are read here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BlocklistError, GuardrailError, UsageError

if TYPE_CHECKING:
    from .blocklist import Blocklist

KINDS = ("flat", "hnsw", "ivf-sq8", "ivf-pq")
EXACT_LIMIT = 20_000
"""Up to this many entries exact search is cheap on CPU (about 6 ms per 8 queries at dim 512 on 2 cores); beyond it
IVF-SQ8 with exact re-scoring was 4-20x faster at 20k-100k entries with recall 1.0 (benchmarks/search_scaling.py)."""
DEFAULT_MAX_MEMORY = 4 << 30
"""Default budget for the index itself (bytes): IVF-SQ8 up to it, IVF-PQ beyond."""


def choose_kind(count: int, dim: int, max_memory: int | None = None) -> str:
    """The index kind for `count` vectors of `dim` under a memory budget for the index (bytes)."""
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if count <= EXACT_LIMIT and count * dim * 4 <= budget:
        return "flat"
    if count * dim <= budget:
        return "ivf-sq8"
    return "ivf-pq"


def _ivf_list_count(count: int) -> int:
    """IVF lists: about sqrt(count), a power of two (1,024 at 1M entries)."""
    return int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(max(count, 1)))))))


def _pq_subquantizer_count(dim: int) -> int:
    """Sub-quantizers for IVF-PQ: about dim/8 bytes a vector, a divisor of dim."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


class BlocklistIndex:
    """Cosine top-k search over a blocklist's embeddings.

    Args:
        embeddings (`np.ndarray`):
            `(N, dim)` unit-norm vectors. They are kept (as float32) to re-score approximate candidates exactly.
        kind (`str`, *optional*, defaults to `"auto"`):
            `"flat"` (exact), `"hnsw"`, `"ivf-sq8"`, `"ivf-pq"`, or `"auto"` (by size and `max_memory`).
        max_memory (`int`, *optional*):
            Byte budget for the faiss index under `"auto"` (defaults to 4 GiB).
        device (`str`, *optional*, defaults to `"cpu"`):
            `"cuda"` (or `"cuda:N"`) moves flat and IVF indexes to a faiss GPU index (needs faiss with GPU support).
        candidates (`int`, *optional*, defaults to 32):
            Proposals an approximate index makes per query before exact re-scoring.
        nprobe (`int`, *optional*): IVF lists visited per query (defaults to 32).
        ef_search (`int`, *optional*, defaults to 128): HNSW search depth.
        serialized (`np.ndarray`, *optional*):
            A uint8 `faiss.serialize_index` blob of this very index (e.g. stored in the blocklist file), to skip
            training. It is read in a sandbox first and checked against `embeddings` (see `_read_stored_index`);
            a blob that is unreadable, hostile or of other vectors is a `BlocklistError`.

    Safe for concurrent `search` calls: CPU faiss reads are thread-safe; GPU searches are serialized by a lock
    (faiss GPU indexes are not).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        kind: str = "auto",
        *,
        max_memory: int | None = None,
        device: str = "cpu",
        candidates: int = 32,
        nprobe: int = 32,
        ef_search: int = 128,
        serialized: np.ndarray | None = None,
    ) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise UsageError(f"embeddings must be (N, dim), got shape {embeddings.shape}")
        if kind != "auto" and kind not in KINDS:
            raise UsageError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
        if candidates < 1:
            raise UsageError(f"candidates must be >= 1, got {candidates}")
        self.dim = embeddings.shape[1]
        self.vectors = embeddings
        self.kind = choose_kind(len(embeddings), self.dim, max_memory) if kind == "auto" else kind
        self.candidates = candidates
        if serialized is not None:
            index = _read_stored_index(serialized, len(embeddings), self.dim)
            self.kind = _index_kind(index)
        else:
            index = _trained_faiss_index(embeddings, self.kind)
        _set_search_params(index, nprobe, ef_search)
        self.device = device
        self._cpu_index = index
        self._index, self._lock = _searchable_on(index, device)
        if serialized is not None:
            self._check_finds_own_vectors()

    @classmethod
    def from_blocklist(cls, blocklist: Blocklist, kind: str | None = None, **options) -> BlocklistIndex:
        """The index of a blocklist: the faiss index stored in its file when there is one and no `kind` is asked for,
        else one built now (`kind` defaults to `"auto"`)."""
        stored = getattr(blocklist, "faiss_index", None)
        if stored is not None and kind is None:
            return cls(blocklist.embeddings, serialized=stored, **options)
        return cls(blocklist.embeddings, kind=kind or "auto", **options)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    @property
    def memory_bytes(self) -> int:
        """Bytes of the faiss index itself (the float32 vectors kept for re-scoring come on top, unless flat)."""
        return len(self.serialize())

    def serialize(self) -> np.ndarray:
        """The faiss index as a uint8 array (`faiss.serialize_index`), to store beside the vectors."""
        import faiss

        return faiss.serialize_index(self._cpu_index)

    def search(self, vectors: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` cosine scores and row ids for each query vector.

        Returns:
            `(scores, ids)`, both `(n, k)`: float32 exact cosine scores, best first, and int64 row ids. Slots with no
            neighbour (an empty or small blocklist) have id -1 and score -inf.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise UsageError(f"query vectors must be (n, {self.dim}), got shape {vectors.shape}")
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        empty = (np.full((len(vectors), k), -np.inf, np.float32), np.full((len(vectors), k), -1, np.int64))
        if len(vectors) == 0 or len(self) == 0:
            return empty
        wanted = k if self.exact else max(k, self.candidates)
        if self._lock is None:
            scores, ids = self._index.search(vectors, wanted)
        else:
            with self._lock:
                scores, ids = self._index.search(vectors, wanted)
        if not self.exact:
            scores = self._rescore(vectors, ids)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        scores[ids < 0] = -np.inf
        return scores[:, :k], ids[:, :k]

    def _check_finds_own_vectors(self, probes: int = 64, required: float = 0.9) -> None:
        """A stored index must find the blocklist's own vectors: one of other vectors would silently miss matches."""
        if len(self) == 0:
            return
        rows = np.unique(np.linspace(0, len(self) - 1, min(probes, len(self))).astype(np.int64))
        best = self.search(self.vectors[rows], k=1)[0][:, 0]
        found = float(np.mean(best >= 1 - 1e-3))  # an exact copy (itself or a duplicate); float16 storage rounds
        if found < required:
            raise BlocklistError(
                f"the stored faiss index finds only {found:.0%} of {len(rows)} of the blocklist's own vectors: it "
                "indexes other vectors. Rebuild it (BlocklistIndex.from_blocklist(blocklist, kind=...), or build the "
                "blocklist again)"
            )

    def _rescore(self, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact cosines of each query with its candidates (-inf for empty slots)."""
        safe = np.where(ids < 0, 0, ids)
        exact = np.einsum("qd,qkd->qk", vectors, self.vectors[safe])
        return np.where(ids < 0, -np.inf, exact).astype(np.float32)


def store_trained_index(
    blocklist: "Blocklist", kind: str = "auto", *, max_memory: int | None = None, index: BlocklistIndex | None = None
) -> "Blocklist":
    """Train the search index of `kind` for `blocklist` and store it in it, so loading the file needs no training.

    The one place that decides what a blocklist file carries (used by `build_blocklist`, `merge_blocklists` and the
    CLI). `"auto"` picks the kind by size (`choose_kind`). Exact `"flat"` search trains nothing, so nothing is
    stored for it. `index`, an already built `BlocklistIndex` of these very vectors, is stored as is when its kind
    is the one asked for (dedupe builds one). Returns `blocklist`.
    """
    if kind != "auto" and kind not in KINDS:
        raise UsageError(f"index must be 'auto' or one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = choose_kind(len(blocklist), blocklist.dim, max_memory)
    if kind == "flat":
        return blocklist
    if index is None or index.kind != kind or len(index) != len(blocklist):
        index = BlocklistIndex(blocklist.embeddings, kind=kind)
    return blocklist.attach_index(index)


def _trained_faiss_index(embeddings: np.ndarray, kind: str):
    import faiss

    count, dim = embeddings.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        lists = min(_ivf_list_count(count), max(1, count // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            bits = 8 if count >= 256 * 39 else max(1, int(math.log2(max(2, count // 39))))
            index = faiss.IndexIVFPQ(
                quantizer, dim, lists, _pq_subquantizer_count(dim), bits, faiss.METRIC_INNER_PRODUCT
            )
        index.own_fields = True
        quantizer.this.disown()
        sample = embeddings
        if count > 64 * lists:  # k-means on every vector adds time, not accuracy
            sample = embeddings[np.random.default_rng(0).choice(count, 64 * lists, replace=False)]
        if count:
            index.train(sample)
    if count:
        index.add(embeddings)
    return index


def _index_kind(index) -> str:
    import faiss

    index = faiss.downcast_index(index)
    for kind, cls in (("flat", faiss.IndexFlatIP), ("hnsw", faiss.IndexHNSWFlat), ("ivf-sq8", faiss.IndexIVFScalarQuantizer),
                      ("ivf-pq", faiss.IndexIVFPQ)):
        if isinstance(index, cls):
            return kind
    raise BlocklistError(f"unsupported stored faiss index type {type(index).__name__}; rebuild the index")


def _read_stored_index(serialized: np.ndarray, count: int, dim: int):
    """A stored index, read here only after the same bytes were read, checked and searched in a sandbox process."""
    serialized = np.ascontiguousarray(serialized, dtype=np.uint8)
    _check_in_sandbox(serialized, count, dim)
    index = _deserialized(serialized)  # the same bytes the sandbox read, so the same result: no crash
    _check_structure(index, count, dim)
    return index


def _deserialized(serialized: np.ndarray):
    import faiss

    try:
        return faiss.deserialize_index(serialized)
    except (RuntimeError, MemoryError) as error:
        reason = str(error).strip()[-200:]
        raise BlocklistError(f"the stored faiss index cannot be read ({reason}); rebuild it") from error


def _check_structure(index, count: int, dim: int) -> None:
    """Raise `BlocklistError` unless `index` is a supported kind over exactly `count` vectors of `dim`, ids in range."""
    import faiss

    kind = _index_kind(index)
    if index.ntotal != count or index.d != dim:
        raise BlocklistError(
            f"the stored faiss index holds {index.ntotal} vectors of dim {index.d}, but the blocklist has {count} of "
            f"dim {dim}; rebuild the index"
        )
    concrete = faiss.downcast_index(index)
    if concrete.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BlocklistError("the stored faiss index does not use inner product; rebuild it")
    if kind == "hnsw" and faiss.downcast_index(concrete.storage).ntotal != count:
        raise BlocklistError("the stored HNSW index's vectors do not match its graph; rebuild it")
    if kind.startswith("ivf"):
        _check_inverted_lists(concrete, count, dim)


def _check_inverted_lists(ivf, count: int, dim: int) -> None:
    """In-memory lists only (faiss can also map files named in the blob), holding each row id exactly once."""
    import faiss

    quantizer = faiss.downcast_index(ivf.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal != ivf.nlist or quantizer.d != dim:
        raise BlocklistError("the stored IVF index has a malformed coarse quantizer; rebuild it")
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists) or lists.nlist != ivf.nlist:
        raise BlocklistError(
            f"the stored IVF index keeps its lists in {type(lists).__name__}, not in memory; rebuild it"
        )
    sizes = [lists.list_size(i) for i in range(lists.nlist)]
    if sum(sizes) != count:
        raise BlocklistError(f"the stored IVF index lists {sum(sizes)} ids for {count} vectors; rebuild it")
    ids = np.concatenate(
        [faiss.rev_swig_ptr(lists.get_ids(i), size).copy() for i, size in enumerate(sizes) if size]
        or [np.zeros(0, np.int64)]
    )
    if len(ids) and (ids.min() < 0 or ids.max() >= count or len(np.unique(ids)) != count):
        raise BlocklistError("the stored IVF index holds row ids out of range or twice; rebuild it")


_SANDBOX_HEADROOM = 512 << 20
"""Bytes a sandbox may allocate beyond 3x the blob (the blob itself, the index read from it, a search)."""


def _check_in_sandbox(serialized: np.ndarray, count: int, dim: int) -> None:
    """Read, check and search `serialized` in a subprocess with capped memory; a `BlocklistError` if that fails."""
    package_parent = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "import sys, guardrail.index as i; sys.exit(i._sandbox_main(sys.argv[1:]))",
               str(count), str(dim), str(len(serialized))]
    try:
        done = subprocess.run(command, input=memoryview(serialized), capture_output=True, env=env,
                              timeout=120 + len(serialized) / 10e6)
    except subprocess.TimeoutExpired as error:
        raise BlocklistError("reading the stored faiss index did not finish; rebuild it") from error
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    verdict = json.loads(lines[-1]) if done.returncode in (0, 3) and lines else None
    if done.returncode == 0 and verdict == {"ok": True}:
        return
    if verdict is not None:
        raise BlocklistError(verdict["error"])
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    detail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    raise BlocklistError(
        f"reading the stored faiss index crashed its sandbox process ({how}; {detail[0][-200:]}): the index is "
        "corrupt or hostile. Rebuild it, or load the blocklist with an explicit index kind"
    )


def _sandbox_main(argv: list[str]) -> int:
    """Entry of the sandbox process: stdin holds the blob. Prints one JSON line; exit 0 ok, 3 refused."""
    import resource

    import faiss  # noqa: F401 - loaded before the memory cap is measured, so the cap counts it

    count, dim, size = (int(arg) for arg in argv)
    status = Path("/proc/self/status")
    if status.exists():  # Linux: cap the address space at what a genuine index of this size needs
        used = next(int(line.split()[1]) << 10 for line in status.read_text().splitlines() if line.startswith("VmSize"))
        cap = used + 3 * size + _SANDBOX_HEADROOM
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)  # a process may only lower its hard limit
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        blob = np.frombuffer(sys.stdin.buffer.read(size), dtype=np.uint8)
        index = _deserialized(blob)
        _check_structure(index, count, dim)
        if count:
            probes = np.random.default_rng(0).standard_normal((8, dim)).astype(np.float32)
            _set_search_params(index, 32, 128)
            index.search(probes / np.linalg.norm(probes, axis=1, keepdims=True), min(count, 32))
    except (BlocklistError, MemoryError) as error:
        print(json.dumps({"ok": False, "error": str(error) if isinstance(error, BlocklistError) else
                          f"the stored faiss index asks for more memory than an index of {count} vectors needs "
                          f"({type(error).__name__}); it is corrupt or hostile: rebuild it"}))
        return 3
    print(json.dumps({"ok": True}))
    return 0


def _set_search_params(index, nprobe: int, ef_search: int) -> None:
    import faiss

    concrete = faiss.downcast_index(index)
    if hasattr(concrete, "nprobe"):
        concrete.nprobe = nprobe
    if hasattr(concrete, "hnsw"):
        concrete.hnsw.efSearch = ef_search


def gpu_available() -> bool:
    """Whether faiss was built with GPU support and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _searchable_on(index, device: str):
    """(index to search, lock or None): a GPU copy guarded by a lock on `cuda`, the CPU index as is otherwise."""
    if not device.startswith("cuda"):
        return index, None
    import faiss

    if not gpu_available():
        raise GuardrailError(
            "device='cuda' needs faiss with GPU support and a visible GPU: pip uninstall faiss-cpu && pip install "
            "'guardrail[gpu]' (or use device='cpu' for the index)"
        )
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSWFlat):
        return index, None  # faiss has no GPU HNSW: it stays on the CPU, where reads are thread-safe
    gpu = int(device.partition(":")[2] or 0)
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, gpu, index)
    gpu_index.referenced_resources = resources  # keep the resources alive as long as the index
    return gpu_index, threading.Lock()
