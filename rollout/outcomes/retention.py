"""Retention: raw prediction and label rows older than `stores.retention_days` are removed; what outlives them
is kept for good (the hourly and daily summaries, rollout units, routing, decisions, plans, the record of each
label-request batch: reports and `rollout history` stay complete). A closed rollout's per-row label requests
(inclusion probabilities) go once their batch is older than the cutoff: nothing evaluates them again.

Never removed: any row of a rollout still open (its evaluation reads its rows from the start), and a label
while a prediction of its request remains. Deletes run in bounded batches, each its own short transaction,
so writers (the service's log, label uploads) wait at most one batch. Space: SQLite stores made since
auto_vacuum=INCREMENTAL give the freed pages back to the file system after each run (older stores reuse
them, and `OutcomeStore.vacuum()` switches them over once); PostgreSQL gets a plain VACUUM of the two tables
(no lock that blocks a writer), so the space is reused and the tables stop growing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, text

from rollout.outcomes.engine import is_sqlite

BATCH = 20_000  # rows per delete: about 0.1-0.3 s of a writer's wait on SQLite


@dataclass(frozen=True)
class Expired:
    """What one retention run removed (and kept) of the rows older than `cutoff` (epoch seconds)."""

    cutoff: float
    predictions: int
    labels: int
    dead_letters: int
    label_changes: int
    kept_open: int  # older prediction rows kept because their rollout is open
    freed_pages: int | None  # SQLite pages given back to the file system (None: PostgreSQL, or not incremental)
    note: str = ""

    def sentence(self) -> str:
        from rollout.times import from_epoch

        removed = (f"Removed {self.predictions:,} prediction rows and {self.labels:,} labels older than "
                   f"{from_epoch(self.cutoff):%Y-%m-%d %H:%M} UTC")
        kept = f"; kept {self.kept_open:,} older rows of the open rollout" if self.kept_open else ""
        return f"{removed}{kept}.{' ' + self.note if self.note else ''}"


_OPEN = "SELECT rollout_id FROM routing WHERE ended_at IS NULL"


def expire(engine: Engine, cutoff: float, batch: int = BATCH, dry_run: bool = False) -> Expired:
    """Remove the rows older than `cutoff` that no open rollout needs (see the module's docstring)."""
    old_rows = f"ts < :cut AND (rollout_id IS NULL OR rollout_id NOT IN ({_OPEN}))"
    orphan_labels = ("l.ts < :cut AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.request_id = l.request_id)")
    with engine.connect() as conn:
        kept = int(conn.execute(text(f"SELECT count(*) FROM predictions WHERE ts < :cut AND rollout_id IN ({_OPEN})"),
                                {"cut": cutoff}).scalar_one())
        if dry_run:
            n_pred = int(conn.execute(text(f"SELECT count(*) FROM predictions WHERE {old_rows}"),
                                      {"cut": cutoff}).scalar_one())
            return Expired(cutoff, n_pred, 0, 0, 0, kept, None, "Dry run: nothing removed (labels are counted once "
                           "their predictions are gone).")
    dropped_rows, dropped, estimated = 0, list[str](), False
    note = ""
    if not is_sqlite(engine):
        from rollout.outcomes import partitions

        if partitions.is_partitioned(engine):  # whole days go by partition: no row-by-row work
            partitions.ensure_ahead(engine)
            dropped_rows, dropped, estimated = partitions.drop_expired(engine, cutoff)
        else:
            note = ("The prediction log is a plain table (a store made before partitioning): `rollout retention "
                    "--partition`, with the service stopped, makes expiry drop whole days.")
    n_deleted = _batched(engine, f"SELECT id FROM predictions WHERE {old_rows}", "predictions", cutoff, batch)
    n_pred = dropped_rows + n_deleted
    n_labels = _batched(engine, f"SELECT l.id FROM labels l WHERE {orphan_labels}", "labels", cutoff, batch)
    n_dead = _batched(engine, "SELECT id FROM dead_letters WHERE received_at < :cut", "dead_letters", cutoff, batch)
    # label changes of closed rollouts: their summaries will not be refreshed again
    n_changes = _batched(engine, f"SELECT id FROM label_changes WHERE rollout_id NOT IN ({_OPEN})", "label_changes",
                         cutoff, batch)
    n_requested = _requested(engine, cutoff)
    n_units = _unit_totals(engine, batch)
    freed, reclaim_note = _reclaim(engine, n_deleted + n_labels + n_changes + n_dead + n_requested + n_units)
    if dropped:
        about = (f" (days over {partitions.ESTIMATE_ABOVE:,} rows counted from PostgreSQL's statistics)"
                 if estimated else "")
        note = f"{len(dropped)} day partition(s) dropped ({dropped[0]} .. {dropped[-1]}){about}. {note}".strip()
    return Expired(cutoff, n_pred, n_labels, n_dead, n_changes, kept, freed, " ".join(p for p in (note, reclaim_note)
                                                                                            if p))


def _batched(engine: Engine, ids: str, table: str, cutoff: float, batch: int) -> int:
    removed = 0
    while True:
        with engine.begin() as conn:
            done = conn.execute(text(f"DELETE FROM {table} WHERE id IN ({ids} LIMIT :batch)"),
                                {"cut": cutoff, "batch": batch}).rowcount
        removed += done
        if done < batch:
            return removed


def _requested(engine: Engine, cutoff: float) -> int:
    """The per-row inclusion probabilities of label-request batches of closed rollouts older than `cutoff`, one
    batch (at most its budget of rows) per transaction; the batch records (one row each) stay, as history."""
    with engine.connect() as conn:
        batches = conn.execute(text(f"SELECT id FROM label_request_batches WHERE ts_to < :cut AND rollout_id NOT IN "
                                    f"({_OPEN}) AND id IN (SELECT DISTINCT batch_id FROM label_requests)"),
                               {"cut": cutoff}).scalars().all()
    removed = 0
    for batch_id in batches:
        with engine.begin() as conn:
            removed += conn.execute(text("DELETE FROM label_requests WHERE batch_id = :b"), {"b": batch_id}).rowcount
    return removed


def _unit_totals(engine: Engine, batch: int) -> int:
    """The per-unit totals of closed rollouts (rollout.outcomes.units): derived from their rows, needed only by an
    evaluation of an open rollout (a report of a closed one makes its one pass). A batch of units per transaction."""
    removed = 0
    with engine.connect() as conn:
        closed = conn.execute(text(f"SELECT rollout_id FROM unit_state WHERE rollout_id NOT IN ({_OPEN})")).scalars().all()
    for rollout_id in closed:
        with engine.begin() as conn:  # first the state: a half-deleted rollout's totals are never read
            conn.execute(text("DELETE FROM unit_state WHERE rollout_id = :r"), {"r": rollout_id})
        while True:
            with engine.begin() as conn:
                done = conn.execute(text("DELETE FROM unit_totals WHERE rollout_id = :r AND unit IN (SELECT unit FROM "
                                         "unit_totals WHERE rollout_id = :r LIMIT :batch)"),
                                    {"r": rollout_id, "batch": batch}).rowcount
            removed += done
            if done == 0:
                break
    return removed


def _reclaim(engine: Engine, removed: int) -> tuple[int | None, str]:
    if not removed:
        return None, ""
    raw = engine.raw_connection()
    try:
        dbapi: Any = raw.driver_connection
        if is_sqlite(engine):
            if dbapi.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                return None, ("The SQLite file keeps its size (its free pages are reused); run `rollout retention "
                              "--vacuum` once to make later runs give space back.")
            free = int(dbapi.execute("PRAGMA freelist_count").fetchone()[0])
            while dbapi.execute("PRAGMA freelist_count").fetchone()[0] > 0:  # in steps: writers wait one step
                dbapi.execute("PRAGMA incremental_vacuum(2000)").fetchall()
            return free, ""
        dbapi.autocommit = True
        try:
            # label_changes too: the evaluation consumes it (and retention empties it) by DELETE, so without
            # a VACUUM its dead rows were most of what still grew on PostgreSQL (benchmarks/retention.py)
            dbapi.execute("VACUUM (ANALYZE) predictions, labels, label_changes, dead_letters")
        finally:
            dbapi.autocommit = False
        return None, ""
    finally:
        raw.close()


def vacuum(engine: Engine) -> None:
    """Compact the store once: SQLite switches to incremental auto-vacuum (VACUUM rewrites the file, taking an
    exclusive lock: stop the service first); PostgreSQL runs VACUUM (FULL is never needed with retention on)."""
    raw = engine.raw_connection()
    try:
        dbapi: Any = raw.driver_connection
        if is_sqlite(engine):
            dbapi.execute("PRAGMA auto_vacuum=INCREMENTAL")
            dbapi.execute("VACUUM")
        else:
            dbapi.autocommit = True
            try:
                dbapi.execute("VACUUM (ANALYZE)")
            finally:
                dbapi.autocommit = False
    finally:
        raw.close()
