"""The blocklist: vectors of images that must not be reproduced, their records, and how they were embedded.

On disk it is one safetensors file (never pickle): tensors `embeddings` `(N, dim)` and `entries` (UTF-8 JSON Lines
as uint8), with string metadata that includes a sha256 over every tensor and every other metadata value, so a
changed threshold or spec is caught as tampering. Writes are atomic: a temp file in the same folder, then rename.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .embedders import Embedder, file_sha256
from .errors import BlocklistError, UsageError
from .images import ImageInput, to_pil_images

FORMAT = "guardrail.blocklist"
FORMAT_VERSION = "1"
DEFAULT_THRESHOLD = 0.95
"""Cosine at or above which an image is a match. Suits real CLIP weights; calibrate for your embedder."""

UNIT_NORM_TOLERANCE = 1e-2  # float16 storage rounds norms to about 1e-3
_STORED_DTYPES = frozenset({"F16", "F32", "U8"})  # safetensors names of float16, float32, uint8
_REQUIRED_METADATA = ("format", "format_version", "spec", "threshold", "count", "created", "content_sha256")


def _utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Blocklist:
    """Embeddings of images that must not be generated, one record per entry, and the embedder spec.

    Args:
        embeddings (`np.ndarray`):
            `(N, dim)` float vectors with unit L2 norm (float16 or float32; kept as float32 in memory).
        entries (`list[dict]`, *optional*):
            One record per row, each with at least a unique `id`. Defaults to ids `"0"`, `"1"`, ...
        spec (`dict`):
            The spec of the embedder that made the vectors (`Embedder.spec`); its `dim` must match.
        threshold (`float`, *optional*, defaults to 0.95):
            Cosine similarity at or above which a generated image is a match.
        created (`str`, *optional*): ISO creation time (defaults to now).
        faiss_index (`np.ndarray`, *optional*), index_kind (`str`, *optional*):
            A serialized trained index of these vectors and its kind (see `attach_index`); stored in the file.

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
    ) -> None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
            raise BlocklistError(f"embeddings must be a 2-D float array (N, dim), got {embeddings.dtype} {embeddings.shape}")
        if not isinstance(spec, dict) or "dim" not in spec:
            raise BlocklistError("spec must be the embedder's spec dict (with 'dim'); pass embedder.spec")
        if embeddings.shape[1] != spec["dim"]:
            raise BlocklistError(f"embeddings have dim {embeddings.shape[1]} but the spec says dim {spec['dim']}")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        _check_unit_vectors(self.embeddings)
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
        self.build_report: dict | None = None

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
        return self

    def with_threshold(self, threshold: float) -> "Blocklist":
        """A copy with another threshold (the vectors and records are shared, not copied)."""
        copy = Blocklist.__new__(Blocklist)
        copy.__dict__.update(self.__dict__)
        copy.threshold = check_threshold(threshold)
        return copy

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
    def load(cls, path: str | os.PathLike) -> "Blocklist":
        """Read and verify a blocklist file.

        Raises `BlocklistError` naming the problem: not a safetensors file, not a guardrail blocklist, an unknown
        format version, a checksum mismatch (tampering or corruption), count or dim mismatches, or vectors that
        are not finite and unit-norm.
        """
        tensors, metadata = _read_safetensors(Path(path))
        where = os.fspath(path)
        _check_format(where, metadata)
        _check_tensor_layout(where, tensors, metadata)
        _check_checksum(where, tensors, metadata)
        spec, threshold, count, entries = _parsed_metadata_and_entries(where, metadata, tensors["entries"])
        _check_counts(where, count, tensors["embeddings"], entries, spec)
        try:
            return cls(tensors["embeddings"], entries, spec=spec, threshold=threshold, created=metadata["created"],
                       faiss_index=tensors.get("index"), index_kind=metadata.get("index_kind"))
        except (BlocklistError, UsageError) as error:
            raise BlocklistError(f"{where}: {error}") from error


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


def _check_tensor_layout(where: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The expected tensor names, dtypes and ranks; an `index` tensor only with its `index_kind`."""
    if not {"embeddings", "entries"} <= set(tensors) <= {"embeddings", "entries", "index"}:
        raise BlocklistError(
            f"{where} must hold tensors 'embeddings' and 'entries' (and optionally 'index'), found {sorted(tensors)}"
        )
    stored_index = tensors.get("index")
    if stored_index is not None and (stored_index.dtype != np.uint8 or stored_index.ndim != 1):
        raise BlocklistError(f"{where}: index must be a 1-D uint8 tensor, got {stored_index.dtype} {stored_index.shape}")
    if (stored_index is None) != ("index_kind" not in metadata):
        raise BlocklistError(f"{where}: the 'index' tensor and the 'index_kind' metadata come together")
    embeddings, entries_bytes = tensors["embeddings"], tensors["entries"]
    if embeddings.dtype not in (np.float16, np.float32) or embeddings.ndim != 2:
        raise BlocklistError(f"{where}: embeddings must be float16/float32 (N, dim), got {embeddings.dtype} {embeddings.shape}")
    if entries_bytes.dtype != np.uint8 or entries_bytes.ndim != 1:
        raise BlocklistError(f"{where}: entries must be a 1-D uint8 tensor, got {entries_bytes.dtype} {entries_bytes.shape}")


def _check_checksum(where: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    expected = content_sha256(tensors, metadata)
    if metadata["content_sha256"] != expected:
        raise BlocklistError(
            f"{where} failed its checksum (stored {metadata['content_sha256'][:12]}…, computed {expected[:12]}…): "
            "the file was modified or corrupted. Rebuild it or restore a good copy"
        )


def _parsed_metadata_and_entries(
    where: str, metadata: dict[str, str], entries_bytes: np.ndarray
) -> tuple[dict, float, int, list[dict]]:
    """(spec, threshold, count, entries) from their JSON and string forms, or a `BlocklistError`."""
    try:
        spec = json.loads(metadata["spec"])
        threshold = float(metadata["threshold"])
        count = int(metadata["count"])
        # Split on "\n" only: str.splitlines() also splits on U+2028, U+0085 etc., which json.dumps leaves
        # unescaped inside captions, so one record would become two broken lines.
        text = entries_bytes.tobytes().decode("utf-8")
        entries = [json.loads(line) for line in text.removesuffix("\n").split("\n")] if text else []
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: absurdly nested JSON
        raise BlocklistError(f"{where} has unreadable metadata or entries: {error}") from error
    if not isinstance(spec, dict) or not all(isinstance(entry, dict) for entry in entries):
        raise BlocklistError(f"{where}: spec and every entry must be JSON objects")
    return spec, threshold, count, entries


def _check_counts(where: str, count: int, embeddings: np.ndarray, entries: list[dict], spec: dict) -> None:
    if count != len(embeddings) or count != len(entries):
        raise BlocklistError(
            f"{where}: count says {count} but there are {len(embeddings)} embeddings and {len(entries)} entries"
        )
    if spec.get("dim") != embeddings.shape[1]:
        raise BlocklistError(f"{where}: spec dim {spec.get('dim')} != embeddings dim {embeddings.shape[1]}")


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


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BlocklistError(f"blocklist file {os.fspath(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:  # don't read tensors of files that are not ours
                return {}, metadata
            for name in handle.keys():  # safetensors' numpy reader crashes on dtypes numpy lacks (F8_*)
                dtype = handle.get_slice(name).get_dtype()
                if dtype not in _STORED_DTYPES:
                    raise BlocklistError(
                        f"{os.fspath(path)!r}: tensor {name!r} has dtype {dtype}; a blocklist holds float16/float32 "
                        "embeddings and uint8 entries"
                    )
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as error:
        raise BlocklistError(f"{os.fspath(path)!r} is not a readable safetensors file: {error}") from error


def _check_unit_vectors(embeddings: np.ndarray) -> None:
    if not np.isfinite(embeddings).all():
        raise BlocklistError("embeddings contain NaN or infinite values")
    if len(embeddings):
        norms = np.linalg.norm(embeddings, axis=1)
        worst = int(np.argmax(np.abs(norms - 1.0)))
        if abs(norms[worst] - 1.0) > UNIT_NORM_TOLERANCE:
            raise BlocklistError(f"embedding {worst} has L2 norm {norms[worst]:.4f}; every vector must be unit-norm")


def check_threshold(threshold: float) -> float:
    """`threshold` as a float in [-1, 1], or a UsageError."""
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as error:
        raise UsageError(f"threshold must be a number, got {threshold!r}") from error
    if not math.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    return threshold


def _entry_with_defaults(entry: Any, row: int) -> dict:
    if not isinstance(entry, dict) or "id" not in entry:
        raise BlocklistError(f"entry {row} must be a dict with an 'id', got {entry!r:.80}")
    record = {"caption": None, "source": None, "sha256": None, "duplicates": 1, **entry}
    record["id"] = str(record["id"])
    return record
