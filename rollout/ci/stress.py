"""Latency of the candidate vs the champion, measured interleaved on the same inputs.

Each model is timed as the service calls it (`rollout.models.LoadedModel.score` on records: one
DataFrame per call, then the raw estimator), so the budget speaks of what callers will see.

Calls run in rounds: each round makes a share of the single-row calls and one batch call per model,
the models in shuffled order, so machine noise falls on all of them alike. The slowdown against the
champion is estimated per round and gets an interval over rounds (`ratio_interval`); the gate passes
when it lies under the limit, fails when it lies over, and calls it inconclusive (rerun) when it still
straddles the limit after up to three budgets of calls. A clearly fast candidate
stops early: after `min_single` single-row calls per model, `settled(figures)` is asked after every
round (`run` asks whether the gate would pass with half the budget), so CI spends the full
`single_requests` only on candidates close to a limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rollout.ci.gates import stress_clear
from rollout.config import StressConfig
from rollout.data import records_of
from rollout.models import LoadedModel, Predictor

Predict = Callable[[list[Any]], Any]  # scores a list of rows (records, as serving receives them)
Figures = dict[str, dict[str, float]]

MIN_SINGLE = 30  # single-row calls per model before an early stop is considered
INTERVAL_LEVEL = 0.9  # two-sided level of the slowdown's interval: 95% sure on the side it decides
Round = dict[str, tuple[list[float], float]]  # per model: its single-row latencies in the round, its batch latency
POOL_ROWS = 2000  # rows the calls are drawn from (see `pool`)


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
        "single_calls": float(len(s)),
        "batch_calls": float(len(b)),
    }


def pool(sample: pd.DataFrame, batch_size: int, seed: int) -> pd.DataFrame:
    """The rows calls are drawn from: a seeded random subset of `sample`, twice a batch or POOL_ROWS.

    Latency does not depend on which rows are scored, and turning every held-out row into a record
    would cost more than the calls that use them (44 ms for 20k rows against ~3k rows used)."""
    size = max(POOL_ROWS, 2 * batch_size)
    return sample if len(sample) <= size else sample.sample(n=size, random_state=seed)


def measure(
    models: dict[str, Predict],
    sample: Sequence[Any],
    single_requests: int,
    batch_size: int,
    batches: int,
    rng: np.random.Generator,
    clock: Callable[[], float] = time.perf_counter,
    settled: Callable[[Figures], bool] | None = None,
    min_single: int = MIN_SINGLE,
    rounds: list[Round] | None = None,
) -> Figures:
    """p50/p95/p99 latency, throughput and call counts per model, at most `single_requests` single-row
    and `batches` batch calls each; fewer when `settled` says the verdict is already clear. `rounds`, when
    given, receives each round's latencies (seconds) per model, for intervals over rounds."""
    names = list(models)
    single: dict[str, list[float]] = {n: [] for n in names}
    batch: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up: first calls pay for lazy imports and caches
        models[name](list(sample[:1]))
    per_round = math.ceil(single_requests / batches)
    rows = rng.integers(0, len(sample), size=single_requests)
    for r in range(batches):
        before = {n: len(single[n]) for n in names}
        for i in rows[r * per_round:(r + 1) * per_round]:
            row = [sample[int(i)]]
            for name in rng.permutation(names):
                t0 = clock()
                models[name](row)
                single[name].append(clock() - t0)
        chunk = [sample[int(j)] for j in rng.integers(0, len(sample), size=batch_size)]
        for name in rng.permutation(names):
            t0 = clock()
            models[name](chunk)
            batch[name].append(clock() - t0)
        if rounds is not None:
            rounds.append({n: (single[n][before[n]:], batch[n][-1]) for n in names})
        if settled is not None and r + 1 < batches and len(single[names[0]]) >= min_single:
            if settled({n: _summary(single[n], batch[n], batch_size) for n in names}):
                break
    return {n: _summary(single[n], batch[n], batch_size) for n in names}


def ratio_interval(rounds: Sequence[Round], kind: str, level: float = INTERVAL_LEVEL) -> tuple[float, float, float]:
    """How many times slower the candidate is than the champion on `kind` ("single" or "batch") calls, with an
    interval at `level`: per interleaved round the log of candidate over champion (the rounds' median single-row
    call, or their batch call), averaged over rounds with a t interval. Both models' calls of a round shared
    the machine's noise, so the ratio is paired; a ratio of p99s of a few dozen calls (the slowest call or
    two) swings from run to run and is not what the limit is decided on."""
    from scipy import stats

    def typical(r: Round, name: str) -> float:
        return float(np.median(r[name][0])) if kind == "single" else r[name][1]

    logs = np.log([max(typical(r, "candidate"), 1e-12) / max(typical(r, "champion"), 1e-12) for r in rounds])
    mean = float(np.mean(logs))
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = float(stats.t.ppf(1 - (1 - level) / 2, len(logs) - 1)) * float(np.std(logs, ddof=1)) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def run(candidate: Predictor, champion: Predictor | None, sample: pd.DataFrame, cfg: StressConfig, seed: int,
        max_extensions: int = 2, clock: Callable[[], float] = time.perf_counter) -> Figures:
    """Figures of the candidate (and the champion, when there is one) under the policy's stress settings,
    stopping early once the gate would pass with half of every limit. With a champion, the p99 ratios carry
    an interval over rounds; while one straddles the limit, up to `max_extensions` more budgets of calls are
    made, so the gate decides on an interval that clears or breaches the limit, not on a coin flip."""
    models: dict[str, Predict] = {"candidate": LoadedModel(candidate, "candidate").score}
    if champion is not None:
        models["champion"] = LoadedModel(champion, "champion").score
    budget = cfg.budget

    def clear(so_far: Figures) -> bool:
        return stress_clear(so_far["candidate"], so_far.get("champion"), budget.p99_single_ms, budget.p99_batch_ms,
                            budget.max_ratio_vs_champion)

    records = records_of(pool(sample, cfg.batch_size, seed))
    rng = np.random.default_rng(seed)
    rounds: list[Round] = []
    figures = measure(models, records, cfg.single_requests, cfg.batch_size, cfg.batches, rng, clock, clear,
                      rounds=rounds)
    if champion is None:
        return figures
    for extension in range(max_extensions + 1):
        intervals = {kind: ratio_interval(rounds, kind) for kind in ("single", "batch")}
        if extension == max_extensions or not any(lo <= budget.max_ratio_vs_champion < hi
                                                  for _, lo, hi in intervals.values()):
            break
        measure(models, records, cfg.single_requests, cfg.batch_size, cfg.batches, rng, clock, rounds=rounds)
    figures = {n: _summary([v for r in rounds for v in r[n][0]], [r[n][1] for r in rounds], cfg.batch_size)
               for n in models}
    for kind, (point, lo, hi) in intervals.items():
        figures["candidate"].update({f"{kind}_ratio": point, f"{kind}_ratio_low": lo, f"{kind}_ratio_high": hi})
    return figures
