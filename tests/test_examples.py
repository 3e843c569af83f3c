"""The README quickstarts, run as the scripts in examples/ (offline defaults)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_quickstart_resamples_the_memorized_slot_only():
    report = load("quickstart_pipeline").main([])
    assert report["attempts"] == [1, 1, 2, 1]
    assert not any(verdict["matched"] for verdict in report["verdicts"])


def test_guard_quickstart_catches_the_jpeg_copy_and_passes_the_other_image():
    verdicts = load("quickstart_guard").main([])
    assert [verdict["matched"] for verdict in verdicts] == [True, False]
