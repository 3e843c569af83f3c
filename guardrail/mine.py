"""Mine blocklist candidates from a training set's own embeddings: its near-duplicate groups, at any scale.

The images a model memorizes are the ones duplicated in its training set, so the groups of near-identical
embeddings in, say, LAION's published `img_emb` shards are the best candidates for a blocklist. All-pairs
similarity is out of the question at 2B vectors, so the work is cut the way an IVF index cuts a search:

1. `train_quantizer`: spherical k-means on an evenly spaced sample gives `lists` coarse centroids (about
   `LIST_SIZE` vectors per list).
2. `assign_shard`: every vector goes to its 2 nearest lists (primary and secondary), one shard at a time, so a
   pair split by a list boundary still meets in one list.
3. The assignments are grouped by list (the shuffle: local bucket files, or a Ray Data `groupby`), and
   `list_pairs`, the one per-list work function both engines run, finds every pair at cosine >= `similarity`
   between a list's primary members and all of its members, exactly (faiss range search).
4. `groups_from_pairs`: a union-find (connected components) over the pairs; `candidates_blocklist` keeps groups of
   at least `min_duplicates`, one representative each (the group's first vector in input order), ranked by size.

No stage holds all vectors in one process: stage 2 holds one shard, stage 3 one bucket (about `BUCKET_ROWS`
assignments) or one list, and stages 1 and 4 hold the sample, the pairs and the kept groups' records. The README's
"Scaling out" section gives the cost model.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blocklist import DEFAULT_THRESHOLD, Blocklist
from .errors import EmbedderMismatchError, UsageError
from .shards import SPEC_FILE, Shard, finite_unit_vectors, folder_spec, list_shards, read_metadata, row_record

LIST_SIZE = 1000
"""Target vectors per coarse list: the exact stage costs about 2 x LIST_SIZE dot products per vector."""
TRAINING_POINTS_PER_LIST = 40
"""k-means sample size per list (faiss wants at least 39)."""
BUCKET_ROWS = 200_000
"""Assignments (2 per vector) per shuffle bucket of the local engine: 300 MB of float16 vectors at dim 768."""
ENGINES = ("local", "ray")


@dataclass
class MinePlan:
    """The checked input of a mining job: its shards in order, their first global rows, the spec and list count."""

    shards: list[Shard]
    offsets: np.ndarray  # offsets[i] is the global row of shard i's first vector; offsets[-1] the total
    spec: dict
    lists: int

    @property
    def total(self) -> int:
        return int(self.offsets[-1])


def mine_duplicates(
    folders: Sequence[str] | str,
    spec: dict,
    *,
    min_duplicates: int = 5,
    similarity: float = 0.95,
    threshold: float = DEFAULT_THRESHOLD,
    engine: str = "local",
    address: str | None = None,
    lists: int | None = None,
    work_dir: str | None = None,
    seed: int = 0,
) -> Blocklist:
    """A blocklist of one representative per near-duplicate group of at least `min_duplicates` vectors.

    Args:
        folders: clip-retrieval / LAION embedding folders (`img_emb/*.npy` + `metadata/*.parquet`).
        spec: the spec of the embedder that made the vectors (LAION's: `open_clip_spec("ViT-L-14", "openai")`).
        min_duplicates: the smallest group kept.
        similarity: two vectors at or above this cosine are near-duplicates; groups are connected components.
        threshold: the match threshold of the resulting blocklist.
        engine: `"local"` (this process, streaming shards through bucket files in `work_dir`) or `"ray"`.
        address: the Ray cluster (`engine="ray"`); None starts a local one, or uses the one already running.
        lists: coarse lists (default: about one per `LIST_SIZE` vectors).
        work_dir: where the local engine's shuffle buckets go (default: the system temp folder); deleted after.
        seed: k-means seed.

    Each entry's record is the representative's record plus `duplicates` (the group size) and `members` (every
    member's record: id, source and metadata). Entries are ranked by group size, largest first.

    Raises:
        ShardError: a shard is missing, of the wrong dim, has NaN rows or a metadata file of another row count.
        EmbedderMismatchError: a folder states another spec than `spec`.
        UsageError: bad arguments.
    """
    folders = [folders] if isinstance(folders, str) else list(folders)
    _check_mine_options(folders, min_duplicates, similarity, engine, address, lists)
    plan = plan_mine(folders, spec, lists)
    centroids = train_quantizer(plan, seed)
    if engine == "ray":
        pairs = _pairs_on_ray(plan, centroids, similarity, address)
    else:
        pairs = _pairs_locally(plan, centroids, similarity, work_dir)
    return candidates_blocklist(plan, groups_from_pairs(pairs), min_duplicates, threshold)


def _check_mine_options(folders: list[str], min_duplicates: int, similarity: float, engine: str,
                        address: str | None, lists: int | None) -> None:
    if not folders:
        raise UsageError("folders is empty; pass at least one embedding folder (img_emb/ + metadata/)")
    if min_duplicates < 2:
        raise UsageError(f"min_duplicates must be >= 2 (a group of 1 is not a duplicate), got {min_duplicates}")
    if not -1.0 < similarity <= 1.0:
        raise UsageError(f"similarity must be a cosine in (-1, 1], got {similarity}")
    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {ENGINES}, got {engine!r}")
    if address is not None and engine != "ray":
        raise UsageError("address is only for engine='ray'; pass engine='ray' (--engine ray) or drop --address")
    if lists is not None and lists < 1:
        raise UsageError(f"lists must be >= 1, got {lists}")


def plan_mine(folders: list[str], spec: dict, lists: int | None = None) -> MinePlan:
    """List and check every shard of `folders` (no vectors read) against `spec`."""
    for folder in folders:
        if not (Path(folder) / "img_emb").is_dir():
            raise UsageError(f"{folder!r} is not an embedding folder: it has no img_emb/ folder")
        _check_folder_spec(folder, spec)
    shards = [shard for folder in folders for shard in list_shards(folder, dim=int(spec["dim"]))]
    offsets = np.concatenate([[0], np.cumsum([shard.rows for shard in shards])]).astype(np.int64)
    total = int(offsets[-1])
    if lists is None:
        lists = max(1, round(total / LIST_SIZE))
    lists = max(1, min(lists, total // TRAINING_POINTS_PER_LIST or 1, 65536))
    return MinePlan(shards, offsets, dict(spec), lists)


def _check_folder_spec(folder: str, spec: dict) -> None:
    from .embedders import spec_differences

    stated = folder_spec(folder)
    if stated is None:
        return
    differences = spec_differences(spec, stated)
    if differences:
        raise EmbedderMismatchError(
            f"{folder!r} holds vectors of another embedder ({'; '.join(differences)}, per {Path(folder) / SPEC_FILE}); mine only "
            "folders made by one model, and pass its --model/--pretrained"
        )


def train_quantizer(plan: MinePlan, seed: int = 0) -> np.ndarray:
    """`plan.lists` unit centroids from spherical k-means on an evenly spaced sample (float32, lists x dim)."""
    import faiss

    dim = int(plan.spec["dim"])
    if plan.lists == 1 or plan.total == 0:
        return np.zeros((1, dim), np.float32) + 1.0 / math.sqrt(dim)
    count = min(plan.total, plan.lists * TRAINING_POINTS_PER_LIST)
    sample = np.concatenate(list(_rows_of(plan, np.linspace(0, plan.total - 1, count).astype(np.int64))))
    kmeans = faiss.Kmeans(dim, plan.lists, niter=20, spherical=True, seed=seed, verbose=False)
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _rows_of(plan: MinePlan, rows: np.ndarray) -> Iterator[np.ndarray]:
    """The unit vectors of sorted global `rows`, shard by shard."""
    for number, shard in enumerate(plan.shards):
        start, stop = plan.offsets[number], plan.offsets[number + 1]
        local = rows[(rows >= start) & (rows < stop)] - start
        if len(local):
            yield finite_unit_vectors(shard, local)


def assign_shard(plan: MinePlan, number: int, centroids: np.ndarray) -> dict[str, np.ndarray]:
    """Shard `number`'s vectors assigned to their 2 nearest lists: one row per (vector, list).

    Returns columns `list` (int32), `row` (global int64), `primary` (bool: the vector's nearest list) and `vector`
    (float16, the unit vector), primaries first.
    """
    import faiss

    vectors = finite_unit_vectors(plan.shards[number])
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(centroids)
    _, nearest = quantizer.search(vectors, min(2, len(centroids)))
    width = nearest.shape[1]
    rows = np.arange(plan.offsets[number], plan.offsets[number + 1], dtype=np.int64)
    return {
        "list": nearest.T.reshape(-1).astype(np.int32),
        "row": np.tile(rows, width),
        "primary": np.repeat(np.arange(width) == 0, len(rows)),
        "vector": np.tile(vectors.astype(np.float16), (width, 1)),
    }


def list_pairs(rows: np.ndarray, vectors: np.ndarray, primary: np.ndarray, similarity: float) -> np.ndarray:
    """The per-list work both engines run: (E, 2) global row pairs `(a < b)` at cosine >= `similarity`.

    `rows`, `vectors`, `primary` are one list's members. Each primary member is compared exactly with every member
    (faiss range search over float32 copies of the float16 vectors), so a pair is found when one vector's nearest
    list is among the other's 2 nearest.
    """
    import faiss

    queries = np.flatnonzero(primary)
    if len(rows) < 2 or not len(queries):
        return np.empty((0, 2), np.int64)
    database = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    radius = float(np.nextafter(np.float32(similarity), np.float32(-2)))  # range search keeps scores > radius
    limits, _, found = index.range_search(database[queries], radius)
    query_rows = np.repeat(rows[queries], np.diff(limits.astype(np.int64)))
    found_rows = rows[found]
    keep = query_rows != found_rows
    pairs = np.stack([np.minimum(query_rows, found_rows)[keep], np.maximum(query_rows, found_rows)[keep]], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else np.empty((0, 2), np.int64)


def pairs_of_grouped_list(group: dict[str, np.ndarray], similarity: float) -> dict[str, np.ndarray]:
    """`list_pairs` over one list's assignment rows (the columns of `assign_shard`), as columns `a`, `b`."""
    pairs = list_pairs(group["row"], np.asarray(group["vector"]), np.asarray(group["primary"], bool), similarity)
    return {"a": pairs[:, 0], "b": pairs[:, 1]}


def _pairs_locally(plan: MinePlan, centroids: np.ndarray, similarity: float, work_dir: str | None) -> np.ndarray:
    """Stages 2 and 3 in this process: assignments shuffled to bucket files on disk, then each bucket's lists."""
    buckets = max(1, math.ceil(2 * plan.total / BUCKET_ROWS))
    with tempfile.TemporaryDirectory(prefix="guardrail-mine-", dir=work_dir) as scratch:
        for number in range(len(plan.shards)):
            assigned = assign_shard(plan, number, centroids)
            bucket_of = assigned["list"].astype(np.int64) * buckets // len(centroids)
            for bucket in np.unique(bucket_of):
                chosen = bucket_of == bucket
                folder = Path(scratch) / f"bucket_{bucket}"
                folder.mkdir(exist_ok=True)
                keys = np.stack([assigned["list"][chosen], assigned["row"][chosen], assigned["primary"][chosen]], 1)
                np.save(folder / f"keys_{number}.npy", keys.astype(np.int64), allow_pickle=False)
                np.save(folder / f"vectors_{number}.npy", assigned["vector"][chosen], allow_pickle=False)
            del assigned
        pairs = [np.empty((0, 2), np.int64)]
        for folder in sorted(Path(scratch).iterdir()):
            pairs.extend(_bucket_pairs(folder, similarity))
    return np.concatenate(pairs)


def _bucket_pairs(folder: Path, similarity: float) -> Iterator[np.ndarray]:
    numbers = sorted(int(path.stem.rpartition("_")[2]) for path in folder.glob("keys_*.npy"))
    keys = np.concatenate([np.load(folder / f"keys_{n}.npy", allow_pickle=False) for n in numbers])
    vectors = np.concatenate([np.load(folder / f"vectors_{n}.npy", allow_pickle=False) for n in numbers])
    order = np.argsort(keys[:, 0], kind="stable")
    keys, vectors = keys[order], vectors[order]
    starts = np.flatnonzero(np.diff(keys[:, 0], prepend=-1))
    for start, stop in zip(starts, [*starts[1:], len(keys)]):
        yield list_pairs(keys[start:stop, 1], vectors[start:stop], keys[start:stop, 2].astype(bool), similarity)


def _pairs_on_ray(plan: MinePlan, centroids: np.ndarray, similarity: float, address: str | None) -> np.ndarray:
    """Stages 2 and 3 on Ray Data: shards assigned in parallel, `groupby("list")` shuffles, lists run in parallel."""
    from .ray_cluster import quiet_data_context, ray_session

    with ray_session(address) as ray:
        quiet_data_context()
        plan_ref, centroids_ref = ray.put(plan), ray.put(centroids)
        assigned = ray.data.from_items([{"shard": number} for number in range(len(plan.shards))]).map_batches(
            _assign_batch, batch_size=1, batch_format="numpy", fn_kwargs={"plan": plan_ref, "centroids": centroids_ref}
        )
        pairs = assigned.groupby("list").map_groups(
            pairs_of_grouped_list, batch_format="numpy", fn_kwargs={"similarity": similarity}
        )
        found = [np.stack([batch["a"], batch["b"]], axis=1) for batch in pairs.iter_batches(batch_format="numpy")]
    return np.concatenate([np.empty((0, 2), np.int64), *found]).astype(np.int64)


def _assign_batch(batch: dict[str, np.ndarray], plan, centroids) -> dict[str, np.ndarray]:
    import ray

    plan = ray.get(plan) if isinstance(plan, ray.ObjectRef) else plan
    centroids = ray.get(centroids) if isinstance(centroids, ray.ObjectRef) else centroids
    parts = [assign_shard(plan, int(number), centroids) for number in batch["shard"]]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def groups_from_pairs(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over near-duplicate pairs: (members, leaders), the sorted rows in any pair and, for each, the
    smallest row of its group (the group's first vector in input order)."""
    from .build import _connected_components

    members = np.unique(pairs)
    if not len(members):
        return members, members
    local = np.searchsorted(members, pairs)
    return members, members[_connected_components(len(members), local)]


def candidates_blocklist(
    plan: MinePlan, groups: tuple[np.ndarray, np.ndarray], min_duplicates: int, threshold: float = DEFAULT_THRESHOLD
) -> Blocklist:
    """One entry per group of at least `min_duplicates`, largest first: the leader's vector and record, with
    `duplicates` and `members` (each member's record). Reads only the shards that hold kept members."""
    members, leaders = groups
    kept_leaders, sizes = np.unique(leaders, return_counts=True)
    kept_leaders, sizes = kept_leaders[sizes >= min_duplicates], sizes[sizes >= min_duplicates]
    if not len(kept_leaders):
        raise UsageError(
            f"no group of {min_duplicates} or more vectors at the similarity asked for in {plan.total} vectors; "
            "lower --min-duplicates or --similarity"
        )
    keep = np.isin(leaders, kept_leaders)
    members, leaders = members[keep], leaders[keep]
    records = dict(_records_of(plan, members))
    order = np.lexsort((kept_leaders, -sizes))
    entries = []
    for leader, size in zip(kept_leaders[order], sizes[order]):
        record = dict(records[int(leader)])
        record["duplicates"] = int(size)
        record["members"] = [records[int(row)] for row in members[leaders == leader]]
        entries.append(record)
    _make_ids_unique(entries)
    vectors = np.concatenate(list(_rows_of(plan, np.sort(kept_leaders))))
    position = {int(row): i for i, row in enumerate(np.sort(kept_leaders))}
    vectors = vectors[[position[int(row)] for row in kept_leaders[order]]]
    return Blocklist(vectors, entries, spec=plan.spec, threshold=threshold)


def _records_of(plan: MinePlan, rows: np.ndarray) -> Iterator[tuple[int, dict]]:
    """(global row, record) for sorted global `rows`, reading only the metadata of shards that hold some."""
    for number, shard in enumerate(plan.shards):
        start, stop = plan.offsets[number], plan.offsets[number + 1]
        local = rows[(rows >= start) & (rows < stop)] - start
        if len(local):
            metadata = read_metadata(shard)
            for row in local:
                yield int(row + start), row_record(shard, int(row), metadata[row])


def _make_ids_unique(entries: list[dict]) -> None:
    seen: dict[str, int] = {}
    for entry in entries:
        seen[entry["id"]] = seen.get(entry["id"], 0) + 1
        if seen[entry["id"]] > 1:
            entry["id"] = f"{entry['id']}#{seen[entry['id']]}"
