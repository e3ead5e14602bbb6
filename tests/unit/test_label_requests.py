"""Label requests (issue 18): label only what the service proposes, each row weighted by 1/its inclusion probability.

When labels cost money, the rows where the champion and the challenger disagree carry the evidence (for the 0/1
loss, agreeing rows carry none). Sampling them with known probabilities and weighting their labels keeps the
estimate unbiased and the sequential test valid, with far fewer labels than labelling at random.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from rollout.cd.decision import decide
from rollout.cd.evaluation import gather
from rollout.cd.label_requests import request_labels
from rollout.config import ConfigError, parse_policy
from rollout.report import evaluation_markdown
from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.stats import simulation
from rollout.stats.sampling import WeightedMean, inclusion_probabilities, systematic_sample

T0 = datetime(2026, 5, 4, tzinfo=UTC)


def test_inclusion_probabilities_spend_the_budget_favour_the_informative_and_leave_everyone_a_chance() -> None:
    s = np.r_[np.ones(30), np.zeros(170)]
    pi = inclusion_probabilities(s, 40, floor=0.1)
    assert pi.sum() == pytest.approx(40)
    assert np.all(pi[:30] == 1.0)  # capped: the excess goes to the others
    assert np.all((pi[30:] > 0) & (pi[30:] < 0.1))
    assert inclusion_probabilities(np.zeros(10), 5).tolist() == [0.5] * 10  # nothing known: uniform
    assert inclusion_probabilities(np.ones(4), 10).tolist() == [1.0] * 4  # budget beyond the pool: everyone


def test_systematic_sampling_draws_each_row_with_its_probability_and_the_budget_in_size() -> None:
    rng = np.random.default_rng(5)
    pi = inclusion_probabilities(rng.gamma(0.5, size=300), 60)
    draws = np.array([systematic_sample(pi, rng) for _ in range(4000)])
    assert set(draws.sum(axis=1)) <= {60}  # sum(pi) is whole: exactly the budget
    freq = draws.mean(axis=0)
    z = (freq - pi) / np.sqrt(np.maximum(pi * (1 - pi), 1e-9) / 4000)
    assert np.abs(z).max() < 4.5  # 300 rows, each within noise of its probability


def test_the_weighted_mean_is_unbiased_and_its_interval_covers_whatever_the_sampling_favoured() -> None:
    rng = np.random.default_rng(8)
    n = 2000
    disagree = rng.random(n) < 0.15
    d = np.where(disagree, np.where(rng.random(n) < 0.6, 1.0, -1.0), 0.0)  # mean 0.2 * 0.15 = 0.03
    truth = 0.15 * 0.2
    pi = inclusion_probabilities(disagree.astype(float), 300)
    hits, estimates = 0, []
    for _ in range(1500):
        chosen = systematic_sample(pi, rng)
        m = WeightedMean.of(d[chosen], pi[chosen])
        estimates.append(m.mean)
        hits += abs(m.mean - d.mean()) <= 1.96 * m.se
    assert np.mean(estimates) == pytest.approx(d.mean(), abs=0.002)
    assert abs(d.mean() - truth) < 0.02
    assert hits / 1500 >= 0.93  # the se includes the design's variance (conservative by the population's share)


def test_label_requests_keep_false_promotion_at_alpha_and_need_a_fraction_of_random_labels() -> None:
    runs = 600
    null = simulation.simulate_label_requests(np.random.default_rng(21), runs, -0.01, active=True, min_hours=0)
    assert null.promoted <= 0.05 + 2 * (0.05 * 0.95 / runs) ** 0.5
    active = simulation.simulate_label_requests(np.random.default_rng(22), runs, 0.01, active=True, min_hours=0)
    random = simulation.simulate_label_requests(np.random.default_rng(23), runs, 0.01, active=False, min_hours=0)
    assert active.promoted >= random.promoted - 0.02
    assert active.labels_promoted <= 0.5 * random.labels_promoted


def test_label_requests_need_a_task_and_mode_they_can_weigh() -> None:
    with pytest.raises(ConfigError, match="rollout.label_requests.enabled"):
        parse_policy({"data": {"task": "multiclass", "source": "x.csv", "target": "y"},
                      "rollout": {"label_requests": {"enabled": True}}})
    with pytest.raises(ConfigError, match="rollout.label_requests.enabled"):
        parse_policy({"rollout": {"mode": "bandit", "label_requests": {"enabled": True}}})


def _shadow_hour(store: OutcomeStore, rid: int, hour: int, rng: np.random.Generator, per_hour: int,
                 truth: dict[str, float], right: float = 0.8, wins: float = 0.6) -> None:
    """Champion "1" and challenger "2" disagree on 15% of requests; there the challenger is right `wins` of the
    time (60%); elsewhere they are right `right` of the time (80%)."""
    rows = []
    for i in range(per_hour):
        request = f"h{hour}-{i}"
        ts = T0 + timedelta(hours=hour, seconds=i * 3600 / per_hour)
        label = float(rng.random() < 0.4)
        champion = label if rng.random() < right else 1 - label
        challenger = champion
        if rng.random() < 0.15:
            challenger = 1 - champion
            if (challenger == label) != (rng.random() < wins):  # the challenger right `wins` of disagreements
                challenger, champion = champion, challenger
        truth[request] = label
        unit = f"u{rng.integers(5000)}"
        for version, role, prediction, served in (("1", "champion", champion, True),
                                                  ("2", "challenger", challenger, False)):
            rows.append(PredictionRow(request, version, role, ts, unit, rid, served=served, prediction=prediction,
                                      score=0.8 if prediction else 0.2, latency_ms=2.0, segment="all",
                                      features={"x": i}))
    store.log_predictions(rows)


def test_a_shadow_rollout_decides_on_requested_labels_only(store_url: str) -> None:
    policy = parse_policy({"data": {"unit_column": "customer"},
                           "rollout": {"mode": "shadow", "primary_metric": "accuracy", "margin": 0.01,
                                       "min_detectable_effect": 0.01, "min_samples": 200, "min_duration_hours": 12,
                                       "segment_guardrails": [],
                                       "label_requests": {"enabled": True}}})
    store = OutcomeStore(store_url, clock=lambda: T0).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, None, "salt", T0)
    rng = np.random.default_rng(4)
    truth: dict[str, float] = {}
    seen: set[str] = set()
    per_hour, budget = 300, 45
    decision = None
    for hour in range(48):
        _shadow_hour(store, rid, hour, rng, per_hour, truth)
        batch = request_labels(store, store.rollout(rid), policy, budget, rng)
        ids = [r["request_id"] for r in batch.requests]
        assert batch.pool == per_hour and not seen & set(ids)  # each request considered once over the batches
        assert abs(len(ids) - budget) <= 1
        assert batch.requests[0]["features"] == {"x": int(ids[0].split("-")[1])}  # what a labeller needs
        seen |= set(ids)
        store.add_labels([(r, truth[r], T0 + timedelta(hours=hour, minutes=50)) for r in ids])
        decision = decide(policy.rollout, gather(store, store.rollout(rid), policy, T0 + timedelta(hours=hour + 1)))
        if decision.action != "continue":
            break
    assert decision is not None and decision.action == "promote", decision.reasons
    stats = decision.stats["2"]
    assert "label requests" in stats["method"]
    assert stats["n"] <= len(seen)  # only requested rows' labels were read
    # the same precision from labels drawn at random would have cost several times as many
    assert stats["labels_at_random"] > 3 * stats["n"]
    report = evaluation_markdown(decision.to_dict(), model_name="m", rollout_id=rid, mode="shadow",
                                 metric="accuracy", margin=0.01, champion="1", now=T0)
    section = report.split("## Label requests")[1]
    assert f"| 2 | {stats['n']:,} | {stats['labels_at_random']:,.0f} |" in section
    store.dispose()


def test_segment_floors_judge_the_traffic_not_the_requested_sample(tmp_path) -> None:
    """The requested rows are mostly disagreements, where one of the two models is wrong: counted as they come,
    the challenger's accuracy there (~0.6) sits below a floor of 0.7 it clears easily over the traffic (~0.9),
    and the rollout would be held for good. Weighted by 1/inclusion probability, the floor sees the traffic."""
    policy = parse_policy({"rollout": {"mode": "shadow", "primary_metric": "accuracy", "margin": 0.01,
                                       "min_detectable_effect": 0.01, "min_samples": 200, "min_duration_hours": 12,
                                       "segment_guardrails": [{"segment": "all", "metric": "accuracy", "min": 0.7}],
                                       "label_requests": {"enabled": True}}})
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: T0).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, None, "salt", T0)
    rng = np.random.default_rng(4)
    truth: dict[str, float] = {}
    requested: list[str] = []
    decision = None
    for hour in range(48):
        _shadow_hour(store, rid, hour, rng, 300, truth, right=0.95, wins=0.6)
        ids = [r["request_id"] for r in request_labels(store, store.rollout(rid), policy, 45, rng).requests]
        requested += ids
        store.add_labels([(r, truth[r], T0 + timedelta(hours=hour, minutes=50)) for r in ids])
        decision = decide(policy.rollout, gather(store, store.rollout(rid), policy, T0 + timedelta(hours=hour + 1)))
        if decision.action != "continue":
            break
    assert decision is not None and decision.action == "promote", decision.reasons
    (floor,) = [g for g in decision.stats["2"]["guardrails"] if g["name"] == "all accuracy"]
    logged = pd.read_sql("SELECT request_id, prediction FROM predictions WHERE version = '2'", store.engine)
    right = logged["prediction"] == logged["request_id"].map(truth)
    traffic, sample = right.mean(), right[logged["request_id"].isin(set(requested))].mean()
    assert floor["status"] == "pass" and floor["bound"] <= traffic  # its lower bound holds for the traffic
    assert sample < 0.7 < traffic  # counted as they come, the requested rows would have held it for good
    store.dispose()


def test_unrequested_labels_do_not_count(tmp_path) -> None:
    policy = parse_policy({"rollout": {"mode": "shadow", "primary_metric": "accuracy",
                                       "label_requests": {"enabled": True}}})
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: T0).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, None, "salt", T0)
    truth: dict[str, float] = {}
    _shadow_hour(store, rid, 0, np.random.default_rng(1), 200, truth)
    store.add_labels([(r, y, T0 + timedelta(hours=1)) for r, y in truth.items()])  # every label, none requested
    evidence = gather(store, store.rollout(rid), policy, T0 + timedelta(hours=2))
    (ch,) = evidence.challengers
    assert ch.requested is not None and ch.requested.n == 0
    assert ch.labels is not None and ch.labels.matured == 0
    stats = decide(policy.rollout, evidence).stats["2"]
    assert stats["verdict"] == "continue" and stats["n"] == 0


def test_an_ab_rollout_weighs_each_arms_requested_labels(tmp_path) -> None:
    """A/B: each request is scored by one arm; uncertain rows are favoured, and each arm's weighted mean loss
    estimates its loss over all of its traffic (equal models: no effect; a better challenger: promoted)."""
    policy = parse_policy({"rollout": {"mode": "ab", "exposure": 0.5, "primary_metric": "brier", "margin": 0.005,
                                       "min_samples": 100, "min_duration_hours": 0, "segment_guardrails": [],
                                       "label_requests": {"enabled": True}}})
    for better, expected in ((0.0, None), (0.6, "promote")):
        store = OutcomeStore(f"sqlite:///{tmp_path / f'ab{better}.db'}", clock=lambda: T0).create()
        rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"champion": 0.5, "challenger": 0.5},
                                 "salt", T0)
        rng = np.random.default_rng(7)
        truth: dict[str, float] = {}
        estimates = []
        for hour in range(24):
            rows = []
            for i in range(400):
                request, ts = f"h{hour}-{i}", T0 + timedelta(hours=hour, seconds=i * 9)
                p = float(rng.uniform(0.02, 0.98))
                truth[request] = float(rng.random() < p)
                challenger = rng.random() < 0.5
                # the challenger knows part of the answer: its score leans toward the truth by `better`
                score = p + better * (truth[request] - p) * 0.5 if challenger else p
                rows.append(PredictionRow(request, "2" if challenger else "1", "challenger" if challenger else
                                          "champion", ts, f"u{hour}-{i}", rid, served=True, propensity=0.5,
                                          prediction=float(score >= 0.5), score=score, latency_ms=2.0))
            store.log_predictions(rows)
            batch = request_labels(store, store.rollout(rid), policy, 60, rng)
            store.add_labels([(r["request_id"], truth[r["request_id"]], T0 + timedelta(hours=hour, minutes=55))
                              for r in batch.requests])
            decision = decide(policy.rollout, gather(store, store.rollout(rid), policy, T0 + timedelta(hours=hour + 1)))
            estimates.append(decision.stats["2"])
            if expected and decision.action == "promote":
                break
        last = estimates[-1]
        assert "label requests" in last["method"] and last["labels_at_random"] > last["n"]
        if expected is None:
            assert abs(last["estimate"]) < 3 * last["se"] and decision.action != "promote"
        else:
            assert decision.action == "promote", decision.reasons
        store.dispose()
