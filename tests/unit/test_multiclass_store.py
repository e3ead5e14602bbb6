"""Multiclass outcomes in the store: each row's class probabilities are kept, the online log loss reads the
labelled class's probability (SQLite, PostgreSQL and the in-memory fake agree with scikit-learn), the
paired differences against the champion follow, and the per-class counts behind class guardrails are right."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.memory import InMemoryStore
from rollout.roles import Role

NOW = 1_790_000_000.0  # epoch seconds, a fixed past hour


def _traffic(seed: int = 3, n: int = 400) -> tuple[np.ndarray, dict[str, np.ndarray], list[PredictionRow]]:
    """Three classes; a sharp champion and a vaguer challenger score every request (shadow)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    probs = {}
    for version, sharpness in (("1", 3.0), ("2", 1.0)):
        logits = rng.normal(0, 1, (n, 3)) + sharpness * np.eye(3)[y]
        p = np.exp(logits)
        probs[version] = p / p.sum(axis=1, keepdims=True)
    rows = []
    for i in range(n):
        for version, role in (("1", Role.CHAMPION), ("2", Role.CHALLENGER)):
            p = probs[version][i]
            rows.append(PredictionRow(request_id=f"r{i}", version=version, role=role, ts=NOW + i, rollout_id=1,
                                      served=role == Role.CHAMPION, propensity=1.0, prediction=float(np.argmax(p)),
                                      score=p.tolist(), segment="A" if i % 2 else "B"))
    return y, probs, rows


def _store(kind: str, store_url: str):
    if kind == "memory":
        return InMemoryStore()
    return OutcomeStore(store_url).create()


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_online_log_loss_of_multiclass_rows_is_scikit_learns(kind, store_url):
    y, probs, rows = _traffic()
    store = _store(kind, store_url)
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=NOW - 60)
    store.log_predictions(rows)
    store.add_labels([(f"r{i}", float(label), NOW + 1000) for i, label in enumerate(y)])
    sums = store.evidence(1, NOW + 10_000, "1")
    for version in ("1", "2"):
        moments = [m for (v, _, _), m in sums.loss["log_loss"].items() if v == version]
        n, total = sum(m.n for m in moments), sum(m.mean * m.n for m in moments)
        assert n == len(y)
        assert total / n == pytest.approx(log_loss(y, probs[version], labels=[0, 1, 2]), rel=1e-9)
        accuracy = [m for (v, _, _), m in sums.loss["accuracy"].items() if v == version]
        errors = sum(m.mean * m.n for m in accuracy)
        assert errors == pytest.approx(np.sum(np.argmax(probs[version], axis=1) != y))
    paired = [m for (v, _, _), m in sums.paired["log_loss"].items() if v == "2"]
    expected = log_loss(y, probs["2"], labels=[0, 1, 2]) - log_loss(y, probs["1"], labels=[0, 1, 2])
    assert sum(m.mean * m.n for m in paired) / len(y) == pytest.approx(expected, rel=1e-9)

    counts = store.class_counts(1, NOW + 10_000)
    predicted = np.argmax(probs["2"], axis=1)
    for segment, part in (("A", np.arange(len(y)) % 2 == 1), ("B", np.arange(len(y)) % 2 == 0)):
        for c in range(3):
            hits = int(np.sum(part & (predicted == c) & (y == c)))
            assert counts.get(("2", segment, float(c), float(c)), 0) == hits
    assert sum(n for (v, *_), n in counts.items() if v == "1") == len(y)


def test_a_store_from_before_multiclass_gets_the_column(tmp_path):
    """A store created without the probabilities column is migrated in place; its rows stay."""
    import sqlite3

    path = tmp_path / "old.db"
    OutcomeStore(f"sqlite:///{path}").create().log_predictions([PredictionRow("r0", "1", ts=NOW, prediction=1.0,
                                                                              score=0.7)])
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE predictions DROP COLUMN probabilities")
    store = OutcomeStore(f"sqlite:///{path}").create()
    store.log_predictions([PredictionRow("r1", "1", ts=NOW, prediction=2.0, score=[0.1, 0.2, 0.7])])
    with sqlite3.connect(path) as conn:
        stored = conn.execute("SELECT request_id, score, probabilities FROM predictions ORDER BY id").fetchall()
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert stored == [("r0", 0.7, None), ("r1", 0.7, "[0.1,0.2,0.7]")]
    assert "ix_predictions_eval" not in indexes and "ix_predictions_request" in indexes
