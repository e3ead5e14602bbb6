"""PostgreSQL: the prediction log partitioned by day, so a day expires by dropping its partition.

At tens of millions of rows a day, DELETE cannot keep up: it writes every row twice (the heap and WAL),
leaves dead tuples for VACUUM and holds its locks for minutes. A new PostgreSQL store's `predictions` is
declaratively partitioned by `day` (RANGE, one partition a day: `predictions_YYYYMMDD`). Partitions are made
`AHEAD_DAYS` ahead by `create()` and by every retention run, and a write for a day without one (traffic
replayed with past times) makes it first (`ensure_days`, one catalog lookup per logged batch; CREATE ...
PARTITION OF takes a lock that no insert waits on). There is no DEFAULT partition: PostgreSQL cannot
detach a partition concurrently beside one. Expiry detaches and drops a whole day when no row of an open
rollout is in it: DETACH PARTITION ... CONCURRENTLY blocks no writer, and the drop is O(1) whatever the
day's size. A day holding an open rollout's rows is cleaned by the batched DELETE of
`rollout.outcomes.retention` (its other rows) and dropped once the rollout ends.

Labels are not partitioned: their unique index (one current label per request) must hold across the
whole table, and a partitioned table's unique index must include the partition key. They are a fraction
of the log (one row per labelled request).

A store created before this is a plain table: it keeps working (DELETE-based retention), the retention
report says so, and `rollout retention --partition` (service stopped) converts it in one transaction.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, Index, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateColumn, CreateIndex

from rollout.outcomes.engine import LockHeld, autocommit, lock
from rollout.outcomes.schema import LOG_TABLE, SHADOW_COLUMNS, SHADOW_IMPLIED, SHADOW_STORED, prediction_log, predictions

AHEAD_DAYS = 7


_PARTITIONED: dict[str, bool] = {}  # store URL -> whether its log is partitioned (changes only by `convert`)


def is_partitioned(engine: Engine) -> bool:
    with engine.connect() as conn:
        found = bool(conn.execute(text(
            "SELECT 1 FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid "
            "WHERE c.relname = :log AND pg_table_is_visible(c.oid)"), {"log": LOG_TABLE}).first())
    _PARTITIONED[str(engine.url)] = found
    return found


def ensure_days(engine: Engine, days: Iterable[str]) -> None:
    """Make the partitions of these days (YYYY-MM-DD) where missing, before rows of them are written."""
    key = str(engine.url)
    if not _PARTITIONED.get(key, False) and (key in _PARTITIONED or not is_partitioned(engine)):
        return
    wanted = {partition_name(date.fromisoformat(d)): date.fromisoformat(d) for d in set(days)}
    if not wanted:
        return
    with engine.connect() as conn:
        have = set(conn.execute(text("SELECT relname FROM pg_class WHERE relname = ANY(:names)"),
                                {"names": list(wanted)}).scalars())
    for name, day in sorted(wanted.items()):
        if name not in have:
            try:
                with engine.begin() as conn:
                    create_day(conn, day)
            except DBAPIError:  # another writer made it at the same moment
                with engine.connect() as conn:
                    if not conn.execute(text("SELECT 1 FROM pg_class WHERE relname = :n"), {"n": name}).first():
                        raise


def create_partitioned(engine: Engine) -> None:
    """CREATE the prediction log as a table partitioned by day, and the view readers see it through (its indexes
    come from the metadata, after)."""
    with engine.begin() as conn:
        conn.execute(text(_partitioned_ddl(engine)))
        _create_view(conn)
    _PARTITIONED[str(engine.url)] = True


# The log as readers see it: a paired row's champion and shadow as two rows. A LATERAL VALUES, not a UNION ALL:
# PostgreSQL flattens it into the query, so a probe by request id or a range of the time index reaches each day
# partition's index as on the table; a UNION ALL branch with a WHERE is not pulled up into an append relation, and
# the label-change probes then scanned every partition a probe (benchmarks/experiments/paired_log.py).
_VALUES = (*SHADOW_STORED, *SHADOW_IMPLIED)  # the columns a row's two halves differ in
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]
_IMPLIED_SQL = {c: f"CAST({'NULL' if v is None else repr(v)} AS {predictions.c[c].type.compile(dialect=_PG)})"
                for c, v in SHADOW_IMPLIED.items()}  # a shadow half's implied values, typed as the champion's columns
PAIRED_VIEW = (
    f"CREATE VIEW {predictions.name} AS SELECT "
    + ", ".join(f"v.{c.name}" if c.name in _VALUES else f"l.{c.name}" for c in predictions.columns)
    + f" FROM {LOG_TABLE} l CROSS JOIN LATERAL (VALUES ("
    + ", ".join(f"l.{c}" for c in _VALUES)
    + "), ("
    + ", ".join(_IMPLIED_SQL[c] if c in SHADOW_IMPLIED else f"l.shadow_{c}" for c in _VALUES)
    + f")) AS v({', '.join(_VALUES)}) WHERE v.version IS NOT NULL"
)
# Rows inserted into the view (a process of an earlier release during a rolling upgrade, a hand-written INSERT) go to
# the table, unpaired; COPY into the view works through it too.
_UNPAIRED = [c.name for c in predictions.columns if c.name != "id"]
PAIRED_INSERT = (
    "CREATE OR REPLACE FUNCTION predictions_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"INSERT INTO {LOG_TABLE} ({', '.join(_UNPAIRED)}) VALUES ("
    + ", ".join("COALESCE(NEW.served, 1)" if c == "served" else f"NEW.{c}" for c in _UNPAIRED)
    + "); RETURN NEW; END $$"
)


def _create_view(conn: Any) -> None:
    conn.execute(text(PAIRED_VIEW))
    conn.exec_driver_sql(PAIRED_INSERT)
    conn.exec_driver_sql(f"CREATE TRIGGER predictions_insert INSTEAD OF INSERT ON {predictions.name} "
                         "FOR EACH ROW EXECUTE FUNCTION predictions_insert()")


def pair_existing(engine: Engine) -> bool:
    """A partitioned log made before pairing (the table itself named `predictions`) becomes `prediction_log` with the
    shadow columns, and `predictions` the view: catalog changes only (a rename, columns without a default), in one
    transaction; every row stays where it is, unpaired. The table's lock is held for that moment: a writer waits
    for it (and for the queries in flight before it), then goes on through the view. True when it converted."""
    with engine.connect() as conn:
        kind = conn.execute(text("SELECT c.relkind FROM pg_class c WHERE c.relname = :n AND "
                                 "pg_table_is_visible(c.oid)"), {"n": predictions.name}).scalar()
    if kind != "p":
        return False
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {predictions.name} RENAME TO {LOG_TABLE}")
        types = {c.name: c.type.compile(dialect=engine.dialect) for c in prediction_log.columns}
        conn.exec_driver_sql(f"ALTER TABLE {LOG_TABLE} " + ", ".join(f"ADD COLUMN {c} {types[c]}"
                                                                     for c in SHADOW_COLUMNS))
        _create_view(conn)
    _PARTITIONED[str(engine.url)] = True
    return True


def log_source(engine: Engine) -> Any:
    """The table a query of served rows, of times or of rollouts reads on this store: on a paired PostgreSQL log the
    table itself (a pair's shadow half is never served, and shares the row's time, rollout and request), where the
    view would hide its indexes from min/max seeks and partial-index matches; else `predictions`."""
    if engine.dialect.name == "sqlite":
        return predictions
    key = str(engine.url)
    paired = _PARTITIONED[key] if key in _PARTITIONED else is_partitioned(engine)
    return prediction_log if paired else predictions


def create_index(engine: Engine, index: Index) -> None:
    """PostgreSQL: make a (non-unique) index of a store table where missing, without blocking its writers. A plain
    CREATE INDEX takes a lock every insert waits on for the whole build (minutes on a month of traffic, while the
    service's log queue fills and it refuses requests). A plain table (labels, a log from before partitioning)
    gets it CONCURRENTLY. A partitioned log has no CONCURRENTLY: the parent's index ON ONLY (invalid, empty),
    then each day's index CONCURRENTLY, attached as it is built; the parent's is valid once every day's is
    attached, and days made later get theirs with the table. Resumes where an interrupted build stopped (its
    invalid index dropped and built again); one process builds at a time (the store's named lock, tried and
    retried rather than waited on: a CONCURRENTLY build waits for every transaction in flight to end)."""
    dialect = getattr(index, "_ddl_if", None)
    if dialect is not None and dialect.dialect not in (None, engine.dialect.name):
        return
    index_name = str(index.name)
    if _index_valid(engine, index_name):
        return
    table = index.table.name if index.table is not None else ""
    ddl = str(CreateIndex(index).compile(dialect=engine.dialect))
    head = f"CREATE INDEX {index_name} ON {table} "
    if not ddl.startswith(head):
        raise RuntimeError(f"unexpected DDL for {index_name}: {ddl[:200]}")
    while True:
        try:
            with lock(engine, f"index {index_name}"):
                if not _index_valid(engine, index_name):
                    if table == predictions.name and is_partitioned(engine):
                        _build_by_day(engine, index_name, ddl[len(head):])
                    else:
                        with autocommit(engine) as dbapi:
                            dbapi.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name}")  # an interrupted build's
                            dbapi.execute(f"CREATE INDEX CONCURRENTLY {index_name} ON {table} {ddl[len(head):]}")
            return
        except LockHeld:  # another process builds it: wait, then find it valid
            time.sleep(0.5)


def _build_by_day(engine: Engine, index_name: str, body: str) -> None:
    with autocommit(engine) as dbapi:  # CONCURRENTLY runs outside a transaction
        dbapi.execute(f"CREATE INDEX IF NOT EXISTS {index_name} ON ONLY {LOG_TABLE} {body}")
        for day_table, _ in day_partitions(engine):
            # attached already: by an earlier build, or made with a day created since the parent's index
            if dbapi.execute("SELECT 1 FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid "
                             "WHERE i.inhparent = CAST(%s AS regclass) AND x.indrelid = CAST(%s AS regclass)",
                             (index_name, day_table)).fetchone():
                continue
            child = f"{day_table}_{index_name}"[:63]
            dbapi.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {child}")  # an interrupted build's, invalid
            dbapi.execute(f"CREATE INDEX CONCURRENTLY {child} ON {day_table} {body}")
            dbapi.execute(f"ALTER INDEX {index_name} ATTACH PARTITION {child}")


def _index_valid(engine: Engine, name: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                      "WHERE c.relname = :n AND pg_table_is_visible(c.oid)"), {"n": name}).scalar())


def drop_key(engine: Engine) -> None:
    """A partitioned log made with a primary key (id, day) loses it: its index's space back (no query needs it).
    Looked up first: ALTER TABLE takes a lock every writer waits on, even when there is nothing to drop."""
    with engine.connect() as conn:
        name = conn.execute(text(f"SELECT conname FROM pg_constraint WHERE conrelid = CAST('{LOG_TABLE}' AS regclass) "
                                 "AND contype = 'p'")).scalar()
    if name is not None:
        with engine.begin() as conn:
            conn.execute(text(f'ALTER TABLE {LOG_TABLE} DROP CONSTRAINT "{name}"'))


# Fixed-width columns first, 8-byte ones before 4-byte ones, then the variable-width ones: no alignment padding
# between them (10 B a row of shadow traffic). Every read and write names its columns, so their order is free.
_FIXED_FIRST = ("ts", "propensity", "prediction", "score", "latency_ms", "shadow_prediction", "shadow_score",
                "shadow_latency_ms", "id", "rollout_id", "served")


def _partitioned_ddl(engine: Engine) -> str:
    """The prediction log's CREATE TABLE, partitioned by day and without a primary key: a partitioned table's
    key must include `day`, and its index (id, day) cost 32 B a logged row while nothing looks a row up by id
    (retention deletes a partition's old rows by their ctid). `id` stays, numbering rows in the order they came."""
    columns = sorted(prediction_log.columns, key=lambda c: _FIXED_FIRST.index(c.name) if c.name in _FIXED_FIRST
                     else len(_FIXED_FIRST))  # stable: the rest keep their order
    defs = ", ".join(str(CreateColumn(c).compile(dialect=engine.dialect)) for c in columns)
    return f"CREATE TABLE {LOG_TABLE} ({defs}) PARTITION BY RANGE (day)"


def partition_name(day: date) -> str:
    return f"predictions_{day:%Y%m%d}"


def ensure_ahead(engine: Engine, today: date | None = None, ahead: int = AHEAD_DAYS) -> None:
    """Day partitions from today to `ahead` days on, where missing, so live traffic finds its day made."""
    today = today or datetime.now(UTC).date()
    ensure_days(engine, [(today + timedelta(days=k)).isoformat() for k in range(ahead + 1)])


def day_partitions(engine: Engine) -> list[tuple[str, date]]:
    """(name, day) of every day partition, oldest first."""
    with engine.connect() as conn:
        names = [r[0] for r in conn.execute(text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :log"), {"log": LOG_TABLE})]
    out = []
    for name in names:
        stamp = name.removeprefix("predictions_")
        if stamp.isdigit() and len(stamp) == 8:
            out.append((name, datetime.strptime(stamp, "%Y%m%d").replace(tzinfo=UTC).date()))
    return sorted(out, key=lambda p: p[1])


def drop_expired(engine: Engine, cutoff: float) -> tuple[int, list[str], bool]:
    """Drop the day partitions wholly older than `cutoff` that hold no row of an open rollout; returns the rows
    they held, their names and whether a count was estimated. DETACH ... CONCURRENTLY waits for no writer and
    blocks none."""
    cut_day = datetime.fromtimestamp(cutoff, UTC).date()
    rows, dropped, estimated = 0, [], False
    for name, day in day_partitions(engine):
        if day + timedelta(days=1) > cut_day:  # not wholly before the cut
            break
        with engine.connect() as conn:
            open_rows = conn.execute(text(
                f"SELECT 1 FROM {name} WHERE rollout_id IN (SELECT rollout_id FROM routing WHERE ended_at IS NULL) "
                "LIMIT 1")).first()
            if open_rows:
                continue
            n, guessed = _rows_of(conn, name)
            estimated = estimated or guessed
        with autocommit(engine) as dbapi:
            dbapi.execute(f"ALTER TABLE {LOG_TABLE} DETACH PARTITION {name} CONCURRENTLY")
            dbapi.execute(f"DROP TABLE {name}")
        rows += n
        dropped.append(name)
    return rows, dropped, estimated


ESTIMATE_ABOVE = 1_000_000  # a dropped day with more rows than this is counted from the statistics


def _rows_of(conn: Any, name: str) -> tuple[int, bool]:
    """A partition's rows, and whether they were estimated: a day the statistics put over ESTIMATE_ABOVE rows
    (autovacuum analyzes a day's partition long before it expires) is counted from them, its row estimate
    plus the rows written since; a smaller one, or one never analyzed, is counted. A count(*) of a day of 10M
    rows took 2 s of an expiry whose whole job is an O(1) drop (benchmarks/retention.py)."""
    estimate = conn.execute(text(
        "SELECT c.reltuples, s.n_mod_since_analyze FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
        "WHERE c.oid = CAST(:name AS regclass)"), {"name": name}).first()
    if estimate is not None and estimate[0] is not None and float(estimate[0]) > ESTIMATE_ABOVE:
        # a paired row holds two predictions: the statistics' share of rows with a shadow half counts them
        nulls = conn.execute(text("SELECT null_frac FROM pg_stats WHERE tablename = :name AND attname = "
                                  "'shadow_version'"), {"name": name}).scalar()
        paired = 0.0 if nulls is None else 1.0 - float(nulls)
        return int((float(estimate[0]) + int(estimate[1] or 0)) * (1.0 + paired)), True
    # a paired row holds two predictions: its shadow half counts too
    return int(conn.execute(text(f"SELECT count(*) + count(shadow_version) FROM {name}")).scalar_one()), False


def create_day(conn: Any, day: date) -> str:
    name = partition_name(day)
    conn.execute(text(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {LOG_TABLE} "
                      f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"))
    return name


def convert(engine: Engine, create_indexes: Any) -> int:
    """Turn a plain prediction log into the partitioned one, in one transaction (stop the service first: it
    takes the table's exclusive lock for the copy). Every day already logged gets its own partition, so the
    history expires by partition too. Returns the rows moved."""
    columns = ", ".join(c.name for c in predictions.columns)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE predictions RENAME TO predictions_unpartitioned"))
        for index in predictions.indexes:  # their names are taken by the new table's indexes
            conn.execute(text(f"DROP INDEX IF EXISTS {index.name}"))
        conn.execute(text(_partitioned_ddl(engine)))
        _create_view(conn)
        for (day,) in conn.execute(text("SELECT DISTINCT day FROM predictions_unpartitioned")).all():
            create_day(conn, date.fromisoformat(str(day)))
        moved = conn.execute(text(f"INSERT INTO {LOG_TABLE} ({columns}) SELECT {columns} FROM "
                                  "predictions_unpartitioned")).rowcount
        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{LOG_TABLE}', 'id'), "
                          f"GREATEST((SELECT max(id) FROM {LOG_TABLE}), 1))"))
        conn.execute(text("DROP TABLE predictions_unpartitioned"))
    _PARTITIONED[str(engine.url)] = True
    create_indexes()
    ensure_ahead(engine)
    return int(moved)
