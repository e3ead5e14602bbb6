"""Export for analysts: the prediction log joined with each request's current label, one Parquet file per day.

`DIR/day=YYYY-MM-DD/predictions.parquet` (Hive-style partitions, so `pandas.read_parquet(DIR)`, DuckDB's
`read_parquet('DIR/*/*.parquet', hive_partitioning = true)` or Spark read the whole folder with `day` as a
column). Rows go in chunks, so a day of millions of rows needs bounded memory; a day is written to a temporary
file and renamed, so a rerun replaces it whole and a reader never sees half a day.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from rollout.outcomes.engine import is_sqlite
from rollout.outcomes.features import Decoder
from rollout.outcomes.ids import unpack
from rollout.outcomes.partitions import log_source
from rollout.outcomes.retention import logged_rollouts
from rollout.outcomes.schema import predictions
from rollout.outcomes.sqlexpr import first_day
from rollout.times import day_of, day_span, day_start

CHUNK = 100_000

_COLUMNS = ("request_id", "unit_id", "rollout_id", "ts", "version", "role", "served", "propensity", "prediction",
            "score", "probabilities", "latency_ms", "error", "segment", "features")


@dataclass(frozen=True)
class ExportedDay:
    day: str
    rows: int
    labelled: int
    path: Path


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("request_id", pa.string()), ("unit_id", pa.string()), ("rollout_id", pa.int64()),
        ("time", pa.timestamp("ms", tz="UTC")), ("version", pa.string()), ("role", pa.string()),
        ("served", pa.bool_()), ("propensity", pa.float64()), ("prediction", pa.float64()), ("score", pa.float64()),
        ("probabilities", pa.string()), ("latency_ms", pa.float64()), ("error", pa.string()), ("segment", pa.string()),
        ("features", pa.string()), ("label", pa.float64()), ("label_time", pa.timestamp("ms", tz="UTC")),
    ])


def days(engine: Engine, since: str, until: str | None) -> list[str]:
    """The days (YYYY-MM-DD, UTC) with logged predictions from `since` to `until` (inclusive). PostgreSQL: the day
    partitions' rows; SQLite: rollout by rollout, a seek of the time index per day (no index has the day)."""
    if not is_sqlite(engine):
        query = (f"SELECT DISTINCT day FROM {log_source(engine).name} WHERE day >= :since"
                 + (" AND day <= :until" if until else ""))
        with engine.connect() as conn:
            return sorted(str(d) for (d,) in conn.execute(text(query), {"since": since, "until": until}))
    found: set[str] = set()
    before = day_of(day_start(since) - 43_200.0)  # the day before `since`
    with engine.connect() as conn:
        for rollout_id in logged_rollouts(conn):
            after = before
            while (day := conn.execute(first_day(predictions, rollout_id, after)).scalar()) is not None:
                if until is not None and day > until:
                    break
                found.add(str(day))
                after = day
    return sorted(found)


def _chunks(engine: Engine, day: str) -> Iterator[list[tuple[Any, ...]]]:
    """The day's rows with their current labels, in chunks. PostgreSQL reads the day's partition in the order
    the rows were written; SQLite each rollout's range of the day in its time index, in time order (a pass over
    the whole log per day without it)."""
    cols = ", ".join(f"p.{c}" for c in _COLUMNS)
    head = (f"SELECT {cols}, l.label, l.ts FROM predictions p LEFT JOIN labels l "
            "ON l.request_id = p.request_id AND l.current = 1 WHERE p.day = :day")
    lo, hi = day_span(day)
    with engine.connect().execution_options(stream_results=True) as conn:
        decode = Decoder(conn)
        decode.load()  # the feature sets' names, before the rows stream
        if is_sqlite(engine):
            reads = [(text(f"{head} AND p.rollout_id {'IS NULL' if r is None else '= :r'} AND p.ts >= :lo "
                           "AND p.ts < :hi ORDER BY p.ts"), {"day": day, "r": r, "lo": lo, "hi": hi})
                     for r in logged_rollouts(conn)]
        else:
            reads = [(text(f"{head} ORDER BY p.id"), {"day": day})]
        features = _COLUMNS.index("features")
        for sql, params in reads:
            result = conn.execute(sql, params)
            while rows := result.fetchmany(CHUNK):
                # (request_id first: on SQLite a ULID's 16 bytes, rollout.outcomes.ids)
                yield [(unpack(r[0]), *r[1:features], decode.text(r[features]), *r[features + 1:]) for r in rows]


def export_day(engine: Engine, day: str, directory: Path) -> ExportedDay:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    folder = directory / f"day={day}"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / "predictions.parquet"
    partial = folder / f".predictions.parquet.{os.getpid()}.tmp"
    rows = labelled = 0
    with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
        for chunk in _chunks(engine, day):
            columns = list(zip(*chunk, strict=True))
            values = dict(zip((*_COLUMNS, "label", "label_ts"), columns, strict=True))
            table = pa.table({
                "request_id": values["request_id"], "unit_id": values["unit_id"],
                "rollout_id": values["rollout_id"],
                "time": [None if t is None else int(t * 1000) for t in values["ts"]],
                "version": values["version"], "role": values["role"],
                "served": [bool(s) for s in values["served"]], "propensity": values["propensity"],
                "prediction": values["prediction"], "score": values["score"],
                "probabilities": values["probabilities"], "latency_ms": values["latency_ms"],
                "error": values["error"], "segment": values["segment"], "features": values["features"],
                "label": values["label"],
                "label_time": [None if t is None else int(t * 1000) for t in values["label_ts"]],
            }, schema=schema)
            writer.write_table(table)
            rows += len(chunk)
            labelled += sum(1 for v in values["label"] if v is not None)
    os.replace(partial, final)
    return ExportedDay(day, rows, labelled, final)


def export(engine: Engine, since: str, until: str | None, directory: Path) -> list[ExportedDay]:
    """Every day from `since` to `until` that has predictions, one file each (an existing day's file replaced)."""
    return [export_day(engine, day, directory) for day in days(engine, since, until)]
