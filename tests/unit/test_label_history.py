"""Outcome-dependent label delay seen before the rollout can see it (issue 13).

Positives (a default, a churn) are labelled 96 h after their prediction, negatives within the hour, and
`label_delay_hours` is left at its default 0. A rollout's own labels, in its first days, are all negatives:
their delays look short and a challenger that says "no" more often looks better. The labels the store
received lately for older predictions (made before the rollout) show the 96 h, and hold the decision.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np

from rollout.cd.decision import decide
from rollout.cd.evaluation import gather
from rollout.config import parse_policy
from rollout.outcomes import OutcomeStore, PredictionRow

T0 = datetime(2026, 4, 1, tzinfo=UTC)
PER_HOUR = 40


def _traffic(store: OutcomeStore, first_hour: int, hours: int, rollout_id: int | None, now_hour: int,
             rng: np.random.Generator) -> None:
    """Requests of `hours` hours from `first_hour`; labels that have arrived by `now_hour` (positives 96 h late).
    The champion flags positives well; a shadow challenger says 'no' more often."""
    rows, labels = [], []
    for h in range(first_hour, first_hour + hours):
        for i in range(PER_HOUR):
            ts = T0 + timedelta(hours=h, seconds=i * 3600 / PER_HOUR)
            y = float(rng.random() < 0.3)
            champ = y if rng.random() < 0.8 else 1 - y
            rid = f"r{h}-{i}"
            rows.append(PredictionRow(rid, "1", "champion", ts, None, rollout_id, True, 1.0, champ,
                                      0.7 if champ else 0.3, 3.0, None, "all"))
            if rollout_id is not None:
                chal = 0.0 if y == 0 or rng.random() < 0.6 else 1.0  # right on every negative, misses positives
                rows.append(PredictionRow(rid, "2", "challenger", ts, None, rollout_id, False, None, chal,
                                          0.7 if chal else 0.3, 3.0, None, "all"))
            arrives = ts + timedelta(hours=96 if y else 0.5)
            if arrives <= T0 + timedelta(hours=now_hour):
                labels.append((rid, y, arrives))
    store.log_predictions(rows)
    store.add_labels(labels)


def test_a_slow_class_of_labels_seen_in_older_predictions_holds_a_young_rollout(tmp_path) -> None:
    policy = parse_policy({"rollout": {"mode": "shadow", "primary_metric": "accuracy", "margin": 0.01,
                                       "min_samples": 200, "min_duration_hours": 24, "segment_guardrails": []}})
    now_hour = 7 * 24 + 36  # the champion served alone for 7 days; the rollout is 36 h old
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: T0 + timedelta(hours=now_hour)).create()
    rng = np.random.default_rng(4)
    _traffic(store, 0, 7 * 24, None, now_hour, rng)
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + timedelta(days=7))
    _traffic(store, 7 * 24, 36, rid, now_hour, rng)
    evidence = gather(store, store.rollout(rid), policy, T0 + timedelta(hours=now_hour))
    own = evidence.challengers[0].labels
    assert own is not None and own.delay_quantile(0.95) <= 1.0  # the rollout's own labels: all fast so far
    blind = decide(policy.rollout, replace(evidence, label_history=None))
    assert blind.action == "promote"  # judged on its own labels alone, the worse challenger would be promoted
    decision = decide(policy.rollout, evidence)
    stats = decision.stats["2"]
    assert stats["estimate"] > 0.05  # on the negatives it has seen, the challenger looks clearly better
    delay = next(g for g in stats["guardrails"] if g["name"] == "label_delay")
    assert delay["status"] == "pending" and "at least 97" in delay["reason"]
    assert decision.action == "continue"
    store.dispose()


def test_without_slow_labels_the_history_lets_the_rollout_decide(tmp_path) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    rows = [PredictionRow(f"r{i}", "1", "champion", T0 + timedelta(minutes=i), None, None, True, 1.0, 1.0, 0.7)
            for i in range(500)]
    store.log_predictions(rows)
    store.add_labels([(f"r{i}", 1.0, T0 + timedelta(minutes=i + 30)) for i in range(500)])
    history = store.recent_label_delays(limit=200)
    assert history.labelled == 200 and history.delay_hours == ((0, 200),)
    store.dispose()
