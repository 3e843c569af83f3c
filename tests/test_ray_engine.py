"""`--engine ray` on a local Ray cluster: the same blocklists as the local engine, resumable builds, fast failures.

One 2-CPU cluster serves the whole module and is shut down after it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from guardrail import Blocklist, UsageError, mine_duplicates
from guardrail.cli import main
from guardrail.engine_ray import build_blocklist_on_ray
from guardrail.planted import write_planted_folder

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """20 small images and one file that is not an image."""
    root = tmp_path_factory.mktemp("ray-images") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / "broken.png").write_bytes(b"not an image")
    return root


def _build(engine: str, images, weights_file, out, *extra: str) -> int:
    return main(["build", str(images), "-o", str(out), "--model", "ViT-S-32", "--pretrained", str(weights_file),
                 "--batch-size", "4", "--engine", engine, *extra])


def test_ray_build_gives_the_same_blocklist_as_local(cluster, images, weights_file, tmp_path):
    assert _build("local", images, weights_file, tmp_path / "local.safetensors", "--report",
                  str(tmp_path / "local.json")) == 0
    assert _build("ray", images, weights_file, tmp_path / "ray.safetensors", "--shard-size", "8", "--report",
                  str(tmp_path / "ray.json")) == 0
    local, distributed = Blocklist.load(tmp_path / "local.safetensors"), Blocklist.load(tmp_path / "ray.safetensors")
    assert list(distributed.entries) == list(local.entries)
    np.testing.assert_array_equal(distributed.embeddings, local.embeddings)
    assert distributed.spec == local.spec
    import json

    local_report, ray_report = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("local", "ray"))
    assert _without_addresses(ray_report["skips"]) == _without_addresses(local_report["skips"]), "reported alike"
    assert len(ray_report["skips"]) == 1 and ray_report["skipped_by_reason"] == {"cannot decode": 1}
    assert ray_report["shard_count"] == 3 and ray_report["resumed_shards"] == 0
    shards = tmp_path / "ray.safetensors.shards"
    assert sorted(path.name for path in (shards / "img_emb").iterdir()) == [f"img_emb_{i}.npy" for i in range(3)]


def _without_addresses(skips: list[dict]) -> list[dict]:
    """PIL names the in-memory file it could not read by its address (`<_io.BytesIO object at 0x...>`)."""
    import re

    return [{**skip, "reason": re.sub(r" at 0x[0-9a-f]+", "", skip["reason"])} for skip in skips]


def test_a_ray_build_resumes_from_its_complete_shards(cluster, images, weights_file, tmp_path, embedder):
    shards = tmp_path / "shards"
    first = build_blocklist_on_ray([str(images)], embedder, pretrained=str(weights_file), shards=str(shards),
                                   shard_size=8)
    (shards / "img_emb" / "img_emb_1.npy").unlink()  # as if the job was killed while that shard was embedded
    (shards / "img_emb" / ".img_emb_1.npy.x.tmp").write_bytes(b"half written")
    again = build_blocklist_on_ray([str(images)], embedder, pretrained=str(weights_file), shards=str(shards),
                                   shard_size=8)
    assert again.build_report["resumed_shards"] == 2 and again.build_report["shard_count"] == 3
    assert list(again.entries) == list(first.entries)
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert not list(shards.glob("*/.*.tmp")), "stale temp files are cleaned up"
    with pytest.raises(UsageError, match="another build"):
        build_blocklist_on_ray([str(images)], embedder, pretrained=str(weights_file), shards=str(shards),
                               shard_size=5)


def test_on_error_raise_stops_a_ray_build_naming_the_bad_file(cluster, images, weights_file, tmp_path, capsys):
    code = _build("ray", images, weights_file, tmp_path / "out.safetensors", "--on-error", "raise")
    assert code == 1 and "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_ray_mine_finds_the_same_groups_as_local(cluster, tmp_path):
    folder = tmp_path / "emb"
    write_planted_folder(folder, 3000, 32, [4, 6, 30], clusters=10, shard_rows=1000, seed=5)
    spec = {"family": "open_clip", "model": "m", "pretrained": "p", "dim": 32}
    local = mine_duplicates(str(folder), spec, min_duplicates=5, similarity=0.9, lists=8)
    distributed = mine_duplicates(str(folder), spec, min_duplicates=5, similarity=0.9, lists=8, engine="ray")
    assert [entry["duplicates"] for entry in local.entries] == [30, 6]
    assert list(distributed.entries) == list(local.entries)
    np.testing.assert_array_equal(distributed.embeddings, local.embeddings)


def test_an_unreachable_cluster_fails_within_seconds_naming_the_address(images, weights_file, tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a local port where nothing listens
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.perf_counter()
    code = main(["mine", str(images), "--model", "ViT-S-32", "--pretrained", str(weights_file), "-o",
                 str(tmp_path / "out.safetensors"), "--engine", "ray", "--address", address])
    assert code == 2, "not an embedding folder: a usage error, before any cluster"
    code = _build("ray", images, weights_file, tmp_path / "out.safetensors", "--address", address)
    assert code == 1 and address in capsys.readouterr().err
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out.safetensors").exists()
