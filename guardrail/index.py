"""Nearest-neighbour search over blocklist vectors with faiss, from a studio catalogue to LAION-scale blocklists.

Vectors are unit-norm, so inner product is cosine similarity. The index kind is chosen from the entry count and a
memory budget: exact `IndexFlatIP` while exact search is cheap, then IVF with 8-bit scalar quantization, then
IVF-PQ when even one byte per dimension is too much (HNSW on request). Approximate indexes only propose
candidates: every candidate is re-scored exactly against the blocklist's own vectors, so a returned score is always
the true cosine (in float32, of the stored float16 or float32 vector) and a match can only be missed if it is not
among `candidates` proposals (benchmarks measure this recall against exact search).

Where re-scoring reads the vectors decides the memory: a blocklist loaded from a file keeps them in the file, and
above `RESCORE_IN_MEMORY_BYTES` the index reads each query's candidates through that memory map (a few kB a query)
instead of holding an `N x dim` float32 copy, so an IVF-PQ list needs about its codes in RAM. Entries switched off
are skipped inside faiss (an `IDSelector` bitmap, `RowFilter`), so `k` never grows with their number.

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
DEFAULT_CANDIDATES = 32
"""Proposals an approximate index makes per query before exact re-scoring."""
DEFAULT_EF_SEARCH = 128
"""HNSW search depth."""
RESCORE_IN_MEMORY_BYTES = 64 << 20
"""Up to this size of a float32 copy (about 22k vectors of dim 768, just past `EXACT_LIMIT`) a loaded list
re-scores from RAM, beyond it through the file's memory map. The choice is about memory, not speed: either way a
query reads `candidates` rows, and the README's Performance table gives both latencies, warm and cold; a copy this
small is noise next to the embedder's weights, and never pays a page fault."""
RESCORE_MODES = ("auto", "memory", "mapped")


def auto_nprobe(nlist: int) -> int:
    """IVF lists visited per query under `nprobe="auto"`: a sixteenth of the lists, at least 64 (all up to 64).

    Measured with benchmarks/search_scaling.py at dim 768 (queries 0.005 above the threshold): the hardest shape was
    uniform vectors, where 32 of 256 lists missed 1 match in 200 at 100k entries and 48 or 64 missed none, and 64 of
    1,024 lists missed none at 1M. Clustered data with planted duplicate groups kept recall 1.0 from 4 lists up, so
    a build that knows its data is clustered can store a lower `nprobe` (`guardrail build --nprobe`).
    """
    return int(min(nlist, max(64, nlist // 16)))


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
        nprobe (`int` or `"auto"`, *optional*, defaults to `"auto"`):
            IVF lists visited per query; `"auto"` picks it from the list count (`auto_nprobe`).
        ef_search (`int`, *optional*, defaults to 128): HNSW search depth.
        rescore (`str`, *optional*, defaults to `"auto"`):
            Where approximate candidates are re-scored from: `"memory"` (a float32 copy in RAM), `"mapped"` (the
            `embeddings` array as given, e.g. a blocklist file's memory map, float16 or float32; rows are read per
            query and re-scored in float32), or `"auto"` (`"mapped"` for a memory map whose float32 copy would
            exceed `RESCORE_IN_MEMORY_BYTES`, else `"memory"`).
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
        candidates: int = DEFAULT_CANDIDATES,
        nprobe: int | str = "auto",
        ef_search: int = DEFAULT_EF_SEARCH,
        rescore: str = "auto",
        serialized: np.ndarray | None = None,
    ) -> None:
        if not isinstance(embeddings, np.ndarray):
            embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
            raise UsageError(f"embeddings must be float (N, dim), got {embeddings.dtype} {embeddings.shape}")
        if kind != "auto" and kind not in KINDS:
            raise UsageError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
        check_search_options(candidates, nprobe, ef_search, rescore)
        self.dim = embeddings.shape[1]
        self.kind = choose_kind(len(embeddings), self.dim, max_memory) if kind == "auto" else kind
        self.candidates = candidates
        if serialized is not None:
            index = _read_stored_index(serialized, len(embeddings), self.dim)
            self.kind = _index_kind(index)
        else:
            index = _trained_faiss_index(embeddings, self.kind)
        self.rescore = _rescore_mode(rescore, embeddings, self.kind)
        # The re-scoring source: a float32 copy, or the array as given (a memory map stays one: no N x dim copy).
        self.vectors = np.ascontiguousarray(embeddings, np.float32) if self.rescore == "memory" else embeddings
        self.nprobe = _resolved_nprobe(index, nprobe)
        self.ef_search = ef_search
        _set_search_params(index, self.nprobe, ef_search)
        self.device = device
        self._cpu_index = index
        self._index, self._lock = _searchable_on(index, device)
        if serialized is not None:
            self._check_finds_own_vectors()

    @classmethod
    def from_blocklist(cls, blocklist: Blocklist, kind: str | None = None, **options) -> BlocklistIndex:
        """The index of a blocklist: the faiss index stored in its file when there is one and no `kind` is asked for,
        else one built now (`kind` defaults to `"auto"`).

        A stored index brings its search parameters (`Blocklist.index_params`); `options` given here (not None)
        override them. Options set to None mean "the default"."""
        options = {name: value for name, value in options.items() if value is not None}
        stored = getattr(blocklist, "faiss_index", None)
        if stored is not None and kind is None:
            options = {**(getattr(blocklist, "index_params", None) or {}), **options}
            options.pop("max_memory", None)  # the stored kind is used as is
            try:
                return cls(blocklist.embeddings, serialized=stored, **options)
            finally:
                release = getattr(blocklist, "release_pages", None)
                if release is not None:  # the whole blob was read through the map: let those pages go
                    release()
                _return_freed_memory()
        return cls(blocklist.embeddings, kind=kind or "auto", **options)

    @property
    def search_params(self) -> dict[str, int]:
        """The parameters that shape this index's results (what `store_trained_index` stores with it)."""
        params = {"candidates": self.candidates}
        if self.kind.startswith("ivf"):
            params["nprobe"] = self.nprobe
        if self.kind == "hnsw":
            params["ef_search"] = self.ef_search
        return params

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    @property
    def memory_bytes(self) -> int:
        """Bytes of the faiss index itself (a float32 copy for re-scoring comes on top when `rescore` is "memory")."""
        return len(self.serialize())

    def set_search_params(self, nprobe: int | str | None = None, candidates: int | None = None,
                          ef_search: int | None = None) -> None:
        """Change the search parameters in place (None keeps one). Not for an index other threads are searching."""
        check_search_options(candidates or self.candidates, nprobe or "auto", ef_search or self.ef_search, "auto")
        if candidates is not None:
            self.candidates = candidates
        if nprobe is not None:
            self.nprobe = _resolved_nprobe(self._cpu_index, nprobe)
        if ef_search is not None:
            self.ef_search = ef_search
        _set_search_params(self._cpu_index, self.nprobe, self.ef_search)
        if self._index is not self._cpu_index:  # a GPU copy: faiss GPU indexes take nprobe as an attribute
            self._index.nprobe = self.nprobe

    def serialize(self) -> np.ndarray:
        """The faiss index as a uint8 array (`faiss.serialize_index`), to store beside the vectors."""
        import faiss

        return faiss.serialize_index(self._cpu_index)

    def search(
        self, vectors: np.ndarray, k: int = 1, skip: "RowFilter | None" = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` cosine scores and row ids for each query vector.

        Args:
            vectors: `(n, dim)` queries.
            k: neighbours per query.
            skip: rows never to return (`RowFilter`, e.g. disabled entries); filtered inside faiss, so `k` stays
                the same however many rows it holds.

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
        wanted = min(k if self.exact else max(k, self.candidates), len(self))
        scores, ids = self._faiss_search(vectors, wanted, skip)
        if wanted < k:  # faiss fills missing slots with -1 only up to ntotal
            pad = ((0, 0), (0, k - wanted))
            scores, ids = np.pad(scores, pad, constant_values=-np.inf), np.pad(ids, pad, constant_values=-1)
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
        best = np.concatenate([self.search(self.vectors[rows[i : i + 8]], k=1)[0][:, 0]  # 8 at a time: little memory
                               for i in range(0, len(rows), 8)])
        found = float(np.mean(best >= 1 - 1e-3))  # an exact copy (itself or a duplicate); float16 storage rounds
        if found < required:
            raise BlocklistError(
                f"the stored faiss index finds only {found:.0%} of {len(rows)} of the blocklist's own vectors: it "
                "indexes other vectors. Rebuild it (BlocklistIndex.from_blocklist(blocklist, kind=...), or build the "
                "blocklist again)"
            )

    def _faiss_search(
        self, vectors: np.ndarray, wanted: int, skip: "RowFilter | None"
    ) -> tuple[np.ndarray, np.ndarray]:
        params = None if skip is None or not skip.rows else self._params_skipping(skip)
        if self._lock is None:
            return self._index.search(vectors, wanted, params=params)
        with self._lock:
            try:
                scores, ids = self._index.search(vectors, wanted, params=params)
            except RuntimeError:  # a faiss GPU build without IDSelector support
                scores, ids = None, None
        if params is not None and (ids is None or np.isin(ids, skip.array).any()):
            return self._cpu_index.search(vectors, wanted, params=params)  # filtered exactly, on the CPU copy
        return scores, ids

    def _params_skipping(self, skip: "RowFilter"):
        """faiss search parameters carrying `skip`'s selector and this index's own nprobe / efSearch (parameters
        passed to a search replace the index's, so they must be restated)."""
        import faiss

        if self.kind.startswith("ivf"):
            params = faiss.SearchParametersIVF()
            params.nprobe = self.nprobe
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = self.ef_search
        else:
            params = faiss.SearchParameters()
        params.sel = skip.selector
        return params

    def _rescore(self, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact float32 cosines of each query with its candidates (-inf for empty slots).

        Each distinct candidate row is read once, in file order, and converted to float32 (the memory-mapped
        vectors may be float16): a query reads `candidates x dim x itemsize` bytes, never the whole list."""
        safe = np.where(ids < 0, 0, ids)
        rows, inverse = np.unique(safe, return_inverse=True)
        gathered = np.asarray(self.vectors[rows], dtype=np.float32)
        exact = np.einsum("qd,qkd->qk", vectors, gathered[inverse.reshape(safe.shape)])
        return np.where(ids < 0, -np.inf, exact).astype(np.float32)


def _return_freed_memory() -> None:
    """Ask glibc to give freed heap memory back to the system (`malloc_trim`), where there is glibc.

    Reading a stored index copies its blob twice on the way (faiss's reader buffer, then the index); glibc keeps
    the freed copies in the heap: `benchmarks/search_scaling.py --memory 200000` measured 219 bytes an entry
    resident without the trim and 149 with it (IVF-PQ, dim 768, verify=False)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, or another allocator that returns memory itself
        pass


class RowFilter:
    """Rows a search must never return, as a faiss `IDSelector` built once (a bitmap: one bit per entry).

    Built when the set changes (`Guard.disable`), not per search, and passed to `BlocklistIndex.search(skip=)`.
    faiss skips these rows while scanning, so a search still asks for `k` neighbours however many rows are
    excluded (before, `k` grew with them, past the 2,048 faiss GPU indexes allow).
    """

    def __init__(self, rows, count: int) -> None:
        import faiss

        self.array = np.unique(np.fromiter(rows, np.int64))
        if len(self.array) and (self.array[0] < 0 or self.array[-1] >= count):
            raise UsageError(f"rows to skip must be in [0, {count}), got {self.array[0]}..{self.array[-1]}")
        self.rows = frozenset(self.array.tolist())
        bits = np.zeros(max(1, (count + 7) // 8) * 8, bool)
        bits[self.array] = True
        self._bitmap = np.packbits(bits, bitorder="little")  # faiss reads bit (i & 7) of byte i >> 3
        self._members = faiss.IDSelectorBitmap(len(self._bitmap), faiss.swig_ptr(self._bitmap))
        self.selector = faiss.IDSelectorNot(self._members)  # keeps _members (and the bitmap) referenced above

    def __len__(self) -> int:
        return len(self.rows)


def check_search_options(candidates: int, nprobe: int | str, ef_search: int, rescore: str) -> None:
    """A `UsageError` naming the first search option out of range (before any work is done with them)."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise UsageError(f"candidates must be an integer >= 1, got {candidates!r}")
    if nprobe != "auto" and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
        raise UsageError(f"nprobe must be 'auto' or an integer >= 1, got {nprobe!r}")
    if isinstance(ef_search, bool) or not isinstance(ef_search, int) or ef_search < 1:
        raise UsageError(f"ef_search must be an integer >= 1, got {ef_search!r}")
    if rescore not in RESCORE_MODES:
        raise UsageError(f"rescore must be one of {RESCORE_MODES}, got {rescore!r}")


def _rescore_mode(rescore: str, embeddings: np.ndarray, kind: str) -> str:
    """"memory" or "mapped" (see `BlocklistIndex`); exact flat search re-scores nothing, so it copies nothing."""
    if kind == "flat":
        return "mapped"
    if rescore != "auto":
        return rescore
    mapped = isinstance(embeddings, np.memmap) or isinstance(getattr(embeddings, "base", None), np.memmap)
    return "mapped" if mapped and embeddings.shape[0] * embeddings.shape[1] * 4 > RESCORE_IN_MEMORY_BYTES else "memory"


def _resolved_nprobe(index, nprobe: int | str) -> int:
    import faiss

    nlist = getattr(faiss.downcast_index(index), "nlist", None)
    if nlist is None:
        return 0 if nprobe == "auto" else int(nprobe)
    return auto_nprobe(nlist) if nprobe == "auto" else int(min(nprobe, nlist))


def store_trained_index(
    blocklist: "Blocklist", kind: str = "auto", *, max_memory: int | None = None, index: BlocklistIndex | None = None,
    **search_options,
) -> "Blocklist":
    """Train the search index of `kind` for `blocklist` and store it in it, so loading the file needs no training.

    The one place that decides what a blocklist file carries (used by `build_blocklist`, `merge_blocklists` and the
    CLI). `"auto"` picks the kind by size (`choose_kind`). Exact `"flat"` search trains nothing, so nothing is
    stored for it. `index`, an already built `BlocklistIndex` of these very vectors, is stored as is when its kind
    is the one asked for (dedupe builds one). `search_options` (`nprobe`, `candidates`, `ef_search`; None for the
    default) are stored with the index as `index_params`, so a guard loading the file searches as the builder chose.
    Returns `blocklist`.
    """
    search_options = {name: value for name, value in search_options.items() if value is not None}
    unknown = set(search_options) - {"nprobe", "candidates", "ef_search"}
    if unknown:
        raise UsageError(f"unknown search options {sorted(unknown)}; use nprobe, candidates, ef_search")
    if kind != "auto" and kind not in KINDS:
        raise UsageError(f"index must be 'auto' or one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = choose_kind(len(blocklist), blocklist.dim, max_memory)
    if kind == "flat":
        return blocklist
    if index is None or index.kind != kind or len(index) != len(blocklist):
        index = BlocklistIndex(blocklist.embeddings, kind=kind, **search_options)
    else:
        index.set_search_params(**search_options)
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
            sample = embeddings[np.sort(np.random.default_rng(0).choice(count, 64 * lists, replace=False))]
        if count:
            index.train(np.ascontiguousarray(sample, np.float32))
    for start in range(0, count, _ADD_ROWS):  # float32 a chunk at a time: a memory-mapped float16 list stays mapped
        index.add(np.ascontiguousarray(embeddings[start : start + _ADD_ROWS], np.float32))
    return index


_ADD_ROWS = 1 << 16


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
