"""Guard.check: one verdict per image, the blocklist's threshold, refusal of a mismatched embedder, thread safety."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import TEST_THRESHOLD

from guardrail import Blocklist, EmbedderMismatchError, Guard, ImageDecodeError, UsageError


def test_the_blocklisted_image_matches_and_names_its_entry(guard, unguarded):
    verdicts = guard.check(unguarded)
    assert [v.matched for v in verdicts] == [False, True, False, False]
    assert verdicts[1].entry_id == "seed-1" and verdicts[1].entry["caption"].startswith("a photograph")
    assert verdicts[1].score == pytest.approx(1.0, abs=1e-5)
    assert all(v.score < TEST_THRESHOLD for i, v in enumerate(verdicts) if i != 1)


def test_a_match_means_score_at_or_above_the_threshold(memorized_blocklist, embedder, unguarded):
    score = Guard(memorized_blocklist, embedder).check([unguarded[0]])[0].score
    assert Guard(memorized_blocklist, embedder, threshold=score).check([unguarded[0]])[0].matched
    assert not Guard(memorized_blocklist, embedder, threshold=np.nextafter(score, 2)).check([unguarded[0]])[0].matched


def test_threshold_comes_from_the_blocklist_unless_given(memorized_blocklist, embedder):
    assert Guard(memorized_blocklist, embedder).threshold == TEST_THRESHOLD
    assert Guard(memorized_blocklist, embedder, threshold=0.5).threshold == 0.5
    with pytest.raises(UsageError, match="threshold"):
        Guard(memorized_blocklist, embedder, threshold=2.0)


def test_an_embedder_with_other_weights_is_refused(memorized_blocklist, other_embedder):
    with pytest.raises(EmbedderMismatchError, match="weights_sha256"):
        Guard(memorized_blocklist, other_embedder)


def test_an_empty_blocklist_never_matches(embedder, unguarded):
    empty = Blocklist(np.zeros((0, embedder.dim), np.float32), [], spec=embedder.spec, threshold=-1.0)
    verdicts = Guard(empty, embedder).check(unguarded)
    assert [v.matched for v in verdicts] == [False] * 4 and verdicts[0].entry_id is None


def test_a_blocklist_path_and_image_paths_work(memorized_blocklist, embedder, unguarded, tmp_path):
    memorized_blocklist.save(tmp_path / "bl.safetensors")
    unguarded[1].save(tmp_path / "generated.png")
    guard = Guard(tmp_path / "bl.safetensors", embedder)
    assert guard.check(tmp_path / "generated.png")[0].matched


def test_empty_input_is_an_error_not_an_empty_answer(guard):
    with pytest.raises(ImageDecodeError, match="empty"):
        guard.check([])


def test_concurrent_checks_give_the_sequential_results(guard, unguarded):
    batches = [unguarded[i % 4 :] + unguarded[: i % 4] for i in range(24)]
    sequential = [[(v.matched, round(v.score, 5)) for v in guard.check(batch)] for batch in batches]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda b: [(v.matched, round(v.score, 5)) for v in guard.check(b)], batches))
    assert concurrent == sequential


def test_the_embedder_must_be_an_embedder(memorized_blocklist):
    with pytest.raises(UsageError, match="embedder"):
        Guard(memorized_blocklist, object())
