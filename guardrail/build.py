"""Sources -> a verified Blocklist: decode in parallel, embed in streamed batches, skip bad data, dedupe.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from .blocklist import DEFAULT_THRESHOLD, UNIT_NORM_TOLERANCE, Blocklist, check_threshold
from .embedders import Embedder
from .errors import GuardrailError, ImageDecodeError, UsageError
from .images import load_image
from .sources import Item, iter_items, source_kind


class BuildError(GuardrailError):
    """Nothing valid remained to build a blocklist from; `report` says what was skipped and why."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class _Prepared:
    item: Item
    pixels: Any = None  # the embedder's input for one image (a CHW tensor, or a PIL image)
    vector: np.ndarray | None = None
    skip: str | None = None  # why the item was skipped
    mode: str = "RGB"  # the image's original mode, for the report's conversion counts


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
) -> Blocklist:
    """Build a blocklist from image folders, manifests, webdataset shards and precomputed embedding folders.

    Args:
        sources: SOURCE paths (see `guardrail.sources`).
        embedder: embeds the images; may be None when every source holds precomputed vectors (then pass `spec`).
        threshold: the blocklist's match threshold.
        dedupe: collapse entries whose cosine to an earlier kept entry is >= this value into that entry, keeping its
            record and adding to its `duplicates` count. None keeps every entry.
        on_error: `"skip"` (default) records bad items in the report and goes on; `"raise"` stops at the first.
        spec: the embedder spec of precomputed vectors, when no embedder is given.
        batch_size: images per forward pass (defaults to the embedder's `batch_size`, or 32).
        workers: threads that read, download and decode images while the model runs.
        download: fetch URL entries of manifests; without it a URL entry is a `UsageError`.
        progress: show a progress bar with images/s on stderr.

    Returns:
        The `Blocklist`, with the build report (a dict) as its `build_report` attribute.

    Raises:
        BuildError: nothing valid remained (its `report` says why each item was skipped).
        UsageError: bad arguments, unknown sources, URL entries without `download`.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise UsageError("sources is empty; pass at least one SOURCE")
    kinds = [source_kind(source) for source in sources]  # fail fast on a bad SOURCE
    if on_error not in ("skip", "raise"):
        raise UsageError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if dedupe is not None and not -1.0 <= dedupe <= 1.0:
        raise UsageError(f"dedupe must be a cosine similarity in [-1, 1], got {dedupe}")
    if embedder is None and (spec is None or any(kind != "embeddings" for kind in kinds)):
        raise UsageError("an embedder is required (only precomputed-embedding sources can do with spec= alone)")
    if workers < 1:
        raise UsageError(f"workers must be >= 1, got {workers}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    check_threshold(threshold)  # fail now, not after embedding everything
    spec = dict(embedder.spec if embedder is not None else spec)
    batch_size = batch_size or getattr(embedder, "batch_size", 32)

    started = time.perf_counter()
    collector = _Collector(dedupe, spec["dim"])
    skips: list[dict] = []
    converted: Counter = Counter()
    counts = Counter()
    bar = _progress_bar(progress)

    def handle(prepared: _Prepared) -> None:
        counts["read"] += 1
        if prepared.skip is not None:
            if on_error == "raise":
                raise ImageDecodeError(f"{prepared.item.record['id']}: {prepared.skip}")
            skips.append({"id": prepared.item.record["id"], "source": prepared.item.record.get("source"),
                          "reason": prepared.skip})

    prepare = _Preparer(embedder, spec["dim"], download, download_timeout, download_retries)
    batch: list[_Prepared] = []  # images waiting for the model
    vectors: list[_Prepared] = []  # precomputed vectors waiting for the collector
    for prepared in _in_order(prepare, _all_items(sources), workers, window=max(2 * batch_size, 4 * workers)):
        handle(prepared)
        if prepared.skip is not None:
            continue
        if prepared.vector is not None:
            counts["precomputed"] += 1
            vectors.append(prepared)
            if len(vectors) == batch_size:  # one dedupe search per batch, not per vector
                collector.add(np.stack([p.vector for p in vectors]), [p.item.record for p in vectors])
                vectors = []
            continue
        if prepared.mode != "RGB":
            converted[prepared.mode] += 1
        batch.append(prepared)
        if len(batch) == batch_size:
            collector.add(_embed(embedder, batch), [p.item.record for p in batch])
            counts["embedded"] += len(batch)
            bar.update(len(batch))
            batch = []
    if batch:
        collector.add(_embed(embedder, batch), [p.item.record for p in batch])
        counts["embedded"] += len(batch)
        bar.update(len(batch))
    if vectors:
        collector.add(np.stack([p.vector for p in vectors]), [p.item.record for p in vectors])
    bar.close()

    seconds = time.perf_counter() - started
    report = {
        "sources": sources,
        "read": counts["read"],
        "embedded": counts["embedded"],
        "precomputed": counts["precomputed"],
        "skipped": len(skips),
        "skipped_by_reason": dict(Counter(skip["reason"].split(":")[0] for skip in skips)),
        "converted_modes": dict(converted),
        "deduplicated": collector.collapsed,
        "dedupe": dedupe,
        "entries": len(collector.records),
        "threshold": threshold,
        "seconds": round(seconds, 3),
        "images_per_second": round(counts["embedded"] / seconds, 2) if seconds > 0 else None,
        "skips": skips,
    }
    if not collector.records:
        raise BuildError(
            f"no valid images in {sources}: all {len(skips)} items were skipped "
            f"({', '.join(f'{n} {reason}' for reason, n in report['skipped_by_reason'].items()) or 'none found'})",
            report,
        )
    blocklist = Blocklist(np.concatenate(collector.vectors), collector.records, spec=spec, threshold=threshold)
    blocklist.build_report = report
    return blocklist


def merge_blocklists(
    blocklists: Sequence[Blocklist], threshold: float | None = None, dedupe: float | None = None
) -> Blocklist:
    """One blocklist holding the entries of several, which must share one embedder spec.

    Args:
        threshold: the merged threshold (defaults to the first blocklist's).
        dedupe: as in `build_blocklist`, across all inputs (earlier inputs keep their records).

    Raises:
        EmbedderMismatchError: the specs differ.
        BlocklistError: two inputs use the same entry id.
    """
    from .embedders import spec_differences
    from .errors import BlocklistError, EmbedderMismatchError

    if not blocklists:
        raise UsageError("blocklists is empty; pass at least one")
    first = blocklists[0]
    for position, other in enumerate(blocklists[1:], start=2):
        differences = spec_differences(first.spec, other.spec)
        if differences:
            raise EmbedderMismatchError(
                f"blocklist {position} was built with another embedder ({'; '.join(differences)}); only blocklists "
                "with equal specs can be merged. Rebuild one with the other's model and weights"
            )
    seen: set[str] = set()
    collector = _Collector(dedupe, first.dim)
    for blocklist in blocklists:
        clashes = seen.intersection(entry["id"] for entry in blocklist.entries)
        if clashes:
            raise BlocklistError(f"entry ids {sorted(clashes)[:5]} appear in more than one blocklist; ids must be unique")
        seen.update(entry["id"] for entry in blocklist.entries)
        if len(blocklist):
            collector.add(blocklist.embeddings, [dict(entry) for entry in blocklist.entries])
    vectors = np.concatenate(collector.vectors) if collector.vectors else np.zeros((0, first.dim), np.float32)
    return Blocklist(vectors, collector.records, spec=first.spec,
                     threshold=first.threshold if threshold is None else threshold)


def _all_items(sources: list[str]) -> Iterator[Item]:
    seen: Counter = Counter()
    for source in sources:
        for item in iter_items(source):
            identifier = item.record["id"]
            seen[identifier] += 1
            if seen[identifier] > 1:  # ids must be unique across sources
                item.record["id"] = f"{identifier}#{seen[identifier]}"
            yield item


def _in_order(function, items: Iterable[Item], workers: int, window: int) -> Iterator[_Prepared]:
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


class _Preparer:
    """Runs in worker threads: fetch/read bytes, hash them, decode, and apply the embedder's transform."""

    def __init__(self, embedder: Embedder | None, dim: int, download: bool, timeout: float, retries: int) -> None:
        self.transform = getattr(embedder, "transform", None) if hasattr(embedder, "encode") else None
        self.dim, self.download, self.timeout, self.retries = dim, download, timeout, retries

    def __call__(self, item: Item) -> _Prepared:
        if item.vector is not None:
            return self._vector(item)
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
                return _Prepared(item, skip=f"download failed: {error}")
        if item.path is not None:
            try:
                with open(item.path, "rb") as handle:
                    item.data = handle.read()
            except OSError as error:
                return _Prepared(item, skip=f"unreadable path: {error.strerror or error}")
        if item.data is None:
            return _Prepared(item, skip="no image: the record has no path, URL or image data")
        item.record["sha256"] = hashlib.sha256(item.data).hexdigest()
        try:
            image = load_image(io.BytesIO(item.data), name=item.record["id"])
        except ImageDecodeError as error:
            reason = "decompression bomb" if "decompression bomb" in str(error) else "cannot decode"
            return _Prepared(item, skip=f"{reason}: {error}")
        finally:
            item.data = None  # keep memory flat: the bytes are not needed any more
        pixels = self.transform(image) if self.transform is not None else image
        return _Prepared(item, pixels=pixels, mode=image.info.get("source_mode", "RGB"))

    def _vector(self, item: Item) -> _Prepared:
        vector = item.vector
        if vector.shape != (self.dim,):
            return _Prepared(item, skip=f"bad vector: shape {vector.shape}, expected ({self.dim},)")
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(vector).all() or abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            return _Prepared(item, skip=f"bad vector: not finite and unit-norm (norm {norm:.4f})")
        return _Prepared(item, vector=(vector / norm).astype(np.float32))


def _embed(embedder: Any, batch: list[_Prepared]) -> np.ndarray:
    inputs = [p.pixels for p in batch]
    if hasattr(embedder, "encode") and getattr(embedder, "transform", None) is not None:
        import torch

        return embedder.encode(torch.stack(inputs))
    return embedder.embed(inputs)


class _Collector:
    """Keeps vectors and records in input order; with `dedupe`, folds near-duplicates into the first kept entry."""

    def __init__(self, dedupe: float | None, dim: int) -> None:
        self.dedupe = dedupe
        self.vectors: list[np.ndarray] = []
        self.records: list[dict] = []
        self.collapsed = 0
        self._index = None
        if dedupe is not None:
            import faiss

            self._index = faiss.IndexFlatIP(dim)

    def add(self, vectors: np.ndarray, records: list[dict]) -> None:
        if self._index is None:
            self.vectors.append(vectors)
            self.records.extend(records)
            return
        scores, ids = self._index.search(vectors, 1) if self._index.ntotal else (None, None)
        batch_kept: list[int] = []  # rows of this batch that became entries
        for row, record in enumerate(records):
            target = int(ids[row, 0]) if scores is not None and scores[row, 0] >= self.dedupe else -1
            if target < 0 and batch_kept:
                within = vectors[batch_kept] @ vectors[row]
                best = int(np.argmax(within))
                if within[best] >= self.dedupe:
                    target = len(self.records) - len(batch_kept) + best
            if target >= 0:
                self.records[target]["duplicates"] = self.records[target].get("duplicates", 1) + record.get(
                    "duplicates", 1
                )
                self.collapsed += 1
                continue
            self.records.append(record)
            batch_kept.append(row)
        if batch_kept:
            kept = np.ascontiguousarray(vectors[batch_kept], dtype=np.float32)
            self.vectors.append(kept)
            self._index.add(kept)


def _progress_bar(enabled: bool):
    if enabled:
        from tqdm import tqdm

        return tqdm(unit="img", desc="embedding", file=sys.stderr, dynamic_ncols=True)

    class _Silent:
        def update(self, n: int) -> None: ...

        def close(self) -> None: ...

    return _Silent()
