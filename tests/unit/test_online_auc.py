"""Online ROC AUC per version, from score histograms the store groups in SQL, with a DeLong interval: equal to
scikit-learn's AUC on scores on the bucket grid, its interval covering the true AUC at the stated rate by
simulation, the same on every store, and in the evaluation report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.memory import InMemoryStore
from rollout.roles import Role
from rollout.stats.guardrails import auc_from_histograms

NOW = 1_790_000_000.0
BUCKETS = 200


def _hist(scores: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    b = np.minimum((scores * BUCKETS).astype(int), BUCKETS - 1)
    return (np.bincount(b[labels == 1], minlength=BUCKETS).tolist(),
            np.bincount(b[labels == 0], minlength=BUCKETS).tolist())


def test_auc_equals_scikit_learn_on_the_bucket_grid():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.3).astype(int)
    scores = (np.floor(np.clip(rng.normal(0.4 + 0.2 * y, 0.15), 0, 0.999) * BUCKETS) + 0.5) / BUCKETS
    auc, low, high = auc_from_histograms(*_hist(scores, y))
    assert auc == pytest.approx(roc_auc_score(y, scores), abs=1e-12) and low < auc < high


def test_delong_interval_covers_the_true_auc_at_its_rate():
    rng = np.random.default_rng(1)
    d = 1.0  # binormal: positives N(1, 1), negatives N(0, 1): AUC = Phi(1 / sqrt(2))
    truth = stats.norm.cdf(d / math.sqrt(2))
    covered, runs = 0, 400
    for _ in range(runs):
        y = (rng.random(400) < 0.4).astype(int)
        scores = stats.norm.cdf((rng.normal(0, 1, 400) + d * y - 0.5) / 1.5)  # a monotone map into (0, 1)
        _, low, high = auc_from_histograms(*_hist(scores, y))
        covered += low <= truth <= high
    assert abs(covered / runs - 0.95) < 3 * math.sqrt(0.95 * 0.05 / runs), covered / runs


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_score_histograms_from_the_store(kind, store_url):
    rng = np.random.default_rng(2)
    store = InMemoryStore() if kind == "memory" else OutcomeStore(store_url).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=NOW - 60)
    y = (rng.random(300) < 0.5).astype(float)
    scores = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0.0, 1.0)
    store.log_predictions([PredictionRow(f"r{i}", "1", Role.CHAMPION, ts=NOW + i, rollout_id=rid,
                                         prediction=float(scores[i] > 0.5), score=float(scores[i]))
                           for i in range(300)])
    store.add_labels([(f"r{i}", y[i], NOW + i) for i in range(300)])
    pos, neg = store.score_histograms(rid, NOW + 10_000)["1"]
    assert (pos, neg) == _hist(scores, y.astype(int))
