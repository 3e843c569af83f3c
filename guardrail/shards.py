"""The clip-retrieval / LAION embedding layout, listed, checked, read and written in one place.

A folder holds `img_emb/img_emb_{i}.npy` (float16 or float32 vectors, one row per image) and, optionally,
`metadata/metadata_{i}.parquet` with one row per vector in the same order. `build` reads such folders as a SOURCE,
`mine` streams them shard by shard, and the Ray build writes its output in this layout so that a re-run resumes from
the shards already written; all of them check a shard the same way, and every error names the file at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ShardError, UsageError

VECTORS_FOLDER, METADATA_FOLDER = "img_emb", "metadata"
RECORD_COLUMN = "guardrail_record"
"""Metadata column holding a whole guardrail record as JSON (written by the Ray build, so records round-trip)."""
SHARD_INFO_KEY = b"guardrail_shard"
"""Parquet schema-metadata key of a shard's build counts and skipped items (written by the Ray build)."""
SPEC_FILE = "guardrail-spec.json"
"""An embedding folder may state the spec of its vectors here (the Ray build writes it); `mine` checks it."""
ID_COLUMNS = ("id", "key", "index", "sample_id", "uid")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "prompt")
FINITE_CHECK_ROWS = 65536


@dataclass(frozen=True)
class Shard:
    """One shard of an embedding folder: its vectors file, its metadata file (None when absent) and row count."""

    folder: Path
    number: int | None  # the `{i}` of img_emb_{i}.npy; None for a file without a numeric suffix
    vectors_path: Path
    metadata_path: Path | None
    rows: int
    dim: int


def vectors_path(folder: str | Path, number: int) -> Path:
    return Path(folder) / VECTORS_FOLDER / f"img_emb_{number}.npy"


def metadata_path(folder: str | Path, number: int) -> Path:
    return Path(folder) / METADATA_FOLDER / f"metadata_{number}.parquet"


def list_shards(folder: str | Path, dim: int | None = None) -> list[Shard]:
    """The shards of an embedding folder in order, each checked without reading its vectors.

    Raises `ShardError` naming the file for: no shards, a gap in the numbering (img_emb_0, img_emb_2: shard 1 is
    missing), an array that is not 2-D float16/float32 or not of `dim` columns, and a metadata file whose row count
    differs from its vectors'.
    """
    root = Path(folder)
    arrays = sorted((root / VECTORS_FOLDER).glob("*.npy"), key=_natural_key)
    if not arrays:
        raise ShardError(f"embedding folder {str(root)!r} has no {VECTORS_FOLDER}/*.npy files")
    numbers = [_shard_number(path) for path in arrays]
    if all(number is not None for number in numbers):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        if missing:
            raise ShardError(
                f"embedding folder {str(root)!r} is missing shard(s) "
                f"{', '.join(str(vectors_path(root, n)) for n in missing[:5])}{' ...' if len(missing) > 5 else ''} "
                f"(found {len(arrays)} of {max(numbers) + 1}); copy the missing files or re-run the job that wrote them"
            )
    return [_checked_shard(root, number, path, dim) for number, path in zip(numbers, arrays)]


def _checked_shard(root: Path, number: int | None, path: Path, dim: int | None) -> Shard:
    vectors = open_vectors(path)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise ShardError(f"{path}: expected a 2-D float array (float16 or float32), got {vectors.dtype} {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ShardError(
            f"{path}: vectors have dim {vectors.shape[1]} but the embedder spec has dim {dim}; "
            "these vectors were made by another model (check --model/--pretrained)"
        )
    suffix = path.stem.rpartition("_")[2]
    metadata = root / METADATA_FOLDER / f"metadata_{suffix}.parquet"
    if metadata.is_file():
        rows = _parquet_rows(metadata)
        if rows != len(vectors):
            raise ShardError(f"{metadata} has {rows} rows but {path} has {len(vectors)} vectors; they must match")
    return Shard(root, number, path, metadata if metadata.is_file() else None, len(vectors), vectors.shape[1])


def open_vectors(path: str | Path) -> np.ndarray:
    """A shard's vectors as a read-only memory map (nothing read yet); `ShardError` when it is not a .npy array."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ShardError(f"{path} is not a readable .npy array: {error}") from error


def finite_unit_vectors(shard: Shard, rows: np.ndarray | None = None) -> np.ndarray:
    """A shard's vectors (all, or only `rows`: only their pages are read) as float32 unit vectors.

    Raises `ShardError` naming the file and rows when a row is NaN, infinite or zero.
    """
    stored = open_vectors(shard.vectors_path)
    vectors = np.asarray(stored if rows is None else stored[rows], dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        named = bad if rows is None else np.asarray(rows)[bad]
        raise ShardError(
            f"{shard.vectors_path}: {len(bad)} row(s) are NaN, infinite or zero (rows {named[:5].tolist()}"
            f"{' ...' if len(bad) > 5 else ''}); remove them or re-embed those images"
        )
    return vectors / norms[:, None]


def read_metadata(shard: Shard, columns: list[str] | None = None) -> list[dict]:
    """The shard's metadata rows as dicts (empty dicts when it has no metadata file)."""
    if shard.metadata_path is None:
        return [{} for _ in range(shard.rows)]
    return read_parquet(shard.metadata_path, columns).to_pylist()


def read_parquet(path: str | Path, columns: list[str] | None = None) -> Any:
    """A parquet file as a pyarrow Table; `UsageError` naming the file when pyarrow is missing or it is unreadable."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise UsageError("reading .parquet needs pyarrow: pip install pyarrow") from error
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"{str(path)!r} is not a readable parquet file: {error}") from error


def _parquet_rows(path: Path) -> int:
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except ImportError as error:
        raise UsageError("reading .parquet needs pyarrow: pip install pyarrow") from error
    except (OSError, ValueError) as error:
        raise ShardError(f"{path} is not a readable parquet file: {error}") from error


def row_record(shard: Shard, row_number: int, row: dict) -> dict:
    """The guardrail record of one vector: its metadata columns, an `id` (a metadata id column, else
    `img_emb_{i}.npy:row`), its `source`, and `caption` from a caption-like column. A record written whole by the
    Ray build (`RECORD_COLUMN`) comes back as it was written."""
    if row.get(RECORD_COLUMN) is not None:
        return json.loads(row[RECORD_COLUMN])
    record = {key: jsonable(value) for key, value in row.items()}
    identifier = next((row[c] for c in ID_COLUMNS if row.get(c) is not None), None)
    record["id"] = str(identifier) if identifier is not None else f"{shard.vectors_path.name}:{row_number}"
    record["source"] = f"{shard.vectors_path}:{row_number}"
    caption_column = next((c for c in CAPTION_COLUMNS if c in record), None)
    if "caption" not in record and caption_column:
        record["caption"] = record[caption_column]
    return record


def iter_records(shard: Shard) -> Iterator[dict]:
    for row_number, row in enumerate(read_metadata(shard)):
        yield row_record(shard, row_number, row)


def jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_shard(folder: str | Path, number: int, vectors: np.ndarray, records: list[dict], info: dict) -> None:
    """Write shard `number` atomically: metadata first, vectors last, so a shard whose vectors file exists is complete.

    Records go in whole as JSON (`RECORD_COLUMN`, beside `id` and `caption` columns other tools read); `info` (the
    shard's counts and skipped items) goes in the parquet schema metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .blocklist import atomic_path

    root = Path(folder)
    (root / VECTORS_FOLDER).mkdir(parents=True, exist_ok=True)
    (root / METADATA_FOLDER).mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": pa.array([str(record["id"]) for record in records], pa.string()),
        "caption": pa.array([_optional_text(record.get("caption")) for record in records], pa.string()),
        RECORD_COLUMN: pa.array([json.dumps(record, ensure_ascii=False) for record in records], pa.string()),
    }).replace_schema_metadata({SHARD_INFO_KEY: json.dumps(info).encode()})
    with atomic_path(metadata_path(root, number)) as temp:
        pq.write_table(table, temp)
    with atomic_path(vectors_path(root, number)) as temp:
        with open(temp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(vectors), allow_pickle=False)


def shard_info(shard: Shard) -> dict:
    """The counts and skips `write_shard` stored with a shard ({} for a folder written by another tool)."""
    if shard.metadata_path is None:
        return {}
    import pyarrow.parquet as pq

    stored = pq.read_schema(shard.metadata_path).metadata or {}
    return json.loads(stored[SHARD_INFO_KEY]) if SHARD_INFO_KEY in stored else {}


def folder_spec(folder: str | Path) -> dict | None:
    """The spec an embedding folder states in `SPEC_FILE`, or None (LAION's and clip-retrieval's state none)."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ShardError(f"{path} is not a readable JSON spec: {error}") from error


def write_folder_spec(folder: str | Path, spec: dict) -> None:
    from .blocklist import atomic_path

    Path(folder).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(folder) / SPEC_FILE) as temp:
        temp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _shard_number(path: Path) -> int | None:
    suffix = path.stem.rpartition("_")[2]
    return int(suffix) if suffix.isdigit() else None


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
