"""Turn each SOURCE a user names into a stream of items to put in a blocklist, without decoding anything.

A SOURCE is detected by what the path is: a directory of image files, a manifest (`.csv`, `.jsonl`, `.parquet`)
with a path or URL column, webdataset `.tar` shards (brace patterns like `shard-{000..009}.tar` too), or a
clip-retrieval / LAION embedding folder (`img_emb/*.npy` + `metadata/*.parquet`) of precomputed vectors. Every
manifest column lands in the item's record. Decoding happens later, in parallel (see `build.py`).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .shards import CAPTION_COLUMNS, ID_COLUMNS, iter_records, list_shards, open_vectors, read_parquet
from .shards import jsonable as _jsonable

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Column names that manifests in the wild use, in order of preference.
PATH_COLUMNS = ("path", "filepath", "file", "image_path", "image")
URL_COLUMNS = ("url", "URL", "image_url")


@dataclass
class Item:
    """One blocklist candidate: its record, and exactly one of a local path, a URL, raw bytes, or a vector."""

    record: dict
    path: str | None = None
    url: str | None = None
    data: bytes | None = field(default=None, repr=False)
    vector: np.ndarray | None = field(default=None, repr=False)


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style brace patterns: `a-{000..002}.tar` -> `a-000.tar a-001.tar a-002.tar`; `{x,y}`."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        start, stop = numeric.groups()
        width = len(start) if start.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(start), int(stop) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def source_kind(source: str) -> str:
    """'directory', 'embeddings', 'manifest' or 'webdataset', or a UsageError that says what is accepted."""
    path = Path(source)
    if path.is_dir():
        return "embeddings" if (path / "img_emb").is_dir() else "directory"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl", ".parquet"):
        if not path.is_file():
            raise UsageError(f"manifest {source!r} does not exist")
        return "manifest"
    if suffix == ".tar" or "{" in source:
        return "webdataset"
    if path.exists():
        raise UsageError(
            f"cannot tell what SOURCE {source!r} is: pass a folder of images, a .csv/.jsonl/.parquet manifest, "
            "webdataset .tar shards, or a clip-retrieval embedding folder (img_emb/ + metadata/)"
        )
    raise UsageError(f"SOURCE {source!r} does not exist")


def iter_items(source: str) -> Iterator[Item]:
    """The items of one SOURCE, in a stable order."""
    kind = source_kind(source)
    return {"directory": _directory, "manifest": _manifest, "webdataset": _webdataset, "embeddings": _embeddings}[
        kind
    ](source)


def _directory(source: str) -> Iterator[Item]:
    root = Path(source)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()):
        relative = path.relative_to(root).as_posix()
        yield Item({"id": relative, "source": os.fspath(path)}, path=os.fspath(path))


def _first(columns: dict, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in columns), None)


def read_manifest_rows(source: str) -> list[dict]:
    """Rows of a `.csv`, `.jsonl` or `.parquet` manifest as dicts (parquet needs pyarrow)."""
    suffix = Path(source).suffix.lower()
    try:
        if suffix == ".csv":
            with open(source, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".jsonl":
            with open(source, encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
            if not all(isinstance(row, dict) for row in rows):
                raise UsageError(f"manifest {source!r}: every line must be a JSON object")
            return rows
        return read_parquet(source).to_pylist()
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"manifest {source!r} cannot be parsed: {error}") from error


def _manifest(source: str) -> Iterator[Item]:
    rows = read_manifest_rows(source)
    if not rows:
        return
    columns = dict.fromkeys(key for row in rows[:100] for key in row)
    path_column, url_column = _first(columns, PATH_COLUMNS), _first(columns, URL_COLUMNS)
    id_column, caption_column = _first(columns, ID_COLUMNS), _first(columns, CAPTION_COLUMNS)
    if path_column is None and url_column is None:
        raise UsageError(
            f"manifest {source!r} has no path column ({', '.join(PATH_COLUMNS)}) or URL column "
            f"({', '.join(URL_COLUMNS)}); found columns {list(columns)}"
        )
    base = Path(source).parent
    stem = Path(source).name
    for row_number, row in enumerate(rows):
        # csv.DictReader files a row's surplus fields under the key None; keep them under a name JSON accepts.
        record = {("extra_fields" if key is None else key): _jsonable(value) for key, value in row.items()}
        record["id"] = str(row[id_column]) if id_column and row.get(id_column) is not None else f"{stem}:{row_number}"
        if caption_column and caption_column != "caption":
            record.setdefault("caption", row.get(caption_column))
        record["source"] = f"{source}:{row_number + 1}"
        location = row.get(path_column) if path_column else None
        if location and not re.match(r"^https?://", str(location)):
            yield Item(record, path=os.fspath(base / str(location)))
        elif url_column and row.get(url_column) or location:
            yield Item(record, url=str(row.get(url_column) or location))
        else:
            yield Item(record)  # no location at all: reported as skipped by the builder


def _webdataset(source: str) -> Iterator[Item]:
    shards = expand_braces(source)
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        raise UsageError(f"webdataset shard(s) not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for shard in shards:
        yield from _shard_items(shard)


def _shard_items(shard: str) -> Iterator[Item]:
    """Samples of one tar shard: members grouped by key (the name up to the first dot), as webdataset does."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        tar = tarfile.open(shard)
    except (tarfile.TarError, OSError) as error:
        raise UsageError(f"webdataset shard {shard!r} is not a readable tar file: {error}") from error
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            key, _, extension = name.partition(".")
            key = f"{directory}/{key}" if directory else key
            if key not in samples:
                samples[key] = {}
                order.append(key)
            samples[key][extension.lower()] = tar.extractfile(member).read()
    for key in order:
        parts = samples[key]
        record: dict = {"id": key, "source": f"{shard}#{key}"}
        if "json" in parts:
            try:
                extra = json.loads(parts["json"])
                if isinstance(extra, dict):
                    record.update({k: _jsonable(v) for k, v in extra.items() if k not in ("id", "source")})
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        if "txt" in parts:
            record.setdefault("caption", parts["txt"].decode("utf-8", "replace"))
        image_extension = next((ext for ext in parts if "." + ext.rpartition(".")[2] in IMAGE_EXTENSIONS), None)
        yield Item(record, data=parts[image_extension] if image_extension else None)


def _embeddings(source: str) -> Iterator[Item]:
    """clip-retrieval output: `img_emb/img_emb_{i}.npy` with `metadata/metadata_{i}.parquet` rows in the same order."""
    for shard in list_shards(source):
        vectors = open_vectors(shard.vectors_path)
        for row_number, record in enumerate(iter_records(shard)):
            yield Item(record, vector=np.asarray(vectors[row_number], dtype=np.float32))
