"""Blocklists too big for RAM: vectors re-scored through the file's memory map, records parsed only when read,
streamed verification, search knobs stored with the index, and disabled entries that never grow `k`."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from safetensors import safe_open

from guardrail import Blocklist, BlocklistError, BlocklistIndex, Guard, UsageError
from guardrail import blocklist as blocklist_module
from guardrail import index as index_module
from guardrail.blocklist import LazyEntries
from guardrail.cli import main
from guardrail.index import auto_nprobe, store_trained_index


def unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def near(rng: np.random.Generator, targets: np.ndarray, cosine: float) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each target."""
    noise = unit_rows(rng, len(targets), targets.shape[1])
    noise -= (noise * targets).sum(1, keepdims=True) * targets
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (cosine * targets + np.sqrt(1 - cosine**2) * noise).astype(np.float32)


@pytest.fixture(scope="module")
def vectors(embedder) -> np.ndarray:
    return unit_rows(np.random.default_rng(0), 4000, embedder.dim)


@pytest.fixture(scope="module")
def queries(embedder, vectors) -> np.ndarray:
    rng = np.random.default_rng(1)
    targets = vectors[rng.choice(len(vectors), 40, replace=False)]
    return np.concatenate([near(rng, targets, 0.96), near(rng, targets, 0.94), unit_rows(rng, 20, embedder.dim)])


@pytest.fixture(scope="module")
def ivf_file(tmp_path_factory, embedder, vectors):
    """A 4,000-entry list with a stored IVF-SQ8 index, saved as float32 and as float16."""
    entries = [{"id": f"e{i}", "caption": f"caption {i}"} for i in range(len(vectors))]
    blocklist = store_trained_index(Blocklist(vectors, entries, spec=embedder.spec, threshold=0.95), "ivf-sq8")
    folder = tmp_path_factory.mktemp("large")
    return blocklist.save(folder / "f32.safetensors"), blocklist.save(folder / "f16.safetensors", dtype="float16")


def verdict_tuples(guard: Guard, queries: np.ndarray) -> list[tuple]:
    return [(v.matched, round(v.score, 5), v.entry_id) for v in guard.check_embeddings(queries)]


# ---- memory-mapped re-scoring ------------------------------------------------------------------------------------


def test_mapped_rescoring_holds_no_float32_copy_and_gives_the_in_ram_verdicts(ivf_file, embedder, vectors, queries):
    path, _ = ivf_file
    mapped = Guard(Blocklist.load(path), embedder, rescore="mapped")
    in_ram = Guard(Blocklist.load(path), embedder, rescore="memory")
    index = mapped._snapshot.index
    assert index.rescore == "mapped" and isinstance(index.vectors, np.memmap)
    copies = [name for name, value in vars(index).items() if isinstance(value, np.ndarray)
              and value.shape == vectors.shape and not isinstance(value, np.memmap)]
    assert copies == [], f"the index keeps an N x dim array in RAM: {copies}"
    assert isinstance(in_ram._snapshot.index.vectors, np.ndarray) and not isinstance(
        in_ram._snapshot.index.vectors, np.memmap)
    assert verdict_tuples(mapped, queries) == verdict_tuples(in_ram, queries)
    assert sum(v.matched for v in mapped.check_embeddings(queries)) == 40, "the 0.96 copies match, 0.94 ones do not"


def test_building_a_mapped_guard_allocates_no_copy_of_the_vectors(ivf_file, embedder, vectors):
    blocklist = Blocklist.load(ivf_file[0])
    tracemalloc.start()
    try:
        Guard(blocklist, embedder, rescore="mapped")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < vectors.nbytes / 4, f"building the guard allocated {peak / 2**20:.1f} MiB"


def test_auto_rescoring_maps_lists_above_the_cut_off_and_copies_small_ones(ivf_file, embedder, monkeypatch):
    loaded = Blocklist.load(ivf_file[0])
    assert Guard(loaded, embedder)._snapshot.index.rescore == "memory", "4,000 x 384 floats are under 64 MiB"
    monkeypatch.setattr(index_module, "RESCORE_IN_MEMORY_BYTES", 1 << 20)
    assert Guard(loaded, embedder)._snapshot.index.rescore == "mapped"
    in_process = Blocklist(np.array(loaded.embeddings), list(loaded.entries), spec=loaded.spec)
    assert BlocklistIndex(in_process.embeddings, kind="ivf-sq8").rescore == "memory", "no file to map"


def test_float16_on_disk_is_rescored_in_float32_within_its_rounding(ivf_file, embedder, queries):
    full, half = (Guard(Blocklist.load(path), embedder, rescore="mapped") for path in ivf_file)
    assert Blocklist.load(ivf_file[1]).embeddings.dtype == np.float16
    scores, _ = half._snapshot.index.search(queries, k=1)
    assert scores.dtype == np.float32
    for a, b in zip(full.check_embeddings(queries), half.check_embeddings(queries)):
        assert a.entry_id == b.entry_id and abs(a.score - b.score) < 2e-3


# ---- lazy records and streamed verification ----------------------------------------------------------------------


def test_records_are_parsed_only_when_read(ivf_file, monkeypatch):
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(blocklist_module.json, "loads",
                        lambda text, **kw: parsed.append(text) or real_loads(text, **kw))
    loaded = Blocklist.load(ivf_file[0], verify=False)
    assert isinstance(loaded.entries, LazyEntries) and len(loaded.entries) == 4000
    assert not any('"id"' in str(text) for text in parsed), "no record parsed at load"
    assert loaded.entries[1234]["caption"] == "caption 1234"
    assert sum('"id"' in str(text) for text in parsed) == 1, "reading one record parses one"
    assert loaded.rows_of(["e7", "e3999", "nope"]) == {"e7": 7, "e3999": 3999}


def test_verification_streams_the_file_in_chunks(ivf_file, vectors, monkeypatch):
    monkeypatch.setattr(blocklist_module, "_STREAM_BYTES", 1 << 16)
    tracemalloc.start()
    try:
        loaded = Blocklist.load(ivf_file[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(loaded) == 4000 and ivf_file[0].stat().st_size > 7 * 2**20
    assert peak < 2 * 2**20, f"verifying an {ivf_file[0].stat().st_size >> 20} MiB file allocated {peak >> 20} MiB"


def region(path, name):
    with open(path, "rb") as raw:
        size = int.from_bytes(raw.read(8), "little")
        header = json.loads(raw.read(size))
    start, end = header[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def test_a_byte_flipped_mid_stream_fails_the_checksum_but_not_without_verify(ivf_file, tmp_path, monkeypatch):
    monkeypatch.setattr(blocklist_module, "_STREAM_BYTES", 4096)
    start, end = region(ivf_file[0], "embeddings")
    data = bytearray(ivf_file[0].read_bytes())
    data[(start + end) // 2 + 1] ^= 0x01  # a low mantissa bit: still finite, still unit-norm
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BlocklistError, match="checksum"):
        Blocklist.load(damaged)
    assert len(Blocklist.load(damaged, verify=False)) == 4000, "verify=False skips the pass it documents skipping"


def test_without_verify_a_broken_record_raises_when_it_is_read(ivf_file, tmp_path):
    start, _ = region(ivf_file[0], "entries")
    data = bytearray(ivf_file[0].read_bytes())
    data[start] = ord("#")  # record 0 is no longer JSON
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bytes(data))
    loaded = Blocklist.load(broken, verify=False)
    assert loaded.entries[1]["id"] == "e1"
    with pytest.raises(BlocklistError, match="entry 0 is unreadable.*verify=True"):
        loaded.entries[0]


@pytest.mark.parametrize("cut", ["after the header", "in the vectors", "in the index"])
def test_without_verify_truncated_files_and_a_corrupt_index_are_still_refused(ivf_file, tmp_path, embedder, cut):
    data = ivf_file[0].read_bytes()
    damaged = tmp_path / "cut.safetensors"
    if cut == "after the header":
        damaged.write_bytes(data[: region(ivf_file[0], "embeddings")[0]])
    elif cut == "in the vectors":
        start, end = region(ivf_file[0], "embeddings")
        damaged.write_bytes(data[: (start + end) // 2])
    else:
        start, end = region(ivf_file[0], "index")
        corrupt = bytearray(data)
        corrupt[start : start + 64] = bytes(64)  # the index's header: its fourcc and sizes
        damaged.write_bytes(bytes(corrupt))
    with pytest.raises(BlocklistError):
        Guard(Blocklist.load(damaged, verify=False), embedder)


# ---- search knobs -------------------------------------------------------------------------------------------------


def test_guard_passes_search_knobs_to_the_index(ivf_file, embedder):
    guard = Guard(Blocklist.load(ivf_file[0]), embedder, nprobe=3, candidates=5)
    index = guard._snapshot.index
    assert (index.nprobe, index.candidates) == (3, 5)
    import faiss

    assert faiss.downcast_index(index._cpu_index).nprobe == 3, "faiss itself searches with it"
    hnsw = Guard(Blocklist.load(ivf_file[0]), embedder, index_kind="hnsw", ef_search=9)._snapshot.index
    assert faiss.downcast_index(hnsw._cpu_index).hnsw.efSearch == 9
    assert Guard(Blocklist.load(ivf_file[0]), embedder, index_kind="auto", max_memory=1).\
        _snapshot.index.kind == "ivf-pq", "a tiny memory budget picks product quantization"
    with pytest.raises(UsageError, match="nprobe must be"):
        Guard(Blocklist.load(ivf_file[0]), embedder, nprobe=0)
    with pytest.raises(UsageError, match="candidates must be"):
        Guard(Blocklist.load(ivf_file[0]), embedder, candidates=-1)


def test_auto_nprobe_is_a_sixteenth_of_the_lists_and_at_least_64():
    assert [auto_nprobe(n) for n in (16, 64, 256, 1024, 4096, 65536)] == [16, 64, 64, 64, 256, 4096]
    index = BlocklistIndex(unit_rows(np.random.default_rng(2), 3000, 16), kind="ivf-sq8")
    import faiss

    nlist = faiss.downcast_index(index._cpu_index).nlist
    assert index.nprobe == auto_nprobe(nlist) == faiss.downcast_index(index._cpu_index).nprobe


def test_a_stored_index_brings_its_search_parameters_and_a_guard_can_override_them(embedder, vectors, tmp_path):
    blocklist = Blocklist(vectors[:2000], spec=embedder.spec)
    path = store_trained_index(blocklist, "ivf-sq8", nprobe=4, candidates=12).save(tmp_path / "p.safetensors")
    loaded = Blocklist.load(path)
    assert loaded.index_params == {"nprobe": 4, "candidates": 12}
    index = Guard(loaded, embedder)._snapshot.index
    assert (index.nprobe, index.candidates) == (4, 12)
    assert Guard(loaded, embedder, candidates=20)._snapshot.index.candidates == 20


def test_forged_index_params_are_a_blocklist_error(embedder, vectors, tmp_path):
    from safetensors.numpy import load_file, save_file

    from guardrail.blocklist import content_sha256

    blocklist = store_trained_index(Blocklist(vectors[:2000], spec=embedder.spec), "ivf-sq8")
    path = blocklist.save(tmp_path / "x.safetensors")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    metadata["index_params"] = json.dumps({"nprobe": -1})
    metadata["content_sha256"] = content_sha256(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BlocklistError, match="index_params"):
        Blocklist.load(path)


def test_the_build_command_stores_dtype_index_and_search_parameters(tmp_path, weights_file):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 255 - 50 * i, 30 * i)).save(folder / f"{i}.png")
    out = tmp_path / "bl.safetensors"
    assert main(["build", str(folder), "-o", str(out), "--model", "ViT-S-32", "--pretrained", str(weights_file),
                 "--dtype", "float16", "--index", "ivf-sq8", "--nprobe", "3", "--candidates", "7"]) == 0
    loaded = Blocklist.load(out)
    assert loaded.embeddings.dtype == np.float16 and loaded.index_kind == "ivf-sq8"
    assert loaded.index_params == {"nprobe": 1, "candidates": 7}, "nprobe is capped at the list count (1 here)"


# ---- disabled entries ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf-sq8"])
def test_disabling_3000_entries_keeps_k_fixed_and_matches_a_list_without_them(
    ivf_file, embedder, vectors, kind, monkeypatch
):
    rng = np.random.default_rng(5)
    off = rng.choice(len(vectors), 3000, replace=False)
    targets = np.concatenate([off[:30], np.setdiff1d(np.arange(len(vectors)), off)[:30]])
    probes = near(rng, vectors[targets], 0.97)  # half aim at disabled entries, half at enabled ones
    guard = Guard(Blocklist.load(ivf_file[0]), embedder, index_kind=kind)
    guard.disable(*(f"e{i}" for i in off))
    assert len(guard.disabled) == 3000
    kept = np.setdiff1d(np.arange(len(vectors)), off)
    without = Guard(Blocklist(vectors[kept], [{"id": f"e{i}"} for i in kept], spec=embedder.spec, threshold=0.95),
                    embedder, index_kind=kind)
    asked = []
    real = BlocklistIndex._faiss_search
    monkeypatch.setattr(BlocklistIndex, "_faiss_search",
                        lambda self, v, wanted, skip: asked.append(wanted) or real(self, v, wanted, skip))
    got = guard.check_embeddings(probes)
    assert set(asked) == {1 if kind == "flat" else guard._snapshot.index.candidates}, "k does not grow"
    expected = without.check_embeddings(probes)
    if kind == "flat":
        assert [(v.matched, v.entry_id) for v in got] == [(v.matched, v.entry_id) for v in expected]
        np.testing.assert_allclose([v.score for v in got], [v.score for v in expected], atol=1e-5)
    assert not any(v.entry_id in guard.disabled for v in got)
    assert [v.matched for v in got] == [False] * 30 + [True] * 30, "disabled entries never match, others do"
    guard.enable(*(f"e{i}" for i in off[:30]))
    assert all(v.matched for v in guard.check_embeddings(probes)), "enabled again, they match again"


def test_info_reports_the_stored_dtype_and_search_parameters(ivf_file, embedder, capsys):
    assert main(["info", str(ivf_file[1]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vectors"] == f"float16 x {embedder.dim}" and info["index"] == "ivf-sq8"
    assert info["index_params"]["candidates"] == 32 and info["index_params"]["nprobe"] >= 1
