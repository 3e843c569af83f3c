"""The blocklist: vectors of images that must not be reproduced, their records, and how they were embedded.

On disk it is one safetensors file (never pickle): tensors `embeddings` `(N, dim)` and `entries` (UTF-8 JSON Lines
as uint8), with string metadata that includes a sha256 over every tensor and every other metadata value, so a
changed threshold or spec is caught as tampering. Writes are atomic: a temp file in the same folder, then rename.

`Blocklist.load` keeps a large list out of RAM: the vectors stay in the file behind a copy-on-write memory map (float16
or float32, as stored), and an entry's JSON record is parsed only when something asks for that row (a `Verdict`
does). Verification streams the file in chunks, so checking a 100M-entry file needs a few MiB, not its size.
"""

from __future__ import annotations

import array
import dataclasses
import datetime as _dt
import hashlib
import json
import mmap
import operator
import os
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embedders import Embedder, file_sha256
from .embedding_sets import (
    DESCRIPTOR, EXTRA_TENSORS, EmbeddingSet, check_embedding_set, check_extra_layout, check_tile_shape, check_tiles,
    extra_metadata, extra_tensors,
)
from .errors import BlocklistError, UsageError
from .images import ImageInput, to_pil_images
from .scores import UNIT_NORM_TOLERANCE, check_threshold, check_unit_vectors

FORMAT = "guardrail.blocklist"
FORMAT_VERSION = "1"
DEFAULT_THRESHOLD = 0.95
"""Cosine at or above which an image is a match. Suits real CLIP weights; calibrate for your embedder."""

_STORED_DTYPES = frozenset({"F16", "F32", "U8"})  # safetensors names of float16, float32, uint8
_REQUIRED_METADATA = ("format", "format_version", "spec", "threshold", "count", "created", "content_sha256")
_NUMPY_DTYPES = {"F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "U8": np.dtype(np.uint8)}
_STREAM_BYTES = 16 << 20
"""Bytes read at a time when a file is verified or its records indexed: memory stays flat whatever the file size."""
INDEX_PARAMS = ("nprobe", "candidates", "ef_search")
"""Search parameters a stored index may carry (`index_params` metadata), used unless the caller overrides them."""


def _utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Blocklist:
    """Embeddings of images that must not be generated, one record per entry, and the embedder spec.

    Args:
        embeddings (`np.ndarray`):
            `(N, dim)` float vectors with unit L2 norm (float16 or float32; kept as float32 in memory). A loaded
            blocklist instead holds a copy-on-write memory map of the file's tensor, in its stored dtype.
        entries (`Sequence[dict]`, *optional*):
            One record per row, each with at least a unique `id`. Defaults to ids `"0"`, `"1"`, ... A loaded
            blocklist holds a lazy sequence that parses a record when it is read (a fresh dict each time).
        spec (`dict`):
            The spec of the embedder that made the vectors (`Embedder.spec`); its `dim` must match.
        threshold (`float`, *optional*, defaults to 0.95):
            Cosine similarity at or above which a generated image is a match.
        created (`str`, *optional*): ISO creation time (defaults to now).
        faiss_index (`np.ndarray`, *optional*), index_kind (`str`, *optional*):
            A serialized trained index of these vectors and its kind (see `attach_index`); stored in the file.
        index_params (`dict`, *optional*):
            The stored index's search parameters (`nprobe`, `candidates`, `ef_search`), used when it is loaded.
        descriptor (`EmbeddingSet`, *optional*):
            A second embedding of the same entries by a copy-detection descriptor (SSCD), with its own spec and
            threshold: `Guard` then lets the main vectors propose and the descriptor decide (see
            `guardrail.embedding_sets`).
        tiles (`np.ndarray`, *optional*), tile_threshold (`float`, *optional*):
            `(N, len(TILE_GRID), dim)` vectors of each entry's tiles by the main embedder, and the cosine at which a
            tile pair matches.
        recall_threshold (`float`, *optional*):
            With a descriptor: the main-vector cosine at or above which an entry is proposed to the descriptor.
            Defaults to the main threshold.

    `build_blocklist` also sets `build_report`, the build's counts and skips (not stored in the file).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        entries: Sequence[dict] | None = None,
        spec: dict | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        created: str | None = None,
        faiss_index: np.ndarray | None = None,
        index_kind: str | None = None,
        index_params: dict | None = None,
        *,
        descriptor: EmbeddingSet | None = None,
        tiles: np.ndarray | None = None,
        tile_threshold: float | None = None,
        recall_threshold: float | None = None,
    ) -> None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
            raise BlocklistError(f"embeddings must be a 2-D float array (N, dim), got {embeddings.dtype} {embeddings.shape}")
        if not isinstance(spec, dict) or "dim" not in spec:
            raise BlocklistError("spec must be the embedder's spec dict (with 'dim'); pass embedder.spec")
        if embeddings.shape[1] != spec["dim"]:
            raise BlocklistError(f"embeddings have dim {embeddings.shape[1]} but the spec says dim {spec['dim']}")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        check_unit_vectors(self.embeddings)
        if entries is None:
            entries = [{"id": str(i)} for i in range(len(embeddings))]
        if len(entries) != len(embeddings):
            raise BlocklistError(f"{len(entries)} entries for {len(embeddings)} embeddings; there must be one each")
        self.entries = [_entry_with_defaults(entry, i) for i, entry in enumerate(entries)]
        ids = [entry["id"] for entry in self.entries]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i, count in Counter(ids).items() if count > 1)
            raise BlocklistError(f"entry ids must be unique; {duplicate!r} appears more than once")
        self.spec = dict(spec)
        self.threshold = check_threshold(threshold)
        self.created = created or _utc_now_iso()
        if (faiss_index is None) != (index_kind is None):
            raise BlocklistError("faiss_index and index_kind come together: pass both or neither")
        self.faiss_index = None if faiss_index is None else np.ascontiguousarray(faiss_index, dtype=np.uint8)
        self.index_kind = index_kind
        self.index_params = _checked_index_params(index_params)
        self.tiles = None if tiles is None else np.ascontiguousarray(tiles, dtype=np.float32)
        self.tile_threshold = None if tile_threshold is None else check_threshold(tile_threshold)
        if self.tiles is not None:
            check_tiles("tiles", self.tiles, len(self), self.dim)
        if descriptor is not None:
            descriptor = EmbeddingSet(
                np.ascontiguousarray(descriptor.embeddings, dtype=np.float32), dict(descriptor.spec),
                check_threshold(descriptor.threshold),
                None if descriptor.tiles is None else np.ascontiguousarray(descriptor.tiles, dtype=np.float32),
                descriptor.tile_threshold,
            )
            check_embedding_set(DESCRIPTOR, descriptor, len(self))
        elif recall_threshold is not None:
            raise BlocklistError("recall_threshold needs a descriptor set: it is where the descriptor takes over")
        self.descriptor = descriptor
        self.recall_threshold = None if recall_threshold is None else check_threshold(recall_threshold)
        self.build_report: dict | None = None
        self.path: Path | None = None  # the file a loaded blocklist maps

    @classmethod
    def _mapped(cls, embeddings: np.ndarray, entries: "LazyEntries", spec: dict, threshold: float, created: str,
                faiss_index: np.ndarray | None, index_kind: str | None, index_params: dict | None,
                path: Path, extras: dict) -> "Blocklist":
        """A loaded blocklist over the file's memory maps, already checked by `load` (no copy, no parsing)."""
        blocklist = cls.__new__(cls)
        blocklist.embeddings, blocklist.entries, blocklist.spec = embeddings, entries, spec
        blocklist.threshold, blocklist.created = threshold, created
        blocklist.faiss_index, blocklist.index_kind = faiss_index, index_kind
        blocklist.index_params = index_params
        blocklist.tiles, blocklist.tile_threshold = extras["tiles"], extras.get("tile_threshold")
        blocklist.descriptor, blocklist.recall_threshold = extras["descriptor"], extras.get("recall_threshold")
        blocklist.build_report, blocklist.path = None, path
        return blocklist

    def embedding_set(self, name: str = "main") -> EmbeddingSet:
        """The `"main"` set (this blocklist's own vectors, spec, threshold and tiles) or the `"descriptor"` set."""
        if name == DESCRIPTOR:
            if self.descriptor is None:
                raise UsageError("this blocklist has no descriptor set; build one with a descriptor embedder")
            return self.descriptor
        if name != "main":
            raise UsageError(f"name must be 'main' or {DESCRIPTOR!r}, got {name!r}")
        return EmbeddingSet(self.embeddings, self.spec, self.threshold, self.tiles, self.tile_threshold)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def dim(self) -> int:
        return int(self.spec["dim"])

    def __repr__(self) -> str:
        return f"Blocklist({len(self)} entries, model={self.spec.get('model')!r}, threshold={self.threshold})"

    @classmethod
    def from_images(
        cls,
        images: ImageInput | Sequence[ImageInput],
        embedder: Embedder,
        entries: Sequence[dict] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> "Blocklist":
        """Embed `images` in process and make a blocklist of them.

        Records get `sha256` of the file (for paths) or of the decoded RGB pixels, unless `entries` gives one.
        """
        pils = to_pil_images(images)
        if entries is not None and len(entries) != len(pils):
            raise UsageError(f"entries has {len(entries)} records for {len(pils)} images; pass one per image")
        originals = images if isinstance(images, (list, tuple)) else [images] * len(pils)
        hashes = [
            file_sha256(item) if isinstance(item, (str, os.PathLike)) else hashlib.sha256(pil.tobytes()).hexdigest()
            for item, pil in zip(originals, pils)
        ]
        vectors = embedder.embed(pils)
        if entries is None:
            entries = [{"id": str(i)} for i in range(len(vectors))]
        records = [{"sha256": digest, **entry} for entry, digest in zip(entries, hashes)]
        return cls(vectors, records, spec=embedder.spec, threshold=threshold)

    def attach_index(self, index: "BlocklistIndex") -> "Blocklist":  # noqa: F821
        """Store `index` (a `BlocklistIndex` of these vectors) in this blocklist, so loading it needs no training."""
        if len(index) != len(self) or index.dim != self.dim:
            raise UsageError(f"the index holds {len(index)} vectors of dim {index.dim}; this blocklist {len(self)} of {self.dim}")
        self.faiss_index, self.index_kind = index.serialize(), index.kind
        self.index_params = dict(index.search_params)
        return self

    def rows_of(self, entry_ids: Sequence[str]) -> dict[str, int]:
        """The row of each of `entry_ids` that exists (unknown ids are left out).

        A loaded list finds them through a hash table of its ids, built on the first call (one pass over the
        records, 16 bytes an entry); a list made in process through a dict, built on the first call too."""
        if isinstance(self.entries, LazyEntries):
            return self.entries.rows_of(entry_ids)
        rows = self.__dict__.get("_row_of_id")
        if rows is None or len(rows) != len(self.entries):
            rows = {entry["id"]: row for row, entry in enumerate(self.entries)}
            self.__dict__["_row_of_id"] = rows
        return {entry_id: rows[entry_id] for entry_id in entry_ids if entry_id in rows}

    def with_threshold(self, threshold: float) -> "Blocklist":
        """A copy with another threshold (the vectors and records are shared, not copied)."""
        return self.with_thresholds(threshold=threshold)

    def with_thresholds(
        self,
        *,
        threshold: float | None = None,
        tile_threshold: float | None = None,
        recall_threshold: float | None = None,
        descriptor_threshold: float | None = None,
        descriptor_tile_threshold: float | None = None,
    ) -> "Blocklist":
        """A copy with the given thresholds changed (None keeps one); vectors and records are shared, not copied.

        `recall_threshold` and the descriptor's thresholds need a descriptor set, the tile thresholds its tiles."""
        copy = Blocklist.__new__(Blocklist)
        copy.__dict__.update(self.__dict__)
        if threshold is not None:
            copy.threshold = check_threshold(threshold)
        if tile_threshold is not None:
            copy.tile_threshold = check_threshold(tile_threshold)
        descriptor_values = {"threshold": descriptor_threshold, "tile_threshold": descriptor_tile_threshold}
        if recall_threshold is not None or any(value is not None for value in descriptor_values.values()):
            if self.descriptor is None:
                raise UsageError("recall and descriptor thresholds need a descriptor set; this blocklist has none")
            if recall_threshold is not None:
                copy.recall_threshold = check_threshold(recall_threshold)
            copy.descriptor = dataclasses.replace(self.descriptor, **{
                key: check_threshold(value) for key, value in descriptor_values.items() if value is not None})
        return copy

    def release_pages(self) -> None:
        """Drop this process's resident pages of the file's memory maps (the kernel keeps them cached): called after
        a full pass over a map (reading the stored index) so resident memory shows what the process needs. The
        maps are copy-on-write: anything this process wrote into a loaded list's arrays is discarded too."""
        extras = (self.tiles, *((self.descriptor.embeddings, self.descriptor.tiles) if self.descriptor else ()))
        for mapped in (self.embeddings, self.faiss_index, getattr(self.entries, "data", None), *extras):
            _release_pages(mapped)

    # ---- disk format -------------------------------------------------------------------------------------------

    def _tensors_and_metadata(self, dtype: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        if dtype not in ("float16", "float32"):
            raise UsageError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        lines = "".join(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n" for entry in self.entries)
        tensors = {
            "embeddings": self.embeddings.astype(dtype),
            "entries": np.frombuffer(lines.encode("utf-8"), dtype=np.uint8).copy(),
        }
        if self.faiss_index is not None:
            tensors["index"] = self.faiss_index
        tensors.update(extra_tensors(self.embedding_set(), self.descriptor, dtype))
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": json.dumps(self.spec, sort_keys=True),
            "threshold": repr(float(self.threshold)),
            "count": str(len(self)),
            "created": self.created,
        }
        if self.index_kind is not None:
            metadata["index_kind"] = self.index_kind
            if self.index_params:
                metadata["index_params"] = json.dumps(self.index_params, sort_keys=True)
        metadata.update(extra_metadata(self.embedding_set(), self.descriptor, self.recall_threshold))
        metadata["content_sha256"] = content_sha256(tensors, metadata)
        return tensors, metadata

    def save(self, path: str | os.PathLike, dtype: str = "float32") -> Path:
        """Write the blocklist atomically to one `.safetensors` file; returns the path.

        Args:
            path: destination; its folder must exist. An existing file is replaced only once the new one is
                complete.
            dtype: `"float32"` (default) or `"float16"` (half the size; cosines change by about 1e-3).
        """
        from safetensors.numpy import save_file

        tensors, metadata = self._tensors_and_metadata(dtype)
        path = Path(path)
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> "Blocklist":
        """Map a blocklist file and check it; the vectors and records stay in the file.

        The vectors are a copy-on-write memory map in the stored dtype and each record is parsed when it is read, so a
        loaded list holds about 8 bytes an entry (its record offsets) whatever its size; the kernel's page cache
        holds what searches touch.

        Args:
            path: the `.safetensors` file. Replace it only by renaming a new file over it (as `save` does): the
                maps keep the old file's pages, whereas a file truncated in place under a live map faults.
            verify (`bool`, *optional*, defaults to `True`):
                Stream the whole file once, 16 MiB at a time, to check the checksum, that every vector is finite
                and unit-norm, and that every record is a JSON object with a unique id. Pass `False` only in a
                process that reloads a file already checked (a serving replica after `guardrail info`, a reload
                after a swap): the structure is still checked (format and version, the header, tensor sizes
                against the file size, so a truncated file is refused, counts, dims, and a stored index in its
                sandbox), but changed bytes, bad vectors and broken records are not; a broken record then raises
                `BlocklistError` when it is read.

        Raises `BlocklistError` naming the problem: not a safetensors file, not a guardrail blocklist, an unknown
        format version, a checksum mismatch (tampering or corruption), count or dim mismatches, vectors that
        are not finite and unit-norm, or records that are not JSON objects with unique ids.
        """
        path = Path(path)
        where = os.fspath(path)
        layout = _read_layout(path)
        _check_format(where, layout.metadata)
        _check_tensor_layout(where, layout.tensors, layout.metadata)
        scan = _scanned(path, layout, verify)
        if verify:
            _check_checksum(where, scan.checksum, layout.metadata)
        spec, threshold, count, index_params = _parsed_metadata(where, layout.metadata)
        if scan.entry_problem is not None:
            raise BlocklistError(f"{where}: {scan.entry_problem}")
        embeddings_region = layout.tensors["embeddings"]
        _check_counts(where, count, embeddings_region.shape, len(scan.bounds) - 1, spec)
        for problem in (scan.vector_problem, scan.duplicate_problem()):
            if problem is not None:
                raise BlocklistError(f"{where}: {problem}")
        entries = LazyEntries(_mapped_array(path, layout.tensors["entries"]), scan.bounds, where)
        index_region = layout.tensors.get("index")
        return cls._mapped(
            _mapped_array(path, embeddings_region, random_access=True), entries, spec, threshold,
            layout.metadata["created"],
            None if index_region is None else _mapped_array(path, index_region), layout.metadata.get("index_kind"),
            index_params, path, _mapped_extras(path, layout, count, spec),
        )


def _check_format(where: str, metadata: dict[str, str]) -> None:
    """Ours, a version this code reads, and every required metadata key present."""
    if metadata.get("format") != FORMAT:
        raise BlocklistError(f"{where} is not a guardrail blocklist (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BlocklistError(
            f"{where} has format_version {metadata.get('format_version')!r}; this guardrail reads version "
            f"{FORMAT_VERSION}. Upgrade guardrail or rebuild the blocklist"
        )
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise BlocklistError(f"{where} lacks metadata {missing}")


def _check_tensor_layout(where: str, tensors: dict[str, "_Region"], metadata: dict[str, str]) -> None:
    """The expected tensor names, dtypes and ranks; an `index` tensor only with its `index_kind`."""
    if not {"embeddings", "entries"} <= set(tensors) <= {"embeddings", "entries", "index", *EXTRA_TENSORS}:
        raise BlocklistError(
            f"{where} must hold tensors 'embeddings' and 'entries' (and optionally 'index' and "
            f"{', '.join(map(repr, EXTRA_TENSORS))}), found {sorted(tensors)}"
        )
    for name in EXTRA_TENSORS:
        region = tensors.get(name)
        rank = 3 if name.startswith("tiles") else 2
        if region is not None and (region.dtype not in (np.float16, np.float32) or region.ndim != rank):
            raise BlocklistError(f"{where}: {name} must be a {rank}-D float16/float32 tensor, got {region.dtype} "
                                 f"{region.shape}")
    stored_index = tensors.get("index")
    if stored_index is not None and (stored_index.dtype != np.uint8 or stored_index.ndim != 1):
        raise BlocklistError(f"{where}: index must be a 1-D uint8 tensor, got {stored_index.dtype} {stored_index.shape}")
    if (stored_index is None) != ("index_kind" not in metadata):
        raise BlocklistError(f"{where}: the 'index' tensor and the 'index_kind' metadata come together")
    if "index_params" in metadata and stored_index is None:
        raise BlocklistError(f"{where}: 'index_params' metadata without a stored 'index' tensor")
    embeddings, entries_bytes = tensors["embeddings"], tensors["entries"]
    if embeddings.dtype not in (np.float16, np.float32) or embeddings.ndim != 2:
        raise BlocklistError(f"{where}: embeddings must be float16/float32 (N, dim), got {embeddings.dtype} {embeddings.shape}")
    if entries_bytes.dtype != np.uint8 or entries_bytes.ndim != 1:
        raise BlocklistError(f"{where}: entries must be a 1-D uint8 tensor, got {entries_bytes.dtype} {entries_bytes.shape}")


def _check_checksum(where: str, computed: str, metadata: dict[str, str]) -> None:
    if metadata["content_sha256"] != computed:
        raise BlocklistError(
            f"{where} failed its checksum (stored {metadata['content_sha256'][:12]}…, computed {computed[:12]}…): "
            "the file was modified or corrupted. Rebuild it or restore a good copy"
        )


def _parsed_metadata(where: str, metadata: dict[str, str]) -> tuple[dict, float, int, dict | None]:
    """(spec, threshold, count, index_params) from their JSON and string forms, or a `BlocklistError`."""
    try:
        spec = json.loads(metadata["spec"])
        threshold = float(metadata["threshold"])
        count = int(metadata["count"])
        index_params = json.loads(metadata["index_params"]) if "index_params" in metadata else None
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly nested JSON
        raise BlocklistError(f"{where} has unreadable metadata or entries: {error}") from error
    if not isinstance(spec, dict):
        raise BlocklistError(f"{where}: spec and every entry must be JSON objects")
    try:
        return spec, check_threshold(threshold), count, _checked_index_params(index_params)
    except (BlocklistError, UsageError) as error:
        raise BlocklistError(f"{where}: {error}") from error


def _check_counts(where: str, count: int, embeddings_shape: tuple, entry_count: int, spec: dict) -> None:
    if count != embeddings_shape[0] or count != entry_count:
        raise BlocklistError(
            f"{where}: count says {count} but there are {embeddings_shape[0]} embeddings and {entry_count} entries"
        )
    if spec.get("dim") != embeddings_shape[1]:
        raise BlocklistError(f"{where}: spec dim {spec.get('dim')} != embeddings dim {embeddings_shape[1]}")


def _checked_index_params(params: Any) -> dict | None:
    """Stored search parameters: None, or a dict of positive ints under known names (else a `BlocklistError`)."""
    if params is None:
        return None
    if not isinstance(params, dict) or not set(params) <= set(INDEX_PARAMS) or not all(
        type(value) is int and 1 <= value <= 1 << 20 for value in params.values()
    ):
        raise BlocklistError(f"index_params must map {INDEX_PARAMS} to positive integers, got {params!r:.200}")
    return dict(params)


class LazyEntries(Sequence):
    """A loaded blocklist's records: the JSON Lines tensor, mapped from the file, parsed one row at a time.

    `bounds[i]` is where row i starts and `bounds[i + 1] - 1` where it ends (its newline), so reading a record
    touches only its own bytes. Each read returns a fresh dict, with the defaults `Blocklist` gives every record.
    """

    def __init__(self, data: np.ndarray, bounds: np.ndarray, where: str) -> None:
        self.data, self.bounds, self.where = data, bounds, where
        self._id_table: tuple[np.ndarray, np.ndarray] | None = None
        self._id_table_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = operator.index(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"entry {row} out of range for {len(self)} entries")
        line = self.data[int(self.bounds[row]) : int(self.bounds[row + 1]) - 1].tobytes()
        try:
            return _entry_with_defaults(json.loads(line.decode("utf-8")), row)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise BlocklistError(
                f"{self.where}: entry {row} is unreadable ({error}); the file is damaged. It was loaded with "
                "verify=False: load it with verify=True to check every record"
            ) from error

    def __iter__(self):
        return (self[row] for row in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LazyEntries({len(self)} records in {self.where})"

    def rows_of(self, entry_ids: Sequence[str]) -> dict[str, int]:
        """The row of each known id, through a table of 64-bit id hashes built on the first call."""
        with self._id_table_lock:
            if self._id_table is None:
                hashes = np.fromiter((_id_hash(entry["id"]) for entry in self), np.uint64, len(self))
                order = np.argsort(hashes, kind="stable")
                self._id_table = (hashes[order], order)
        hashes, order = self._id_table
        rows = {}
        for entry_id in entry_ids:
            wanted = np.uint64(_id_hash(entry_id))
            start, stop = np.searchsorted(hashes, wanted, "left"), np.searchsorted(hashes, wanted, "right")
            for row in order[start:stop]:  # a 64-bit collision is possible, so compare the real ids
                if self[int(row)]["id"] == entry_id:
                    rows[entry_id] = int(row)
                    break
        return rows


def _id_hash(entry_id: str) -> int:
    digest = hashlib.blake2b(str(entry_id).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class _Region:
    """Where one tensor lies in the file (absolute byte offsets), and its dtype and shape."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class _Layout:
    metadata: dict[str, str]
    tensors: dict[str, _Region]


def _read_layout(path: Path) -> _Layout:
    """The metadata and where each tensor lies, without reading any tensor.

    safetensors validates the header first (its size cap, offsets that tile the data section, a file size that
    matches, so a truncated file is refused here); only then is the same header read again for the offsets.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BlocklistError(f"blocklist file {os.fspath(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:  # don't look further into files that are not ours
                return _Layout(metadata, {})
            dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
        for name, dtype in dtypes.items():  # numpy lacks some safetensors dtypes (F8_*)
            if dtype not in _STORED_DTYPES:
                raise BlocklistError(
                    f"{os.fspath(path)!r}: tensor {name!r} has dtype {dtype}; a blocklist holds float16/float32 "
                    "embeddings and uint8 entries"
                )
        with open(path, "rb") as raw:
            (header_size,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(header_size))
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError, struct.error) as error:
        raise BlocklistError(f"{os.fspath(path)!r} is not a readable safetensors file: {error}") from error
    data_start = 8 + header_size
    tensors = {}
    for name, dtype in dtypes.items():
        begin, end = (data_start + int(offset) for offset in header[name]["data_offsets"])
        tensors[name] = _Region(_NUMPY_DTYPES[dtype], tuple(int(n) for n in header[name]["shape"]), begin, end)
    return _Layout(metadata, tensors)


@dataclass
class _Scan:
    """What one streaming pass over a file found (verification fields stay empty when it was not asked for)."""

    bounds: np.ndarray
    checksum: str | None = None
    vector_problem: str | None = None
    entry_problem: str | None = None
    id_hashes: np.ndarray | None = None
    entries: LazyEntries | None = None

    def duplicate_problem(self) -> str | None:
        """A message naming an id that appears twice, or None (hash clashes are checked on the real ids)."""
        if self.id_hashes is None or len(self.id_hashes) < 2:
            return None
        order = np.argsort(self.id_hashes, kind="stable")
        ordered = self.id_hashes[order]
        clashes = np.flatnonzero(ordered[1:] == ordered[:-1])
        for position in clashes:
            first, second = self.entries[int(order[position])], self.entries[int(order[position + 1])]
            if first["id"] == second["id"]:
                return f"entry ids must be unique; {first['id']!r} appears more than once"
        return None


def _scanned(path: Path, layout: _Layout, verify: bool) -> _Scan:
    """One pass over the file, `_STREAM_BYTES` at a time: the record offsets always; with `verify`, also the
    checksum (the same digest as `content_sha256`), the first bad vector and the first bad or duplicate record."""
    digest = hashlib.sha256()
    newlines: list[np.ndarray] = []
    entry_lines = _EntryLines() if verify else None
    vector_checks = {name: _VectorCheck(layout.tensors[name]) for name in ("embeddings", *EXTRA_TENSORS)
                     if verify and name in layout.tensors}
    buffer = bytearray(_STREAM_BYTES)
    with open(path, "rb") as handle:
        for name in sorted(layout.tensors):
            region = layout.tensors[name]
            if not verify and name != "entries":
                continue
            digest.update(json.dumps([name, str(region.dtype), list(region.shape)]).encode())
            block_bytes = len(buffer)
            vectors = vector_checks.get(name)
            if vectors is not None and vectors.row_bytes:
                block_bytes = max(1, len(buffer) // vectors.row_bytes) * vectors.row_bytes
            position = region.start
            handle.seek(position)
            while position < region.end:
                view = memoryview(buffer)[: min(block_bytes, region.end - position)]
                got = handle.readinto(view)
                if not got:
                    raise BlocklistError(f"{os.fspath(path)!r} is not a readable safetensors file: it ends early")
                block = view[:got]
                if verify:
                    digest.update(block)
                if name == "entries":
                    found = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
                    newlines.append(found + (position - region.start))
                    if entry_lines is not None:
                        entry_lines.feed(bytes(block))
                elif vectors is not None:
                    vectors.feed(block)
                position += got
    entries_region = layout.tensors["entries"]
    size = entries_region.end - entries_region.start
    bounds = np.concatenate([np.zeros(1, np.int64), *(n.astype(np.int64) + 1 for n in newlines)])
    if size and bounds[-1] != size:  # a last record without a newline ends at the end of the tensor
        bounds = np.append(bounds, size + 1)
    scan = _Scan(bounds)
    if verify:
        signed = {key: value for key, value in layout.metadata.items() if key != "content_sha256"}
        digest.update(json.dumps(signed, sort_keys=True).encode())
        scan.checksum = digest.hexdigest()
        entry_lines.finish()
        problems = [(name, check.problem) for name, check in vector_checks.items() if check.problem is not None]
        if problems:
            name, problem = problems[0]
            scan.vector_problem = problem if name == "embeddings" else f"{name}: {problem}"
        scan.entry_problem = entry_lines.problem
        scan.id_hashes = np.asarray(entry_lines.id_hashes, dtype=np.uint64)
        scan.entries = LazyEntries(_mapped_array(path, entries_region), bounds, os.fspath(path))
    return scan


class _EntryLines:
    """Parses JSON Lines fed in arbitrary blocks; keeps the first problem and a 64-bit hash of every id."""

    def __init__(self) -> None:
        self.pending = b""
        self.row = 0
        self.problem: str | None = None
        self.id_hashes: array.array = array.array("Q")

    def feed(self, block: bytes) -> None:
        lines = (self.pending + block).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self._line(line)

    def finish(self) -> None:
        if self.pending:
            self._line(self.pending)
        self.pending = b""

    def _line(self, line: bytes) -> None:
        row, self.row = self.row, self.row + 1
        if self.problem is not None:
            return
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                self.problem = "spec and every entry must be JSON objects"
            elif "id" not in record:
                self.problem = f"entry {row} must be a dict with an 'id', got {record!r:.80}"
            else:
                self.id_hashes.append(_id_hash(str(record["id"])))
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            self.problem = f"unreadable entries: {error}"


class _VectorCheck:
    """Checks embeddings fed in whole rows: the first non-finite or non-unit vector, by row."""

    def __init__(self, region: _Region) -> None:
        self.dtype, self.dim = region.dtype, region.shape[-1] if len(region.shape) >= 2 else 0
        self.row_bytes = self.dim * self.dtype.itemsize
        self.row = 0
        self.problem: str | None = None if self.dim or not region.shape or not region.shape[0] else (
            "embedding 0 has L2 norm 0.0000; every vector must be unit-norm")

    def feed(self, block: memoryview) -> None:
        rows = np.frombuffer(block, self.dtype).reshape(-1, self.dim).astype(np.float64)  # squares cannot overflow
        start, self.row = self.row, self.row + len(rows)
        if self.problem is not None:
            return
        if not np.isfinite(rows).all():
            self.problem = "embeddings contain NaN or infinite values"
            return
        norms = np.linalg.norm(rows, axis=1)
        worst = int(np.argmax(np.abs(norms - 1.0)))
        if abs(norms[worst] - 1.0) > UNIT_NORM_TOLERANCE:
            self.problem = f"embedding {start + worst} has L2 norm {norms[worst]:.4f}; every vector must be unit-norm"


def _mapped_array(path: Path, region: _Region, random_access: bool = False) -> np.ndarray:
    """A copy-on-write memory map of one tensor (an empty array for an empty one: mmap cannot map zero bytes).

    Copy-on-write ("c"), not read-only: the file is never written either way, but callers that hand the array to
    torch (`torch.as_tensor`) get a writable array, as an in-memory blocklist gives them. `random_access` tells the
    kernel not to read ahead (MADV_RANDOM): re-scoring reads a few scattered rows per query, and read-ahead would
    pull (and map) their neighbours too."""
    if region.end == region.start:
        return np.zeros(region.shape, region.dtype)
    mapped = np.memmap(path, dtype=region.dtype, mode="c", offset=region.start, shape=region.shape)
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        try:
            mapped._mmap.madvise(mmap.MADV_RANDOM)
        except (AttributeError, OSError, ValueError):  # not supported here: only read-ahead is lost
            pass
    return mapped


def _mapped_extras(path: Path, layout: _Layout, count: int, spec: dict) -> dict:
    """The descriptor set and tiles of a loaded file (memory maps), checked against the entry count and specs."""
    where = os.fspath(path)
    shapes = {name: region.shape for name, region in layout.tensors.items()}
    parsed = check_extra_layout(where, shapes, layout.metadata, count)

    def mapped(name: str) -> np.ndarray | None:
        region = layout.tensors.get(name)
        return None if region is None else _mapped_array(path, region, random_access=True)

    if "tiles" in shapes:
        check_tile_shape(where, "tiles", shapes["tiles"], count, spec["dim"])
    descriptor = None
    if parsed["descriptor_spec"] is not None:
        descriptor_spec = parsed["descriptor_spec"]
        if "tiles.descriptor" in shapes:
            check_tile_shape(where, "tiles.descriptor", shapes["tiles.descriptor"], count, descriptor_spec["dim"])
        descriptor = EmbeddingSet(mapped("embeddings.descriptor"), descriptor_spec, parsed["descriptor_threshold"],
                                  mapped("tiles.descriptor"), parsed.get("descriptor_tile_threshold"))
    return {**parsed, "tiles": mapped("tiles"), "descriptor": descriptor}


def _release_pages(array: Any) -> None:
    """Drop this process's resident pages of a memory map (MADV_DONTNEED); the data stays in the file and cache."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed or not madvise-able: nothing to release
            pass


def content_sha256(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every metadata value except the checksum itself."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        digest.update(array)  # the raw bytes, without a copy
    signed = {key: value for key, value in metadata.items() if key != "content_sha256"}
    digest.update(json.dumps(signed, sort_keys=True).encode())
    return digest.hexdigest()


class atomic_path:
    """Context manager yielding a temp path beside `path`; renamed onto `path` on success, deleted on failure.

    A crash, exception or Ctrl-C therefore never leaves a half-written file at `path`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        if not self.path.parent.is_dir():
            raise UsageError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(handle)
        self.temp = Path(name)
        return self.temp

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            with open(self.temp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(self.temp, 0o666 & ~_umask())  # mkstemp makes files 0600; give them the usual mode
            os.replace(self.temp, self.path)
        else:
            self.temp.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, racily, for other threads)."""
    try:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def _entry_with_defaults(entry: Any, row: int) -> dict:
    if not isinstance(entry, dict) or "id" not in entry:
        raise BlocklistError(f"entry {row} must be a dict with an 'id', got {entry!r:.80}")
    record = {"caption": None, "source": None, "sha256": None, "duplicates": 1, **entry}
    record["id"] = str(record["id"])
    return record
