"""Nearest-neighbour search over blocklist vectors with faiss, from a studio catalogue to LAION-scale blocklists.

Vectors are unit-norm, so inner product is cosine similarity. The index kind is chosen from the entry count and a
memory budget: exact `IndexFlatIP` while exact search is cheap, then IVF with 8-bit scalar quantization, then
IVF-PQ when even one byte per dimension is too much (HNSW on request). Approximate indexes only propose
candidates: every candidate is re-scored exactly against the stored float32 vectors, so a returned score is always
the true cosine and a match can only be missed if it is not among `candidates` proposals (benchmarks measure this
recall against exact search).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .errors import GuardrailError, UsageError

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


def _lists_for(count: int) -> int:
    """IVF lists: about sqrt(count), a power of two (1,024 at 1M entries)."""
    return int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(max(count, 1)))))))


def _pq_bytes_for(dim: int) -> int:
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
            training. It is checked against `embeddings` (count and dim).

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
            index = _deserialize(serialized, len(embeddings), self.dim)
            self.kind = _kind_of(index)
        else:
            index = _build(embeddings, self.kind)
        _set_search_params(index, nprobe, ef_search)
        self.device = device
        self._cpu_index = index
        self._index, self._lock = _to_device(index, device)

    @classmethod
    def from_blocklist(cls, blocklist: "Blocklist", kind: str | None = None, **options) -> "BlocklistIndex":  # noqa: F821
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

    def _rescore(self, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact cosines of each query with its candidates (-inf for empty slots)."""
        safe = np.where(ids < 0, 0, ids)
        exact = np.einsum("qd,qkd->qk", vectors, self.vectors[safe])
        return np.where(ids < 0, -np.inf, exact).astype(np.float32)


def _build(embeddings: np.ndarray, kind: str):
    import faiss

    count, dim = embeddings.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        lists = min(_lists_for(count), max(1, count // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            bits = 8 if count >= 256 * 39 else max(1, int(math.log2(max(2, count // 39))))
            index = faiss.IndexIVFPQ(quantizer, dim, lists, _pq_bytes_for(dim), bits, faiss.METRIC_INNER_PRODUCT)
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


def _kind_of(index) -> str:
    import faiss

    index = faiss.downcast_index(index)
    for kind, cls in (("flat", faiss.IndexFlatIP), ("hnsw", faiss.IndexHNSWFlat), ("ivf-sq8", faiss.IndexIVFScalarQuantizer),
                      ("ivf-pq", faiss.IndexIVFPQ)):
        if isinstance(index, cls):
            return kind
    raise GuardrailError(f"unsupported stored faiss index type {type(index).__name__}; rebuild the index")


def _deserialize(serialized: np.ndarray, count: int, dim: int):
    import faiss

    try:
        index = faiss.deserialize_index(np.ascontiguousarray(serialized, dtype=np.uint8))
    except RuntimeError as error:
        raise GuardrailError(f"the stored faiss index cannot be read ({error}); rebuild it") from error
    if index.ntotal != count or index.d != dim:
        raise GuardrailError(
            f"the stored faiss index holds {index.ntotal} vectors of dim {index.d}, but the blocklist has {count} of "
            f"dim {dim}; rebuild the index"
        )
    if faiss.downcast_index(index).metric_type != faiss.METRIC_INNER_PRODUCT:
        raise GuardrailError("the stored faiss index does not use inner product; rebuild it")
    return index


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


def _to_device(index, device: str):
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
