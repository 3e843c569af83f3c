"""Embedding folders with planted near-duplicate groups: known answers for testing and benchmarking `mine`.

The background is clustered the way real image embeddings are (points around cluster centres, cosine about 0.5
inside a cluster), and each planted group sits inside a cluster: `size` members at pairwise cosine `rho`
(member = sqrt(rho) centre + sqrt(1 - rho) noise orthogonal to the centre). Folders are written shard by shard,
so a folder of millions of vectors never needs them all in memory. A vector's metadata `key` is its global row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class PlantedTruth:
    """The planted groups: each an array of global rows, with its pairwise cosine."""

    groups: list[np.ndarray]
    cosines: list[float]
    total: int


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def write_planted_folder(
    folder: str | Path,
    total: int,
    dim: int,
    group_sizes: list[int],
    *,
    cosine: tuple[float, float] = (0.95, 0.99),
    clusters: int = 1000,
    shard_rows: int = 100_000,
    dtype: str = "float16",
    seed: int = 0,
) -> PlantedTruth:
    """Write `total` vectors (planted members included) as `img_emb_{i}.npy` + `metadata_{i}.parquet` shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    planted = sum(group_sizes)
    if planted > total:
        raise ValueError(f"group sizes add up to {planted}, more than total {total}")
    centres = _unit(rng.standard_normal((clusters, dim)).astype(np.float32))
    group_centres = _unit(centres[rng.integers(0, clusters, len(group_sizes))]
                          + rng.standard_normal((len(group_sizes), dim)).astype(np.float32) / np.sqrt(dim))
    rhos = rng.uniform(*cosine, len(group_sizes))
    positions = rng.permutation(total)[:planted]
    member_group = np.repeat(np.arange(len(group_sizes)), group_sizes)
    groups = [np.sort(positions[member_group == g]) for g in range(len(group_sizes))]
    group_of_row = np.full(total, -1, np.int64)
    group_of_row[positions] = member_group
    root = Path(folder)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, total, shard_rows)):
        stop = min(total, start + shard_rows)
        vectors = _unit(centres[rng.integers(0, clusters, stop - start)]
                        + rng.standard_normal((stop - start, dim)).astype(np.float32) / np.sqrt(dim))
        members = np.flatnonzero(group_of_row[start:stop] >= 0)
        if len(members):
            g = group_of_row[start:stop][members]
            noise = rng.standard_normal((len(members), dim)).astype(np.float32)
            noise = _unit(noise - np.sum(noise * group_centres[g], axis=1, keepdims=True) * group_centres[g])
            rho = rhos[g][:, None].astype(np.float32)
            vectors[members] = _unit(np.sqrt(rho) * group_centres[g] + np.sqrt(1 - rho) * noise)
        np.save(root / "img_emb" / f"img_emb_{number}.npy", vectors.astype(dtype), allow_pickle=False)
        keys = [str(row) for row in range(start, stop)]
        pq.write_table(pa.table({"key": keys, "caption": [f"image {key}" for key in keys]}),
                       root / "metadata" / f"metadata_{number}.parquet")
    return PlantedTruth(groups, [float(r) for r in rhos], total)


def score_mined(entries: list[dict], truth: PlantedTruth, min_duplicates: int) -> dict:
    """Group recall, precision and size error of mined entries (records with `members` whose ids are rows).

    A planted group of at least `min_duplicates` is found when one mined group's members are mostly its members
    and its size is within 1 of the planted size; a mined group is correct when it is the match of a planted one.
    """
    owner = {int(row): g for g, rows in enumerate(truth.groups) for row in rows}
    matched: dict[int, int] = {}
    for position, entry in enumerate(entries):
        rows = [int(member["id"]) for member in entry["members"]]
        votes = np.bincount([owner.get(row, -1) + 1 for row in rows], minlength=len(truth.groups) + 1)
        best = int(np.argmax(votes)) - 1
        if best >= 0 and votes[best + 1] * 2 > len(rows) and abs(len(rows) - len(truth.groups[best])) <= 1:
            matched.setdefault(best, position)
    wanted = [g for g, rows in enumerate(truth.groups) if len(rows) >= min_duplicates]
    size_errors = [abs(entries[matched[g]]["duplicates"] - len(truth.groups[g])) for g in wanted if g in matched]
    return {
        "planted_groups": len(wanted),
        "mined_groups": len(entries),
        "recall": sum(g in matched for g in wanted) / max(1, len(wanted)),
        "precision": len(set(matched.values())) / max(1, len(entries)),
        "max_size_error": max(size_errors, default=None),
    }
