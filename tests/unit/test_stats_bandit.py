"""Thompson-sampling weights and inverse-propensity estimates."""

from __future__ import annotations

import numpy as np
import pytest

from rollout.stats import bandit, simulation


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(99)


def test_thompson_beta_prefers_the_better_arm_with_floor(rng: np.random.Generator) -> None:
    w = bandit.thompson_beta([600, 500, 505], [1000, 1000, 1000], rng, floor=0.05)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] > 0.85
    assert w.min() >= 0.05


def test_burn_in_gives_equal_weights_until_every_arm_has_enough(rng: np.random.Generator) -> None:
    w = bandit.thompson_beta([60, 10], [100, 20], rng, burn_in=100)
    assert w == pytest.approx([0.5, 0.5])
    w = bandit.thompson_gaussian([1.0, 0.0], [1.0, 1.0], [500, 99], rng, burn_in=100)
    assert w == pytest.approx([0.5, 0.5])
    w = bandit.thompson_gaussian([1.0, 0.0], [1.0, 1.0], [500, 500], rng, floor=0.01)
    assert w == pytest.approx([0.99, 0.01])


def test_thompson_is_reproducible_with_the_same_generator() -> None:
    a = bandit.thompson_beta([50, 48], [100, 100], np.random.default_rng(1))
    b = bandit.thompson_beta([50, 48], [100, 100], np.random.default_rng(1))
    assert np.array_equal(a, b)


def test_ipw_estimators_match_direct_formulas(rng: np.random.Generator) -> None:
    props = rng.uniform(0.05, 0.95, size=2000)
    arm = rng.uniform(size=2000) < props
    reward = rng.binomial(1, 0.3, size=2000).astype(float)
    s = bandit.IPWSums.of(reward[arm], props[arm], n_total=2000)
    ht = bandit.horvitz_thompson(s)
    y = np.where(arm, reward / props, 0.0)
    assert ht.mean == pytest.approx(y.mean())
    assert ht.se == pytest.approx(y.std(ddof=1) / np.sqrt(2000))
    hj = bandit.hajek(s)
    assert hj.mean == pytest.approx((reward[arm] / props[arm]).sum() / (1 / props[arm]).sum())
    assert (s + s).n == 2 * s.n


def test_ipw_removes_the_bias_of_naive_means_after_thompson_allocation(rng: np.random.Generator) -> None:
    res = simulation.simulate_thompson(rng, n_runs=2000)
    naive_bias, naive_se = res.bias(res.naive)
    ht_bias, ht_se = res.bias(res.horvitz_thompson)
    hj_bias, _ = res.bias(res.hajek)
    assert np.all(naive_bias < -5 * naive_se)  # unlucky arms get starved and keep their low estimates
    assert np.all(np.abs(ht_bias) < 3 * ht_se)
    # Hajek (self-normalised) keeps an O(1/n) ratio bias, small next to the naive one
    assert np.all(np.abs(hj_bias) < np.abs(naive_bias) / 4)
    assert res.naive_false_positive > 0.06  # a naive z test after adaptive allocation over-rejects
