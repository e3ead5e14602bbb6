"""Labels under concurrency: one current label per request, no error, on both backends."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from rollout.outcomes import OutcomeStore, PredictionRow

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_concurrent_label_writers_leave_one_current_label_each_and_no_error(store_url: str) -> None:
    """Three writers (each its own store object, as three service replicas) post labels for the same 200
    requests at once, several times each: every request ends with exactly one current label, the latest."""
    setup = OutcomeStore(store_url, clock=lambda: T0).create()
    rid = setup.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    setup.log_predictions(PredictionRow(f"r{i}", "1", rollout_id=rid, ts=T0, prediction=1.0) for i in range(200))
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def writer(w: int) -> None:
        store = OutcomeStore(store_url, clock=lambda: T0)
        try:
            start.wait()
            for round_ in range(5):
                at = T0 + timedelta(hours=1 + round_, minutes=w)  # writer 2's labels are the latest each round
                store.add_labels([(f"r{i}", float((i + w + round_) % 2), at) for i in range(200)])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
        finally:
            store.dispose()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with setup.engine.connect() as conn:
        current: dict[str, Any] = dict(conn.execute(text(
            "SELECT request_id, count(*) FROM labels WHERE current = 1 GROUP BY request_id")).all())
        latest = dict(conn.execute(text("SELECT request_id, label FROM labels WHERE current = 1")).all())
    assert len(current) == 200 and set(current.values()) == {1}
    assert all(latest[f"r{i}"] == float((i + 2 + 4) % 2) for i in range(200))  # writer 2, last round
    matured = setup.evidence(rid, T0 + timedelta(days=1)).loss["accuracy"]
    assert sum(m.n for m in matured.values()) == 200  # the evaluation counts each request once
    setup.dispose()
