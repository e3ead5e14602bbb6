"""The write path: prediction rows, labels (the later one wins), bulk loads.

Every write that changes what an evaluation would count leaves a note for the summaries in the same
transaction: a prediction marks its (rollout, hour) dirty, a label that becomes current appends a
label change (see rollout.outcomes.summaries).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from rollout.outcomes.engine import autocommit, chunks, driver, is_sqlite, log_turn, write
from rollout.outcomes.features import FeatureSets, expand_known, sets_of
from rollout.outcomes.ids import pack, unpack
from rollout.outcomes.schema import (
    LOG_COLUMNS,
    LOG_TABLE,
    SHADOW_COLUMNS,
    SHADOW_IMPLIED,
    SHADOW_STORED,
    RequestId,
    aggregate_dirty_hours,
    dead_letters,
    label_changes,
    labels,
    log_columns,
    metadata,
    prediction_log,
    predictions,
    summary_state,
)
from rollout.roles import Role
from rollout.times import day_of_cached, hour_of, to_epoch

Time = datetime | float | str
# (version, segment, day, prediction, label, the champion's prediction of the same request or None): a count's key
OutcomeCell = tuple[str, str | None, str, float, float, float | None]
ClassCell = tuple[str, str | None, float, float]  # (version, segment, predicted class, labelled class): a count's key


@dataclass(slots=True)
class PredictionRow:
    """One logged prediction: which version answered (or shadowed) which request, and how.

    `ts` None means "now"; `features` is the record as received (stored as JSON), or None when not kept.
    A row with an `error` carries no prediction; `served` is false for shadow scorings. A multiclass
    model's `score` is its list of class probabilities (stored as JSON, with the predicted class's
    probability as the score)."""

    request_id: str
    version: str
    role: str = Role.CHAMPION
    ts: Time | None = None
    unit_id: str | None = None
    rollout_id: int | None = None
    served: bool = True
    propensity: float | None = None
    prediction: float | None = None
    score: float | Sequence[float] | None = None
    latency_ms: float | None = None
    error: str | None = None
    segment: str | None = None
    features: Mapping[str, Any] | str | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A shadow job carries its request's served rows to a child process: a dataclass with slots pickles
        # through copyreg, several times slower than its fields as a tuple.
        return (PredictionRow, (self.request_id, self.version, self.role, self.ts, self.unit_id, self.rollout_id,
                                self.served, self.propensity, self.prediction, self.score, self.latency_ms, self.error,
                                self.segment, self.features))


@dataclass(frozen=True)
class LabelReport:
    """Outcome of a label upload: new labels stored, earlier labels replaced, labels for unknown requests."""

    stored: int
    replaced: int
    unknown: int
    unknown_ids: tuple[str, ...] = ()


SEGMENT_CHARS = 64  # a longer segment value is cut to this (it is a grouping key, not an identifier)


def log_predictions(engine: Engine, rows: Iterable[PredictionRow], now: float) -> int:
    """Insert prediction rows and mark their hours dirty, in one transaction; returns the rows written.

    A row that cannot be stored (a time out of range, a value too long for its column, a NUL byte) goes to
    the dead-letter table with the reason, and the rest of its batch is written: a failing batch is split
    in halves until the refused rows are alone. Rows go to the driver as tuples (executemany), about 3x
    less CPU a row than SQLAlchemy's per-row parameter processing; on PostgreSQL by COPY first."""
    payload: list[tuple[Any, ...]] = []
    dead: list[tuple[PredictionRow, str]] = []
    written = 0
    sets = sets_of(engine)
    sqlite = is_sqlite(engine)
    columns = log_columns(sqlite)
    for row in rows:
        try:
            payload.append(_stored_form(engine, sqlite, sets, row, now))
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            dead.append((row, f"{type(exc).__name__}: {exc}"))
    table = predictions.name
    if not sqlite:
        from rollout.outcomes.partitions import log_source

        if log_source(engine) is prediction_log:  # a shadow request's two rows as one
            table, columns, payload = LOG_TABLE, PAIRED_COLUMNS, paired(payload)
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['?' if sqlite else '%s'] * len(columns))})"
    if payload and not sqlite:  # PostgreSQL: each row's day partition exists before it is written
        from rollout.outcomes.partitions import ensure_days

        ensure_days(engine, {r[4] for r in payload})  # `day`, the fifth column
        copied = _copy(engine, table, columns, payload)
        if copied is not None:  # else the database refused a row and wrote none: the halving finds it
            written, payload = copied, []
    written += _insert_halving(engine, sql, payload, dead)
    if dead:
        _dead_letter(engine, dead, now)
    return written


PAIRED_COLUMNS = LOG_COLUMNS + SHADOW_COLUMNS
_SERVED = LOG_COLUMNS.index("served")
_SHARED = tuple(LOG_COLUMNS.index(c) for c in ("unit_id", "rollout_id", "ts", "day", "segment"))
_SHADOW = tuple(LOG_COLUMNS.index(c) for c in SHADOW_STORED)
_IMPLIED = tuple((LOG_COLUMNS.index(c), value) for c, value in SHADOW_IMPLIED.items())
_NO_SHADOW = (None,) * len(SHADOW_COLUMNS)


def paired(payload: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """PostgreSQL's stored rows (PAIRED_COLUMNS) of a batch in LOG_COLUMNS form: a shadow row (not served, propensity
    1, no features) whose request has a served row in the batch with the same unit, rollout, time and segment goes
    into that row's `shadow_*` columns, one shadow to a served row; every other row is stored alone. The view gives
    readers both rows back exactly (schema.LOG_TABLE)."""
    served: dict[Any, int] = {}
    for i, row in enumerate(payload):
        if row[_SERVED]:
            served.setdefault(row[0], i)
    if len(served) == len(payload):  # champion-only or A/B traffic: nothing to pair
        return [row + _NO_SHADOW for row in payload]
    shadows: dict[int, tuple[Any, ...]] = {}
    alone: list[tuple[Any, ...]] = []
    for row in payload:
        if row[_SERVED]:
            continue
        partner = served.get(row[0])
        if (partner is None or partner in shadows or any(row[k] != value for k, value in _IMPLIED)
                or any(row[k] != payload[partner][k] for k in _SHARED)):
            alone.append(row + _NO_SHADOW)
        else:
            shadows[partner] = tuple(row[k] for k in _SHADOW)
    out = [row + shadows.get(i, _NO_SHADOW) for i, row in enumerate(payload) if row[_SERVED]]
    return out + alone


def _stored_form(engine: Engine, sqlite: bool, sets: FeatureSets, row: PredictionRow, now: float) -> tuple[Any, ...]:
    """The row as `log_columns` lists them: on SQLite a ULID request id packed and no day (computed from ts)."""
    ts = now if row.ts is None else to_epoch(row.ts)
    features = row.features
    if isinstance(features, str):  # already JSON: an object is stored as any record is; anything else is refused
        features = json.loads(features)
        if not isinstance(features, dict):
            raise ValueError(f"features: expected a JSON object, got {type(features).__name__}")
    segment = None if row.segment is None else str(row.segment)[:SEGMENT_CHARS]
    score, probabilities = split_score(row.score)
    rest = (str(row.version), str(row.role), int(bool(row.served)), _clean_float(row.propensity),
            _clean_float(row.prediction), score, _clean_float(row.latency_ms), row.error, segment,
            None if features is None else sets.encode(engine, features), probabilities)
    unit = None if row.unit_id is None else str(row.unit_id)
    if sqlite:
        return (pack(str(row.request_id)), unit, row.rollout_id, ts, *rest)
    return (str(row.request_id), unit, row.rollout_id, ts, day_of_cached(ts), *rest)


def split_score(score: float | Sequence[float] | None) -> tuple[float | None, str | None]:
    """The stored (score, probabilities) of a row's score: a binary score as it is; a multiclass row of class
    probabilities as the largest (the predicted class's) and the JSON list."""
    if score is None or isinstance(score, int | float):
        return _clean_float(score), None
    values = [float(v) for v in score]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"class probabilities must be finite numbers, got {values[:5]}")
    return max(values), json.dumps(values, separators=(",", ":"))


def _copy(engine: Engine, table: str, columns: Sequence[str], payload: list[tuple[Any, ...]]) -> int | None:
    """PostgreSQL: the rows by COPY and their hours marked dirty, in one transaction; how many, or None when
    the database refused a value (nothing written: `_insert_halving` then finds the row). COPY costs the
    writer about a third of executemany's CPU a row and doubles its rate (`benchmarks/log_load.py`)."""
    import psycopg

    try:
        with engine.begin() as conn:
            copy_rows(conn.connection.driver_connection, table, columns, payload)
            mark_dirty(conn, {(r[2], hour_of(r[3])) for r in payload})
        return _predictions_in(payload)
    except (psycopg.DataError, psycopg.IntegrityError, ValueError, OverflowError):
        return None  # a value the table refuses (too long, a NUL byte, out of range): rolled back


def copy_rows(dbapi: Any, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """PostgreSQL: append rows to `table` by COPY on a psycopg connection, in its current transaction."""
    with dbapi.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _insert_halving(engine: Engine, sql: str, payload: list[tuple[Any, ...]],
                    dead: list[tuple[PredictionRow, str]]) -> int:
    """Insert the rows; when the database refuses the batch, each half on its own, down to single rows."""
    if not payload:
        return 0
    try:
        with log_turn(engine), engine.begin() as conn:
            conn.exec_driver_sql(sql, payload)
            # ts (index 3) -> the (rollout, hour) whose summaries are now stale
            mark_dirty(conn, {(r[2], hour_of(r[3])) for r in payload})
        return _predictions_in(payload)
    except (DBAPIError, ValueError, OverflowError) as exc:
        if isinstance(exc, OperationalError) and not _is_data_error(exc):
            raise  # the database is unavailable, not refusing a value: the caller retries the batch
        if len(payload) == 1:
            reason = str(getattr(exc, "orig", exc)).strip()[:500]
            dead.extend((row, reason) for row in _rows_of(engine, payload[0]))
            return 0
        half = len(payload) // 2
        return _insert_halving(engine, sql, payload[:half], dead) + _insert_halving(engine, sql, payload[half:], dead)


def _is_data_error(exc: OperationalError) -> bool:
    return "out of range" in str(exc).lower()


def _predictions_in(payload: list[tuple[Any, ...]]) -> int:
    """The predictions stored rows hold: a paired row (PAIRED_COLUMNS with a shadow version) holds two."""
    n = len(LOG_COLUMNS)
    return sum(2 if len(r) > n and r[n] is not None else 1 for r in payload)


def _rows_of(engine: Engine, stored: tuple[Any, ...]) -> list[PredictionRow]:
    """The prediction rows a refused stored row held: one, or a paired row's two."""
    n = len(log_columns(is_sqlite(engine)))
    rows = [_row_of(engine, stored[:n])]
    if len(stored) > n and stored[n] is not None:
        shadow = list(stored[:n])
        for k, value in (*zip(_SHADOW, stored[n:], strict=True), *_IMPLIED):
            shadow[k] = value
        rows.append(_row_of(engine, tuple(shadow)))
    return rows


def _row_of(engine: Engine, stored: tuple[Any, ...]) -> PredictionRow:
    values = dict(zip(log_columns(is_sqlite(engine)), stored, strict=True))
    values.pop("day", None)
    values["request_id"] = unpack(values["request_id"])
    values["features"] = expand_known(engine, values["features"])
    probabilities = values.pop("probabilities")
    if probabilities is not None:
        values["score"] = json.loads(probabilities)
    return PredictionRow(**values)


def _dead_letter(engine: Engine, dead: list[tuple[PredictionRow, str]], now: float) -> None:
    rows = [{"kind": "prediction", "received_at": now, "reason": reason[:500],
             "payload": json.dumps(asdict(row), default=repr)} for row, reason in dead]
    with engine.begin() as conn:
        conn.execute(insert(dead_letters), rows)


def dead_letter_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())


def mark_dirty(conn: Connection, pairs: Iterable[tuple[int | None, int]]) -> None:
    """Mark the summaries of (rollout, hour) stale, inside the writer's own transaction.

    Sorted, so two writers lock the marks in the same order (no deadlock on PostgreSQL); a new random
    token each time, so a refresh that read an older token leaves the mark in place.
    """
    marks = sorted({(int(r), int(h)) for r, h in pairs if r is not None})
    if not marks:
        return
    stmt = (sqlite_insert if conn.dialect.name == "sqlite" else pg_insert)(aggregate_dirty_hours)
    stmt = stmt.on_conflict_do_update(index_elements=["rollout_id", "hour"], set_={"token": stmt.excluded.token})
    conn.execute(stmt, [{"rollout_id": r, "hour": h, "token": secrets.randbits(62)} for r, h in marks])


def add_labels(engine: Engine, items: Iterable[Sequence[Any]], received: float) -> LabelReport:
    """Store (request id, label[, ts]) items; the label with the later time wins (ties: the later arrival).

    Earlier labels are kept as history (current = 0). Labels for request ids with no stored prediction
    are kept (matched = 0) and reported, so a late prediction log still joins."""
    batch = list(items)
    for attempt in range(_RETRIES):
        try:
            return _add_labels(engine, batch, received)
        except (IntegrityError, OperationalError, _StaleRead) as exc:
            # Another writer made a label of one of these requests current first (the unique index), or
            # PostgreSQL broke a deadlock, or SQLite stayed locked past its busy timeout: redo it all.
            if attempt == _RETRIES - 1 or not _retryable(exc):
                raise
            time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")


_RETRIES = 8


class _StaleRead(RuntimeError):
    """The current labels read were replaced by another writer before this one could supersede them."""


def _retryable(exc: Exception) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return isinstance(exc, IntegrityError | _StaleRead) or any(w in text for w in ("deadlock", "locked", "serializ"))


def _add_labels(engine: Engine, items: list[Sequence[Any]], received: float) -> LabelReport:
    latest: dict[str, tuple[float, float]] = {}
    for item in items:
        request_id, label = str(item[0]), item[1]
        ts = item[2] if len(item) > 2 and item[2] is not None else received
        value = float(label)
        if math.isnan(value):
            raise ValueError(f"label of request {request_id} is NaN")
        epoch = to_epoch(ts)
        prev = latest.get(request_id)
        if prev is None or epoch >= prev[1]:
            latest[request_id] = (value, epoch)
    if not latest:
        return LabelReport(0, 0, 0)
    arrived = list(latest)
    ids = sorted(arrived)  # the same lock order in every writer
    with write(engine) as conn:
        known: dict[str, set[int]] = {}  # request id -> rollouts its predictions belong to
        days: dict[tuple[str, int], tuple[str, str]] = {}  # (request id, rollout) -> first and last day of its rows
        first_ts: dict[str, float] = {}  # request id -> time of its first prediction
        existing: dict[str, tuple[float, float, int]] = {}  # request id -> (ts, label, row id) of its current label
        for chunk in chunks(ids, 500):
            p = predictions
            for rid, rollout_id, first, last, ts in conn.execute(
                select(p.c.request_id, p.c.rollout_id, func.min(p.c.day), func.max(p.c.day), func.min(p.c.ts))
                .where(p.c.request_id.in_(chunk)).group_by(p.c.request_id, p.c.rollout_id)
            ):
                first_ts[rid] = min(float(ts), first_ts.get(rid, math.inf))
                rollouts = known.setdefault(rid, set())
                if rollout_id is not None:
                    rollouts.add(int(rollout_id))
                    days[(rid, int(rollout_id))] = (first, last)
            existing.update(
                (r[0], (r[1], r[2], r[3]))
                for r in conn.execute(
                    select(labels.c.request_id, labels.c.ts, labels.c.label, labels.c.id)
                    .where(labels.c.request_id.in_(chunk), labels.c.current == 1)
                )
            )
        superseded = [rid for rid in ids if rid in existing and latest[rid][1] >= existing[rid][0]]
        for chunk in chunks(superseded, 500):
            # Exactly the rows read: under READ COMMITTED another writer may have replaced them since, and a
            # `current = 1` filter would then demote its newer label instead. Fewer rows updated = stale read.
            done = conn.execute(update(labels).where(labels.c.id.in_([existing[rid][2] for rid in chunk]),
                                                     labels.c.current == 1).values(current=0)).rowcount
            if done != len(chunk):
                raise _StaleRead(f"{len(chunk) - done} labels were replaced by another writer meanwhile")
        rows = []
        changes = []
        for rid in ids:
            value, epoch = latest[rid]
            is_current = rid not in existing or epoch >= existing[rid][0]
            old = existing[rid][1] if rid in existing else None
            if is_current and old != value:  # the evaluation summaries apply these as deltas
                changes += [{"rollout_id": r, "request_id": rid, "old_label": old, "new_label": value,
                             "day_from": days[(rid, r)][0], "day_to": days[(rid, r)][1]}
                            for r in sorted(known.get(rid, ()))]
            rows.append({"request_id": rid, "label": value, "ts": epoch, "received_at": received,
                         "current": int(is_current), "matched": int(rid in known), "predicted_at": first_ts.get(rid)})
        conn.execute(insert(labels), rows)
        if changes:
            conn.execute(insert(label_changes), changes)
    unknown = tuple(rid for rid in arrived if rid not in known)
    return LabelReport(stored=len(rows), replaced=len(superseded), unknown=len(unknown), unknown_ids=unknown[:100])


def dedupe_current_labels(engine: Engine) -> int:
    """Leave one current label per request (the latest), as the unique index needs; returns how many were demoted.
    Stores written before the index could hold several after concurrent uploads."""
    dup = select(labels.c.request_id).where(labels.c.current == 1).group_by(labels.c.request_id).having(
        func.count() > 1)
    demoted = 0
    with write(engine) as conn:
        for (rid,) in conn.execute(dup).all():
            rows = conn.execute(select(labels.c.id).where(labels.c.request_id == rid, labels.c.current == 1)
                                .order_by(labels.c.ts.desc(), labels.c.id.desc())).scalars().all()
            demoted += conn.execute(update(labels).where(labels.c.id.in_(rows[1:])).values(current=0)).rowcount
    return demoted


def bulk_insert(engine: Engine, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                batch: int = 200_000) -> int:
    """Append many rows already in their stored form (epoch seconds, `day` strings, JSON text) to `table`.

    For backfills and benchmarks: PostgreSQL through COPY, SQLite through executemany, no per-row checks.
    Marks no hour dirty: it drops every rollout's summaries instead (the next evaluation rebuilds them),
    cheaper for a backfill and always correct. Returns the number of rows written. On SQLite a predictions
    `day` given is left out (SQLite computes it) and request ids are packed (rollout.outcomes.ids).
    """
    target = metadata.tables[table]
    names = [target.c[c].name for c in columns]  # KeyError on an unknown column
    written = 0
    sqlite = is_sqlite(engine)
    if sqlite:
        keep = [i for i, c in enumerate(names) if not (table == "predictions" and c == "day")]
        ids = {i for i, c in enumerate(names) if isinstance(target.c[c].type, RequestId)}
        names = [names[i] for i in keep]
        rows = (tuple(pack(row[i]) if i in ids else row[i] for i in keep) for row in rows)
    try:
        with driver(engine) as dbapi:
            if sqlite:
                sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
                # Index pages of random keys (request ids) need a large page cache to insert fast; the
                # connection goes back to the pool, so the default is restored below.
                cache = dbapi.execute("PRAGMA cache_size").fetchone()[0]
                dbapi.execute("PRAGMA cache_size=-1048576")  # 1 GiB, as needed
                try:
                    for chunk in chunks(rows, batch):
                        dbapi.execute("BEGIN")
                        dbapi.executemany(sql, chunk)
                        dbapi.execute("COMMIT")
                        written += len(chunk)
                finally:  # a failed load too: the pooled connection keeps no 1 GiB cache
                    if dbapi.in_transaction:
                        dbapi.execute("ROLLBACK")
                    dbapi.execute(f"PRAGMA cache_size={int(cache)}")
            else:
                day = None
                if table == predictions.name:  # a paired log's table (its rows stored alone), not the view
                    from rollout.outcomes.partitions import log_source

                    day, table = names.index("day") if "day" in names else None, log_source(engine).name
                for chunk in chunks(rows, batch):  # a chunk at a time: its days' partitions first (predictions)
                    if day is not None:
                        from rollout.outcomes.partitions import ensure_days

                        ensure_days(engine, {str(r[day]) for r in chunk})
                    copy_rows(dbapi, table, names, chunk)
                    dbapi.commit()
                    written += len(chunk)
    finally:
        with engine.begin() as conn:  # after the rows: an evaluation meanwhile rebuilds again
            conn.execute(delete(summary_state))
    return written


def analyze(engine: Engine) -> None:
    """After a bulk load: refresh the planner's statistics; on PostgreSQL VACUUM (ANALYZE), which also sets
    the loaded rows' hint bits and visibility map at once rather than leaving it to later scans."""
    if not is_sqlite(engine):
        with autocommit(engine) as dbapi:
            dbapi.execute("VACUUM (ANALYZE)")
        return
    with driver(engine) as sqlite:
        sqlite.execute("ANALYZE")


# The planner's statistics are what keep the summary refresh on its index probes (milliseconds) rather than a
# nested scan of a day's partition per row (minutes). A partition created this morning has none until it is
# analyzed, and autovacuum (which would do it) may be off or behind: the evaluation analyzes what is stale,
# so it never waits on autovacuum. Stale: the table's file grew by more than 10% (and 8 pages) since its last
# analyze or vacuum, read from its size on disk. pg_stat's row counts are not used: they reach the view up to
# seconds after the writer's commit, so they would ask again for the table just analyzed. ANALYZE reads a
# sample (bounded time) and takes no lock a writer waits on.
_STALE = """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind = 'r'
AND (c.relname = ANY(%(tables)s) OR c.relname ~ '^predictions_[0-9]{8}$')
AND pg_relation_size(c.oid) / current_setting('block_size')::int > 1.1 * greatest(c.relpages, 0) + 8"""


def analyze_stale(engine: Engine) -> list[str]:
    """PostgreSQL: ANALYZE the store's tables (and day partitions) whose statistics are stale; their names.
    Skipped (an empty list) when another session holds a conflicting lock for more than a second."""
    if is_sqlite(engine):
        return []
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '1s'")
            stale = [str(r[0]) for r in conn.exec_driver_sql(_STALE, {"tables": sorted(metadata.tables)})]
            if stale:
                conn.exec_driver_sql("ANALYZE " + ", ".join(f'"{name}"' for name in stale))
    except OperationalError:
        return []
    return stale


def _clean_float(value: Any) -> float | None:
    if value is None:
        return None
    out = float(value)
    return None if math.isnan(out) else out
