"""`guardrail demo` on the digits model: the report's promises, computed by the demo and checked here."""

from __future__ import annotations

import json

import pytest

from guardrail.demo import run_demo

SAMPLES = 24


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("digits-demo")
    return out, run_demo(out, samples=SAMPLES, verbose=False)


def test_the_report_has_every_figure_the_design_names(digits_report):
    out, report = digits_report
    on_disk = json.loads((out / "report.json").read_text())
    for group, key in [("detector", "auc"), ("detector", "tpr_at_1pct_fpr"), ("early_check", "caught"),
                       ("early_check", "false_stops"), ("guarded", "denoiser_steps"), ("unguarded", "denoiser_steps"),
                       ("guarded", "refused"), ("guarded", "replacements_on_prompt"),
                       ("unguarded", "near_copies_of_blocklisted"), ("guarded", "near_copies_of_blocklisted"),
                       ("guarded", "false_resamples"), ("guarded", "first_attempt_clean"), ("guarded", "resampled"),
                       ("guarded", "exhausted"), ("guarded", "blocked"), ("guarded", "generations")]:
        assert key in on_disk[group], f"{group}.{key}"
    assert on_disk["samples"] == SAMPLES and len(on_disk["slots"]) == SAMPLES
    assert set(on_disk["stages_alone"]) >= {"reseed", "delay_guidance", "steer_away", "perturb_prompt"}


def test_the_model_regurgitates_and_the_guard_lets_no_copy_through(digits_report):
    _, report = digits_report
    assert report["unguarded"]["near_copies_of_blocklisted"] >= 3, "the shipped model should regurgitate"
    assert report["guarded"]["near_copies_of_blocklisted"] == 0
    assert report["reseed_only"]["near_copies_of_blocklisted"] == 0


def test_the_full_policy_escapes_where_reseeding_refuses(digits_report):
    _, report = digits_report
    full, reseed = report["guarded"], report["reseed_only"]
    assert full["blocked"] == full["exhausted"] == full["refused"], "on_exhausted='black': every refusal is black"
    assert full["refused"] < reseed["refused"], "the escalation must beat reseeding on a memorizing model"
    assert full["replacements_on_prompt"] is not None and full["replacements_on_prompt"] >= 0.8


def test_images_that_matched_nothing_are_left_alone(digits_report):
    _, report = digits_report
    assert report["guarded"]["changed_but_matched_nothing"] == 0
    assert report["reseed_only"]["changed_but_matched_nothing"] == 0
    for slot in report["slots"]:
        if slot["guarded"]["stage"] == "first":
            assert slot["guarded"]["attempts"] == 1


def test_the_detector_figures_are_measured_not_assumed(digits_report):
    _, report = digits_report
    detector = report["detector"]
    assert detector["memorized"] >= 100 and detector["benign"] >= 100
    assert 0.5 < detector["auc"] <= 1.0 and 0.0 <= detector["tpr_at_1pct_fpr"] <= 1.0
    assert detector["false_positive_rate"] <= 0.01
