"""BlocklistIndex agrees with a brute-force numpy oracle."""

from __future__ import annotations

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
    assert ids[0, :2].tolist() != [-1, -1] and ids[0, 2:].tolist() == [-1, -1]
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
