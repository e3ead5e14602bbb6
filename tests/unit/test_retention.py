"""Retention on both backends: rows older than the cut go, except an open rollout's; labels go with their
predictions; summaries and the audit log stay; a new SQLite file gives the space back."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select

from rollout.outcomes import OutcomeStore, PredictionRow, partitions
from rollout.outcomes.schema import label_request_batches, label_requests, labels, predictions

DAY = 86_400.0
T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
PER_DAY = 40  # requests a day; each logged by the champion (served) and the challenger (shadow)


def _traffic(store: OutcomeStore, rollout_id: int | None, first_day: int, last_day: int, tag: str) -> None:
    rows, items = [], []
    for day in range(first_day, last_day):
        for i in range(PER_DAY):
            ts = T0 + day * DAY + i * 600
            rid = f"{tag}-{day}-{i}"
            score = (i % 10) / 10
            rows.append(PredictionRow(rid, "1", "champion", ts, f"u{i % 7}", rollout_id, True, 1.0, float(score > 0.5),
                                      score, 1.0, features={"income": float(i)}))
            if rollout_id is not None:
                rows.append(PredictionRow(rid, "2", "challenger", ts, f"u{i % 7}", rollout_id, False, None,
                                          float(score > 0.4), min(score + 0.1, 1.0), 1.0))
            items.append((rid, i % 2, ts + 3600))
    store.log_predictions(rows)
    store.add_labels(items)


def _count(store: OutcomeStore, table: object, *where: object) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())  # type: ignore[arg-type]


def test_retention_never_removes_an_open_rollouts_rows(store_url: str) -> None:
    store = OutcomeStore(store_url).create()
    closed = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=T0)
    _traffic(store, closed, 0, 5, "closed")
    store.record_decision(closed, "promote", {"reasons": ["better"]}, ts=T0 + 5 * DAY)
    store.end_rollout(closed, ended_at=T0 + 5 * DAY, reason="promoted")
    _traffic(store, None, 5, 10, "idle")  # champion-only traffic between rollouts
    opened = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=T0 + 10 * DAY)
    _traffic(store, opened, 10, 70, "open")  # a 60-day rollout
    evidence = store.evidence(opened, cutoff=T0 + 70 * DAY)
    history = store.audit_log()

    expired = store.expire(T0 + 40 * DAY)  # retention_days 30 as of day 70

    assert expired.predictions == 5 * PER_DAY * 2 + 5 * PER_DAY  # the closed rollout's two rows a request, the idle
    assert expired.labels == 10 * PER_DAY  # their labels, once no prediction of the request remains
    assert expired.kept_open == 30 * PER_DAY * 2  # the open rollout's rows before the cut: all still there
    assert _count(store, predictions, predictions.c.rollout_id == opened) == 60 * PER_DAY * 2
    assert _count(store, predictions) == 60 * PER_DAY * 2
    assert _count(store, labels) == 60 * PER_DAY
    assert store.evidence(opened, cutoff=T0 + 70 * DAY) == evidence  # the open rollout's evaluation is unchanged
    assert store.audit_log() == history  # decisions and alias moves are kept for good
    again = store.expire(T0 + 40 * DAY)
    assert (again.predictions, again.labels) == (0, 0)  # idempotent

    # once the rollout ends, its rows older than the cut go too; a label still goes only with its prediction
    store.end_rollout(opened, ended_at=T0 + 70 * DAY, reason="rejected")
    after = store.expire(T0 + 40 * DAY)
    assert (after.predictions, after.labels, after.kept_open) == (30 * PER_DAY * 2, 30 * PER_DAY, 0)
    assert _count(store, predictions) == 30 * PER_DAY * 2
    store.dispose()


def test_label_requests_go_with_their_closed_rollout(store_url: str) -> None:
    store = OutcomeStore(store_url).create()
    closed = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=T0)
    old = store.save_label_requests(closed, T0, T0 + DAY, 40, 3, [("a", 0.5), ("b", 0.2), ("c", 0.1)])
    store.end_rollout(closed, ended_at=T0 + 5 * DAY, reason="promoted")
    opened = store.open_rollout("shadow", {"champion": "1", "challenger": "3"}, {}, "s", started_at=T0 + 10 * DAY)
    store.save_label_requests(opened, T0 + 10 * DAY, T0 + 11 * DAY, 40, 2, [("d", 0.5), ("e", 0.2)])

    store.expire(T0 + 40 * DAY)

    # the closed rollout's per-row probabilities go, the open one's stay (its evaluation weighs them);
    # every batch's record stays, as history
    assert _count(store, label_requests, label_requests.c.rollout_id == closed) == 0
    assert _count(store, label_requests, label_requests.c.rollout_id == opened) == 2
    assert _count(store, label_request_batches) == 2 and old
    store.dispose()


def test_a_dry_run_removes_nothing(tmp_path: Path) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    _traffic(store, None, 0, 3, "idle")
    counted = store.expire(T0 + 2 * DAY, dry_run=True)
    assert counted.predictions == 2 * PER_DAY and _count(store, predictions) == 3 * PER_DAY
    said = counted.sentence()  # what `rollout retention --dry-run` prints: a count, not a report of removals
    assert said.startswith(f"Would remove {2 * PER_DAY:,} prediction rows") and "Removed" not in said
    assert "0 labels" not in said and "Dry run: nothing removed." in said


def test_a_new_sqlite_store_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    store = OutcomeStore(f"sqlite:///{path}").create()
    _traffic(store, None, 0, 40, "idle")
    store.engine.dispose()
    before = os.path.getsize(path)
    expired = store.expire(T0 + 38 * DAY)
    assert expired.freed_pages and expired.freed_pages > 0 and not expired.note
    with store.engine.connect() as conn:  # the WAL copied back, so the file shows its real size
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.engine.dispose()
    empty = OutcomeStore(f"sqlite:///{tmp_path / 'empty.db'}").create()  # the schema's own pages stay
    empty.engine.dispose()
    schema = os.path.getsize(tmp_path / "empty.db")
    assert os.path.getsize(path) - schema < 0.3 * (before - schema), (before, os.path.getsize(path), schema)


def test_an_older_sqlite_store_is_told_how_to_give_space_back(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    sqlite3.connect(path).execute("PRAGMA auto_vacuum=NONE").connection.execute("CREATE TABLE t (x)").connection.close()
    store = OutcomeStore(f"sqlite:///{path}").create()
    _traffic(store, None, 0, 4, "idle")
    expired = store.expire(T0 + 3 * DAY)
    assert expired.predictions == 3 * PER_DAY and "rollout retention --vacuum" in expired.note
    store.vacuum()
    _traffic(store, None, 4, 8, "later")
    assert not store.expire(T0 + 7 * DAY).note  # switched over: space given back from now on


def test_export_writes_a_parquet_file_a_day_with_labels(store_url: str, tmp_path: Path) -> None:
    """Daily Parquet files, traffic outside any rollout included; on SQLite, whose time index has no day, each day
    is read rollout by rollout through that index rather than by a pass over the whole log."""
    from sqlalchemy import event

    store = OutcomeStore(store_url).create()
    rollout = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=T0)
    _traffic(store, rollout, 0, 3, "r")
    _traffic(store, None, 2, 4, "idle")  # outside any rollout, on 2026-01-03 and 2026-01-04
    statements: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, context: object,
                many: bool) -> None:
        if "predictions" in statement and statement.lstrip()[:6].upper() in ("SELECT", "WITH R"):
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        exported = store.export("2026-01-02", "2026-01-03", tmp_path / "export")
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert [(d.day, d.rows, d.labelled) for d in exported] == [("2026-01-02", 2 * PER_DAY, 2 * PER_DAY),
                                                               ("2026-01-03", 3 * PER_DAY, 3 * PER_DAY)]
    frame = pd.read_parquet(tmp_path / "export")  # the whole folder, `day` from the partition names
    assert len(frame) == 5 * PER_DAY and set(frame["day"].astype(str)) == {"2026-01-02", "2026-01-03"}
    assert frame["request_id"].str.startswith("idle-").sum() == PER_DAY
    one = frame[(frame["request_id"] == "r-1-3") & (frame["role"] == "champion")].iloc[0]
    assert one["label"] == 1.0 and one["served"] and one["time"] == pd.Timestamp(T0 + DAY + 1800, unit="s", tz="UTC")
    assert one["features"] == '{"income":3.0}'
    again = store.export("2026-01-03", None, tmp_path / "export")  # a rerun replaces the day whole
    assert [d.rows for d in again] == [3 * PER_DAY, PER_DAY] and len(pd.read_parquet(tmp_path / "export")) == 6 * PER_DAY
    if store.is_sqlite:
        with store.engine.connect() as conn:
            for statement, parameters in statements:
                plan = "\n".join(str(row[-1]) for row in conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + statement, parameters))  # type: ignore[arg-type]
                assert not [line for line in plan.splitlines() if line.startswith("SCAN p") and "USING" not in line
                            or line.startswith("SCAN predictions")], f"{statement}\n{plan}"
    store.dispose()


def test_retention_and_the_newest_inputs_never_scan_the_prediction_log(store_url: str) -> None:
    """Without an index on ts alone, retention seeks the old rows rollout by rollout (the time index) and the
    newest served inputs (drift checks, training on production data) come from ix_predictions_features, which
    holds only served rows with features. Every statement they run on the log is planned through an index: on
    PostgreSQL even with sequential scans priced out, so a partial index's condition must be matched."""
    from sqlalchemy import event

    store = OutcomeStore(store_url).create()
    closed = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=T0)
    _traffic(store, closed, 0, 5, "closed")
    store.end_rollout(closed, ended_at=T0 + 5 * DAY, reason="promoted")
    _traffic(store, None, 5, 10, "idle")
    opened = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=T0 + 10 * DAY)
    _traffic(store, opened, 10, 20, "open")
    _traffic(store, None, 10, 12, "beside")  # rows outside the rollout on its days: on PostgreSQL, gone by ctid
    statements: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, context: object,
                many: bool) -> None:
        if "predictions" in statement and not many and statement.lstrip()[:6].upper() in ("SELECT", "DELETE", "WITH R"):
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        expired = store.expire(T0 + 12 * DAY)
        recent = store.recent_features(limit=5)
        production = store.production_rows(days=3, limit=10)
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert expired.predictions == 5 * PER_DAY * 2 + 7 * PER_DAY and expired.kept_open == 2 * PER_DAY * 2
    assert _count(store, predictions, predictions.c.request_id.like("beside-%")) == 0
    assert list(recent["income"]) == [39.0, 38.0, 37.0, 36.0, 35.0]  # the newest served inputs first
    assert len(production) == 10 and production["_role"].eq("champion").all()
    assert any(s.lstrip().upper().startswith("DELETE") for s, _ in statements)
    sqlite = store.engine.dialect.name == "sqlite"
    existing = set() if sqlite else {name for name, _ in partitions.day_partitions(store.engine)}
    with store.engine.connect() as conn:
        if not sqlite:
            conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in statements:
            if not sqlite and any(name not in existing for name in re.findall(r"predictions_\d{8}", statement)):
                continue  # a day partition dropped since
            plan = "\n".join(" ".join(str(v) for v in row) for row in conn.exec_driver_sql(
                ("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement, parameters))  # type: ignore[arg-type]
            scans = [line for line in plan.splitlines()
                     if (("SCAN p" in line and "USING" not in line) if sqlite else "Seq Scan on predictions" in line)]
            assert not scans, f"{statement}\n{plan}"
    store.dispose()
