"""Timing helper shared by the benchmark scripts (run them from the repo root: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of `function()` in seconds over `repeats` calls, after one warm-up call."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_median_seconds(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, run in turn within every round (so drift on a shared machine hits all
    alike), after one warm-up round."""
    for function in functions:
        function()
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            samples[index].append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]
