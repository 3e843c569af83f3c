"""`guardrail build --engine ray`: embed past one machine with Ray Data, resumably, into the same blocklist.

The driver lists the SOURCEs with today's readers (`build._items_with_unique_ids`, so ids are those of the local
build) and cuts the items into shards of `shard_size`. A Ray Data `map_batches` over an actor pool sends each
shard to an actor holding one embedder (one GPU each when the cluster has GPUs); the actor decodes and embeds it
with the local build's own code (`build._embed_items`) and writes it in clip-retrieval's layout
(`shards.write_shard`: `img_emb/img_emb_{i}.npy` + `metadata/metadata_{i}.parquet`, the shard's counts and skipped
items in the parquet's schema metadata), each file atomically, vectors last. The driver then reads the shards back
in order and finishes with `build.finished_blocklist`, as the local build does: same records, vectors, dedupe,
index and report.

A killed job leaves complete shards and temp files only; the next run with the same inputs and `shards` folder
embeds only the shards whose vectors file is missing. The shard folder is written next to the output by default
and kept: it is a clip-retrieval embedding folder `mine` and `build` read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .blocklist import DEFAULT_THRESHOLD, Blocklist, atomic_path
from .build import _checked_build_options, _embed_items, _Embedded, _items_with_unique_ids, _ItemPreparer
from .build import finished_blocklist
from .embedders import Embedder
from .errors import GuardrailError, UsageError
from .index import DEFAULT_CANDIDATES, DEFAULT_EF_SEARCH, check_search_options
from .shards import iter_records, list_shards, open_vectors, shard_info, vectors_path, write_folder_spec, write_shard
from .sources import Item

SHARD_SIZE = 1000
"""Items per shard: the unit of work of an actor, and of resuming."""
JOB_FILE = "guardrail-build.json"
"""What a shard folder was written for (sources, shard size, item ids); a resume must match it."""


def build_blocklist_on_ray(
    sources: Sequence[str] | str,
    embedder: Embedder | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    dedupe: float | None = None,
    on_error: str = "skip",
    *,
    shards: str,
    pretrained: str | None = None,
    spec: dict | None = None,
    address: str | None = None,
    actors: int | None = None,
    device: str = "cpu",
    shard_size: int = SHARD_SIZE,
    batch_size: int | None = None,
    workers: int = 4,
    download: bool = False,
    download_timeout: float = 10.0,
    download_retries: int = 2,
    index: str = "auto",
    nprobe: int | str | None = None,
    candidates: int | None = None,
) -> Blocklist:
    """`build_blocklist` on a Ray cluster: the same arguments and result, plus where and how to run.

    Args:
        embedder: the embedder (its spec is the blocklist's); each actor rebuilds it with
            `embedder_from_spec(embedder.spec, pretrained)`. None for precomputed-embedding sources (pass `spec`).
        shards: the folder the shards are written to (and resumed from); created if missing.
        pretrained: the tag or weights file actors load (a weights file must be readable on every node).
        address: the Ray cluster (`ray start --head` prints it); None uses the cluster already initialized in this
            process or starts a local one.
        actors: embedders running at once (default: one per GPU when the cluster has GPUs, else one per CPU).
        device: torch device of CPU actors; on a cluster with GPUs actors use `cuda` (one GPU each).
        shard_size: items per shard.

    The build report (`build_report`) also says `engine`, `shards` (the folder), `shard_count` and
    `resumed_shards` (shards found complete and not embedded again).
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    spec = _checked_build_options(sources, embedder, spec, threshold, dedupe, on_error, workers, batch_size, index)
    check_search_options(candidates or DEFAULT_CANDIDATES, nprobe or "auto", DEFAULT_EF_SEARCH, "auto")
    if shard_size < 1:
        raise UsageError(f"shard_size must be >= 1, got {shard_size}")
    if actors is not None and actors < 1:
        raise UsageError(f"actors must be >= 1, got {actors}")
    if embedder is not None and not pretrained:
        raise UsageError("pretrained is required with an embedder: the tag or weights file each actor loads")
    batch_size = batch_size or getattr(embedder, "batch_size", 32)
    started = time.perf_counter()
    folder = Path(shards)
    payloads = _shard_payloads(sources, shard_size)
    _claim_shard_folder(folder, sources, shard_size, payloads, spec)
    pending = [number for number in range(len(payloads)) if not vectors_path(folder, number).is_file()]
    if pending:
        options = {"spec": spec, "pretrained": pretrained if embedder is not None else None, "device": device,
                   "batch_size": batch_size, "workers": workers, "on_error": on_error, "download": download,
                   "download_timeout": download_timeout, "download_retries": download_retries,
                   "folder": str(folder)}
        _embed_shards_on_ray([payloads[number] for number in pending], options, address, actors)
    embedded = _read_shards(folder, len(payloads))
    return finished_blocklist(
        sources, embedded, spec, threshold, dedupe, index, nprobe, candidates, started, engine="ray",
        shards=str(folder), shard_count=len(payloads), resumed_shards=len(payloads) - len(pending),
    )


def default_shard_folder(output: str) -> str:
    """Where `guardrail build -o OUT --engine ray` keeps its shards unless told: `OUT.shards/` beside the output."""
    return f"{output}.shards"


def _shard_payloads(sources: list[str], shard_size: int) -> list[dict]:
    """The items, in the local build's order and with its ids, cut into shards as JSON rows for Ray Data."""
    payloads, items = [], []
    for item in _items_with_unique_ids(sources):
        items.append(_item_to_json(item))
        if len(items) == shard_size:
            payloads.append({"shard": len(payloads), "items": json.dumps(items)})
            items = []
    if items or not payloads:
        payloads.append({"shard": len(payloads), "items": json.dumps(items)})
    return payloads


def _item_to_json(item: Item) -> dict:
    encoded: dict[str, Any] = {"record": item.record, "path": item.path, "url": item.url}
    if item.data is not None:
        encoded["data"] = base64.b64encode(item.data).decode("ascii")
    if item.vector is not None:
        encoded["vector"] = np.asarray(item.vector, np.float32).tolist()  # floats round-trip exactly
    return encoded


def _item_from_json(encoded: dict) -> Item:
    data = base64.b64decode(encoded["data"]) if "data" in encoded else None
    vector = np.asarray(encoded["vector"], np.float32) if "vector" in encoded else None
    return Item(encoded["record"], path=encoded["path"], url=encoded["url"], data=data, vector=vector)


def _claim_shard_folder(folder: Path, sources: list[str], shard_size: int, payloads: list[dict], spec: dict) -> None:
    """Record what `folder` is for, or check that its shards were written for the same job; drop stale temp files."""
    from .embedders import spec_identity

    ids = hashlib.sha256()
    for payload in payloads:
        for item in json.loads(payload["items"]):
            ids.update(str(item["record"]["id"]).encode() + b"\0")
    job = {"sources": sources, "shard_size": shard_size, "shard_count": len(payloads), "ids_sha256": ids.hexdigest(),
           "spec": spec_identity(spec)}
    path = folder / JOB_FILE
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != json.loads(json.dumps(job)):
            changed = sorted(key for key in job if found.get(key) != json.loads(json.dumps(job))[key])
            raise UsageError(
                f"shard folder {str(folder)!r} holds shards of another build (differs in {', '.join(changed)}); "
                "pass another --shards folder, or delete this one to start over"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temp:
            temp.write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    write_folder_spec(folder, spec)
    for stale in [*folder.glob("*/.*.tmp")]:  # left by a killed writer; atomic_path never renamed them
        stale.unlink()


def _embed_shards_on_ray(payloads: list[dict], options: dict, address: str | None, actors: int | None) -> None:
    from .ray_cluster import quiet_data_context, ray_session

    with ray_session(address) as ray:
        quiet_data_context()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        if gpus:
            options = {**options, "device": "cuda"}
        dataset = ray.data.from_items(payloads, override_num_blocks=len(payloads))
        pool = ray.data.ActorPoolStrategy(size=min(actors or gpus or cpus, len(payloads)))
        written = dataset.map_batches(
            ShardEmbedder, fn_constructor_kwargs=options, batch_size=1, batch_format="numpy", compute=pool,
            **resources,
        )
        for batch in written.iter_batches(batch_format="numpy"):
            for kind, message in zip(batch["error_type"], batch["error"]):
                if kind:  # an actor stopped on bad input (on_error="raise", a URL without download): raise it here
                    raise _error_class(str(kind))(str(message))


def _error_class(name: str) -> type[GuardrailError]:
    from . import errors

    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, GuardrailError) else GuardrailError


class ShardEmbedder:
    """A Ray Data actor: one embedder; embeds whole shards with the local build's code and writes each atomically."""

    def __init__(self, spec: dict, pretrained: str | None, device: str, batch_size: int, workers: int,
                 on_error: str, download: bool, download_timeout: float, download_retries: int, folder: str) -> None:
        from .rebuild import embedder_from_spec

        self.embedder = None if pretrained is None else embedder_from_spec(spec, pretrained, device, batch_size)
        self.preparer = _ItemPreparer(self.embedder, spec["dim"], download, download_timeout, download_retries)
        self.batch_size, self.workers, self.on_error, self.folder = batch_size, workers, on_error, folder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed and write each shard of the batch; a GuardrailError comes back as data, since Ray Data's wrapper
        exceptions lose their cause on the way to the driver."""
        error_types, errors = [], []
        for number, encoded in zip(batch["shard"], batch["items"]):
            kind, message = "", ""
            try:
                self._write(int(number), [_item_from_json(item) for item in json.loads(str(encoded))])
            except GuardrailError as error:
                kind, message = type(error).__name__, str(error)
            error_types.append(kind)
            errors.append(message)
        return {"shard": np.asarray(batch["shard"]), "error_type": np.asarray(error_types),
                "error": np.asarray(errors)}

    def _write(self, number: int, items: list[Item]) -> None:
        embedded = _embed_items(items, self.embedder, self.preparer, self.batch_size, self.workers, self.on_error,
                                False)
        dim = self.preparer.dim
        vectors = np.concatenate(embedded.vectors) if embedded.vectors else np.empty((0, dim), np.float32)
        info = {"counts": dict(embedded.counts), "skips": embedded.skips,
                "converted_modes": dict(embedded.converted_modes)}
        write_shard(self.folder, number, vectors, embedded.records, info)


def _read_shards(folder: Path, count: int) -> _Embedded:
    """Every shard of the job, in order, as the local build's `_Embedded` (vectors, records, counts, skips)."""
    embedded = _Embedded()
    shards = list_shards(folder)
    if len(shards) != count:
        raise GuardrailError(f"shard folder {str(folder)!r} has {len(shards)} shards, expected {count}")
    for shard in shards:
        info = shard_info(shard)
        embedded.vectors.append(np.asarray(open_vectors(shard.vectors_path), np.float32))
        embedded.records.extend(iter_records(shard))
        embedded.skips.extend(info.get("skips", []))
        embedded.counts.update(Counter(info.get("counts", {})))
        embedded.converted_modes.update(Counter(info.get("converted_modes", {})))
    return embedded
