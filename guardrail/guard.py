"""Embed -> search -> a `Verdict` per image. The one object serving code calls.

`Guard` refuses an embedder whose spec differs from the blocklist's (vectors of two models must never be compared).
Its blocklist, index, threshold and disabled entries live in one immutable snapshot: `check` reads it once, and
`swap_blocklist` / `disable` replace it in a single assignment, so a request never sees a half-built index and
concurrent `check` calls need no lock. Match counts per entry are kept to spot entries that flood matches.

Disabled entries are a `RowFilter` in the snapshot, built when the set changes: faiss skips them while searching,
so every check asks for one neighbour however many are disabled (faiss GPU indexes refuse k > 2048).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .blocklist import Blocklist, check_threshold
from .cascade import DEFAULT_RECALL_K, Thresholds, staged_verdicts, thresholds_in_force
from .embedders import Embedder, spec_differences
from .errors import EmbedderMismatchError, UsageError
from .images import ImageInput, to_pil_images
from .index import BlocklistIndex, RowFilter
from .verdict import NO_MATCH_SCORE, Verdict

logger = logging.getLogger(__name__)

class _Snapshot(NamedTuple):
    blocklist: Blocklist
    index: BlocklistIndex
    thresholds: Thresholds
    disabled_rows: frozenset
    row_filter: RowFilter | None = None  # the disabled rows as a faiss selector; None when none is disabled

    @property
    def threshold(self) -> float:
        return self.thresholds.main


def _default_index_device(embedder: Embedder) -> str:
    device = str(getattr(embedder, "device", "cpu"))
    if device.startswith("cuda"):
        from .index import gpu_available

        if gpu_available():
            return device
    return "cpu"


class Guard:
    """Checks images against a blocklist.

    Args:
        blocklist (`Blocklist` or path):
            The blocklist, or a path to its `.safetensors` file.
        embedder (`Embedder`):
            Must have the same spec as the embedder that built the blocklist.
        threshold (`float`, *optional*):
            Overrides the blocklist's own threshold.
        flood_fraction (`float`, *optional*):
            Report (log a warning, and list in `flooding()`) an entry that matches more than this fraction of the
            last `flood_window` checked images: a broad template can otherwise block a whole category.
        flood_window (`int`, *optional*, defaults to 1000):
            How many recent images the flood fraction is measured over.
        index_kind (`str`, *optional*):
            Force an index kind (`"flat"`, `"hnsw"`, `"ivf-sq8"`, `"ivf-pq"`); by default the one stored in the
            blocklist file, else chosen by size (see `guardrail.index`).
        index_device (`str`, *optional*):
            Where to search: `"cpu"` or `"cuda"`. Defaults to the embedder's device when it is a GPU and faiss has
            GPU support, else the CPU.
        nprobe (`int` or `"auto"`, *optional*):
            IVF lists visited per query. Defaults to the value stored with the blocklist's index, else `"auto"`
            (`guardrail.index.auto_nprobe`: recall 1.0 on the benchmark's hardest data at every size measured).
        candidates (`int`, *optional*):
            Proposals re-scored exactly per query (stored value, else 32). More costs re-scoring reads, not recall.
        ef_search (`int`, *optional*): HNSW search depth (stored value, else 128).
        max_memory (`int`, *optional*):
            Byte budget for an index chosen here (no stored index, or `index_kind="auto"`): see `choose_kind`.
        rescore (`str`, *optional*, defaults to `"auto"`):
            Where candidates are re-scored from: `"memory"` (a float32 copy), `"mapped"` (the blocklist file's
            memory map), or `"auto"` (mapped above `guardrail.index.RESCORE_IN_MEMORY_BYTES`).
        descriptor (`Embedder`, *optional*):
            The copy-detection descriptor (`TorchScriptEmbedder`, `ONNXEmbedder`) that built the blocklist's
            descriptor set. The guard then matches in two stages (`guardrail.cascade`): the main embedder proposes
            entries at the blocklist's `recall_threshold`, and the descriptor decides at its own threshold. Without
            it, a blocklist's descriptor set is not used.
        tiles (`bool`, *optional*, defaults to `False`):
            Also match the crops of `TILE_GRID` (partial copies, template verbatims) at the blocklist's tile
            threshold (`guardrail calibrate --tiles` sets it). Each image then costs `1 + len(TILE_GRID)` embeddings
            per stage.
        recall_k (`int`, *optional*, defaults to 8):
            Nearest entries proposed per image (and per tile) when matching in stages or with tiles.

    Raises:
        EmbedderMismatchError: the embedder's (or the descriptor's) spec differs from the blocklist's.
        UsageError: a descriptor for a blocklist without a descriptor set, or tiles without a tile threshold.
    """

    def __init__(
        self,
        blocklist: Blocklist | str | os.PathLike,
        embedder: Embedder,
        threshold: float | None = None,
        flood_fraction: float | None = None,
        flood_window: int = 1000,
        index_kind: str | None = None,
        index_device: str | None = None,
        *,
        nprobe: int | str | None = None,
        candidates: int | None = None,
        ef_search: int | None = None,
        max_memory: int | None = None,
        rescore: str | None = None,
        descriptor: Embedder | None = None,
        tiles: bool = False,
        recall_k: int = DEFAULT_RECALL_K,
    ) -> None:
        for name, value in (("embedder", embedder), ("descriptor", descriptor)):
            if value is not None and not isinstance(value, Embedder):
                raise UsageError(f"{name} must provide spec, dim and embed(); got {type(value).__name__}")
        if recall_k < 1:
            raise UsageError(f"recall_k must be >= 1, got {recall_k}")
        if flood_fraction is not None and not 0.0 < flood_fraction <= 1.0:
            raise UsageError(f"flood_fraction must be in (0, 1], got {flood_fraction}")
        if flood_window < 1:
            raise UsageError(f"flood_window must be >= 1, got {flood_window}")
        self.embedder = embedder
        self.descriptor, self.tiles, self.recall_k = descriptor, bool(tiles), recall_k
        self.index_kind = index_kind
        self.index_device = index_device or _default_index_device(embedder)
        self.index_options = {"nprobe": nprobe, "candidates": candidates, "ef_search": ef_search,
                              "max_memory": max_memory, "rescore": rescore}
        self.flood_fraction = flood_fraction
        self._lock = threading.Lock()  # orders snapshot writers; never held while searching or building an index
        self._stats_lock = threading.Lock()  # the match statistics
        self._threshold_override = None if threshold is None else check_threshold(threshold)
        self._recent: deque = deque(maxlen=flood_window)
        self._match_counts: Counter = Counter()
        self._flooding: set[str] = set()
        self._snapshot = self._snapshot_of(blocklist)

    def _snapshot_of(self, blocklist: Blocklist | str | os.PathLike) -> _Snapshot:
        """A snapshot of `blocklist` with its index and the threshold in force (no lock needed: nothing is shared)."""
        blocklist, index = self._verified_with_index(blocklist)
        return _Snapshot(blocklist, index, self._thresholds_of(blocklist), frozenset())

    def _thresholds_of(self, blocklist: Blocklist) -> Thresholds:
        return thresholds_in_force(blocklist, self._threshold_override, self.descriptor, self.tiles)

    def _verified_with_index(self, blocklist: Blocklist | str | os.PathLike) -> tuple[Blocklist, BlocklistIndex]:
        """The blocklist (loaded if a path), checked against the embedder, and its search index: the slow part."""
        if not isinstance(blocklist, Blocklist):
            blocklist = Blocklist.load(blocklist)
        _check_same_spec("embedder", blocklist.spec, self.embedder.spec)
        if self.descriptor is not None:
            if blocklist.descriptor is None:
                raise UsageError(
                    "descriptor was given but the blocklist has no descriptor set; rebuild it with the descriptor "
                    "(guardrail build --descriptor FILE), or leave descriptor out"
                )
            _check_same_spec("descriptor", blocklist.descriptor.spec, self.descriptor.spec)
        return blocklist, self._index_of(blocklist, self.index_device)

    def _index_of(self, blocklist: Blocklist, device: str) -> BlocklistIndex:
        return BlocklistIndex.from_blocklist(blocklist, kind=self.index_kind, device=device, **self.index_options)

    @staticmethod
    def _with_disabled(snapshot: _Snapshot, disabled_rows: frozenset) -> _Snapshot:
        row_filter = RowFilter(disabled_rows, len(snapshot.blocklist)) if disabled_rows else None
        return snapshot._replace(disabled_rows=frozenset(disabled_rows), row_filter=row_filter)

    @property
    def blocklist(self) -> Blocklist:
        return self._snapshot.blocklist

    @property
    def threshold(self) -> float:
        return self._snapshot.threshold

    def to(self, device: Any, dtype: Any = None) -> "Guard":
        """Follow a pipeline to `device` (and `dtype`): the embedder (and descriptor) move, and the index moves to a
        GPU when faiss has GPU support (back to the CPU otherwise). Returns the guard."""
        for model in (self.embedder, self.descriptor):
            move = getattr(model, "to", None)
            if callable(move):
                move(device, dtype=dtype)
        index_device = _default_index_device(self.embedder)
        if index_device != self.index_device:
            self.index_device = index_device
            with self._lock:
                snapshot = self._snapshot
            index = self._index_of(snapshot.blocklist, index_device)
            with self._lock:
                if self._snapshot.blocklist is snapshot.blocklist:  # else a swap built its index on the new device
                    self._snapshot = self._snapshot._replace(index=index)
        return self

    def __repr__(self) -> str:
        return f"Guard({self.blocklist!r}, {self.embedder!r}, threshold={self.threshold})"

    # ---- operator controls ------------------------------------------------------------------------------------

    def swap_blocklist(self, blocklist: Blocklist | str | os.PathLike, threshold: float | None = None) -> None:
        """Replace the blocklist (and its index) atomically while requests are in flight.

        The new index is built before the switch, with no lock held, so checks keep running on the old one
        meanwhile. The new blocklist's spec is verified like the first one's. A threshold given to the constructor
        (or here) keeps overriding the blocklist's; disabled ids stay disabled if they exist in the new blocklist.
        The override in force is read under the lock, so a concurrent swap that sets one is never lost.
        """
        if threshold is not None:
            threshold = check_threshold(threshold)
        blocklist, index = self._verified_with_index(blocklist)
        with self._lock:
            if threshold is not None:
                self._threshold_override = threshold
            snapshot = _Snapshot(blocklist, index, self._thresholds_of(blocklist), frozenset())
            rows = frozenset(blocklist.rows_of(sorted(self.disabled)).values())
            self._snapshot = self._with_disabled(snapshot, rows)

    @property
    def disabled(self) -> frozenset[str]:
        """Ids of entries switched off with `disable`."""
        snapshot = self._snapshot
        return frozenset(snapshot.blocklist.entries[row]["id"] for row in snapshot.disabled_rows)

    def disable(self, *entry_ids: str) -> None:
        """Switch entries off without rebuilding: they never match until `enable`d. Unknown ids are an error."""
        self._set_disabled(entry_ids, disable=True)

    def enable(self, *entry_ids: str) -> None:
        """Switch entries back on."""
        self._set_disabled(entry_ids, disable=False)

    def _set_disabled(self, entry_ids: Sequence[str], disable: bool) -> None:
        with self._lock:
            snapshot = self._snapshot
            rows = snapshot.blocklist.rows_of(entry_ids)
            unknown = [entry_id for entry_id in entry_ids if entry_id not in rows]
            if unknown:
                raise UsageError(f"no blocklist entries with ids {unknown}")
            changed = set(rows.values())
            disabled = snapshot.disabled_rows | changed if disable else snapshot.disabled_rows - changed
            self._snapshot = self._with_disabled(snapshot, frozenset(disabled))

    def match_counts(self) -> dict[str, int]:
        """How many checked images matched each entry since the guard was made."""
        with self._stats_lock:
            return dict(self._match_counts)

    def flooding(self) -> list[str]:
        """Entries that matched more than `flood_fraction` of the last `flood_window` images (needs the option)."""
        if self.flood_fraction is None:
            return []
        with self._stats_lock:
            return self._flooding_now()

    def _flooding_now(self) -> list[str]:
        counts = Counter(entry_id for entry_id in self._recent if entry_id is not None)
        return sorted(entry_id for entry_id, count in counts.items() if count > self.flood_fraction * len(self._recent))

    # ---- checking ---------------------------------------------------------------------------------------------

    def check(self, images: ImageInput | Sequence[ImageInput], record: bool = True) -> list[Verdict]:
        """One `Verdict` per image, in order.

        Accepts PIL images, numpy arrays (HWC/NHWC, uint8 or float in [0, 1]), torch tensors (CHW/NCHW in [0, 1])
        and image file paths. Raises `ImageDecodeError` for an empty batch or an invalid image. With
        `record=False` the verdicts stay out of `match_counts()` and the flood report (for previews of unfinished
        images, such as the sampler's early check).
        """
        if self.descriptor is None and not self.tiles:
            return self.check_embeddings(self.embedder.embed(images), record=record)
        verdicts = staged_verdicts(self._snapshot, self.embedder, self.descriptor, self.tiles, self.recall_k,
                                   to_pil_images(images))
        if record:
            self._count_matches(verdicts)
        return verdicts

    def check_embeddings(self, vectors: np.ndarray, record: bool = True) -> list[Verdict]:
        """Verdicts for vectors already made by this guard's embedder (unit-norm float32 `(n, dim)`), matched as
        whole images against the main vectors: the descriptor and tiles need the images (`check`)."""
        snapshot = self._snapshot  # read once: all verdicts of a call come from one blocklist
        scores, ids = snapshot.index.search(vectors, k=1, skip=snapshot.row_filter)
        verdicts = []
        for score, row in zip(scores[:, 0].tolist(), ids[:, 0].tolist()):
            if row < 0 or row in snapshot.disabled_rows:  # nothing enabled (the filter already skipped disabled rows)
                verdicts.append(Verdict(False, NO_MATCH_SCORE, None, None, scores={"main": NO_MATCH_SCORE}))
                continue
            entry = snapshot.blocklist.entries[row]  # parsed now, for this verdict only (lazy on a loaded list)
            verdicts.append(Verdict(bool(score >= snapshot.threshold), float(score), entry["id"], dict(entry),
                                    scores={"main": float(score)}))
        if record:  # previews (the sampler's early x̂0 checks) stay out of the match counts and flood reports
            self._count_matches(verdicts)
        return verdicts

    def _count_matches(self, verdicts: list[Verdict]) -> None:
        matched_ids = [verdict.entry_id if verdict.matched else None for verdict in verdicts]
        with self._stats_lock:
            self._match_counts.update(entry_id for entry_id in matched_ids if entry_id is not None)
            if self.flood_fraction is None:
                return
            self._recent.extend(matched_ids)
            flooding = set(self._flooding_now())
            for entry_id in flooding - self._flooding:  # warn once, when an entry starts flooding
                logger.warning(
                    "guardrail: blocklist entry %r matched more than %.0f%% of the last %d images; it may be too "
                    "broad (Guard.disable(%r) switches it off)",
                    entry_id, 100 * self.flood_fraction, len(self._recent), entry_id,
                )
            self._flooding = flooding


def _check_same_spec(name: str, expected: dict, actual: dict) -> None:
    differences = spec_differences(expected, actual)
    if differences:
        raise EmbedderMismatchError(
            f"the {name} does not match the one that built the blocklist ({'; '.join(differences)}). Use the "
            f"blocklist's model and weights, or rebuild the blocklist with this {name}"
        )
