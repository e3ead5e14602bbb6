"""Guardrail statistics: proportion bounds, sample-ratio mismatch, stability and proxies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from rollout.stats import guardrails
from rollout.stats.moments import Moments


@pytest.mark.parametrize(("successes", "trials"), [(0, 20), (37, 40), (950, 1000), (3, 7)])
def test_wilson_bounds_match_statsmodels(successes: int, trials: int) -> None:
    lower, upper = guardrails.wilson_bounds(successes, trials, alpha=0.05)
    # a one-sided bound at alpha is one end of the two-sided interval at 2 alpha
    sm_lower, sm_upper = proportion_confint(successes, trials, alpha=0.10, method="wilson")
    assert lower == pytest.approx(sm_lower, abs=1e-12)
    assert upper == pytest.approx(sm_upper, abs=1e-12)


def test_segment_floor_states() -> None:
    assert guardrails.floor_check("VIP precision", 990, 1000, 0.95, 0.05).status == "pass"
    assert guardrails.floor_check("VIP precision", 880, 1000, 0.95, 0.05).status == "fail"
    unsure = guardrails.floor_check("VIP precision", 19, 20, 0.95, 0.05)
    assert unsure.status == "pending" and "19/20" in unsure.reason
    assert guardrails.floor_check("VIP precision", 0, 0, 0.95, 0.05).status == "pending"


def test_error_rate_ceiling_states() -> None:
    assert guardrails.ceiling_check("error_rate", 2, 5000, 0.01, 0.05).status == "pass"
    assert guardrails.ceiling_check("error_rate", 120, 5000, 0.01, 0.05).status == "fail"
    assert guardrails.ceiling_check("error_rate", 1, 100, 0.01, 0.05).status == "pending"


def test_srm_matches_scipy_and_flags_a_broken_split() -> None:
    res = guardrails.srm_test([9120, 880], [0.9, 0.1])
    expected = stats.chisquare([9120, 880], [9000, 1000])
    assert res.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert res.p_value < 0.001
    assert guardrails.srm_test([5010, 4990], [1, 1]).p_value > 0.5
    assert guardrails.srm_test([0, 0], [1, 1]).p_value == 1.0


def test_stability_ratio_needs_days_and_flags_a_jumpy_challenger(rng: np.random.Generator) -> None:
    steady = [Moments.of(rng.normal(0.2, 0.01, 50)) for _ in range(7)]
    jumpy = [Moments.of(rng.normal(0.2 + 0.1 * (i % 2), 0.01, 50)) for i in range(7)]
    assert guardrails.stability_check(jumpy, steady, 2.0).status == "fail"
    assert guardrails.stability_check(steady, jumpy, 2.0).status == "pass"
    assert guardrails.stability_check(jumpy[:2], steady[:2], 2.0).status == "skipped"
    assert guardrails.daily_std(steady) == pytest.approx(np.std([d.mean for d in steady], ddof=1))


def test_correlation_from_sums_matches_numpy(rng: np.random.Generator) -> None:
    x = rng.normal(size=500)
    y = 0.7 * x + rng.normal(size=500)
    c = guardrails.correlation_from_sums(500, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(), 0.05)
    assert c.r == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)
    assert c.lower < c.r < c.upper


def test_latency_and_psi_checks() -> None:
    assert guardrails.latency_check(300.0, 250.0).status == "fail"
    assert guardrails.latency_check(80.0, 250.0).status == "pass"
    assert guardrails.latency_check(None, 250.0).status == "pending"
    assert guardrails.psi_check(0.4, 0.25).status == "pending"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)
