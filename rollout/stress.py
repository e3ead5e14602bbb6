"""Latency of the candidate vs the champion, measured interleaved on the same inputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

Predict = Callable[[pd.DataFrame], Any]


def _summary(single: list[float], batch: list[float], batch_rows: int) -> dict[str, float]:
    s, b = np.asarray(single) * 1e3, np.asarray(batch) * 1e3
    return {
        "single_p50_ms": float(np.percentile(s, 50)),
        "single_p95_ms": float(np.percentile(s, 95)),
        "single_p99_ms": float(np.percentile(s, 99)),
        "batch_p50_ms": float(np.percentile(b, 50)),
        "batch_p95_ms": float(np.percentile(b, 95)),
        "batch_p99_ms": float(np.percentile(b, 99)),
        "single_rows_per_s": float(1e3 / s.mean()),
        "batch_rows_per_s": float(batch_rows * 1e3 / b.mean()),
    }


def measure(
    models: dict[str, Predict],
    sample: pd.DataFrame,
    single_requests: int,
    batch_size: int,
    batches: int,
    rng: np.random.Generator,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, float]]:
    """p50/p95/p99 latency and throughput per model; calls alternate between models, in shuffled order
    each round, so machine noise falls on all of them alike."""
    names = list(models)
    single: dict[str, list[float]] = {n: [] for n in names}
    batch: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up: first calls pay for lazy imports and caches
        models[name](sample.head(1))
    rows = rng.integers(0, len(sample), size=single_requests)
    for i in rows:
        row = sample.iloc[[int(i)]]
        for name in rng.permutation(names):
            t0 = clock()
            models[name](row)
            single[name].append(clock() - t0)
    for _ in range(batches):
        chunk = sample.iloc[rng.integers(0, len(sample), size=batch_size)]
        for name in rng.permutation(names):
            t0 = clock()
            models[name](chunk)
            batch[name].append(clock() - t0)
    return {n: _summary(single[n], batch[n], batch_size) for n in names}
