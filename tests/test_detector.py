"""Calibrating the memorization-score threshold of a pipeline on benign prompts, and the detection metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardrail import GuardedPipeline, GuardrailError, UsageError
from guardrail.detector import (
    MemorizationThreshold,
    calibrate_memorization,
    detection_metrics,
    memorization_scores,
    threshold_at_fpr,
)

BENIGN = [f"a photo of object number {i} on a table" for i in range(100)]


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_threshold_flags_at_most_fpr_and_is_the_lowest_such(fpr):
    scores = np.random.default_rng(0).normal(size=200)
    threshold = threshold_at_fpr(scores, fpr)
    assert (scores >= threshold).mean() <= fpr
    lower = scores[scores < threshold].max()
    assert (scores >= lower).mean() > fpr, "any lower benign score would flag too many"


def test_detection_metrics_match_a_rank_count():
    rng = np.random.default_rng(1)
    memorized, benign = rng.normal(2, 1, 150), rng.normal(0, 1, 300)
    metrics = detection_metrics(memorized, benign)
    pairs = sum((m > b) + 0.5 * (m == b) for m in memorized for b in benign) / (150 * 300)
    assert metrics["auc"] == pytest.approx(pairs)
    threshold = np.sort(benign)[-3]  # 1% of 300: three benign scores may reach it
    assert metrics["tpr_at_1pct_fpr"] == pytest.approx((memorized >= threshold).mean())
    assert metrics["false_positive_rate"] <= 0.01


def test_calibration_on_a_real_pipeline_round_trips_and_agrees_with_the_guarded_report(sd_pipe, guard, tmp_path):
    calibrated = calibrate_memorization(sd_pipe, BENIGN, fpr=0.01, guidance_scale=7.5, num_inference_steps=4)
    assert calibrated.benign_prompts == 100 and calibrated.pipeline.startswith("StableDiffusionPipeline:")
    scores = memorization_scores(sd_pipe, BENIGN, guidance_scale=7.5, num_inference_steps=4)
    assert (scores >= calibrated.threshold).sum() <= 1
    assert calibrated.benign_max == pytest.approx(scores.max())
    loaded = MemorizationThreshold.load(calibrated.save(tmp_path / "memorization.json"))
    assert loaded == calibrated
    # The score a calibration run records is the score the guarded call reports for the same seed.
    report = GuardedPipeline(sd_pipe, guard, action="flag")(
        prompt=BENIGN[3], guidance_scale=7.5, num_inference_steps=4, generator=torch.Generator().manual_seed(3)
    ).guardrail
    assert report.memorization[0] == pytest.approx(scores[3], rel=1e-4)


def test_calibration_refuses_what_cannot_be_calibrated(sd_pipe, tmp_path):
    with pytest.raises(UsageError, match="at least 100"):
        calibrate_memorization(sd_pipe, BENIGN[:10], fpr=0.01, guidance_scale=7.5, num_inference_steps=2)
    with pytest.raises(UsageError, match="classifier-free-guidance"):
        memorization_scores(sd_pipe, BENIGN[:2], guidance_scale=1.0, num_inference_steps=2)
    with pytest.raises(UsageError, match="fpr"):
        calibrate_memorization(sd_pipe, BENIGN, fpr=1.5)
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(GuardrailError, match="not a guardrail memorization threshold"):
        MemorizationThreshold.load(tmp_path / "bad.json")
