"""SQLite: a prediction log from before the compact row, rewritten in it.

Since then SQLite computes `day` from ts (a VIRTUAL column, schema.SQLITE_DAY) and keeps a ULID request id as its
16 bytes (rollout.outcomes.ids): ~31 B a logged row less. A column cannot become generated in place, so the log
is copied into a new table, in one transaction (a crash leaves the old store as it was), and the request ids
the other tables keep are packed alike, so that they still join. The summaries, unit totals and unit lists are
rebuilt by the next evaluation (a unit without a unit id is its request id, packed now).

Run by OutcomeStore.create on a store that needs it; a writer meanwhile waits for it (or retries its batch).
It costs about a full copy of the log: stop the service first on a large store.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy.schema import CreateTable

from rollout.outcomes.engine import write
from rollout.outcomes.ids import pack
from rollout.outcomes.schema import SQLITE_LOG_COLUMNS, predictions

# The tables besides the log that keep request ids; and the derived state rebuilt from the log.
_ID_TABLES = ("labels", "label_changes", "label_requests")
_DERIVED = ("summary_state", "rollout_units", "unit_totals", "unit_state")


def needs_compacting(engine: Engine) -> bool:
    """Whether the SQLite log stores its `day` (a log from before the compact row)."""
    with engine.connect() as conn:
        columns = {r[1]: r[6] for r in conn.exec_driver_sql("PRAGMA table_xinfo(predictions)")}  # name -> hidden
    return "day" in columns and columns["day"] == 0


def compact(engine: Engine) -> int:
    """Rewrite the log in the compact row; returns the rows moved."""
    columns = ", ".join(("id", *SQLITE_LOG_COLUMNS))
    copied = ", ".join(("id", "rollout_pack(request_id)", *SQLITE_LOG_COLUMNS[1:]))
    with write(engine) as conn:  # BEGIN IMMEDIATE: no other writer in between
        dbapi: Any = conn.connection.driver_connection
        dbapi.create_function("rollout_pack", 1, pack, deterministic=True)
        conn.exec_driver_sql("ALTER TABLE predictions RENAME TO predictions_before_compact")
        conn.execute(CreateTable(predictions))  # the indexes come after the rows (OutcomeStore.create)
        moved = conn.exec_driver_sql(f"INSERT INTO predictions ({columns}) SELECT {copied} "
                                     "FROM predictions_before_compact ORDER BY id").rowcount
        conn.exec_driver_sql("DROP TABLE predictions_before_compact")  # and its indexes
        for table in _ID_TABLES:
            conn.exec_driver_sql(f"UPDATE {table} SET request_id = rollout_pack(request_id) "
                                 "WHERE typeof(request_id) = 'text'")
        for table in _DERIVED:
            conn.exec_driver_sql(f"DELETE FROM {table}")
    return int(moved)
