"""Guardrail statistics: proportion bounds, sample-ratio mismatch, stability and proxies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from rollout.stats import guardrails
from rollout.stats.moments import Moments


def test_srm_on_units_keeps_its_error_rate_where_requests_of_returning_units_do_not() -> None:
    """A/B sticky by unit (60/40), 600 units that come back ~28 times each (the demo's week): the test
    on units flags a fair split at about its level; on requests it flags a fair split most of the time,
    which is why ab/abn rollouts count units (OutcomeStore.units_served)."""
    rng = np.random.default_rng(7)
    sims, units, share = 2000, 600, 0.4
    challenger = rng.random((sims, units)) < share  # the salted hash: uniform per unit
    visits = rng.geometric(1 / 28, size=(sims, units))  # requests per unit: many rare, a few heavy
    unit_p = np.array([guardrails.srm_test([units - c, c], [1 - share, share]).p_value for c in challenger.sum(1)])
    ch_requests = (visits * challenger).sum(1)
    request_p = np.array([guardrails.srm_test([t - c, c], [1 - share, share]).p_value
                          for t, c in zip(visits.sum(1), ch_requests, strict=True)])
    alpha = 0.001
    assert (unit_p < alpha).mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / sims)
    assert (request_p < alpha).mean() > 0.5
    # A real mismatch: half of the challenger's units never logged (a broken arm), found almost always; the
    # price of counting units is power: with 600 units, a fifth of them lost gives p of about 0.01, not 0.001.
    lost = challenger & (rng.random((sims, units)) < 0.5)
    broken_p = np.array([guardrails.srm_test([units - c, c - lo], [1 - share, share]).p_value
                         for c, lo in zip(challenger.sum(1), lost.sum(1), strict=True)])
    assert (broken_p < alpha).mean() > 0.9


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


def test_latency_and_psi_checks() -> None:
    assert guardrails.latency_check(300.0, 250.0).status == "fail"
    assert guardrails.latency_check(80.0, 250.0).status == "pass"
    assert guardrails.latency_check(None, 250.0).status == "pending"
    assert guardrails.psi_check(0.4, 0.25).status == "pending"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)
