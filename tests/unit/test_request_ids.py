"""Request ids as the outcome store keeps them: a ULID as its 16 bytes on SQLite, any other id as its text, and
every id read back as the string that was logged; SQLite's day computed from ts; an older SQLite store rewritten
in the compact row with nothing lost."""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.ids import pack, unpack
from rollout.times import day_of
from serving.predict import new_request_ids

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_a_ulid_packs_to_its_16_bytes_and_back_and_nothing_else_is_touched() -> None:
    ulids = new_request_ids(2000) + [unpack(os.urandom(16)) for _ in range(2000)]
    for u in ulids:
        packed = pack(u)
        assert isinstance(packed, bytes) and len(packed) == 16 and unpack(packed) == u
    assert [pack(u) for u in sorted(ulids)] == sorted(pack(u) for u in ulids)  # byte order is time order
    u = ulids[0]
    for other in ("r1", "", u.lower(), "8" + u[1:], u[:-1] + "I", u[:-1] + "U", " " + u[1:], u[:-1] + "_",
                  "+" + u[1:], "é" * 26, u + "0", u[:-1]):
        assert pack(other) == other, other
    assert pack(None) is None and unpack(None) is None and unpack("r1") == "r1"


def _stored(store: OutcomeStore, sql: str) -> list[tuple[object, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def test_sqlite_keeps_a_ulid_as_bytes_and_every_read_gives_the_id_back(tmp_path: Path) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: T0).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    ulids = new_request_ids(40)
    mine = [f"my-own-{i}" for i in range(10)]
    rows = [PredictionRow(r, v, "champion" if v == "1" else "challenger", T0 + timedelta(minutes=i), rollout_id=rid,
                          served=v == "1", prediction=1.0, score=0.8)
            for i, r in enumerate(ulids + mine) for v in ("1", "2")]
    store.log_predictions(rows)
    report = store.add_labels([(r, 1.0, T0 + timedelta(hours=2)) for r in ulids[:30] + mine[:5]]
                              + [("01ARZ3NDEKTSV4RRFFQ69G5FAV", 0.0, T0)])  # a ULID nobody logged
    assert (report.stored, report.unknown, report.unknown_ids) == (36, 1, ("01ARZ3NDEKTSV4RRFFQ69G5FAV",))

    kinds = dict(_stored(store, "SELECT typeof(request_id), count(*) FROM predictions GROUP BY 1"))
    assert kinds == {"blob": 80, "text": 20}
    assert dict(_stored(store, "SELECT typeof(request_id), count(*) FROM labels GROUP BY 1")) == {"blob": 31, "text": 5}
    hidden = {name: h for _, name, *_, h in _stored(store, "PRAGMA table_xinfo(predictions)")}
    assert hidden["day"] == 2  # a VIRTUAL generated column: not stored

    assert store.logged_requests(ulids[:3] + mine[:2] + ["nope"]) == set(ulids[:3] + mine[:2])
    assert store.unmatched_labels() == 1
    evidence = store.evidence(rid)
    assert sum(m.n for m in evidence.loss["accuracy"].values()) == 2 * 35  # both versions' labelled rows
    assert sum(m.n for m in evidence.paired["accuracy"].values()) == 35  # the challenger's, paired by request id
    details = store.label_request_details(rid, [ulids[5], mine[1]])
    assert set(details) == {ulids[5], mine[1]}

    exported = store.export("2026-03-01", None, tmp_path / "out")
    import pandas as pd

    frame = pd.concat(pd.read_parquet(d.path) for d in exported)
    assert set(frame["request_id"]) == set(ulids + mine)
    assert frame.loc[frame["request_id"] == ulids[0], "label"].tolist() == [1.0, 1.0]
    store.dispose()


def test_sqlite_computes_the_day_a_row_is_filed_under_as_day_of_does(tmp_path: Path) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: T0).create()
    rng = random.Random(3)
    midnight = 1_770_076_800.0
    times = [midnight + d for d in (-86400.0, -1.0, -1e-3, -5e-4, -1e-6, -4e-7, 0.0, 1e-7, 3599.5, 86399.999999)]
    times += [rng.uniform(0, 2e9) for _ in range(3000)] + [midnight + rng.uniform(-1e-3, 1e-3) for _ in range(500)]
    store.log_predictions([PredictionRow(f"t{i}", "1", ts=t) for i, t in enumerate(times)])
    got = dict(_stored(store, "SELECT request_id, day FROM predictions"))
    assert [got[f"t{i}"] for i in range(len(times))] == [day_of(t) for t in times]
    store.dispose()


OLD_LOG = """CREATE TABLE predictions (id INTEGER NOT NULL, request_id VARCHAR(64) NOT NULL, unit_id VARCHAR(128),
rollout_id INTEGER, ts FLOAT NOT NULL, day VARCHAR(10) NOT NULL, version VARCHAR(32) NOT NULL,
role VARCHAR(32) NOT NULL, served INTEGER NOT NULL, propensity FLOAT, prediction FLOAT, score FLOAT,
latency_ms FLOAT, error TEXT, segment VARCHAR(64), features TEXT, probabilities TEXT, PRIMARY KEY (id))"""


@pytest.mark.parametrize("mode", ["shadow", "ab"])
def test_a_sqlite_store_from_before_is_rewritten_compact_and_answers_the_same(tmp_path: Path, mode: str) -> None:
    """A log that stored its day and its ids as text (made here as the old code made it) is copied into the compact
    row when the store is opened: the same rows and ids, the labels still joined, the same evidence and units as
    a store that logged the same traffic new, and a row logged afterwards joins its label too."""
    rng = random.Random(11)
    ulids = new_request_ids(300)
    requests = [(r if i % 7 else f"own-{i}", None if i % 3 == 0 else f"u{i % 40}", T0.timestamp() + i * 600.0)
                for i, r in enumerate(ulids)]
    weights = {} if mode == "shadow" else {"challenger": 0.5}

    def traffic(rollout: int) -> list[PredictionRow]:
        rows = []
        for i, (r, unit, ts) in enumerate(requests):
            versions = ("1", "2") if mode == "shadow" else ("12"[i % 2],)
            for v in versions:
                rows.append(PredictionRow(r, v, "champion" if v == "1" else "challenger", ts, unit, rollout,
                                          served=mode != "shadow" or v == "1", propensity=0.5,
                                          prediction=float(rng.random() < 0.5), score=rng.random(), latency_ms=3.0))
        return rows

    labels = [(r, float(i % 3 == 0), ts + 3600) for i, (r, _, ts) in enumerate(requests) if i % 4]
    fresh = OutcomeStore(f"sqlite:///{tmp_path / 'new.db'}", clock=lambda: T0).create()
    rid = fresh.open_rollout(mode, {"champion": "1", "challenger": "2"}, weights, "salt", T0)
    rows = traffic(rid)
    fresh.log_predictions(rows)
    fresh.add_labels(labels)

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = OutcomeStore(url, clock=lambda: T0).create()
    assert old.open_rollout(mode, {"champion": "1", "challenger": "2"}, weights, "salt", T0) == rid
    with old.engine.begin() as conn:  # the log and the labels as the code before kept them
        conn.exec_driver_sql("DROP TABLE predictions")
        conn.exec_driver_sql(OLD_LOG)
        conn.exec_driver_sql("CREATE INDEX ix_predictions_request ON predictions (request_id)")
        conn.exec_driver_sql("CREATE INDEX ix_predictions_time ON predictions (rollout_id, ts)")
        conn.execute(text("INSERT INTO predictions (request_id, unit_id, rollout_id, ts, day, version, role, served, "
                          "propensity, prediction, score, latency_ms) VALUES (:r, :u, :o, :ts, :day, :v, :role, :s, "
                          ":p, :pred, :score, :lat)"),
                     [{"r": x.request_id, "u": x.unit_id, "o": rid, "ts": x.ts, "day": day_of(float(x.ts)),  # type: ignore[arg-type]
                       "v": x.version, "role": x.role, "s": int(x.served), "p": x.propensity, "pred": x.prediction,
                       "score": x.score, "lat": x.latency_ms} for x in rows])
        conn.execute(text("INSERT INTO labels (request_id, label, ts, received_at, current, matched, predicted_at) "
                          "VALUES (:r, :y, :ts, :ts, 1, 1, NULL)"), [{"r": r, "y": y, "ts": ts} for r, y, ts in labels])
    old.dispose()

    upgraded = OutcomeStore(url, clock=lambda: T0).create()
    kinds = dict(_stored(upgraded, "SELECT typeof(request_id), count(*) FROM predictions GROUP BY 1"))
    assert sum(kinds.values()) == len(rows) and kinds["blob"] > kinds["text"] > 0
    assert dict(_stored(upgraded, "SELECT typeof(request_id), count(*) FROM labels GROUP BY 1")) == dict(
        _stored(fresh, "SELECT typeof(request_id), count(*) FROM labels GROUP BY 1"))
    hidden = {name: h for _, name, *_, h in _stored(upgraded, "PRAGMA table_xinfo(predictions)")}
    assert hidden["day"] == 2
    indexes = {name for _, name, *_ in _stored(upgraded, "PRAGMA index_list(predictions)")}
    assert {"ix_predictions_request", "ix_predictions_time", "ix_predictions_features"} <= indexes
    a, b = upgraded.evidence(rid), fresh.evidence(rid)
    assert a.loss == b.loss and a.paired == b.paired and a.traffic == b.traffic and a.units == b.units
    assert upgraded.logged_requests([r for r, _, _ in requests]) == {r for r, _, _ in requests}

    late = ulids[-1]  # a label for a request logged before the upgrade, and one logged after it
    new_id = new_request_ids(1)[0]
    upgraded.log_predictions([PredictionRow(new_id, "1", ts=T0 + timedelta(days=3), rollout_id=rid, prediction=1.0)])
    report = upgraded.add_labels([(late, 1.0, T0 + timedelta(days=4)), (new_id, 1.0, T0 + timedelta(days=4))])
    assert report.unknown == 0
    assert OutcomeStore(url).create().logged_requests([new_id]) == {new_id}  # reopening: nothing to redo
    upgraded.dispose()
    fresh.dispose()


def test_processes_opening_an_older_store_together_compact_it_once(tmp_path: Path) -> None:
    """Workers, shadow children and flows open the store at once: one copies the log, the others wait for its
    lock and find it done, and none sees the new log without its indexes."""
    import threading

    from rollout.outcomes import migrate

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = OutcomeStore(url).create()
    ids = new_request_ids(30_000)
    with old.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE predictions")
        conn.exec_driver_sql(OLD_LOG)
        conn.exec_driver_sql("CREATE INDEX ix_predictions_request ON predictions (request_id)")
        conn.connection.driver_connection.executemany(  # type: ignore[union-attr]
            "INSERT INTO predictions (request_id, rollout_id, ts, day, version, role, served) "
            "VALUES (?, 1, ?, '2026-02-03', '1', 'champion', 1)", [(r, 1_770_076_800.0 + i) for i, r in enumerate(ids)])
    old.dispose()
    moved: list[int] = []
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            store = OutcomeStore(url)
            moved.append(migrate.compact(store.engine))
            store.create()
            assert store.logged_requests(ids[:5]) == set(ids[:5])
            store.dispose()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(moved) == [0, 0, len(ids)]


def test_a_sqlite_too_old_for_generated_columns_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sqlite3

    from rollout.outcomes import engine

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 30, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.30.1")
    with pytest.raises(RuntimeError, match=r"needs SQLite 3\.31\.0 or later .* has 3\.30\.1"):
        engine.make_engine(f"sqlite:///{tmp_path / 'o.db'}")


def test_a_hinted_sqlite_query_binds_a_request_id_as_the_store_keeps_it(tmp_path: Path) -> None:
    """The summaries' SQLite index hints rewrite the SQL on its way to the driver: a bound request id must still be
    packed, and a returned one unpacked, as for any statement, or a ULID matches no row (no hinted query binds one
    today; this keeps it so). They ran the compiled SQL themselves, bypassing both."""
    from sqlalchemy import select

    from rollout.outcomes.schema import predictions
    from rollout.outcomes.summaries import _execute_hinted

    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: T0).create()
    ulid = new_request_ids(1)[0]
    store.log_predictions([PredictionRow(ulid, "1", "champion", T0, prediction=1.0),
                           PredictionRow("my-own-id", "1", "champion", T0, prediction=0.0)])
    p = predictions.alias("p")
    hint = [("FROM predictions AS p ", "FROM predictions AS p INDEXED BY ix_predictions_request ")]
    with store.engine.connect() as conn:
        for request_id, prediction in ((ulid, 1.0), ("my-own-id", 0.0)):
            query = select(p.c.request_id, p.c.prediction).where(p.c.request_id == request_id, p.c.ts >= 0)
            assert [tuple(r) for r in _execute_hinted(conn, query, hint)] == [(request_id, prediction)]
    store.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_process_makes_ids_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids are drawn from entropy read ahead in blocks, and follow the process's last id within a millisecond: a
    forked child (a server forking its workers) must neither reuse the parent's unread bytes nor follow its last
    id, or both would name different requests alike. Both ask within one millisecond here (a stopped clock)."""
    import serving.predict

    now = time.time_ns()
    monkeypatch.setattr(serving.predict.time, "time_ns", lambda: now)
    new_request_ids(1)  # the parent has read entropy ahead and made an id
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, then out without running the parent's cleanup
        try:
            os.write(write, "\n".join(new_request_ids(1) + new_request_ids(500)).encode())
        finally:
            os._exit(0)
    os.close(write)
    parent = new_request_ids(1) + new_request_ids(500)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    child = b"".join(chunks).decode().split("\n")
    assert len(child) == 501 and not set(child) & set(parent)
    assert parent == sorted(parent) and child == sorted(child)  # each process's ids in time order still
