"""PostgreSQL's prediction log partitioned by day: live days get partitions ahead, a day expires by dropping its
partition (never one holding an open rollout's rows), writers go on meanwhile, and an old store converts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import inspect, text

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes import partitions
from rollout.outcomes.schema import SHADOW_COLUMNS, metadata, predictions
from tests.conftest import fresh_pg_database

pytestmark = pytest.mark.postgres

D0 = date(2026, 3, 1)
DAY = 86_400.0


@pytest.fixture
def pg() -> Iterator[str]:
    """A database of its own for each test (partitions are tables: no test sees another's)."""
    with fresh_pg_database("rollout_part") as url:
        yield url


def _epoch(day: date, hour: int = 12) -> float:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp()


def _log(store: OutcomeStore, day: date, rollout_id: int | None, n: int, tag: str) -> None:
    store.log_predictions(PredictionRow(f"{tag}-{day}-{i}", "1", "champion", _epoch(day) + i, f"u{i}", rollout_id,
                                        True, 1.0, 1.0, 0.7) for i in range(n))
    store.add_labels((f"{tag}-{day}-{i}", 1, _epoch(day) + 3600) for i in range(n))


def _vacuumed(store: OutcomeStore, wait_for: str) -> set[str]:
    """The tables PostgreSQL's statistics say were vacuumed, once `wait_for` shows up (they are flushed late)."""
    import time

    for _ in range(50):
        with store.engine.connect() as conn:
            names = set(conn.execute(text("SELECT relname FROM pg_stat_user_tables WHERE last_vacuum IS NOT NULL"))
                        .scalars())
        if wait_for in names:
            return names
        time.sleep(0.1)
    raise AssertionError(f"{wait_for} never shown as vacuumed")


_PG_INDEXES = ["ix_predictions_request", "ix_predictions_features", "ix_predictions_time"]


def _where(store: OutcomeStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {str(t): int(n) for t, n in conn.execute(text(
            "SELECT tableoid::regclass, count(*) FROM prediction_log GROUP BY 1"))}


def test_a_new_store_is_partitioned_with_days_ahead_and_live_rows_land_in_their_day(pg: str) -> None:
    store = OutcomeStore(pg).create()
    with store.engine.connect() as conn:  # its indexes made on the parent before any day: valid, on every day
        assert conn.execute(text("SELECT bool_and(i.indisvalid) AND count(*) = :n FROM pg_index i JOIN pg_class c "
                                 "ON c.oid = i.indexrelid WHERE c.relname = ANY(:names)"),
                            {"n": len(_PG_INDEXES), "names": _PG_INDEXES}).scalar_one()
    today = datetime.now(UTC).date()
    names = {n for n, _ in partitions.day_partitions(store.engine)}
    assert partitions.is_partitioned(store.engine)
    assert {partitions.partition_name(today + timedelta(days=k)) for k in range(8)} <= names
    store.log_predictions([PredictionRow("now", "1"), PredictionRow("past", "1", ts=_epoch(D0))])
    assert _where(store) == {partitions.partition_name(today): 1, partitions.partition_name(D0): 1}  # made for it


def test_expiry_drops_whole_days_keeps_an_open_rollouts_and_writers_go_on(pg: str) -> None:
    store = OutcomeStore(pg).create()
    partitions.ensure_ahead(store.engine, today=D0, ahead=9)  # D0 .. D9 have partitions, as live days would
    closed = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", started_at=_epoch(D0, 0))
    for k in range(5):
        _log(store, D0 + timedelta(days=k), closed, 50, "closed")
    store.end_rollout(closed, ended_at=_epoch(D0 + timedelta(days=5), 0))
    opened = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s",
                                started_at=_epoch(D0 + timedelta(days=2), 0))
    _log(store, D0 + timedelta(days=2), opened, 30, "open")  # day 2 holds rows of the open rollout too
    for k in range(5, 10):
        _log(store, D0 + timedelta(days=k), opened, 40, "open")
    evidence = store.evidence(opened, cutoff=_epoch(D0 + timedelta(days=10), 0))

    written: list[int] = []
    stop = threading.Event()

    def writer() -> None:  # today's traffic goes on while old days are dropped
        i = 0
        while not stop.is_set():
            store.log_predictions([PredictionRow(f"live-{i}", "1", ts=_epoch(D0 + timedelta(days=9)) + i)])
            written.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        expired = store.expire(_epoch(D0 + timedelta(days=8), 0))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert written and not thread.is_alive()
    left = {n for n, _ in partitions.day_partitions(store.engine)}
    gone = {partitions.partition_name(D0 + timedelta(days=k)) for k in (0, 1, 3, 4)}
    kept = {partitions.partition_name(D0 + timedelta(days=k)) for k in (2, 5, 6, 7, 8, 9)}
    assert not gone & left and kept <= left
    assert "4 day partition(s) dropped" in expired.note
    # days 0, 1, 3, 4 (the closed rollout's only) went with their partitions; day 2's closed rows by DELETE;
    # days 2 and 5-7 hold the open rollout's rows, so their partitions stay
    assert expired.predictions == 5 * 50 and expired.kept_open == 30 + 3 * 40
    assert store.evidence(opened, cutoff=_epoch(D0 + timedelta(days=10), 0)) == evidence
    # VACUUM (ANALYZE) went to what the deletes touched (day 2's partition, the labels), not every day partition
    # (0.75 s of a 0.85 s retention step at 45 days, benchmarks/retention.py)
    vacuumed = _vacuumed(store, "labels")
    assert {partitions.partition_name(D0 + timedelta(days=2)), "labels"} <= vacuumed
    assert not {partitions.partition_name(D0 + timedelta(days=k)) for k in (5, 6, 7)} & vacuumed
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM predictions WHERE rollout_id = :r"),
                            {"r": opened}).scalar_one() == 30 + 5 * 40
        assert conn.execute(text("SELECT count(*) FROM predictions WHERE request_id LIKE 'live-%'")).scalar_one() \
            == len(written)


def test_an_old_plain_store_converts_with_its_history_in_day_partitions(pg: str) -> None:
    store = OutcomeStore(pg)
    metadata.create_all(store.engine)  # a store made before partitioning: plain tables
    assert not partitions.is_partitioned(store.engine)
    for k in range(3):
        _log(store, D0 + timedelta(days=k), None, 20, "old")
    note = store.expire(_epoch(D0, 0), dry_run=False).note
    assert "rollout retention --partition" in note  # the retention report says how to convert
    assert store.partition() == 60
    assert partitions.is_partitioned(store.engine)
    assert _where(store) == {partitions.partition_name(D0 + timedelta(days=k)): 20 for k in range(3)}
    store.log_predictions([PredictionRow("after", "1", ts=_epoch(D0 + timedelta(days=1)))])
    with store.engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM predictions ORDER BY id DESC LIMIT 2")).scalars().all()
    assert ids[0] > ids[1]  # the id sequence continues past the moved rows
    expired = store.expire(_epoch(D0 + timedelta(days=2), 0))
    assert expired.predictions == 41 and "2 day partition(s) dropped" in expired.note  # with the row "after"
    assert store.partition() == 0  # idempotent
    assert [i.name for i in predictions.indexes]  # the metadata's indexes exist on the new table
    with store.engine.connect() as conn:
        names = set(conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'prediction_log'")).scalars())
    assert {"ix_predictions_request", "ix_predictions_time"} <= names


def test_converting_a_plain_log_builds_an_index_added_since_on_the_partitioned_log_only(
        pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rollout retention --partition` on a log from before partitioning that lacks an index added since: the index is
    built once, on the partitioned log, not first on the plain table the conversion then drops (a wasted build as
    long as the whole log's, on a one-off command run with the service stopped)."""
    old = OutcomeStore(pg)
    metadata.create_all(old.engine)  # plain tables, as a store made before partitioning
    for k in range(2):
        _log(old, D0 + timedelta(days=k), None, 10, "old")
    with old.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_predictions_time"))  # as if added by a later version
    old.dispose()
    built: list[tuple[str, bool]] = []
    real = partitions.create_index

    def spy(engine: object, index: object) -> None:
        with old.engine.connect() as conn:  # partitioned now? (not is_partitioned: it caches)
            partitioned = conn.execute(text("SELECT count(*) FROM pg_partitioned_table")).scalar_one() > 0
        built.append((str(getattr(index, "name")), partitioned))
        real(engine, index)  # type: ignore[arg-type]

    monkeypatch.setattr(partitions, "create_index", spy)
    assert OutcomeStore(pg).partition() == 20  # what the CLI runs: a new store object, then the conversion
    assert ("ix_predictions_time", False) not in built and ("ix_predictions_time", True) in built
    with old.engine.connect() as conn:
        names = set(conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'prediction_log'")).scalars())
    assert {"ix_predictions_request", "ix_predictions_time"} <= names


def test_a_partitioned_log_has_no_key_and_an_older_one_loses_its_own(pg: str) -> None:
    """A partitioned table's key must include the day, and its index (id, day) cost 32 B a logged row that no
    query read: new logs have none, and a store made with one loses it when opened. Fixed-width columns come
    first, so no alignment padding sits between them."""
    store = OutcomeStore(pg).create()

    def key() -> object:
        with store.engine.connect() as conn:
            return conn.execute(text("SELECT conname FROM pg_constraint WHERE conrelid = 'prediction_log'::regclass "
                                     "AND contype = 'p'")).scalar()

    assert key() is None
    with store.engine.connect() as conn:
        columns = conn.execute(text("SELECT attname FROM pg_attribute WHERE attrelid = 'prediction_log'::regclass "
                                    "AND attnum > 0 ORDER BY attnum")).scalars().all()
    assert columns[:11] == ["ts", "propensity", "prediction", "score", "latency_ms", "shadow_prediction",
                            "shadow_score", "shadow_latency_ms", "id", "rollout_id", "served"]
    assert set(columns) == {c.name for c in predictions.columns} | set(SHADOW_COLUMNS)
    with store.engine.begin() as conn:  # as a store partitioned before
        conn.execute(text("ALTER TABLE prediction_log ADD PRIMARY KEY (id, day)"))
    _log(store, D0, None, 5, "old")
    assert key() is not None
    again = OutcomeStore(pg).create()
    assert key() is None
    again.log_predictions([PredictionRow("after", "1", ts=_epoch(D0))])
    with again.engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM predictions ORDER BY id")).scalars().all()
    assert len(ids) == 6 == len(set(ids))  # ids still number the rows
    again.dispose()
    store.dispose()


def test_an_index_missing_from_a_partitioned_log_is_built_day_by_day(pg: str) -> None:
    """An index added to the schema reaches a store made before it without a CREATE INDEX on the parent (which
    locks every day against inserts for the whole build): each day's index is built CONCURRENTLY and attached,
    the parent's is valid once all are, an interrupted build resumes, and a day made later gets its own."""
    store = OutcomeStore(pg).create()
    for k in range(3):
        _log(store, D0 + timedelta(days=k), None, 20, "old")
    with store.engine.begin() as conn:  # as a store made before ix_predictions_features
        conn.execute(text("DROP INDEX ix_predictions_features"))
    with store.engine.connect() as conn:  # as a build interrupted after the parent and one day's index
        conn.execute(text("COMMIT"))
        conn.execute(text("CREATE INDEX ix_predictions_features ON ONLY prediction_log (ts) "
                          "WHERE served = 1 AND features IS NOT NULL"))
        first = partitions.partition_name(D0)
        conn.execute(text(f"CREATE INDEX {first}_ix_predictions_features ON {first} (ts) "
                          "WHERE served = 1 AND features IS NOT NULL"))
        conn.execute(text(f"ALTER INDEX ix_predictions_features ATTACH PARTITION {first}_ix_predictions_features"))
        conn.commit()
    OutcomeStore(pg).create()
    with store.engine.connect() as conn:
        valid = conn.execute(text("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                                  "'ix_predictions_features'::regclass")).scalar_one()
        children = conn.execute(text("SELECT count(*) FROM pg_inherits WHERE inhparent = "
                                     "'ix_predictions_features'::regclass")).scalar_one()
    days = partitions.day_partitions(store.engine)
    assert valid and children == len(days)
    partitions.ensure_days(store.engine, [(D0 - timedelta(days=5)).isoformat()])  # a day made after
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_inherits WHERE inhparent = "
                                 "'ix_predictions_features'::regclass")).scalar_one() == len(days) + 1
    store.dispose()


def test_an_unused_index_is_dropped_without_holding_writers_behind_a_reader(pg: str) -> None:
    """A store made before the time index lost its day has ix_predictions_day. Opening it builds the new index and
    drops the old one; a DROP INDEX waits for the log's exclusive lock, and every insert queues behind it. With a
    reader in a long transaction on the log, the drop gives up after a second (a writer meanwhile waits no longer
    than that) and the next open drops it."""
    import time

    store = OutcomeStore(pg).create()
    _log(store, D0, None, 20, "old")
    with store.engine.begin() as conn:  # as a store made before: the time index with the day
        conn.execute(text("DROP INDEX ix_predictions_time"))
        conn.execute(text("CREATE INDEX ix_predictions_day ON prediction_log (rollout_id, day, ts)"))

    def names() -> set[str]:
        return {str(ix["name"]) for ix in inspect(store.engine).get_indexes("prediction_log")}

    reader = store.engine.connect()
    reader.execute(text("SELECT count(*) FROM prediction_log")).scalar_one()  # its transaction stays open
    waited: list[float] = []

    def write() -> None:
        time.sleep(0.3)  # while the drop waits for its lock
        started = time.perf_counter()
        _log(store, D0, None, 5, "live")
        waited.append(time.perf_counter() - started)

    opener = threading.Thread(target=lambda: OutcomeStore(pg).create())  # builds ix_predictions_time, drops the old
    writer = threading.Thread(target=write)
    opener.start()
    writer.start()
    opener.join(20)
    writer.join(20)
    blocked = opener.is_alive()
    reader.rollback()  # the reader ends (which also frees a drop that waited for it)
    reader.close()
    opener.join(30)
    assert not blocked, "opening the store waited for the reader to end"
    assert waited and waited[0] < 5.0, waited  # the writer was not held until the reader ended
    assert {"ix_predictions_time", "ix_predictions_day"} <= names()  # the drop gave up: left for the next open
    OutcomeStore(pg).create()
    assert "ix_predictions_day" not in names() and "ix_predictions_time" in names()
    store.dispose()


def test_an_index_missing_from_a_plain_table_is_built_without_holding_its_writers(pg: str) -> None:
    """A plain table (labels, or a log from before partitioning) gets an index added to the schema CONCURRENTLY:
    a plain CREATE INDEX waits for the writer whose transaction is open and every later writer queues behind it;
    CONCURRENTLY lets them write while it waits and builds."""
    import time

    store = OutcomeStore(pg)
    metadata.create_all(store.engine)  # a store made before partitioning: plain tables
    _log(store, D0, None, 20, "old")
    with store.engine.begin() as conn:  # as made before ix_predictions_time
        conn.execute(text("DROP INDEX ix_predictions_time"))
    slow = store.engine.connect()  # a writer whose transaction stays open a while
    slow.execute(text("INSERT INTO predictions (request_id, ts, day, version, role, served) "
                      "VALUES ('slow', 1, '2026-03-01', '1', 'champion', 1)"))
    waited: list[float] = []

    def write() -> None:
        time.sleep(0.5)  # while the build waits for the open writer
        started = time.perf_counter()
        _log(store, D0, None, 5, "live")
        waited.append(time.perf_counter() - started)

    opener = threading.Thread(target=lambda: OutcomeStore(pg).create())
    writer = threading.Thread(target=write)
    opener.start()
    writer.start()
    writer.join(20)
    time.sleep(0.5)
    slow.commit()  # the open writer ends: the build goes on
    slow.close()
    opener.join(60)
    assert not opener.is_alive()
    assert waited and waited[0] < 3.0, waited  # the later writer did not wait for the open one
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                                 "'ix_predictions_time'::regclass")).scalar_one()
    assert not partitions.is_partitioned(store.engine)
    store.dispose()
