"""A/B randomises units (a customer's visits all go to one arm), so visits of one unit are not independent
evidence: the effect's standard error comes from unit sums. Checked against numpy on every store, and by
simulation against the known answer: with ~20 visits per unit and within-unit correlation 0.2, repeated looks
of the anytime-valid test promote a challenger exactly at the margin at most alpha of the time, where
row-level standard errors promoted it 11% of the time (rollout.stats.simulation, also a benchmark row)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.memory import InMemoryStore
from rollout.roles import Role
from rollout.stats import simulation
from rollout.stats.moments import ClusterSums, Moments

NOW = 1_790_000_000.0


def _visits(rng: np.random.Generator, units: int, visits: float, p: float, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """0/1 losses of each unit's visits with within-unit correlation rho (a beta-distributed rate per unit)."""
    counts = np.maximum(rng.poisson(visits, units), 1)
    a = p * (1 - rho) / rho
    b = (1 - p) * (1 - rho) / rho
    rates = rng.beta(a, b, units)
    unit = np.repeat(np.arange(units), counts)
    return unit, (rng.random(unit.size) < rates[unit]).astype(float)


def test_cluster_sums_match_the_textbook_cluster_robust_variance():
    rng = np.random.default_rng(0)
    unit, y = _visits(rng, 300, 8, 0.3, 0.2)
    sums = ClusterSums.of(unit, y)
    totals = np.bincount(unit, weights=y)
    sizes = np.bincount(unit)
    m = y.mean()
    expected = np.sum((totals - m * sizes) ** 2) / y.size**2 * 300 / 299
    assert sums.units == 300 and sums.n == y.size and sums.var_of_mean == pytest.approx(expected, rel=1e-12)
    one_each = ClusterSums.of(range(len(y)), y)  # every row its own unit: the usual variance of the mean
    assert one_each.var_of_mean == pytest.approx(Moments.of(y).se ** 2, rel=1e-9)


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_unit_sums_from_the_store_match_numpy(kind, store_url):
    rng = np.random.default_rng(4)
    unit, y = _visits(rng, 60, 5, 0.4, 0.3)
    store = InMemoryStore() if kind == "memory" else OutcomeStore(store_url).create()
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, started_at=NOW - 60)
    rows, labels = [], []
    arm = rng.random(60) < 0.5
    for i, (u, loss) in enumerate(zip(unit, y, strict=True)):
        version, role = ("2", Role.CHALLENGER) if arm[u] else ("1", Role.CHAMPION)
        rows.append(PredictionRow(f"r{i}", version, role, ts=NOW + i, unit_id=f"u{u}", rollout_id=rid,
                                  prediction=1.0, score=0.9))
        labels.append((f"r{i}", 1.0 - loss, NOW + 5000))  # accuracy loss 1 exactly when the label is 0
    store.log_predictions(rows)
    store.add_labels(labels)
    got = store.unit_sums(rid, "accuracy", NOW + 10_000)
    for version, mask in (("1", ~arm[unit]), ("2", arm[unit])):
        expected = ClusterSums.of(unit[mask], y[mask])
        assert got[version].units == expected.units and got[version].n == expected.n
        assert got[version].var_of_mean == pytest.approx(expected.var_of_mean, rel=1e-9)


def test_unit_clustered_errors_keep_false_promotion_near_alpha_under_repeated_looks():
    """750 units per arm, ~20 visits each, within-unit correlation 0.2, the challenger exactly the margin worse,
    daily looks for 14 days: unit-level errors promote it at most alpha of the time (0.0% here); row-level
    errors, which take the 20 visits of a unit for 20 independent answers, 11%."""
    runs = 400
    scenario = dict(units=750, visits=20, rho=0.2, step_hours=24)
    clustered = simulation.simulate_unit_false_promotion(np.random.default_rng(3), runs, True, **scenario)
    naive = simulation.simulate_unit_false_promotion(np.random.default_rng(3), runs, False, **scenario)
    assert clustered <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / runs), clustered
    assert naive >= 0.08, naive
