"""The promotion tests: the A/B difference against statsmodels, the sequential bounds by simulated error rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.weightstats import ttest_ind

from rollout.stats import sequential, simulation
from rollout.stats.moments import Moments


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


# ---------------------------------------------------------------- the A/B difference vs statsmodels


def test_welch_difference_matches_statsmodels_unequal_variances(rng: np.random.Generator) -> None:
    a, b = rng.normal(0.30, 0.5, size=300), rng.normal(0.25, 1.5, size=900)
    estimate, se, df = sequential.welch_difference(Moments.of(a), Moments.of(b))
    stat, _, sm_df = ttest_ind(a, b, usevar="unequal", value=0.0)
    assert estimate == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert estimate / se == pytest.approx(stat, rel=1e-9)
    assert df == pytest.approx(sm_df, rel=1e-9)


# ---------------------------------------------------------------- mixture confidence sequence


def test_mixture_bound_is_wider_than_fixed_and_tightest_near_n_star() -> None:
    ns = np.array([100.0, 1000.0, 10_000.0, 100_000.0])
    width = sequential.mixture_width(ns, n_star=10_000, alpha=0.05)
    assert np.all(width > stats.norm.ppf(0.95))
    # width in units of sigma/sqrt(N*) is smallest at N* among these sample sizes
    absolute = width / np.sqrt(ns)
    assert np.all(np.diff(absolute) < 0)  # keeps shrinking with n ...
    relative = width / stats.norm.ppf(0.95)
    assert np.argmin(relative) == 2  # ... but costs least relative to a fixed test near N*


def test_p_value_and_bound_agree() -> None:
    est, se, n, n_star = 0.004, 0.003, 20_000, 12_000
    p = sequential.mixture_p_value(est, se, n, n_star, null=-0.01, alpha=0.05)
    b = sequential.mixture_bounds(est, se, n, n_star, alpha=p, tune_alpha=0.05)
    assert b.lower == pytest.approx(-0.01, abs=1e-9)


def test_plan_cap_and_n_star_from_power() -> None:
    plan = sequential.plan_mixture(sigma=math.sqrt(0.2), effect=0.0, margin=0.01, alpha=0.05, power=0.8)
    assert plan.n_fixed == pytest.approx((1.6449 + 0.8416) ** 2 * 0.2 / 1e-4, rel=1e-3)
    assert plan.n_star == plan.n_fixed
    assert 1.6 < plan.cap / plan.n_fixed < 1.9
    assert sequential.plan_mixture(0.45, -0.01, 0.01, 0.05, 0.8).cap == math.inf  # no gap to detect


def test_samples_and_hours_to_decision() -> None:
    n = sequential.samples_to_decide(estimate=0.01, sigma=0.45, margin=0.01, alpha=0.05, n_star=12_000)
    width = sequential.mixture_width(n, 12_000, 0.05) * 0.45 / math.sqrt(n)
    assert float(width) == pytest.approx(0.02, rel=1e-3)
    assert sequential.hours_to_decision(1000, 100) == 10
    assert sequential.hours_to_decision(1000, 0) == math.inf


# ---------------------------------------------------------------- simulations (the reason the engine exists)


def test_mixture_keeps_false_promotion_under_alpha_when_peeking_hourly(rng: np.random.Generator) -> None:
    runs = 2000
    seq = simulation.simulate_false_promotion(rng, "mixture", n_runs=runs)
    naive = simulation.simulate_false_promotion(rng, "naive", n_runs=runs)
    assert seq.rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)
    assert naive.rate > 0.2  # the simulation can tell a broken procedure


def test_mixture_power_at_the_planned_cap(rng: np.random.Generator) -> None:
    runs = 2000
    res = simulation.simulate_power(rng, "mixture", n_runs=runs)
    assert res.rate >= 0.8 - 3 * math.sqrt(0.8 * 0.2 / runs)
    assert res.mean_stop_n < res.cap


def test_confidence_sequence_covers_uniformly_over_time(rng: np.random.Generator) -> None:
    runs = 2000
    cov = simulation.simulate_coverage(rng, n_runs=runs)
    mc = 3 * math.sqrt(0.05 * 0.95 / runs)
    assert cov.lower >= 0.95 - mc
    assert cov.upper >= 0.95 - mc
    assert cov.both >= 0.90 - mc


# ---------------------------------------------------------------- group sequential (O'Brien-Fleming spending)


def test_obf_boundaries_match_published_values_and_monte_carlo(rng: np.random.Generator) -> None:
    ts = np.arange(1, 6) / 5
    z = np.array(sequential.obf_boundary(list(ts), alpha=0.05).z)
    # Lan-DeMets OBF-type, one-sided 0.05, five equal looks
    assert z == pytest.approx([4.229, 2.888, 2.298, 1.962, 1.740], abs=0.005)
    paths = np.cumsum(rng.standard_normal((400_000, 5)) * math.sqrt(0.2), axis=1)
    crossed = (paths / np.sqrt(ts) >= z).any(axis=1).mean()
    assert crossed == pytest.approx(0.05, abs=3 * math.sqrt(0.05 * 0.95 / 400_000))


def test_obf_earlier_boundaries_do_not_change_when_looks_are_added() -> None:
    history = [0.07, 0.19, 0.2, 0.33, 0.61]
    before = sequential.obf_boundary(history, 0.05).z
    after = sequential.obf_boundary(history + [0.64, 0.9], 0.05).z
    assert after[: len(before)] == pytest.approx(before)


def test_obf_spends_the_spending_function_at_the_last_of_fifty_looks() -> None:
    looks = list(np.sort(np.random.default_rng(3).uniform(0.01, 1.0, size=50)))
    boundary = sequential.obf_boundary(looks, 0.05)  # its time per hourly evaluation: benchmarks/statistics.py
    assert boundary.spent[-1] == pytest.approx(float(sequential.obf_spending(looks[-1], 0.05)))


def test_obf_min_gap_keeps_error_under_alpha() -> None:
    ts = np.arange(1, 201) / 200
    boundary = sequential.obf_boundary(list(ts), 0.05, min_gap=0.02)
    used = np.array(boundary.used)
    assert used.sum() < 60 and used[-1]
    z_used = np.array(boundary.z)[used]
    # the exact first-crossing probability at the used looks is at most alpha
    p = sequential._crossing(ts[used], z_used * np.sqrt(ts[used]), 0.0).sum()
    assert p <= 0.05 + 1e-9


def test_obf_type_one_error_at_the_cap_and_expected_size(rng: np.random.Generator) -> None:
    runs = 2000
    plan = sequential.plan_group_sequential(math.sqrt(0.2), 0.0, 0.01, 0.05, 0.8, looks=336)
    assert 1.03 < plan.inflation < 1.1
    null = simulation.simulate_false_promotion(rng, "obf", n_runs=runs, max_samples=336 * 100)
    assert abs(null.rate - 0.05) < 3 * math.sqrt(0.05 * 0.95 / runs)
    alt = simulation.simulate_power(rng, "obf", n_runs=runs)
    assert alt.rate >= 0.8 - 3 * math.sqrt(0.8 * 0.2 / runs)
    assert alt.mean_stop_n / alt.n_fixed < 0.85  # stops early at the planned effect


def test_group_sequential_bounds_use_history() -> None:
    first = sequential.group_sequential_bounds(0.0, 0.01, 500, [], 10_000, 0.05)
    late = sequential.group_sequential_bounds(0.0, 0.01, 9_000, [500, 3000, 6000], 10_000, 0.05)
    assert first.lower < late.lower  # early looks demand far more evidence
    assert late.upper - late.estimate == pytest.approx(late.estimate - late.lower)
