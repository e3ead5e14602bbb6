"""SQLite: a prediction log from before the compact row, rewritten in it.

Since then SQLite computes `day` from ts (a VIRTUAL column, schema.SQLITE_DAY) and keeps a ULID request id as its
16 bytes (rollout.outcomes.ids): ~31 B a logged row less. A column cannot become generated in place, so the log
is copied into a new table, in one transaction (a crash leaves the old store as it was), and the request ids
the other tables keep are packed alike, so that they still join. The summaries, unit totals and unit lists are
rebuilt by the next evaluation (a unit without a unit id is its request id, packed now).

Run by OutcomeStore.create (before anything else reads request ids); a writer meanwhile waits for it (or retries
its batch). It costs about a copy of the log. Stop every process of the earlier version first: its writer would
insert a `day` SQLite now computes (refused), and it would read packed ids as bytes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.schema import CreateTable

from rollout.outcomes.engine import write
from rollout.outcomes.ids import pack
from rollout.outcomes.schema import SQLITE_LOG_COLUMNS, RequestId, metadata, predictions

# The tables besides the log that keep request ids (a RequestId column); and the derived state rebuilt from the log.
_ID_TABLES = tuple(t.name for t in metadata.sorted_tables
                   if t is not predictions and any(isinstance(c.type, RequestId) for c in t.c))
_DERIVED = ("summary_state", "rollout_units", "unit_totals", "unit_state")


def needs_compacting(conn: Connection) -> bool:
    """Whether the SQLite log stores its `day` (a log from before the compact row)."""
    columns = {r[1]: r[6] for r in conn.exec_driver_sql("PRAGMA table_xinfo(predictions)")}  # name -> hidden
    return "day" in columns and columns["day"] == 0


def compact(engine: Engine) -> int:
    """Rewrite the log in the compact row if it is not yet; returns the rows moved.

    Under the write lock from the check to the commit, the indexes made in the same transaction: processes that
    open the store together compact it once (the others find it done), and no reader ever sees the new log
    without its indexes (the evaluation's queries name them)."""
    with engine.connect() as conn:  # a read first: no write lock taken on every open
        if not needs_compacting(conn):
            return 0
    columns = ", ".join(("id", *SQLITE_LOG_COLUMNS))
    copied = ", ".join(("id", "rollout_pack(request_id)", *SQLITE_LOG_COLUMNS[1:]))
    with write(engine) as conn:  # BEGIN IMMEDIATE: no other writer in between
        if not needs_compacting(conn):
            return 0  # another process did it while this one waited for the lock
        dbapi: Any = conn.connection.driver_connection
        dbapi.create_function("rollout_pack", 1, pack, deterministic=True)
        conn.exec_driver_sql("ALTER TABLE predictions RENAME TO predictions_before_compact")
        conn.execute(CreateTable(predictions))
        moved = conn.exec_driver_sql(f"INSERT INTO predictions ({columns}) SELECT {copied} "
                                     "FROM predictions_before_compact ORDER BY id").rowcount
        conn.exec_driver_sql("DROP TABLE predictions_before_compact")  # and its indexes
        for index in predictions.indexes:  # built after the rows, one sort each (SQLite's only: ddl_if)
            index.create(conn, checkfirst=True)
        for table in _ID_TABLES:
            conn.exec_driver_sql(f"UPDATE {table} SET request_id = rollout_pack(request_id) "
                                 "WHERE typeof(request_id) = 'text'")
        for table in _DERIVED:
            conn.exec_driver_sql(f"DELETE FROM {table}")
    return int(moved)
