"""Labels that arrive late, or unevenly across arms, bias the comparison: the evaluation measures coverage per
arm and the delay of the labels it has, and holds the decision (never rejects) naming what to set."""

from __future__ import annotations

import numpy as np
import pytest

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.memory import InMemoryStore
from rollout.roles import Role
from rollout.stats.guardrails import LabelSums, label_coverage_check, label_delay_check

NOW = 1_790_000_000.0


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_label_sums_count_coverage_and_delays_per_version(kind, store_url):
    store = InMemoryStore() if kind == "memory" else OutcomeStore(store_url).create()
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, started_at=NOW - 60)
    rows, labels = [], []
    for i in range(200):
        version = "2" if i % 2 else "1"
        rows.append(PredictionRow(f"r{i}", version, Role.CHALLENGER if i % 2 else Role.CHAMPION, ts=NOW + i,
                                  rollout_id=rid, prediction=1.0, score=0.8))
        if version == "1" or i % 4 == 1:  # the challenger's rows get a label half as often
            labels.append((f"r{i}", 1.0, NOW + i + 3600.0 * (i % 30)))  # 0 to 29 hours late
    store.log_predictions(rows)
    store.add_labels(labels)
    got = store.label_sums(rid, NOW + 10_000)
    assert (got["1"].matured, got["1"].labelled, got["2"].matured, got["2"].labelled) == (100, 100, 100, 50)
    delays = [i % 30 for i in range(200) if (i % 2 == 0 or i % 4 == 1)]
    assert dict(got["1"].delay_hours).get(0, 0) + dict(got["2"].delay_hours).get(0, 0) == delays.count(0)
    assert got["1"].delay_quantile(0.95) == float(np.quantile([i % 30 for i in range(0, 200, 2)], 0.95,
                                                              method="inverted_cdf") + 1)


def test_late_labels_hold_the_decision_and_name_the_setting():
    late = LabelSums(400, 400, ((0, 200), (40, 60), (95, 140)))
    held = label_delay_check(late, label_delay_hours=0.0)
    assert held.status == "pending" and "set it to at least 96" in held.reason
    assert label_delay_check(late, label_delay_hours=96.0).status == "pass"
    assert label_delay_check(LabelSums(10, 10, ((0, 10),)), 0.0).status == "pending"  # too few labels to judge


def test_coverage_that_differs_between_arms_holds_and_noise_does_not():
    champion = LabelSums(5000, 4000, ())
    assert label_coverage_check(LabelSums(5000, 3000, ()), champion, 0.0, 0.05).status == "pending"
    assert label_coverage_check(LabelSums(5000, 3950, ()), champion, 0.0, 0.05).status == "pass"
    small = label_coverage_check(LabelSums(40, 26, ()), LabelSums(40, 33, ()), 0.0, 0.05)
    assert small.status == "pass"  # 65% vs 82% on 40 each: within noise
    low = label_coverage_check(LabelSums(5000, 100, ()), None, 0.1, 0.05)
    assert low.status == "pending" and "rollout.min_label_coverage 10%" in low.reason


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_a_failed_challenger_request_counts_as_its_unit_not_the_fallback_champions(kind, store_url):
    """A/B assigns units; when the challenger fails a request the champion answers it as a fallback (propensity 0).
    The sample-ratio test counts the unit for the arm the router chose, so a failing challenger is not mistaken
    for a broken split."""
    store = InMemoryStore() if kind == "memory" else OutcomeStore(store_url).create()
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, started_at=NOW - 60)
    rows = []
    for i in range(40):
        unit, ts = f"u{i % 20}", NOW + i
        if i % 20 < 10:  # units 0-9: the champion's
            rows.append(PredictionRow(f"r{i}", "1", Role.CHAMPION, ts=ts, unit_id=unit, rollout_id=rid,
                                      propensity=0.5, prediction=1.0))
        elif i % 2:  # units 10-19: the challenger's, which fails every other request; the champion answers those
            rows.append(PredictionRow(f"r{i}", "2", Role.CHALLENGER, ts=ts, unit_id=unit, rollout_id=rid,
                                      served=False, propensity=0.5, error="timeout"))
            rows.append(PredictionRow(f"r{i}", "1", Role.CHAMPION, ts=ts, unit_id=unit, rollout_id=rid,
                                      propensity=0.0, prediction=1.0))
        else:
            rows.append(PredictionRow(f"r{i}", "2", Role.CHALLENGER, ts=ts, unit_id=unit, rollout_id=rid,
                                      propensity=0.5, prediction=1.0))
    store.log_predictions(rows)
    assert store.evidence(rid, NOW + 10_000, "1").units == {"1": 10, "2": 10}
