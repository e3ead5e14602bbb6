"""Arm assignment: deterministic and sticky for a salt, exposure as configured, bandit propensities logged."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest
from scipy.stats import chisquare

from rollout.outcomes import OutcomeStore, Rollout
from serving.routing import build_view, unit_hash
from tests.serving.conftest import app_for, make_policy, record, serve

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _rollout(mode: str, weights: dict[str, float], versions: dict[str, str] | None = None, salt: str = "s1") -> Rollout:
    versions = versions or {"champion": "1", "challenger": "2"}
    return Rollout(1, mode, versions, weights, salt, T0, T0)


def test_assignment_is_deterministic_for_a_salt_and_changes_with_it() -> None:
    units = [f"c{i:05d}" for i in range(2000)]
    assert [unit_hash("salt-a", u) for u in units] == [unit_hash("salt-a", u) for u in units]
    view_a = build_view(_rollout("ab", {"challenger": 0.5}, salt="a"), {"champion": "1", "challenger": "2"}, {"1", "2"}, 0.1)
    view_b = build_view(_rollout("ab", {"challenger": 0.5}, salt="b"), {"champion": "1", "challenger": "2"}, {"1", "2"}, 0.1)
    rng = random.Random(0)
    arms_a = [view_a.choose(u, "req", rng).version for u in units]
    assert arms_a == [view_a.choose(u, "other-req", rng).version for u in units]  # sticky per unit
    arms_b = [view_b.choose(u, "req", rng).version for u in units]
    assert 0.4 < sum(a != b for a, b in zip(arms_a, arms_b, strict=True)) / len(units) < 0.6


def test_exposure_matches_the_configured_abn_split() -> None:
    versions = {"champion": "1", "challenger": "2", "challenger-2": "3"}
    view = build_view(_rollout("abn", {"challenger": 0.1, "challenger-2": 0.2}, versions), versions, {"1", "2", "3"}, 0.1)
    assert [(a.role, a.weight) for a in view.arms] == [("champion", pytest.approx(0.7)), ("challenger", 0.1), ("challenger-2", 0.2)]
    counts = Counter(view.choose(f"unit-{i}", "r", random.Random(0)).version for i in range(20_000))
    observed = [counts["1"], counts["2"], counts["3"]]
    assert chisquare(observed, [14_000, 2_000, 4_000]).pvalue > 0.01


def test_weights_by_version_default_exposure_and_missing_alias() -> None:
    versions = {"champion": "1", "challenger": "2"}
    by_version = build_view(_rollout("ab", {"2": 0.25}), versions, {"1", "2"}, 0.1)
    assert [a.weight for a in by_version.arms] == [0.75, 0.25]
    default = build_view(_rollout("ab", {}), versions, {"1", "2"}, 0.1)
    assert [a.weight for a in default.arms] == [pytest.approx(0.9), 0.1]
    # The challenger alias moved to the champion's version (promotion): one arm left, no self-comparison.
    promoted = build_view(_rollout("ab", {}), {"champion": "2", "challenger": "2"}, {"2"}, 0.1)
    assert [(a.role, a.version) for a in promoted.arms] == [("champion", "2")]


@pytest.mark.anyio
async def test_sticky_units_through_the_service(registry, store: OutcomeStore) -> None:
    store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "fixed-salt")
    async with serve(app_for(make_policy(), registry, store)) as client:
        first = [(await client.post("/predict", json={"record": record(i), "unit_id": f"u{i}"})).json() for i in range(40)]
        again = [(await client.post("/predict", json={"record": record(i + 1), "unit_id": f"u{i}"})).json() for i in range(40)]
    assert [r["version"] for r in first] == [r["version"] for r in again]
    assert {r["version"] for r in first} == {"1", "2"}
    expected = ["1" if unit_hash("fixed-salt", f"u{i}") < 0.5 else "2" for i in range(40)]
    assert [r["version"] for r in first] == expected


@pytest.mark.anyio
async def test_bandit_logs_propensities_that_sum_to_one(registry, store: OutcomeStore) -> None:
    rid = store.open_rollout("bandit", {"champion": "1", "challenger": "2"}, {"1": 0.3, "2": 0.7}, "s")
    app = app_for(make_policy(), registry, store, rng=random.Random(7))
    async with serve(app) as client:
        for i in range(300):
            assert (await client.post("/predict", json={"record": record(i), "unit_id": "same-unit"})).status_code == 200
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT version, propensity, count(*) FROM predictions WHERE rollout_id = ? GROUP BY version, propensity", (rid,)
        ).all()
    propensity = {v: p for v, p, _ in rows}
    counts = {v: n for v, _, n in rows}
    assert propensity == {"1": pytest.approx(0.3), "2": pytest.approx(0.7)}
    assert sum(propensity.values()) == pytest.approx(1.0)
    assert chisquare([counts["1"], counts["2"]], [90, 210]).pvalue > 0.01  # a draw per request, not per unit
