"""Guardrail statistics, checked by simulation against their error rates under hourly re-checking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rollout.stats import guardrails
from rollout.stats.moments import Moments


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def _mc(alpha: float, runs: int) -> float:
    """alpha plus three Monte Carlo standard errors: the most a valid test may show in `runs` runs."""
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_the_proportion_sequence_keeps_its_level_over_every_look(rng: np.random.Generator) -> None:
    """A proportion exactly at its limit, looked at after every 10 observations up to 3,000: the share of runs
    whose confidence sequence ever excludes it stays under alpha (a fixed-sample bound re-checked would not)."""
    runs, alpha, p = 1000, 0.05, 0.6
    draws = rng.random((runs, 3000)) < p
    looks = np.arange(10, 3001, 10)
    ever = np.zeros(runs, dtype=bool)
    for t in looks:
        s = draws[:, :t].sum(1)
        ever |= np.array([guardrails.excludes(int(k), int(t), p, alpha) for k in s])
    assert ever.mean() <= _mc(alpha, runs)
    lower, upper = guardrails.bernoulli_cs(600, 1000, alpha)
    assert lower < 0.6 < upper and upper - lower < 0.12


def test_segment_floor_and_error_ceiling_states() -> None:
    assert guardrails.floor_check("VIP precision", 990, 1000, 0.95, 0.05).status == "pass"
    assert guardrails.floor_check("VIP precision", 880, 1000, 0.95, 0.05).status == "fail"
    unsure = guardrails.floor_check("VIP precision", 19, 20, 0.95, 0.05)
    assert unsure.status == "pending" and "19/20" in unsure.reason
    assert guardrails.floor_check("VIP precision", 0, 0, 0.95, 0.05).status == "pending"
    early = guardrails.floor_check("VIP precision", 2, 25, 0.95, 0.05, min_trials=30)
    assert early.status == "pending" and "25 of 30" in early.reason  # clearly low, but too little to reject yet
    assert guardrails.ceiling_check("error_rate", 2, 5000, 0.01, 0.05).status == "pass"
    assert guardrails.ceiling_check("error_rate", 120, 5000, 0.01, 0.05).status == "fail"
    assert guardrails.ceiling_check("error_rate", 1, 100, 0.01, 0.05).status == "pending"


def _hist(values: np.ndarray) -> list[tuple[float, float, int]]:
    """Latencies bucketed as the outcome store does: 40 log-buckets per e-fold, edges covering both databases."""
    buckets = np.floor((np.log(np.maximum(values, 1e-4)) + 10.0) * 40.0).astype(int)
    ids, counts = np.unique(buckets, return_counts=True)
    return [(math.exp((b - 0.5) / 40 - 10), math.exp((b + 1) / 40 - 10), int(n)) for b, n in zip(ids, counts)]


def test_quantile_bounds_cover_the_true_p99(rng: np.random.Generator) -> None:
    runs, alpha = 600, 0.05
    true_p99 = float(np.exp(3.0 + 0.5 * 2.3263478740408408))  # lognormal(3, 0.5)
    below = above = 0
    for _ in range(runs):
        lower, upper = guardrails.quantile_bounds(_hist(rng.lognormal(3.0, 0.5, 3000)), 0.99, alpha)
        below += upper < true_p99
        above += lower > true_p99
    assert below / runs <= _mc(alpha, runs) and above / runs <= _mc(alpha, runs)


def test_latency_fails_only_on_a_bound_and_never_on_a_point_estimate(rng: np.random.Generator) -> None:
    at_limit = _hist(rng.lognormal(3.0, 0.5, 5000))
    limit = float(np.exp(3.0 + 0.5 * 2.3263478740408408))  # the true p99
    assert guardrails.latency_check(at_limit, limit, 0.001).status != "fail"
    slow = _hist(rng.lognormal(3.5, 0.5, 5000))
    assert guardrails.latency_check(slow, limit, 0.001).status == "fail"
    assert guardrails.latency_check(_hist(rng.lognormal(2.0, 0.5, 5000)), limit, 0.001).status == "pass"
    assert guardrails.latency_check([], limit, 0.001).status == "pending"
    ratio = guardrails.latency_check(slow, 1.2, 0.001, champion=at_limit)
    assert ratio.name == "latency_ratio_vs_champion" and ratio.status == "fail"  # 1.65x the champion's p99


def test_srm_re_tested_every_hour_keeps_its_level_and_finds_a_broken_split(rng: np.random.Generator) -> None:
    runs, alpha, hours, per_hour = 500, 0.01, 336, 150
    fair = rng.random((runs, hours * per_hour)) < 0.1
    broken = rng.random((runs, hours * per_hour)) < 0.09  # a tenth of the challenger's traffic lost
    fair_alarm = broken_alarm = 0
    for r in range(runs):
        c_fair = np.cumsum(fair[r].reshape(hours, per_hour).sum(1))
        c_broken = np.cumsum(broken[r].reshape(hours, per_hour).sum(1))
        n = per_hour * np.arange(1, hours + 1)
        fair_alarm += any(guardrails.srm_test([int(t - c), int(c)], [0.9, 0.1]).p_value < alpha
                          for t, c in zip(n[::4], c_fair[::4], strict=True))
        broken_alarm += guardrails.srm_test([int(n[-1] - c_broken[-1]), int(c_broken[-1])], [0.9, 0.1]).p_value < alpha
    assert fair_alarm / runs <= _mc(alpha, runs)
    assert broken_alarm / runs > 0.9
    assert guardrails.srm_test([0, 0], [1, 1]).p_value == 1.0


def test_srm_on_units_keeps_its_level_where_requests_of_returning_units_do_not(rng: np.random.Generator) -> None:
    """A/B sticky by unit (60/40), 600 units that come back ~28 times each: counted in units a fair split is
    rarely flagged; counted in requests (a unit's visits all go to its arm) it is flagged most of the time."""
    sims, units, share = 1000, 600, 0.4
    challenger = rng.random((sims, units)) < share
    visits = rng.geometric(1 / 28, size=(sims, units))
    unit_p = np.array([guardrails.srm_test([units - c, c], [1 - share, share]).p_value for c in challenger.sum(1)])
    ch_requests = (visits * challenger).sum(1)
    request_p = np.array([guardrails.srm_test([t - c, c], [1 - share, share]).p_value
                          for t, c in zip(visits.sum(1), ch_requests, strict=True)])
    assert (unit_p < 0.001).mean() <= _mc(0.001, sims)
    assert (request_p < 0.001).mean() > 0.5


def test_a_bandit_router_is_checked_against_its_own_propensities(rng: np.random.Generator) -> None:
    """Allocation drifting over time, as Thompson weights do: the challenger's propensity-weighted count matches
    the total; a router that sends a tenth of the challenger's requests to the champion is caught."""
    n = 20_000
    p = np.clip(0.5 + 0.4 * np.sin(np.linspace(0, 3, n)), 0.01, 0.99)
    fair = rng.random(n) < p
    w = 1 / p[fair]
    assert guardrails.ipw_balance_test(w.sum(), (w * w).sum(), n, alpha_scale=336).p_value > 0.01
    leaky = fair & (rng.random(n) > 0.1)
    w = 1 / p[leaky]
    assert guardrails.ipw_balance_test(w.sum(), (w * w).sum(), n, alpha_scale=336).p_value < 0.001


def _days(rng: np.random.Generator, n_per_day: int, swing: float, days: int = 10) -> list[Moments]:
    return [Moments.of((rng.random(n_per_day) < 0.2 + rng.normal(0, swing)).astype(float)) for _ in range(days)]


def test_stability_is_judged_net_of_sampling_so_a_small_arm_is_not_called_erratic(rng: np.random.Generator) -> None:
    """A/B at exposure 0.1: the challenger's day means carry ten times the champion's sampling variance. With
    the same true day-to-day swing it must not fail. Ten or fourteen points say little about a spread, so only a
    clearly erratic challenger fails: one swinging ten times as much, over two weeks."""
    runs, alpha = 300, 0.01
    fails = sum(guardrails.stability_check(_days(rng, 200, 0.01), _days(rng, 1800, 0.01), 2.0, alpha, 0.005).status
                == "fail" for _ in range(runs))
    assert fails / runs <= _mc(alpha, runs)
    erratic = sum(guardrails.stability_check(_days(rng, 2000, 0.1, 14), _days(rng, 2000, 0.01, 14), 2.0, alpha,
                                             0.005).status == "fail" for _ in range(50))
    assert erratic >= 40  # 44 of 50 with this seed
    assert guardrails.stability_check(_days(rng, 200, 0.0, 2), _days(rng, 200, 0.0, 2), 2.0, alpha, 0.005).status \
        == "skipped"


def test_psi_is_a_proxy_that_holds_and_never_rejects() -> None:
    assert guardrails.psi_check(0.4, 0.25).status == "pending"
    assert guardrails.psi_check(0.1, 0.25).status == "pass"
