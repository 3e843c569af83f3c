"""The blocklist file: round trips, and a precise BlocklistError for every kind of damage or tampering."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from guardrail import Blocklist, BlocklistError, UsageError
from guardrail.blocklist import content_sha256

SPEC = {"family": "open_clip", "model": "test", "dim": 8}


def unit(n, dim=8, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def blocklist():
    entries = [{"id": f"img-{i}", "caption": f"caption {i} ✓", "url": f"https://example.org/{i}.jpg"} for i in range(5)]
    return Blocklist(unit(5), entries, spec=SPEC, threshold=0.9)


@pytest.fixture
def saved(blocklist, tmp_path):
    return blocklist.save(tmp_path / "bl.safetensors")


def rewrite(path, tensors=None, metadata=None, fix_checksum=True):
    """Rewrite a blocklist file with changed parts, optionally re-signing it (a forger who knows the format)."""
    with safe_open(str(path), framework="numpy") as handle:
        old_metadata = handle.metadata()
    new_tensors = {**load_file(str(path)), **(tensors or {})}
    new_metadata = {**old_metadata, **(metadata or {})}
    if fix_checksum:
        new_metadata["content_sha256"] = content_sha256(new_tensors, new_metadata)
    save_file(new_tensors, str(path), metadata=new_metadata)


def test_round_trip_keeps_vectors_records_spec_and_threshold(blocklist, saved):
    loaded = Blocklist.load(saved)
    assert len(loaded) == 5 and loaded.threshold == 0.9 and loaded.spec == SPEC
    np.testing.assert_array_equal(loaded.embeddings, blocklist.embeddings)
    assert loaded.entries == blocklist.entries
    assert loaded.entries[0]["url"] == "https://example.org/0.jpg", "extra columns survive"
    assert loaded.entries[0]["duplicates"] == 1 and loaded.created == blocklist.created


def test_float16_storage_halves_the_vectors_and_stays_close(blocklist, tmp_path):
    path = blocklist.save(tmp_path / "half.safetensors", dtype="float16")
    loaded = Blocklist.load(path)
    np.testing.assert_allclose(loaded.embeddings, blocklist.embeddings, atol=1e-3)
    assert load_file(str(path))["embeddings"].dtype == np.float16


def test_an_empty_blocklist_round_trips(tmp_path):
    path = Blocklist(np.zeros((0, 8), np.float32), [], spec=SPEC).save(tmp_path / "empty.safetensors")
    assert len(Blocklist.load(path)) == 0


def test_the_file_is_plain_safetensors_with_string_metadata(saved):
    with safe_open(str(saved), framework="numpy") as handle:
        metadata = handle.metadata()
        assert sorted(handle.keys()) == ["embeddings", "entries"]
    assert metadata["format"] == "guardrail.blocklist" and metadata["count"] == "5"
    assert json.loads(metadata["spec"]) == SPEC
    assert all(isinstance(value, str) for value in metadata.values())


def test_a_flipped_byte_fails_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-20] ^= 0x01  # inside the entries tensor
    saved.write_bytes(bytes(data))
    with pytest.raises(BlocklistError, match="checksum"):
        Blocklist.load(saved)


def test_a_changed_threshold_is_tampering(saved):
    rewrite(saved, metadata={"threshold": "0.1"}, fix_checksum=False)
    with pytest.raises(BlocklistError, match="checksum"):
        Blocklist.load(saved)


def test_a_changed_spec_is_tampering(saved):
    rewrite(saved, metadata={"spec": json.dumps({**SPEC, "model": "other"})}, fix_checksum=False)
    with pytest.raises(BlocklistError, match="checksum"):
        Blocklist.load(saved)


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_files_are_refused(saved, keep):
    saved.write_bytes(saved.read_bytes()[:keep])
    with pytest.raises(BlocklistError, match="not a readable safetensors file"):
        Blocklist.load(saved)


def test_random_bytes_and_missing_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(BlocklistError, match="not a readable safetensors file"):
        Blocklist.load(junk)
    with pytest.raises(BlocklistError, match="does not exist"):
        Blocklist.load(tmp_path / "missing.safetensors")


def test_other_safetensors_files_are_not_blocklists(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(path))
    with pytest.raises(BlocklistError, match="not a guardrail blocklist"):
        Blocklist.load(path)


def test_an_unknown_format_version_names_the_fix(saved):
    rewrite(saved, metadata={"format_version": "99"})
    with pytest.raises(BlocklistError, match="format_version '99'.*Upgrade guardrail"):
        Blocklist.load(saved)


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        (None, {"count": "4"}, "count says 4"),
        ({"embeddings": unit(5, dim=4)}, None, "dim"),
        ({"embeddings": unit(5) * 2}, None, "norm"),
        ({"embeddings": np.full((5, 8), np.nan, np.float32)}, None, "NaN"),
        ({"embeddings": np.zeros((5, 8), np.int32)}, None, "float16/float32"),
        ({"entries": np.frombuffer(b"{not json}\n" * 5, np.uint8).copy()}, None, "unreadable"),
        ({"entries": np.frombuffer(b'{"id": "a"}\n' * 5, np.uint8).copy()}, None, "unique"),
        ({"extra": np.zeros(1, np.uint8)}, None, "must hold tensors"),
        (None, {"spec": "[1, 2]"}, "JSON objects"),
    ],
)
def test_self_consistent_but_invalid_files_say_what_is_wrong(saved, tensors, metadata, message):
    rewrite(saved, tensors=tensors, metadata=metadata, fix_checksum=True)
    with pytest.raises(BlocklistError, match=message):
        Blocklist.load(saved)


def test_a_failed_save_leaves_the_previous_file_untouched_and_no_temp_files(blocklist, saved, monkeypatch):
    before = saved.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        Blocklist(unit(3, seed=1), spec=SPEC).save(saved)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_save_into_a_missing_folder_is_a_usage_error(blocklist, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        blocklist.save(tmp_path / "nope" / "bl.safetensors")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(embeddings=unit(2), entries=[{"id": "a"}], spec=SPEC), "one each"),
        (dict(embeddings=unit(2), entries=[{"id": "a"}, {"caption": "x"}], spec=SPEC), "'id'"),
        (dict(embeddings=unit(2), spec={"model": "x"}), "spec"),
        (dict(embeddings=unit(2), spec=SPEC, threshold=1.5), "threshold"),
        (dict(embeddings=np.ones(8, np.float32), spec=SPEC), "2-D"),
    ],
)
def test_invalid_blocklists_are_refused_in_memory(kwargs, message):
    with pytest.raises((BlocklistError, UsageError), match=message):
        Blocklist(**kwargs)


def test_from_images_records_content_hashes(embedder, tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    blocklist = Blocklist.from_images([path, Image.new("RGB", (32, 32))], embedder)
    import hashlib

    assert blocklist.entries[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert blocklist.entries[1]["sha256"] and blocklist.entries[1]["id"] == "1"
    assert blocklist.spec == embedder.spec and blocklist.embeddings.shape == (2, embedder.dim)
