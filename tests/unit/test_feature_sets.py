"""Logged features are stored as `[set id, values...]` with the column names kept once (rollout.outcomes.features):
every reader gets the record's features back as they were sent, on both backends, rows from before included."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import func, select

from rollout.outcomes import OutcomeStore, PredictionRow, features
from rollout.outcomes.requests import details
from rollout.outcomes.schema import LOG_COLUMNS, dead_letters, feature_sets, predictions, to_json

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
RECORDS = [
    {"income": 52000.5, "tier": "gold", "age": 40, "purpose": None},
    {"income": 31000.0, "tier": "VIP", "age": 23, "purpose": "car"},
    {"tier": "standard", "income": 1.0, "age": 0, "purpose": "home"},  # the same names in another order: a set
    {"income": 7.0, "notes": {"a": [1, 2]}, "flag": True},  # other names, a nested value
]


def _log(store: OutcomeStore, rollout_id: int, records: list[dict], tag: str = "r", start: float = 0.0) -> None:
    rows = [PredictionRow(f"{tag}{i}", "1", "champion", T0 + start + i, f"u{i}", rollout_id, True, 1.0, 1.0, 0.9, 1.0,
                          features=record) for i, record in enumerate(records)]
    rows += [PredictionRow(f"{tag}{i}", "2", "challenger", T0 + start + i, f"u{i}", rollout_id, False, None, 0.0, 0.2,
                           1.0) for i in range(len(records))]
    store.log_predictions(rows)
    store.add_labels([(f"{tag}{i}", 1.0, T0 + 3600) for i in range(len(records))])


def _stored(store: OutcomeStore) -> list[str]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(predictions.c.features).where(predictions.c.features.is_not(None))
                                           .order_by(predictions.c.ts))]


def test_features_are_stored_without_their_names_and_every_reader_gets_the_records_back(store_url: str,
                                                                                        tmp_path: Path) -> None:
    store = OutcomeStore(store_url, clock=lambda: T0 + 7200).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=T0)
    _log(store, rid, RECORDS)

    stored = _stored(store)
    assert all(s.startswith("[") and '"income"' not in s for s in stored), stored
    assert sum(map(len, stored)) < 0.6 * sum(len(to_json(r)) for r in RECORDS)  # the names were most of it
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(feature_sets)).scalar_one() == 3

    newest_first = list(reversed(RECORDS))
    expected = pd.DataFrame.from_records(newest_first)
    pd.testing.assert_frame_equal(store.recent_features(), expected)  # drift checks
    training = store.production_rows(days=1, limit=100)  # training on production data
    pd.testing.assert_frame_equal(training.drop(columns=["_label", "_ts", "_unit", "_role"]), expected)
    seen = details(store.engine, rid, ["r0", "r3"])  # what a labeller is shown: the record as an object
    assert json.loads(seen["r0"]["features"]) == RECORDS[0] and json.loads(seen["r3"]["features"]) == RECORDS[3]
    store.export("2026-01-01", None, tmp_path / "export")
    frame = pd.read_parquet(tmp_path / "export")
    exported = frame[frame["served"]].sort_values("time")["features"].tolist()
    assert [json.loads(f) for f in exported] == RECORDS  # analysts read objects, never set ids

    again = OutcomeStore(store_url).create()  # another writer (a replica) finds the same sets, makes none
    _log(again, rid, RECORDS[:3], tag="s", start=60)
    with again.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(feature_sets)).scalar_one() == 3
    pd.testing.assert_frame_equal(again.recent_features(limit=3), pd.DataFrame.from_records(list(reversed(RECORDS[:3]))))
    again.dispose()
    store.dispose()


def test_rows_stored_as_objects_read_as_before_and_a_process_makes_at_most_max_sets(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = OutcomeStore(store_url).create()
    rid = store.open_rollout("shadow", {"champion": "1"}, {}, "s", started_at=T0)
    store.bulk_insert("predictions", LOG_COLUMNS, [  # a row as a store from before kept it: an object
        ("old", None, rid, T0 - 10, "2026-01-01", "1", "champion", 1, 1.0, 1.0, 0.9, 1.0, None, None,
         '{"income":5.0,"tier":"gold"}', None)])
    monkeypatch.setattr(features, "MAX_SETS", 2)  # the store makes two sets; then objects, without asking again
    _log(store, rid, RECORDS)
    stored = _stored(store)
    assert [s.startswith("[") for s in stored] == [False, True, True, True, False]  # the third set: an object
    assert not features.sets_of(store.engine).ids.get(tuple(RECORDS[3])) and features.sets_of(store.engine).full
    pd.testing.assert_frame_equal(store.recent_features(),
                                  pd.DataFrame.from_records([*reversed(RECORDS), {"income": 5.0, "tier": "gold"}]))
    store.dispose()


def test_a_refused_rows_dead_letter_keeps_its_features_as_an_object(pg_url: str) -> None:
    from tests.conftest import empty_pg_store

    empty_pg_store(pg_url)
    store = OutcomeStore(pg_url).create()
    rows = [PredictionRow(f"r{i}", "1", ts=T0, features=RECORDS[1]) for i in range(4)]
    rows[2] = PredictionRow("r\x00bad", "1", ts=T0, features=RECORDS[1])  # PostgreSQL refuses a NUL in text
    assert store.log_predictions(rows) == 3
    with store.engine.connect() as conn:
        payload = json.loads(conn.execute(select(dead_letters.c.payload)).scalar_one())
    assert json.loads(payload["features"]) == RECORDS[1]
    store.dispose()


def test_a_row_naming_a_set_the_store_lacks_is_a_clear_error_not_a_wrong_record(tmp_path: Path) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    rid = store.open_rollout("shadow", {"champion": "1"}, {}, "s", started_at=T0)
    _log(store, rid, RECORDS[:1])
    with store.engine.begin() as conn:  # as a hand-edited or half-copied store would be
        conn.execute(feature_sets.delete())
    with pytest.raises(ValueError, match="feature set 1, which feature_sets does not hold"):
        store.recent_features()
    store.dispose()


def test_features_given_as_json_text_are_stored_as_records_are_and_other_json_is_refused_alone(
        store_url: str, tmp_path: Path) -> None:
    store = OutcomeStore(store_url).create()
    rows = [PredictionRow(f"r{i}", "1", ts=T0 + i, features=to_json(RECORDS[0])) for i in range(4)]
    rows[1] = PredictionRow("r1", "1", ts=T0 + 1, features="[1, 2.0]")  # would read as a set id and its values
    rows[2] = PredictionRow("r2", "1", ts=T0 + 2, features="[]")
    assert store.log_predictions(rows) == 2 and store.dead_letters() == 2  # the others are written, once
    assert all(s.startswith("[") for s in _stored(store))
    pd.testing.assert_frame_equal(store.recent_features(), pd.DataFrame.from_records([RECORDS[0]] * 2))
    store.dispose()


def test_export_of_an_in_memory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sqlite://` has one connection for everything: the export reads the sets and streams rows on it."""
    store = OutcomeStore("sqlite://").create()
    rid = store.open_rollout("shadow", {"champion": "1"}, {}, "s", started_at=T0)
    _log(store, rid, RECORDS)
    monkeypatch.setattr("rollout.outcomes.export.CHUNK", 2)  # several chunks
    exported = store.export("2026-01-01", None, tmp_path / "export")
    frame = pd.read_parquet(tmp_path / "export")
    assert exported[0].rows == 2 * len(RECORDS)
    assert [json.loads(f) for f in frame[frame["served"]].sort_values("time")["features"]] == RECORDS


def test_processes_naming_a_new_set_at_once_do_not_fail_each_other_on_sqlite(tmp_path: Path) -> None:
    """`rollout serve --workers 2` in shadow mode: each worker's log writer and each shadow child name the first
    record's set on their own connection at about once. Another process commits between one's look-up and its
    insert (forced here): the insert must wait for the lock, not fail with "database is locked"."""
    import threading
    import time

    from sqlalchemy import event

    url = f"sqlite:///{tmp_path / 'o.db'}"
    OutcomeStore(url).create()
    mine, other = OutcomeStore(url), OutcomeStore(url)
    other_done: list[BaseException | None] = []

    def other_process_writes() -> None:  # another process commits a set of its own
        try:
            other.engine.dispose()
            features.FeatureSets().id_of(other.engine, ("a", "b"))
            other_done.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            other_done.append(exc)

    @event.listens_for(mine.engine, "before_cursor_execute")
    def between_lookup_and_insert(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if statement.startswith("INSERT INTO feature_sets") and not other_done:
            thread = threading.Thread(target=other_process_writes)
            thread.start()
            thread.join(0.5)  # it commits (no lock held here) or waits for this transaction's lock

    set_id = features.FeatureSets().id_of(mine.engine, ("income", "tier"))
    deadline = time.monotonic() + 10
    while not other_done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other_done == [None]
    assert set_id is not None
    with mine.engine.connect() as conn:
        names = {r[0] for r in conn.execute(select(feature_sets.c.columns))}
    assert names == {'["income","tier"]', '["a","b"]'}
