"""BlocklistIndex agrees with a brute-force numpy oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from guardrail import Blocklist, BlocklistIndex, UsageError


def unit(rng, n, dim):
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("n, k", [(1, 1), (50, 1), (500, 5)])
def test_search_matches_brute_force_cosine(n, k):
    rng = np.random.default_rng(n)
    base, queries = unit(rng, n, 32), unit(rng, 20, 32)
    scores, ids = BlocklistIndex(base).search(queries, k=k)
    oracle = queries @ base.T
    expected_ids = np.argsort(-oracle, axis=1)[:, :k]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(oracle, expected_ids, axis=1), atol=1e-5)


def test_an_empty_index_returns_no_neighbours():
    scores, ids = BlocklistIndex(np.zeros((0, 8), np.float32)).search(unit(np.random.default_rng(0), 3, 8), k=2)
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_k_larger_than_the_index_pads_with_minus_one():
    rng = np.random.default_rng(1)
    scores, ids = BlocklistIndex(unit(rng, 2, 8)).search(unit(rng, 1, 8), k=4)
    assert sorted(ids[0, :2].tolist()) == [0, 1] and ids[0, 2:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 2:]).all()


def test_from_blocklist_indexes_its_embeddings():
    rng = np.random.default_rng(2)
    vectors = unit(rng, 10, 16)
    index = BlocklistIndex.from_blocklist(Blocklist(vectors, spec={"dim": 16}))
    assert len(index) == 10
    assert index.search(vectors[[7]], k=1)[1][0, 0] == 7


def test_wrong_query_dim_is_a_usage_error():
    with pytest.raises(UsageError, match="query vectors"):
        BlocklistIndex(unit(np.random.default_rng(3), 4, 16)).search(np.zeros((1, 8), np.float32))


def planted(count=20_000, dim=64, queries=40, noise=0.15, seed=0):
    """A base set and queries that are near-duplicates (cosine ~0.99) of known rows."""
    rng = np.random.default_rng(seed)
    base = unit(rng, count, dim)
    targets = rng.choice(count, queries, replace=False)
    noisy = base[targets] + noise * unit(rng, queries, dim) / np.sqrt(dim) * 4
    return base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True), targets


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-sq8", "ivf-pq"])
def test_every_index_kind_finds_planted_near_duplicates_with_exact_scores(kind):
    base, queries, targets = planted()
    index = BlocklistIndex(base, kind=kind)
    scores, ids = index.search(queries, k=3)
    assert index.kind == kind
    np.testing.assert_array_equal(ids[:, 0], targets)
    exact = np.einsum("qd,qkd->qk", queries, base[ids])
    np.testing.assert_allclose(scores, exact, atol=1e-5), "approximate candidates are re-scored exactly"


def test_auto_picks_exact_search_for_small_blocklists_and_compact_indexes_for_large_ones():
    from guardrail.index import choose_kind

    assert choose_kind(10_000, 512) == "flat"
    assert choose_kind(1_000_000, 512) == "ivf-sq8"
    assert choose_kind(100_000_000, 768) == "ivf-pq"
    assert choose_kind(1_000_000, 512, max_memory=100 << 20) == "ivf-pq"
    assert choose_kind(50_000, 512, max_memory=64 << 20) == "ivf-sq8"


def test_a_stored_index_survives_the_blocklist_file_and_is_reused(tmp_path):
    base, queries, targets = planted(count=5000)
    blocklist = Blocklist(base, spec={"dim": 64}).attach_index(BlocklistIndex(base, kind="ivf-pq"))
    loaded = Blocklist.load(blocklist.save(tmp_path / "bl.safetensors"))
    assert loaded.index_kind == "ivf-pq" and loaded.faiss_index is not None
    index = BlocklistIndex.from_blocklist(loaded)
    assert index.kind == "ivf-pq"
    np.testing.assert_array_equal(index.search(queries, k=1)[1][:, 0], targets)
    assert BlocklistIndex.from_blocklist(loaded, kind="flat").kind == "flat", "an explicit kind rebuilds"


def test_a_stored_index_of_other_vectors_is_refused():
    from guardrail import GuardrailError

    base = unit(np.random.default_rng(5), 100, 16)
    with pytest.raises(GuardrailError, match="rebuild"):
        BlocklistIndex(base[:50], serialized=BlocklistIndex(base).serialize())


def test_the_stored_index_is_covered_by_the_checksum(tmp_path):
    from guardrail import BlocklistError

    base = unit(np.random.default_rng(6), 300, 16)
    path = Blocklist(base, spec={"dim": 16}).attach_index(BlocklistIndex(base, kind="ivf-sq8")).save(tmp_path / "b.st")
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_size])["index"]["data_offsets"]
    data[8 + header_size + (start + end) // 2] ^= 0xFF  # a byte inside the 'index' tensor itself
    path.write_bytes(bytes(data))
    with pytest.raises(BlocklistError, match="checksum"):
        Blocklist.load(path)


def flat_blob_claiming(floats: int, base: np.ndarray) -> np.ndarray:
    """A flat index blob whose vector-size field claims `floats` floats: faiss allocates them before it reads."""
    import faiss
    import struct

    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    blob = faiss.serialize_index(flat).copy()
    size_field = 4 + 4 + 8 + 8 + 8 + 1 + 4  # fourcc, d, ntotal, 2 dummies, is_trained, metric
    blob[size_field : size_field + 8] = np.frombuffer(struct.pack("<Q", floats), np.uint8)
    return blob


def ivf_blob_with_ids_out_of_range(base: np.ndarray) -> np.ndarray:
    import faiss

    owner = faiss.deserialize_index(BlocklistIndex(base, kind="ivf-sq8").serialize())  # keep: it owns the index
    index = faiss.downcast_index(owner)
    lists = faiss.downcast_InvertedLists(index.invlists)
    first = next(i for i in range(lists.nlist) if lists.list_size(i))
    faiss.rev_swig_ptr(lists.get_ids(first), 1)[0] = len(base) + 10_000  # a row past the end of the blocklist
    return faiss.serialize_index(index)


def ivf_blob_with_lists_on_disk(base: np.ndarray, folder) -> np.ndarray:
    import faiss

    quantizer = faiss.IndexFlatIP(base.shape[1])
    index = faiss.IndexIVFScalarQuantizer(quantizer, base.shape[1], 4, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    on_disk = faiss.OnDiskInvertedLists(4, index.code_size, str(folder / "lists.ivfdata"))
    index.replace_invlists(on_disk, True)
    on_disk.this.disown()
    index.add(base)
    return faiss.serialize_index(index)


def resigned_with_index(base: np.ndarray, blob: np.ndarray, path):
    """A blocklist file whose 'index' tensor is `blob` and whose checksum is valid: anyone can re-sign a file."""
    blocklist = Blocklist(base, spec={"dim": base.shape[1]}).attach_index(BlocklistIndex(base, kind="ivf-sq8"))
    blocklist.faiss_index = np.asarray(blob, dtype=np.uint8)
    return blocklist.save(path)


@pytest.mark.parametrize("hostile", ["garbage", "ids out of range", "lists on disk", "index of other vectors",
                                     "4 GB size field"])
def test_a_hostile_stored_index_in_a_resigned_file_is_a_blocklist_error(hostile, tmp_path):
    from guardrail import BlocklistError

    base = unit(np.random.default_rng(8), 300, 16)
    blob = {
        "garbage": lambda: np.frombuffer(b"IwSq" + np.random.default_rng(0).bytes(4000), np.uint8),
        "ids out of range": lambda: ivf_blob_with_ids_out_of_range(base),
        "lists on disk": lambda: ivf_blob_with_lists_on_disk(base, tmp_path),
        "index of other vectors": lambda: BlocklistIndex(base[::-1].copy(), kind="ivf-sq8").serialize(),
        "4 GB size field": lambda: flat_blob_claiming(10**9, base),
    }[hostile]()
    loaded = Blocklist.load(resigned_with_index(base, blob, tmp_path / "hostile.safetensors"))  # the checksum holds
    with pytest.raises(BlocklistError, match="(?i)rebuild"):
        BlocklistIndex.from_blocklist(loaded)
    rebuilt = BlocklistIndex.from_blocklist(loaded, kind="flat")
    assert rebuilt.search(base[:1])[1][0, 0] == 0, "an explicit kind rebuilds"


def test_a_stored_index_that_asks_faiss_for_gigabytes_never_allocates_them_in_the_process(tmp_path):
    """faiss sizes a vector from the blob before reading it; the guard process must not be the one that pays."""
    base = unit(np.random.default_rng(9), 300, 16)
    path = resigned_with_index(base, flat_blob_claiming(10**9, base), tmp_path / "bomb.safetensors")  # 4 GB of floats
    script = (
        "import sys\n"
        "from guardrail import Blocklist, BlocklistError, BlocklistIndex\n"
        "blocklist = Blocklist.load(sys.argv[1])\n"
        "try:\n"
        "    BlocklistIndex.from_blocklist(blocklist)\n"
        "except BlocklistError as error:\n"
        "    print('refused:', error)\n"
        # VmHWM is this process image's own peak; ru_maxrss would carry over the pytest parent's peak across exec.
        "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "print('peak MiB', int(hwm.split()[1]) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout
    assert int(done.stdout.split("peak MiB")[1]) < 1024, "the 4 GB were never allocated in this process"


def test_cuda_without_faiss_gpu_support_is_a_clear_error():
    from guardrail import GuardrailError
    from guardrail.index import gpu_available

    if gpu_available():
        pytest.skip("this faiss has GPU support")
    with pytest.raises(GuardrailError, match="faiss with GPU support"):
        BlocklistIndex(unit(np.random.default_rng(7), 10, 8), device="cuda")


@pytest.mark.skipif("not __import__('guardrail.index').index.gpu_available()", reason="needs faiss-gpu and a GPU")
def test_gpu_index_matches_the_cpu_index_under_concurrent_searches():
    from concurrent.futures import ThreadPoolExecutor

    base, queries, targets = planted()
    gpu = BlocklistIndex(base, kind="flat", device="cuda")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: gpu.search(q[None], k=1)[1][0, 0], queries))
    assert results == targets.tolist()
