"""Guard.check: one verdict per image, the blocklist's threshold, refusal of a mismatched embedder, thread safety."""

from __future__ import annotations

import logging
import threading
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


class PixelEmbedder:
    """A cheap deterministic stand-in embedder (mean colour of 4x4 cells) for high-volume concurrency tests."""

    spec = {"family": "test-pixels", "dim": 48}
    dim = 48

    def embed(self, images):
        from guardrail.embedders import l2_normalize
        from guardrail.images import to_pil_images

        cells = [np.asarray(image.resize((4, 4)), dtype=np.float32).reshape(-1) + 1.0 for image in to_pil_images(images)]
        return l2_normalize(np.stack(cells))


def colour_images(count, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(count)]


def summary(verdicts):
    return [(v.matched, v.entry_id, round(v.score, 5)) for v in verdicts]


def test_sixteen_threads_times_two_hundred_calls_give_the_sequential_results():
    embedder = PixelEmbedder()
    pool_images = colour_images(40, seed=1)
    guard = Guard(Blocklist(embedder.embed(pool_images[:10]), spec=embedder.spec, threshold=0.999), embedder)
    rng = np.random.default_rng(2)
    calls = [[pool_images[i] for i in rng.integers(0, 40, size=rng.integers(1, 6))] for _ in range(16 * 200)]
    sequential = [summary(guard.check(batch)) for batch in calls]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda batch: summary(guard.check(batch)), calls))
    assert concurrent == sequential
    assert any(matched for result in sequential for matched, _, _ in result)


def test_swapping_blocklists_under_load_never_mixes_or_fails():
    embedder = PixelEmbedder()
    images = colour_images(20, seed=3)
    first = Blocklist(embedder.embed(images[:10]), [{"id": f"a{i}"} for i in range(10)], spec=embedder.spec,
                      threshold=0.999)
    second = Blocklist(embedder.embed(images[10:]), [{"id": f"b{i}"} for i in range(10)], spec=embedder.spec,
                       threshold=0.999)
    guard = Guard(first, embedder)
    expected = {"a": summary(Guard(first, embedder).check(images)), "b": summary(Guard(second, embedder).check(images))}
    stop = threading.Event()
    results, errors = [], []

    def client():
        while not stop.is_set():
            try:
                results.append(summary(guard.check(images)))
            except Exception as error:  # noqa: BLE001 - the test counts every failure
                errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for swap in range(40):
        guard.swap_blocklist(second if swap % 2 == 0 else first)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results and all(result in (expected["a"], expected["b"]) for result in results)


def test_a_swap_still_verifies_the_embedder_spec(guard, other_embedder, unguarded):
    foreign = Blocklist.from_images([unguarded[0]], other_embedder)
    with pytest.raises(EmbedderMismatchError):
        guard.swap_blocklist(foreign)
    assert guard.blocklist.entries[0]["id"] == "seed-1", "a refused swap keeps the old blocklist"


def test_a_disabled_entry_never_matches_until_enabled(memorized_blocklist, embedder, unguarded):
    guard = Guard(memorized_blocklist, embedder)
    guard.disable("seed-1")
    assert guard.disabled == {"seed-1"}
    assert not guard.check([unguarded[1]])[0].matched
    guard.enable("seed-1")
    assert guard.check([unguarded[1]])[0].matched
    with pytest.raises(UsageError, match="no blocklist entries"):
        guard.disable("nope")


def test_disabling_falls_back_to_the_next_nearest_entry():
    embedder = PixelEmbedder()
    images = colour_images(3, seed=4)
    blocklist = Blocklist(embedder.embed(images), [{"id": "x"}, {"id": "y"}, {"id": "z"}], spec=embedder.spec,
                          threshold=0.999)
    guard = Guard(blocklist, embedder)
    guard.disable("x")
    verdict = guard.check([images[0]])[0]
    assert verdict.entry_id in ("y", "z") and not verdict.matched


def test_match_counts_and_flooding_entries_are_reported(caplog):
    embedder = PixelEmbedder()
    images = colour_images(10, seed=5)
    guard = Guard(Blocklist(embedder.embed(images[:2]), [{"id": "broad"}, {"id": "rare"}], spec=embedder.spec,
                            threshold=0.999), embedder, flood_fraction=0.3, flood_window=20)
    with caplog.at_level(logging.WARNING, logger="guardrail"):
        guard.check([images[0]] * 4 + images[2:8])
        guard.check([images[1]])
    assert guard.match_counts() == {"broad": 4, "rare": 1}
    assert guard.flooding() == ["broad"]
    assert len([r for r in caplog.records if "broad" in r.getMessage()]) == 1, "warned once"


def test_a_swap_keeps_the_threshold_the_guard_was_given(memorized_blocklist, embedder):
    guard = Guard(memorized_blocklist, embedder, threshold=0.5)
    guard.swap_blocklist(memorized_blocklist.with_threshold(0.9))
    assert guard.threshold == 0.5
    guard.swap_blocklist(memorized_blocklist, threshold=0.7)
    assert guard.threshold == 0.7


def test_verdict_records_are_copies(guard, unguarded):
    verdict = guard.check([unguarded[1]])[0]
    verdict.entry["caption"] = "changed"
    assert guard.blocklist.entries[0]["caption"] != "changed"


def test_concurrent_swaps_never_lose_a_threshold_override(monkeypatch):
    """A swap that started before another swap set an override must still install that override."""
    from guardrail import index as index_module

    embedder = PixelEmbedder()
    images = colour_images(4, seed=6)
    blocklist = Blocklist(embedder.embed(images), spec=embedder.spec, threshold=0.999)
    guard = Guard(blocklist, embedder)
    slow_swap_building, override_set = threading.Event(), threading.Event()
    build_index = index_module.BlocklistIndex.from_blocklist.__func__

    def from_blocklist(cls, *args, **kwargs):
        if threading.current_thread().name == "slow-swap":  # hold this swap's index build until the override is set
            slow_swap_building.set()
            assert override_set.wait(10)
        return build_index(cls, *args, **kwargs)

    monkeypatch.setattr(index_module.BlocklistIndex, "from_blocklist", classmethod(from_blocklist))
    slow = threading.Thread(target=guard.swap_blocklist, args=(blocklist.with_threshold(0.2),), name="slow-swap")
    slow.start()
    assert slow_swap_building.wait(10)
    guard.swap_blocklist(blocklist, threshold=0.5)
    override_set.set()
    slow.join(10)
    assert guard.threshold == 0.5, "the override set by the other swap is kept"
