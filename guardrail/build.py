"""Sources -> a verified Blocklist: decode in parallel, embed in streamed batches, skip bad data, group duplicates.

Memory stays flat in the number of images: at most a bounded window of decoded images is alive at once, and only
the vectors and records are kept. Every skipped item is recorded with its reason in the build report.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blocklist import DEFAULT_THRESHOLD, UNIT_NORM_TOLERANCE, Blocklist, check_threshold
from .embedders import Embedder
from .embedding_sets import DEFAULT_DESCRIPTOR_THRESHOLD, TILE_GRID, EmbeddingSet
from .errors import GuardrailError, ImageDecodeError, UsageError
from .images import load_image
from .index import KINDS as INDEX_KINDS
from .index import DEFAULT_CANDIDATES, DEFAULT_EF_SEARCH, BlocklistIndex, check_search_options, store_trained_index
from .sources import Item, iter_items, source_kind
from .tiles import embed_with_tiles, tile_crops


class BuildError(GuardrailError):
    """Nothing valid remained to build a blocklist from; `report` says what was skipped and why."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class _PreparedItem:
    item: Item
    pixels: Any = None  # the embedder's input for one image (a CHW tensor, or a PIL image)
    image: Any = None  # the decoded PIL image, kept only when a descriptor or tiles need it too
    vector: np.ndarray | None = None
    skip: str | None = None  # why the item was skipped
    mode: str = "RGB"  # the image's original mode, for the report's conversion counts


RECALL_MARGIN = 0.1
"""A new descriptor set's recall threshold is the main threshold less this, until `guardrail calibrate` sets it."""

DEDUPE_NEIGHBOURS = 32
"""Nearest neighbours each vector is compared with when dedupe groups entries (see `fold_duplicates`)."""


def build_blocklist(
    sources: Sequence[str] | str,
    embedder: Embedder | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    dedupe: float | None = None,
    on_error: str = "skip",
    *,
    spec: dict | None = None,
    batch_size: int | None = None,
    workers: int = 4,
    download: bool = False,
    download_timeout: float = 10.0,
    download_retries: int = 2,
    progress: bool = False,
    index: str = "auto",
    nprobe: int | str | None = None,
    candidates: int | None = None,
    descriptor: Embedder | None = None,
    descriptor_threshold: float = DEFAULT_DESCRIPTOR_THRESHOLD,
    tiles: bool = False,
) -> Blocklist:
    """Build a blocklist from image folders, manifests, webdataset shards and precomputed embedding folders.

    Args:
        sources: SOURCE paths (see `guardrail.sources`).
        embedder: embeds the images; may be None when every source holds precomputed vectors (then pass `spec`).
        threshold: the blocklist's match threshold.
        dedupe: group entries at or above this cosine (see `fold_duplicates`). Every vector stays in the blocklist,
            so no match is lost: only the records fold, into the group's first entry. None groups nothing.
        on_error: `"skip"` (default) records bad items in the report and goes on; `"raise"` stops at the first.
        spec: the embedder spec of precomputed vectors, when no embedder is given.
        batch_size: images per forward pass (defaults to the embedder's `batch_size`, or 32).
        workers: threads that read, download and decode images while the model runs.
        download: fetch URL entries of manifests; without it a URL entry is a `UsageError`.
        progress: show a progress bar with images/s on stderr.
        index: the search index stored in the blocklist (`store_trained_index`): `"auto"` (by size), or a kind.
        nprobe, candidates: search parameters stored with that index (defaults: `"auto"` nprobe, 32 candidates);
            a guard loading the file uses them unless it is given its own.
        descriptor: a copy-detection descriptor (`TorchScriptEmbedder`, `ONNXEmbedder`) whose vectors of the same
            images are stored as the blocklist's descriptor set, in the same pass over the images (see
            `guardrail.embedding_sets`). Its recall threshold starts at `threshold - RECALL_MARGIN`.
        descriptor_threshold: the descriptor set's threshold (default 0.75, as SSCD's authors suggest).
        tiles: also store the vectors of each entry's `TILE_GRID` crops, by the embedder (and the descriptor).

    Returns:
        The `Blocklist`, with the build report (a dict) as its `build_report` attribute.

    Raises:
        BuildError: nothing valid remained (its `report` says why each item was skipped).
        UsageError: bad arguments, unknown sources, URL entries without `download`.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    spec = _checked_build_options(sources, embedder, spec, threshold, dedupe, on_error, workers, batch_size, index)
    check_search_options(candidates or DEFAULT_CANDIDATES, nprobe or "auto", DEFAULT_EF_SEARCH, "auto")  # fail now
    batch_size = batch_size or getattr(embedder, "batch_size", 32)
    started = time.perf_counter()
    if (descriptor is not None or tiles) and any(source_kind(source) == "embeddings" for source in sources):
        raise UsageError("a descriptor set and tiles need the images: precomputed-embedding sources cannot have them")
    check_threshold(descriptor_threshold)
    preparer = _ItemPreparer(embedder, spec["dim"], download, download_timeout, download_retries,
                             keep_images=descriptor is not None or tiles)
    extras = _ExtraSets(embedder, descriptor, tiles)
    embedded = _embed_items(_items_with_unique_ids(sources), embedder, preparer, batch_size, workers, on_error, progress,
                            extras)
    return finished_blocklist(sources, embedded, spec, threshold, dedupe, index, nprobe, candidates, started,
                              extra_sets=extras.sets(descriptor_threshold, threshold))


def finished_blocklist(
    sources: list[str], embedded: "_Embedded", spec: dict, threshold: float, dedupe: float | None, index: str,
    nprobe: int | str | None, candidates: int | None, started: float, extra_sets: dict | None = None,
    **report_extras: Any,
) -> Blocklist:
    """The embedded vectors and records -> a verified Blocklist with its index and build report (any engine).

    `extra_sets` are `Blocklist` keyword arguments for a descriptor set and tiles. Raises `BuildError` (with the
    report) when nothing valid remained.
    """
    if not embedded.records:
        report = _build_report(sources, embedded, dedupe, 0, threshold, time.perf_counter() - started)
        raise BuildError(
            f"no valid images in {sources}: all {len(embedded.skips)} items were skipped "
            f"({', '.join(f'{n} {reason}' for reason, n in report['skipped_by_reason'].items()) or 'none found'})",
            {**report, **report_extras},
        )
    vectors = np.concatenate(embedded.vectors)
    folded, dedupe_index = fold_duplicates(vectors, embedded.records, dedupe) if dedupe is not None else (0, None)
    blocklist = Blocklist(vectors, embedded.records, spec=spec, threshold=threshold, **(extra_sets or {}))
    store_trained_index(blocklist, index, index=dedupe_index, nprobe=nprobe, candidates=candidates)
    report = _build_report(sources, embedded, dedupe, folded, threshold, time.perf_counter() - started)
    blocklist.build_report = {**report, **report_extras}
    return blocklist


def _checked_build_options(
    sources: list[str], embedder: Embedder | None, spec: dict | None, threshold: float, dedupe: float | None,
    on_error: str, workers: int, batch_size: int | None, index: str,
) -> dict:
    """Every build option checked before any image is read; returns the spec the vectors will have."""
    if not sources:
        raise UsageError("sources is empty; pass at least one SOURCE")
    kinds = [source_kind(source) for source in sources]  # fail fast on a bad SOURCE
    if on_error not in ("skip", "raise"):
        raise UsageError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    _check_dedupe(dedupe)
    if embedder is None and (spec is None or any(kind != "embeddings" for kind in kinds)):
        raise UsageError("an embedder is required (only precomputed-embedding sources can do with spec= alone)")
    if workers < 1:
        raise UsageError(f"workers must be >= 1, got {workers}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if index != "auto" and index not in INDEX_KINDS:
        raise UsageError(f"index must be 'auto' or one of {INDEX_KINDS}, got {index!r}")
    check_threshold(threshold)  # fail now, not after embedding everything
    return dict(embedder.spec if embedder is not None else spec)


def _check_dedupe(dedupe: float | None) -> None:
    if dedupe is not None and not -1.0 <= dedupe <= 1.0:
        raise UsageError(f"dedupe must be a cosine similarity in [-1, 1], got {dedupe}")


@dataclass
class _Embedded:
    """What the embedding pass kept: vectors (in batches) and records in input order, and what it skipped."""

    vectors: list[np.ndarray] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    skips: list[dict] = field(default_factory=list)
    converted_modes: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)  # read, embedded, precomputed

    def add(self, vectors: np.ndarray, batch: list[_PreparedItem]) -> None:
        self.vectors.append(np.ascontiguousarray(vectors, dtype=np.float32))
        self.records.extend(prepared.item.record for prepared in batch)


class _ExtraSets:
    """The descriptor's vectors and the tiles' vectors of each embedded batch, made from the same decoded images."""

    def __init__(self, embedder: Embedder | None, descriptor: Embedder | None, tiles: bool) -> None:
        self.embedder, self.descriptor, self.tiles = embedder, descriptor, tiles
        self.parts: dict[str, list[np.ndarray]] = {"tiles": [], "descriptor": [], "descriptor_tiles": []}

    def add(self, images: list) -> None:
        if self.tiles:
            self.parts["tiles"].append(self.embedder.embed(tile_crops(images)).reshape(len(images), len(TILE_GRID), -1))
        if self.descriptor is not None:
            whole, tile_vectors = embed_with_tiles(self.descriptor, images, self.tiles)
            self.parts["descriptor"].append(whole)
            if tile_vectors is not None:
                self.parts["descriptor_tiles"].append(tile_vectors)

    def sets(self, descriptor_threshold: float, threshold: float) -> dict:
        """`Blocklist` keyword arguments for the extra sets."""
        joined = {name: np.concatenate(parts) if parts else None for name, parts in self.parts.items()}
        found: dict = {"tiles": joined["tiles"]}
        if self.descriptor is not None:
            found["descriptor"] = EmbeddingSet(joined["descriptor"], dict(self.descriptor.spec), descriptor_threshold,
                                               joined["descriptor_tiles"])
            found["recall_threshold"] = max(-1.0, threshold - RECALL_MARGIN)
        return found


def _embed_items(
    items: Iterable[Item], embedder: Embedder | None, preparer: "_ItemPreparer", batch_size: int, workers: int,
    on_error: str, progress: bool, extras: _ExtraSets | None = None,
) -> _Embedded:
    """Read every item (decoding in `workers` threads), embed images in batches and keep precomputed vectors."""
    embedded = _Embedded()
    bar = _progress_bar(progress)
    images: list[_PreparedItem] = []  # waiting for the model
    precomputed: list[_PreparedItem] = []

    def embed_images() -> None:
        embedded.add(_embedded_batch(embedder, images), images)
        if extras is not None and preparer.keep_images:
            extras.add([prepared.image for prepared in images])
            for prepared in images:
                prepared.image = None
        embedded.counts["embedded"] += len(images)
        bar.update(len(images))
        images.clear()

    def keep_precomputed() -> None:
        embedded.add(np.stack([prepared.vector for prepared in precomputed]), precomputed)
        precomputed.clear()

    window = max(2 * batch_size, 4 * workers)
    for prepared in _mapped_in_order(preparer, items, workers, window):
        embedded.counts["read"] += 1
        if prepared.skip is not None:
            _record_skip(embedded.skips, prepared, on_error)
        elif prepared.vector is not None:
            embedded.counts["precomputed"] += 1
            precomputed.append(prepared)
            if len(precomputed) == batch_size:
                keep_precomputed()
        else:
            if prepared.mode != "RGB":
                embedded.converted_modes[prepared.mode] += 1
            images.append(prepared)
            if len(images) == batch_size:
                embed_images()
    if images:
        embed_images()
    if precomputed:
        keep_precomputed()
    bar.close()
    return embedded


def _record_skip(skips: list[dict], prepared: _PreparedItem, on_error: str) -> None:
    if on_error == "raise":
        raise ImageDecodeError(f"{prepared.item.record['id']}: {prepared.skip}")
    skips.append({"id": prepared.item.record["id"], "source": prepared.item.record.get("source"),
                  "reason": prepared.skip})


def _build_report(
    sources: list[str], embedded: _Embedded, dedupe: float | None, folded: int, threshold: float, seconds: float
) -> dict:
    counts, skips = embedded.counts, embedded.skips
    return {
        "sources": sources,
        "read": counts["read"],
        "embedded": counts["embedded"],
        "precomputed": counts["precomputed"],
        "skipped": len(skips),
        "skipped_by_reason": dict(Counter(skip["reason"].split(":")[0] for skip in skips)),
        "converted_modes": dict(embedded.converted_modes),
        "deduplicated": folded,
        "dedupe": dedupe,
        "entries": len(embedded.records),
        "threshold": threshold,
        "seconds": round(seconds, 3),
        "images_per_second": round(counts["embedded"] / seconds, 2) if seconds > 0 else None,
        "skips": skips,
    }


def fold_duplicates(vectors: np.ndarray, records: list[dict], dedupe: float) -> tuple[int, BlocklistIndex]:
    """Group near-duplicate entries and fold their records into each group's first entry; returns (folded, index).

    Vectors are never dropped: an image at the threshold to a duplicate can be far below it to the group's first
    entry, so dropping the duplicate would lose that match. Only the records change, in place: the first entry of
    a group (in input order) gets `duplicates` = the group's total count, and every other member gets
    `duplicate_of` = that entry's id and `duplicates` = 0, so the counts sum to the number of images. A match on a
    member names the member; its record says which group it belongs to.

    A group is a connected component of the graph linking each vector to those of its `DEDUPE_NEIGHBOURS` nearest
    neighbours at cosine >= `dedupe` (so members can chain below `dedupe`: that only merges records). Records that
    were already folded (a merged blocklist) stay with their group. The search uses `BlocklistIndex` (exact up to
    `EXACT_LIMIT` entries, IVF beyond), which is also returned so the build can store it.
    """
    _check_dedupe(dedupe)
    index = BlocklistIndex(vectors)
    group = _connected_components(len(vectors), _duplicate_links(index, vectors, records, dedupe))
    first = np.full(len(vectors), len(vectors))
    np.minimum.at(first, group, np.arange(len(vectors)))  # the first row of each group
    totals = np.zeros(len(vectors), np.int64)
    np.add.at(totals, group, [int(record.get("duplicates", 1)) for record in records])
    folded = 0
    for row, record in enumerate(records):
        leader = int(first[group[row]])
        if leader == row:
            record.pop("duplicate_of", None)
            record["duplicates"] = max(1, int(totals[group[row]]))
        else:
            record["duplicate_of"], record["duplicates"] = records[leader]["id"], 0
            folded += 1
    return folded, index


def _duplicate_links(index: BlocklistIndex, vectors: np.ndarray, records: list[dict], dedupe: float) -> np.ndarray:
    """(E, 2) row pairs that belong together: neighbours at cosine >= dedupe, and earlier folds."""
    links = []
    k = min(DEDUPE_NEIGHBOURS, len(vectors))
    for start in range(0, len(vectors), 4096):
        scores, ids = index.search(vectors[start : start + 4096], k=k)
        rows, columns = np.nonzero((scores >= dedupe) & (ids >= 0))
        links.append(np.stack([rows + start, ids[rows, columns]], axis=1))
    row_of = {record["id"]: row for row, record in enumerate(records)}
    earlier = [(row, row_of[r["duplicate_of"]]) for row, r in enumerate(records) if r.get("duplicate_of") in row_of]
    links.append(np.asarray(earlier, dtype=np.int64).reshape(-1, 2))
    return np.concatenate(links).astype(np.int64)


def _connected_components(count: int, links: np.ndarray) -> np.ndarray:
    """A component label per node (the smallest node of its component), by min-label propagation."""
    label = np.arange(count)
    while True:
        smaller = np.minimum(label[links[:, 0]], label[links[:, 1]])
        updated = label.copy()
        np.minimum.at(updated, links[:, 0], smaller)
        np.minimum.at(updated, links[:, 1], smaller)
        updated = updated[updated]  # pointer jumping: follow labels to their own labels
        if np.array_equal(updated, label):
            return label
        label = updated


def merge_blocklists(
    blocklists: Sequence[Blocklist], threshold: float | None = None, dedupe: float | None = None, *, index: str = "auto"
) -> Blocklist:
    """One blocklist holding the entries of several, which must share one embedder spec.

    Args:
        threshold: the merged threshold (defaults to the first blocklist's).
        dedupe: as in `build_blocklist`, across all inputs (earlier inputs' entries lead their groups).
        index: the search index stored in the result (`store_trained_index`): `"auto"` (by size), or a kind.

    Raises:
        EmbedderMismatchError: the specs differ.
        BlocklistError: two inputs use the same entry id.
    """
    from .embedders import spec_differences
    from .errors import BlocklistError, EmbedderMismatchError

    if not blocklists:
        raise UsageError("blocklists is empty; pass at least one")
    _check_dedupe(dedupe)
    first = blocklists[0]
    for position, other in enumerate(blocklists[1:], start=2):
        differences = spec_differences(first.spec, other.spec)
        if differences:
            raise EmbedderMismatchError(
                f"blocklist {position} was built with another embedder ({'; '.join(differences)}); only blocklists "
                "with equal specs can be merged. Rebuild one with the other's model and weights"
            )
    seen: set[str] = set()
    for blocklist in blocklists:
        clashes = seen.intersection(entry["id"] for entry in blocklist.entries)
        if clashes:
            raise BlocklistError(f"entry ids {sorted(clashes)[:5]} appear in more than one blocklist; ids must be unique")
        seen.update(entry["id"] for entry in blocklist.entries)
    vectors = np.concatenate([first.embeddings[:0], *(blocklist.embeddings for blocklist in blocklists)])
    records = [dict(entry) for blocklist in blocklists for entry in blocklist.entries]
    folded, dedupe_index = (0, None) if dedupe is None or not len(vectors) else fold_duplicates(vectors, records, dedupe)
    merged = Blocklist(vectors, records, spec=first.spec, threshold=first.threshold if threshold is None else threshold,
                       tile_threshold=first.tile_threshold, recall_threshold=first.recall_threshold,
                       **_merged_extras(blocklists))
    return store_trained_index(merged, index, index=dedupe_index)


def _merged_extras(blocklists: Sequence[Blocklist]) -> dict:
    """The inputs' descriptor sets and tiles, joined: every input must have the same ones (thresholds: the first's)."""
    from .embedders import spec_differences
    from .errors import EmbedderMismatchError

    first = blocklists[0]
    for position, other in enumerate(blocklists[1:], start=2):
        if (other.descriptor is None) != (first.descriptor is None) or (other.tiles is None) != (first.tiles is None) or (
                first.descriptor is not None and (other.descriptor.tiles is None) != (first.descriptor.tiles is None)):
            raise UsageError(
                f"blocklist {position} and blocklist 1 differ in their descriptor set or tiles; merge only blocklists "
                "built with the same --descriptor and --tiles options"
            )
        if first.descriptor is not None:
            differences = spec_differences(first.descriptor.spec, other.descriptor.spec)
            if differences:
                raise EmbedderMismatchError(
                    f"blocklist {position}'s descriptor set was made by another descriptor ({'; '.join(differences)})"
                )

    def joined(arrays: list) -> np.ndarray | None:
        return None if arrays[0] is None else np.concatenate([np.asarray(array, np.float32) for array in arrays])

    found: dict = {"tiles": joined([blocklist.tiles for blocklist in blocklists])}
    if first.descriptor is not None:
        found["descriptor"] = EmbeddingSet(
            joined([blocklist.descriptor.embeddings for blocklist in blocklists]), first.descriptor.spec,
            first.descriptor.threshold, joined([blocklist.descriptor.tiles for blocklist in blocklists]),
            first.descriptor.tile_threshold,
        )
    return found


def _items_with_unique_ids(sources: list[str]) -> Iterator[Item]:
    seen: Counter = Counter()
    for source in sources:
        for item in iter_items(source):
            identifier = item.record["id"]
            seen[identifier] += 1
            if seen[identifier] > 1:  # ids must be unique across sources
                item.record["id"] = f"{identifier}#{seen[identifier]}"
            yield item


def _mapped_in_order(function, items: Iterable[Item], workers: int, window: int) -> Iterator[_PreparedItem]:
    """`map(function, items)` on a thread pool, in order, with at most `window` items in flight."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guardrail-build")
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class _ItemPreparer:
    """Runs in worker threads: fetch/read bytes, hash them, decode, and apply the embedder's transform."""

    def __init__(self, embedder: Embedder | None, dim: int, download: bool, timeout: float, retries: int,
                 keep_images: bool = False) -> None:
        self.transform = getattr(embedder, "transform", None) if hasattr(embedder, "encode") else None
        self.dim, self.download, self.timeout, self.retries = dim, download, timeout, retries
        self.keep_images = keep_images

    def __call__(self, item: Item) -> _PreparedItem:
        if item.vector is not None:
            return self._checked_vector(item)
        if item.url is not None and item.path is None and item.data is None:
            if not self.download:
                raise UsageError(
                    f"entry {item.record['id']!r} is a URL ({item.url}); pass --download (download=True) to fetch "
                    "URL entries, or give local paths"
                )
            from .download import DownloadError, fetch  # urllib is only needed for URL entries

            try:
                item.data = fetch(item.url, timeout=self.timeout, retries=self.retries)
            except DownloadError as error:
                return _PreparedItem(item, skip=f"download failed: {error}")
        if item.path is not None:
            try:
                with open(item.path, "rb") as handle:
                    item.data = handle.read()
            except OSError as error:
                return _PreparedItem(item, skip=f"unreadable path: {error.strerror or error}")
        if item.data is None:
            return _PreparedItem(item, skip="no image: the record has no path, URL or image data")
        item.record["sha256"] = hashlib.sha256(item.data).hexdigest()
        try:
            image = load_image(io.BytesIO(item.data), name=item.record["id"])
        except ImageDecodeError as error:
            reason = "decompression bomb" if "decompression bomb" in str(error) else "cannot decode"
            return _PreparedItem(item, skip=f"{reason}: {error}")
        finally:
            item.data = None  # keep memory flat: the bytes are not needed any more
        pixels = self.transform(image) if self.transform is not None else image
        return _PreparedItem(item, pixels=pixels, image=image if self.keep_images else None,
                             mode=image.info.get("source_mode", "RGB"))

    def _checked_vector(self, item: Item) -> _PreparedItem:
        vector = item.vector
        if vector.shape != (self.dim,):
            return _PreparedItem(item, skip=f"bad vector: shape {vector.shape}, expected ({self.dim},)")
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(vector).all() or abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            return _PreparedItem(item, skip=f"bad vector: not finite and unit-norm (norm {norm:.4f})")
        return _PreparedItem(item, vector=(vector / norm).astype(np.float32))


def _embedded_batch(embedder: Any, batch: list[_PreparedItem]) -> np.ndarray:
    inputs = [p.pixels for p in batch]
    if hasattr(embedder, "encode") and getattr(embedder, "transform", None) is not None:
        import torch

        return embedder.encode(torch.stack(inputs))
    return embedder.embed(inputs)


def _progress_bar(enabled: bool):
    if enabled:
        from tqdm import tqdm

        return tqdm(unit="img", desc="embedding", file=sys.stderr, dynamic_ncols=True)

    class _Silent:
        def update(self, n: int) -> None: ...

        def close(self) -> None: ...

    return _Silent()
