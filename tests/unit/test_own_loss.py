"""Your own per-row loss as the online metric (a cost matrix: a false approval costs five times a false
refusal): computed from counted (prediction, label) cells on every store, equal to the loss computed row by row,
paired against the champion in shadow, and promoting the challenger that costs less."""

from __future__ import annotations

import sys
import types
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from rollout.cd.decision import decide
from rollout.cd.evaluation import gather
from rollout.config import parse_policy
from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.memory import InMemoryStore
from rollout.roles import Role

START = datetime(2026, 3, 1, tzinfo=UTC)


def cost(y_true, prediction):
    return 5.0 * ((prediction == 1) & (y_true == 0)) + 1.0 * ((prediction == 0) & (y_true == 1))


@pytest.fixture
def team_costs():
    module = types.ModuleType("team_costs")
    module.cost = cost
    sys.modules["team_costs"] = module
    yield "team_costs:cost"
    del sys.modules["team_costs"]


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_your_loss_is_paired_per_request_and_promotes_the_cheaper_model(kind, store_url, team_costs):
    rng = np.random.default_rng(2)
    n = 3000
    y = (rng.random(n) < 0.4).astype(float)
    # the champion approves too easily (false approvals cost 5); the challenger is stricter
    champ = np.where(y == 1, rng.random(n) < 0.9, rng.random(n) < 0.30).astype(float)
    chal = np.where(y == 1, rng.random(n) < 0.8, rng.random(n) < 0.10).astype(float)
    store = InMemoryStore() if kind == "memory" else OutcomeStore(store_url).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=START)
    t0 = START.timestamp()
    rows = []
    for i in range(n):
        ts = t0 + i * 60.0  # about two days of traffic
        rows.append(PredictionRow(f"r{i}", "1", Role.CHAMPION, ts=ts, rollout_id=rid, prediction=champ[i], score=0.5))
        rows.append(PredictionRow(f"r{i}", "2", Role.CHALLENGER, ts=ts, rollout_id=rid, served=False,
                                  prediction=chal[i], score=0.5))
    store.log_predictions(rows)
    store.add_labels([(f"r{i}", y[i], t0 + i * 60.0) for i in range(n)])
    policy = parse_policy({"rollout": {"mode": "shadow", "primary_metric": team_costs, "margin": 0.05,
                                       "min_detectable_effect": 0.2, "segment_guardrails": []},
                           "registry": {"trusted_modules": ["team_costs"]}, "data": {"unit_column": None}})
    now = START + timedelta(days=3)
    evidence = gather(store, store.rollout(rid), policy, now)
    challenger = evidence.challengers[0]
    own = sum(m.total for m in challenger.loss.values())
    assert own == pytest.approx(cost(y, chal).sum())
    paired = sum(m.total for m in challenger.paired.values())
    assert paired == pytest.approx((cost(y, chal) - cost(y, champ)).sum())
    decision = decide(policy.rollout, evidence, np.random.default_rng(0))
    assert (decision.action, decision.winner) == ("promote", "2"), decision.reasons
