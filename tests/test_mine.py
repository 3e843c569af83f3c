"""mine_duplicates and `guardrail mine` on the local engine: planted groups found whole, bad shards named, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guardrail import Blocklist, EmbedderMismatchError, ShardError, mine_duplicates
from guardrail.cli import main
from guardrail.mine import MinePlan, _pairs_locally
from guardrail.planted import score_mined, write_planted_folder
from guardrail.shards import list_shards, write_shard

DIM = 64
SPEC = {"family": "open_clip", "model": "test-model", "pretrained": "test", "dim": DIM}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """6,000 clustered vectors in 3 shards with groups of 3 (below --min-duplicates 5), 5, 9, 40 and 120."""
    folder = tmp_path_factory.mktemp("planted") / "emb"
    truth = write_planted_folder(folder, 6000, DIM, [3, 5, 9, 40, 120], clusters=20, shard_rows=2000, seed=3)
    return folder, truth


def test_mine_finds_every_planted_group_whole_and_ranks_them_by_size(planted):
    folder, truth = planted
    mined = mine_duplicates(str(folder), SPEC, min_duplicates=5, similarity=0.9, lists=16)
    score = score_mined(mined.entries, truth, 5)
    assert score["recall"] == 1.0 and score["precision"] == 1.0 and score["max_size_error"] == 0
    assert [entry["duplicates"] for entry in mined.entries] == [120, 40, 9, 5]
    biggest = max(truth.groups, key=len)
    first = mined.entries[0]
    assert first["id"] == str(biggest[0]), "the representative is the group's first vector in input order"
    assert [member["id"] for member in first["members"]] == [str(row) for row in biggest]
    assert first["members"][1]["caption"] == f"image {biggest[1]}", "members keep their metadata"
    np.testing.assert_allclose(mined.embeddings[0], _row(folder, biggest[0]), atol=1e-6)


def _row(folder: Path, row: int) -> np.ndarray:
    shards = list_shards(folder)
    for shard in shards:
        if row < shard.rows:
            vector = np.load(shard.vectors_path)[row].astype(np.float32)
            return vector / np.linalg.norm(vector)
        row -= shard.rows
    raise IndexError(row)


def test_a_pair_split_by_a_list_boundary_is_still_found(tmp_path):
    """a is nearest to list 0 and b to list 1; only their second lists bring them together."""
    centroids = np.eye(DIM, dtype=np.float32)[:2]
    a = np.zeros(DIM, np.float32)
    a[0], a[1], a[2] = 0.62, 0.58, 0.53
    b = a.copy()
    b[0], b[1] = 0.58, 0.62
    vectors = np.stack([a / np.linalg.norm(a), b / np.linalg.norm(b)])
    assert float(vectors[0] @ vectors[1]) > 0.99
    write_shard(tmp_path, 0, vectors, [{"id": "a"}, {"id": "b"}], {})
    plan = MinePlan(list_shards(tmp_path), np.array([0, 2]), SPEC, lists=2)
    assert np.unique(_pairs_locally(plan, centroids, 0.99, None), axis=0).tolist() == [[0, 1]]


def test_mine_on_the_command_line_writes_a_verified_blocklist(planted, tmp_path, monkeypatch):
    folder, _ = planted
    monkeypatch.setattr("guardrail.embedders.open_clip_spec", lambda model, pretrained: SPEC)
    out = tmp_path / "candidates.safetensors"
    code = main(["mine", str(folder), "--model", "m", "--pretrained", "p", "--min-duplicates", "10",
                 "--similarity", "0.9", "--lists", "16", "-o", str(out)])
    assert code == 0
    loaded = Blocklist.load(out)
    assert [entry["duplicates"] for entry in loaded.entries] == [120, 40]


def _copy_folder(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("damage, named", [
    ("wrong dim", "img_emb_1.npy"),
    ("NaN rows", "img_emb_2.npy"),
    ("short metadata", "metadata_0.parquet"),
    ("missing shard", "img_emb_1.npy"),
])
def test_a_bad_shard_is_reported_by_name(planted, tmp_path, capsys, monkeypatch, damage, named):
    import pyarrow.parquet as pq

    folder = _copy_folder(planted[0], tmp_path / "emb")
    if damage == "wrong dim":
        np.save(folder / "img_emb" / "img_emb_1.npy", np.ones((2000, DIM + 1), np.float16))
    elif damage == "NaN rows":
        vectors = np.load(folder / "img_emb" / "img_emb_2.npy")
        vectors[7] = np.nan
        np.save(folder / "img_emb" / "img_emb_2.npy", vectors)
    elif damage == "short metadata":
        table = pq.read_table(folder / "metadata" / "metadata_0.parquet")
        pq.write_table(table.slice(0, 1999), folder / "metadata" / "metadata_0.parquet")
    else:
        (folder / "img_emb" / "img_emb_1.npy").unlink()
    with pytest.raises(ShardError, match=named):
        mine_duplicates(str(folder), SPEC, similarity=0.9)
    monkeypatch.setattr("guardrail.embedders.open_clip_spec", lambda model, pretrained: SPEC)
    code = main(["mine", str(folder), "--model", "m", "--pretrained", "p", "-o", str(tmp_path / "out.safetensors")])
    assert code == 1 and named in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_mine_refuses_folders_of_another_embedder(planted, tmp_path):
    folder = _copy_folder(planted[0], tmp_path / "emb")
    (folder / "guardrail-spec.json").write_text(json.dumps({**SPEC, "model": "another-model"}))
    with pytest.raises(EmbedderMismatchError, match="another-model"):
        mine_duplicates([str(planted[0]), str(folder)], SPEC)


def test_the_local_engine_never_imports_ray(planted):
    script = (
        "import sys\n"
        "from guardrail import mine_duplicates\n"
        f"mined = mine_duplicates({str(planted[0])!r}, {SPEC!r}, min_duplicates=100, similarity=0.9, lists=16)\n"
        "assert len(mined) == 1, len(mined)\n"
        "print('ray' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_an_interrupted_shard_write_leaves_no_shard_file(tmp_path, monkeypatch):
    """The Ray build's shard writer: a kill while the vectors are written leaves an incomplete shard, never a half
    file, and the complete shard before it stays readable."""
    write_shard(tmp_path, 0, np.eye(DIM, dtype=np.float32)[:2], [{"id": "a"}, {"id": "b"}], {"counts": {"read": 2}})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("guardrail.shards.np.save", killed)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path, 1, np.eye(DIM, dtype=np.float32)[2:4], [{"id": "c"}, {"id": "d"}], {})
    assert sorted(path.name for path in (tmp_path / "img_emb").iterdir()) == ["img_emb_0.npy"]
    assert [shard.rows for shard in list_shards(tmp_path)] == [2]
