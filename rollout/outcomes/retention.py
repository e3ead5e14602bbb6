"""Retention: raw prediction and label rows older than `stores.retention_days` are removed; what outlives them
is kept for good (the hourly and daily summaries, rollout units, routing, decisions, plans, the record of each
label-request batch: reports and `rollout history` stay complete). A closed rollout's per-row label requests
(inclusion probabilities) go once their batch is older than the cutoff: nothing evaluates them again.

Never removed: any row of a rollout still open (its evaluation reads its rows from the start), and a label
while a prediction of its request remains. Deletes run in bounded batches, each its own short transaction,
so writers (the service's log, label uploads) wait at most one batch. Space: SQLite stores made since
auto_vacuum=INCREMENTAL give the freed pages back to the file system after each run (older stores reuse
them, and `OutcomeStore.vacuum()` switches them over once); PostgreSQL gets a plain VACUUM of the tables (or
day partitions) the deletes touched (no lock that blocks a writer), so the space is reused and they stop growing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, text

from rollout.outcomes.engine import autocommit, driver, is_sqlite
from rollout.outcomes.log import analyze
from rollout.outcomes.partitions import log_source
from rollout.times import day_of

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
    dry_run: bool = False  # counted, nothing removed

    def sentence(self) -> str:
        from rollout.times import from_epoch

        when = f"{from_epoch(self.cutoff):%Y-%m-%d %H:%M} UTC"
        removed = (f"Would remove {self.predictions:,} prediction rows older than {when}, and the labels of the "
                   "requests they are the last rows of" if self.dry_run else
                   f"Removed {self.predictions:,} prediction rows and {self.labels:,} labels older than {when}")
        kept = (f"; {'keeps' if self.dry_run else 'kept'} {self.kept_open:,} older rows of the open rollout"
                if self.kept_open else "")
        return f"{removed}{kept}.{' ' + self.note if self.note else ''}"


_OPEN = "SELECT rollout_id FROM routing WHERE ended_at IS NULL"


def expire(engine: Engine, cutoff: float, batch: int = BATCH, dry_run: bool = False) -> Expired:
    """Remove the rows older than `cutoff` that no open rollout needs (see the module's docstring)."""
    orphan_labels = ("l.ts < :cut AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.request_id = l.request_id)")
    cut_day = day_of(cutoff)
    old: dict[str, Any] = {"cut": cutoff, "day": cut_day}
    older = _old(engine)
    with engine.connect() as conn:
        kept = int(conn.execute(text(f"SELECT count(*) FROM predictions WHERE rollout_id IN ({_OPEN}) AND {older}"),
                                old).scalar_one())
        if dry_run:
            n_pred = sum(int(conn.execute(text(f"SELECT count(*) FROM predictions WHERE {_of(r)} AND {older}"),
                                          {**old, "r": r}).scalar_one()) for r in logged_rollouts(conn, skip_open=True))
            return Expired(cutoff, n_pred, 0, 0, 0, kept, None, "Dry run: nothing removed.", dry_run=True)
    dropped_rows, dropped, estimated = 0, list[str](), False
    note = ""
    tables = ["predictions"]
    if not is_sqlite(engine):
        from rollout.outcomes import partitions

        if partitions.is_partitioned(engine):  # whole days go by partition: no row-by-row work
            partitions.ensure_ahead(engine)
            dropped_rows, dropped, estimated = partitions.drop_expired(engine, cutoff)
            # the days kept for an open rollout: their other old rows, partition by partition (no key: by ctid)
            tables = [name for name, day in partitions.day_partitions(engine) if day.isoformat() <= cut_day]
        else:
            note = ("The prediction log is a plain table (a store made before partitioning): `rollout retention "
                    "--partition`, with the service stopped, makes expiry drop whole days.")
    with engine.connect() as conn:
        rollouts = logged_rollouts(conn, skip_open=True)
    touched: dict[str, int] = {}  # table (or day partition) -> rows deleted from it
    for table in tables:
        key = "id" if table == "predictions" else "ctid"
        # a day partition of the paired log: a row with a shadow half is two predictions
        weight = None if key == "id" else "1 + (shadow_version IS NOT NULL)::int"
        for r in rollouts:
            n = _batched(engine, f"SELECT {key} FROM {table} WHERE {_of(r)} AND {older}", table, cutoff, batch,
                         {**old, "r": r}, key, weight)
            touched[table] = touched.get(table, 0) + n
    n_deleted = sum(touched.values())
    n_pred = dropped_rows + n_deleted
    n_labels = _batched(engine, f"SELECT l.id FROM labels l WHERE {orphan_labels}", "labels", cutoff, batch)
    n_dead = _batched(engine, "SELECT id FROM dead_letters WHERE received_at < :cut", "dead_letters", cutoff, batch)
    # label changes of closed rollouts: their summaries will not be refreshed again
    n_changes = _batched(engine, f"SELECT id FROM label_changes WHERE rollout_id NOT IN ({_OPEN})", "label_changes",
                         cutoff, batch)
    n_requested = _requested(engine, cutoff)
    n_units = _unit_totals(engine, batch)
    touched.update(labels=n_labels, label_changes=n_changes, dead_letters=n_dead, label_requests=n_requested,
                   unit_totals=n_units)
    freed, reclaim_note = _reclaim(engine, touched)
    if dropped:
        about = (f" (days over {partitions.ESTIMATE_ABOVE:,} rows counted from PostgreSQL's statistics)"
                 if estimated else "")
        note = f"{len(dropped)} day partition(s) dropped ({dropped[0]} .. {dropped[-1]}){about}. {note}".strip()
    return Expired(cutoff, n_pred, n_labels, n_dead, n_changes, kept, freed, " ".join(p for p in (note, reclaim_note)
                                                                                            if p))


# A rollout's prediction rows older than the cut, through its time index (rollout_id, ts): no index on
# ts alone is kept for retention (it cost 18 B a logged row on SQLite, 23 on PostgreSQL).
def _old(engine: Engine) -> str:
    """Rows older than the cut: PostgreSQL names the day too (its partitions are pruned by it); on SQLite the time
    alone is the index's range, and the count of an open rollout's old rows is read from the index alone."""
    return "ts < :cut" if is_sqlite(engine) else "day <= :day AND ts < :cut"


def _of(rollout_id: int | None) -> str:
    return "rollout_id IS NULL" if rollout_id is None else "rollout_id = :r"


def logged_rollouts(conn: Any, skip_open: bool = False) -> list[int | None]:
    """The rollout ids the prediction log holds rows of (open rollouts left out with `skip_open`), and None
    (traffic outside any rollout): a loose index scan of the time index, one seek per rollout, however many rows
    each has."""
    log = log_source(conn.engine).name  # a pair shares its rollout: the table's own index seeks
    present = conn.execute(text(
        f"WITH RECURSIVE r(id) AS (SELECT min(rollout_id) FROM {log} UNION ALL "
        f"SELECT (SELECT min(rollout_id) FROM {log} WHERE rollout_id > r.id) FROM r WHERE r.id IS NOT NULL) "
        "SELECT id FROM r WHERE id IS NOT NULL" + (f" AND id NOT IN ({_OPEN})" if skip_open else ""))).scalars().all()
    return [None, *(int(r) for r in present)]


def _batched(engine: Engine, ids: str, table: str, cutoff: float, batch: int,
             params: dict[str, Any] | None = None, key: str = "id", weight: str | None = None) -> int:
    """DELETE the rows `ids` selects (their `key`: id, or PostgreSQL's ctid) in batches, each its own transaction;
    returns the rows removed, or the sum of `weight` over them (the predictions a paired log's rows held)."""
    removed = 0
    where = f"id IN ({ids} LIMIT :batch)" if key == "id" else f"ctid = ANY(ARRAY({ids} LIMIT :batch))"  # a TID scan
    while True:
        with engine.begin() as conn:
            bound = {"cut": cutoff, "batch": batch, **(params or {})}
            if weight is None:
                done = conn.execute(text(f"DELETE FROM {table} WHERE {where}"), bound).rowcount
                removed += done
            else:
                held = conn.execute(text(f"DELETE FROM {table} WHERE {where} RETURNING {weight}"), bound).scalars().all()
                done = len(held)
                removed += sum(int(n) for n in held)
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


def _reclaim(engine: Engine, touched: dict[str, int]) -> tuple[int | None, str]:
    """Space back after the deletes (`touched`: rows deleted per table or day partition)."""
    if not sum(touched.values()):
        return None, ""
    if not is_sqlite(engine):
        # The tables deletes touched, not the whole partitioned log: a VACUUM (ANALYZE) of every day partition
        # was 0.75 s of a 0.85 s retention step when only labels had gone (benchmarks/retention.py).
        # label_changes always: the evaluation consumes it (and retention empties it) by DELETE, so without
        # a VACUUM its dead rows were most of what still grew on PostgreSQL.
        tables = sorted({*(t for t, n in touched.items() if n), "label_changes"})
        with autocommit(engine) as dbapi:
            dbapi.execute(f"VACUUM (ANALYZE) {', '.join(tables)}")
        return None, ""
    with driver(engine) as sqlite:
        if sqlite.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return None, ("The SQLite file keeps its size (its free pages are reused); run `rollout retention "
                          "--vacuum` once to make later runs give space back.")
        free = int(sqlite.execute("PRAGMA freelist_count").fetchone()[0])
        while sqlite.execute("PRAGMA freelist_count").fetchone()[0] > 0:  # in steps: writers wait one step
            sqlite.execute("PRAGMA incremental_vacuum(2000)").fetchall()
        return free, ""


def vacuum(engine: Engine) -> None:
    """Compact the store once: SQLite switches to incremental auto-vacuum (VACUUM rewrites the file, taking an
    exclusive lock: stop the service first); PostgreSQL runs VACUUM (FULL is never needed with retention on)."""
    if not is_sqlite(engine):
        analyze(engine)  # its VACUUM (ANALYZE)
        return
    with driver(engine) as sqlite:
        sqlite.execute("PRAGMA auto_vacuum=INCREMENTAL")
        sqlite.execute("VACUUM")
