"""The outcome store (SQLAlchemy Core): predictions, labels, routing, decisions, and the evaluation lock.

SQLite in WAL mode by default, PostgreSQL by URL. Every evaluation aggregate is a GROUP BY in
SQL that returns sufficient statistics (rollout.stats.moments), so no query loads rows into
memory. Times are stored as epoch seconds (UTC) plus a `day` column (YYYY-MM-DD, UTC) so that
per-day grouping is a plain indexed column on both databases.

Losses per request (metric -> loss, lower is better), computed in SQL with CASE:
  accuracy  0/1 error: prediction != label
  log_loss  -ln(clip(p_true, 1e-15)) with p_true = score if label == 1 else 1 - score
            (score is the probability of class 1)
  brier     (score - label)^2
  mse       (prediction - label)^2
  mae       |prediction - label|
Only predictions without an error and with a label count; the latest label of a request wins.

Evaluation at scale (benchmarks/evaluation_scale.py): per-day summaries, maintained incrementally.
The evaluation runs hourly over a rollout of up to ~30 days, so it must not rescan every row each hour.
  * daily_aggregates: per (rollout, day, version, segment), over the day's error-free predictions LEFT
    JOIN their current label LEFT JOIN the champion's row of the same request, with NO maturity cut:
    loss moments (n, sum, sum of squares) of all five metrics, confusion cells, paired differences of
    all five metrics against the rollout's champion (aggregate_state.champion, from routing),
    agreement sums, and inverse-propensity sums of all five metrics. daily_usage: per (rollout, day,
    version, latency bucket) the row, error and served counts (traffic and the latency histogram).
  * aggregate_dirty: a mark per (rollout, day) whose summary is stale, written in the writer's own
    transaction: log_predictions marks the days it wrote; add_labels (new labels and relabels) marks
    the days of the predictions its labels match (one indexed lookup per 500 ids, which it already
    made to report unknown ids). A mark is a new random token each time (upsert).
  * Every aggregate call (_aggregates): the first time for a rollout, every day of it is marked dirty
    (aggregate_state then records it). Then, in ONE read transaction (one snapshot on SQLite; on
    PostgreSQL data newer than the marks read is harmless): read the marks; recompute the dirty days
    from predictions through ix_predictions_day; read the summary rows of all other days; compute the
    day of the maturity cut live, up to the cut. Then a short write transaction stores each recomputed
    day only if its mark still holds the token read (delete ... where token = read); a writer that
    marked the day meanwhile leaves it dirty for the next call, and two concurrent refreshes cannot
    store an older result over a newer one. The answer is built from the read snapshot alone.
  * The maturity cut (matured_before) needs no per-cut summaries: days before the cut's day lie
    wholly before the cut, days after it hold no matured row, so only the cut's own day (usually
    today, small) is computed live. Traffic, latency and agreement have no cut: summaries of all days.
  * A champion other than the rollout's own (paired_moments / agreement) is computed live over every
    day (a full pass, as before the summaries). bulk_insert (backfills, benchmarks) marks nothing; it
    drops aggregate_state, so the next evaluation of each rollout rebuilds its summaries.
Results equal the former one-pass GROUP BY: same keys and counts; float sums are per-day sums added
in (version, segment, day) order, so they agree to rounding (and exactly between two calls).
Exact identities save aggregates: a 0/1 loss is its own square, |e|*|e| == e*e (mae_sq = mse_sum),
counts shared by metrics that need the same inputs, fp/fn/tn from tp and the marginals. An inner
query computes each row's losses once (OFFSET 0: neither database merges it into the aggregates).
An hour of traffic dirties today, yesterday (labels) and sometimes the day before (late labels), so
the hourly evaluation reads ~3 days of rows instead of 30. Each result is also kept on the store
object and reused by the next calls of the same evaluation while nothing was written (max(id) of
predictions and labels unchanged) and for at most `aggregate_cache_s` seconds (0: recompute always):
gather() asks six aggregates in a row, and this keeps them one snapshot and one refresh.
SQLite walks a first build in request-id order through the covering ix_predictions_eval (probes into
ix_labels_current and into the same index for the champion's row move forward through pages just
read); PostgreSQL gets nested loops for the few dirty days (SET LOCAL enable_hashjoin/mergejoin off:
the planner would hash both whole tables) and no JIT (it costs more than it saves here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from rollout.stats.bandit import IPWSums
from rollout.stats.guardrails import AgreementSums
from rollout.stats.moments import Confusion, Moments

METRICS = ("accuracy", "log_loss", "brier", "mse", "mae")
EPS = 1e-15
# Latency histogram resolution: 40 buckets per e-fold (about 2.5 % wide), offset keeps the index positive.
_LAT_BUCKETS_PER_E = 40.0
_LAT_OFFSET = 10.0

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("unit_id", String(128)),
    Column("rollout_id", Integer),
    Column("ts", Float, nullable=False),
    Column("day", String(10), nullable=False),
    Column("version", String(32), nullable=False),
    Column("role", String(32), nullable=False),
    Column("served", Integer, nullable=False, default=1),
    Column("propensity", Float),
    Column("prediction", Float),
    Column("score", Float),
    Column("latency_ms", Float),
    Column("error", Text),
    Column("segment", String(64)),
    Column("features", Text),
)
Index("ix_predictions_rollout", predictions.c.rollout_id, predictions.c.version, predictions.c.ts)
Index("ix_predictions_request", predictions.c.request_id)
Index("ix_predictions_ts", predictions.c.ts)
# The refresh of the evaluation summaries reads one rollout's rows of a few days; the live part of an
# evaluation reads the day of its maturity cut up to the cut.
Index("ix_predictions_day", predictions.c.rollout_id, predictions.c.day, predictions.c.ts)
# SQLite joins by nested loops, and a probe at a random place of a big index misses its small page
# cache. This covering index lets the evaluation walk the rollout's predictions in request-id order
# (no table reads), so the probes into labels' index (ix_labels_current, covering too) and into this
# same index for the champion's row of the request move forward through pages just read.
# PostgreSQL hash-joins instead, so it does not get them (they would only slow its inserts down).
Index("ix_predictions_eval", predictions.c.rollout_id, predictions.c.request_id, predictions.c.version,
      predictions.c.error, predictions.c.prediction, predictions.c.score, predictions.c.ts, predictions.c.segment,
      predictions.c.day).ddl_if(dialect="sqlite")


labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("label", Float, nullable=False),
    Column("ts", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    # 1 for the label that counts; earlier labels of the same request stay as history with 0.
    Column("current", Integer, nullable=False, default=1),
    # 0 when no prediction with this request id was stored at arrival (kept and reported).
    Column("matched", Integer, nullable=False, default=1),
)
Index("ix_labels_request", labels.c.request_id, labels.c.current)
Index("ix_labels_current", labels.c.request_id, labels.c.current, labels.c.label).ddl_if(dialect="sqlite")

routing = Table(
    "routing",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=True),
    Column("mode", String(16), nullable=False),
    Column("versions", Text, nullable=False),
    Column("weights", Text, nullable=False),
    Column("salt", String(128), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("end_reason", Text),
)
Index("ix_routing_open", routing.c.ended_at)

decisions = Table(
    "decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("rollout_id", Integer),
    Column("decision", String(32), nullable=False),
    Column("stats", Text, nullable=False),
    Column("alias_moves", Text, nullable=False),
    Column("actor", String(128), nullable=False),
)
Index("ix_decisions_rollout", decisions.c.rollout_id, decisions.c.ts)

# ------------------------------------------------------------------ evaluation summaries
# Per (rollout, day, version, segment), over the day's error-free predictions and without a maturity
# cut, every sum an evaluation aggregate needs, for all five metrics at once (see the module docstring):
#   <metric>_n/_sum/_sq         loss moments                     (loss_moments)
#   tp, fp, fn, tn              confusion cells                  (confusion)
#   d_<metric>_n/_sum/_sq       loss(row) - loss(champion's row) (paired_moments)
#   pairs, agree, sx..sxy       agreement with the champion      (agreement)
#   w_<metric>_n/_w/_wr/_w2/_w2r/_w2r2  inverse-propensity sums  (ipw_sums)
_LOSS_COLS = tuple(f"{m}_{s}" for m in METRICS for s in ("n", "sum", "sq"))
_CONF_COLS = ("tp", "fp", "fn", "tn")
_PAIR_COLS = tuple(f"d_{m}_{s}" for m in METRICS for s in ("n", "sum", "sq"))
_AGREE_COLS = ("pairs", "agree", "sx", "sy", "sxx", "syy", "sxy")
_IPW_COLS = tuple(f"w_{m}_{s}" for m in METRICS for s in ("n", "w", "wr", "w2", "w2r", "w2r2"))
_SUM_COLS = _LOSS_COLS + _CONF_COLS + _PAIR_COLS + _AGREE_COLS + _IPW_COLS
_INT_COLS = {c for c in _SUM_COLS if c.endswith("_n")} | set(_CONF_COLS) | {"pairs", "agree"}

daily_aggregates = Table(
    "daily_aggregates",
    metadata,
    Column("rollout_id", Integer, nullable=False),
    Column("day", String(10), nullable=False),
    Column("version", String(32), nullable=False),
    Column("segment", String(64)),
    *(Column(c, BigInteger if c in _INT_COLS else Float) for c in _SUM_COLS),
)
Index("ix_daily_aggregates", daily_aggregates.c.rollout_id, daily_aggregates.c.day)

# Per (rollout, day, version, latency bucket): rows, error rows, served rows (traffic and latency_p99).
daily_usage = Table(
    "daily_usage",
    metadata,
    Column("rollout_id", Integer, nullable=False),
    Column("day", String(10), nullable=False),
    Column("version", String(32), nullable=False),
    Column("bucket", Integer),
    Column("n", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("served", BigInteger, nullable=False),
)
Index("ix_daily_usage", daily_usage.c.rollout_id, daily_usage.c.day)

# A (rollout, day) whose summary rows are stale. Every mark writes a new random token, so a refresh
# clears a mark only if nobody marked the day again since the refresh read it (no ABA).
aggregate_dirty = Table(
    "aggregate_dirty",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("day", String(10), primary_key=True),
    Column("token", BigInteger, nullable=False),
)

# One row per rollout whose summaries exist; `champion` is the version they pair with.
aggregate_state = Table(
    "aggregate_state",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("champion", String(32)),
    Column("built_at", Float, nullable=False),
)

locks = Table(
    "locks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

class LockHeld(RuntimeError):
    """Another process holds the named lock (e.g. a concurrent evaluation run)."""


@dataclass(frozen=True)
class LabelReport:
    """Outcome of a label upload: new labels stored, earlier labels replaced, labels for unknown requests."""

    stored: int
    replaced: int
    unknown: int
    unknown_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rollout:
    """One row of the routing table: how traffic is split while a rollout runs."""

    rollout_id: int
    mode: str
    versions: dict[str, str]
    weights: dict[str, float]
    salt: str
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    end_reason: str | None = None


@dataclass(frozen=True)
class TrafficCounts:
    requests: int
    errors: int
    served: int


@dataclass
class _Snapshot:
    """Every evaluation aggregate of one rollout, computed together and kept for the next calls."""

    rollout_id: int
    cutoff: float | None
    champion: str | None
    watermark: tuple[Any, Any]
    taken: float
    loss: dict[str, dict[tuple[str, str | None, str], Moments]] = field(default_factory=dict)
    paired: dict[str, dict[tuple[str, str | None, str], Moments]] = field(default_factory=dict)
    confusion: dict[tuple[str, str | None], Confusion] = field(default_factory=dict)
    agreement: dict[str, AgreementSums] = field(default_factory=dict)
    ipw: dict[str, dict[str, IPWSums]] = field(default_factory=dict)
    traffic: dict[str, TrafficCounts] = field(default_factory=dict)
    latency_hist: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    id: int
    ts: datetime
    rollout_id: int | None
    decision: str
    stats: dict[str, Any]
    alias_moves: list[Any]
    actor: str


def to_epoch(value: datetime | float | int | str | None) -> float | None:
    """Epoch seconds from a datetime (naive = UTC), a number, or an ISO 8601 string."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("a time cannot be a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    raise TypeError(f"not a time: {value!r}")


def from_epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def day_of(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d")


def _json(value: Any) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _clean_float(value: Any) -> float | None:
    if value is None:
        return None
    out = float(value)
    return None if math.isnan(out) else out


def _ln(x: float | None) -> float | None:
    return math.log(x) if x is not None and x > 0 else None


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    """An engine with WAL, a busy timeout and ln() for SQLite; plain pooling for PostgreSQL."""
    if not _is_sqlite(url):
        return create_engine(url, pool_pre_ping=True, future=True)
    in_memory = url in ("sqlite://", "sqlite:///:memory:")
    if not in_memory:
        path = url.split("sqlite:///", 1)[-1]
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if in_memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Transactions are begun explicitly below, so BEGIN IMMEDIATE is possible for the lock.
        dbapi_conn.isolation_level = None
        try:  # SQLite >= 3.35 built with math functions has a native (much faster) ln()
            dbapi_conn.execute("SELECT ln(2.0)").fetchone()
        except Exception:  # noqa: BLE001 - sqlite3.OperationalError: no such function
            dbapi_conn.create_function("ln", 1, _ln, deterministic=True)
        cur = dbapi_conn.cursor()
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine


class OutcomeStore:
    """Predictions, labels, routing state and the decision log of every rollout."""

    # Seconds an evaluation's aggregates are reused by the following calls (when nothing was written
    # in between); 0 turns reuse off.
    aggregate_cache_s: float = 30.0

    def __init__(self, url: str, clock: Any = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.clock = clock or (lambda: datetime.now(tz=UTC))
        self._created = False
        self._snap: _Snapshot | None = None

    def __repr__(self) -> str:
        return f"OutcomeStore({self.engine.url.render_as_string(hide_password=True)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def _now(self) -> float:
        return float(to_epoch(self.clock()))  # type: ignore[arg-type]

    def create(self) -> OutcomeStore:
        """Create tables and indexes if missing (idempotent)."""
        metadata.create_all(self.engine, checkfirst=True)
        for table in (predictions, labels):  # indexes added since a store was first created
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)
        self._created = True
        return self

    def _ensure(self) -> None:
        if not self._created:
            self.create()

    def dispose(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- writes

    def log_predictions(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert prediction rows in one statement; `features` may be a dict (stored as JSON)."""
        if not rows:
            return 0
        self._ensure()
        now = None
        payload = []
        for row in rows:
            ts = row.get("ts")
            if ts is None:
                now = now if now is not None else self._now()
                ts = now
            ts = float(to_epoch(ts))  # type: ignore[arg-type]
            features = row.get("features")
            payload.append(
                {
                    "request_id": str(row["request_id"]),
                    "unit_id": None if row.get("unit_id") is None else str(row["unit_id"]),
                    "rollout_id": row.get("rollout_id"),
                    "ts": ts,
                    "day": day_of(ts),
                    "version": str(row["version"]),
                    "role": str(row.get("role") or "champion"),
                    "served": int(bool(row.get("served", True))),
                    "propensity": _clean_float(row.get("propensity")),
                    "prediction": _clean_float(row.get("prediction")),
                    "score": _clean_float(row.get("score")),
                    "latency_ms": _clean_float(row.get("latency_ms")),
                    "error": row.get("error"),
                    "segment": None if row.get("segment") is None else str(row["segment"]),
                    "features": features if features is None or isinstance(features, str) else _json(features),
                }
            )
        with self.engine.begin() as conn:
            conn.execute(insert(predictions), payload)
            self._mark_dirty(conn, {(r["rollout_id"], r["day"]) for r in payload})
        return len(payload)

    def add_labels(self, items: Iterable[tuple[str, Any, Any] | Sequence[Any]]) -> LabelReport:
        """Store labels by request id; the label with the later time wins (ties: the later arrival).

        Earlier labels are kept as history (current = 0). Labels for request ids with no stored
        prediction are kept (matched = 0) and reported, so a late prediction log still joins.
        """
        self._ensure()
        received = self._now()
        latest: dict[str, tuple[float, float]] = {}
        for item in items:
            request_id, label = str(item[0]), item[1]
            ts = item[2] if len(item) > 2 and item[2] is not None else received
            value = float(label)
            if math.isnan(value):
                raise ValueError(f"label of request {request_id} is NaN")
            epoch = float(to_epoch(ts))  # type: ignore[arg-type]
            prev = latest.get(request_id)
            if prev is None or epoch >= prev[1]:
                latest[request_id] = (value, epoch)
        if not latest:
            return LabelReport(0, 0, 0)
        ids = list(latest)
        replaced = 0
        stored = 0
        with self.engine.begin() as conn:
            known: set[str] = set()
            touched: set[tuple[Any, str]] = set()  # (rollout, day) of the predictions these labels join
            existing: dict[str, float] = {}
            for chunk in _chunks(ids, 500):
                for rid, rollout_id, day in conn.execute(
                    select(predictions.c.request_id, predictions.c.rollout_id, predictions.c.day)
                    .where(predictions.c.request_id.in_(chunk)).distinct()
                ):
                    known.add(rid)
                    touched.add((rollout_id, day))
                existing.update(
                    (r[0], r[1])
                    for r in conn.execute(
                        select(labels.c.request_id, labels.c.ts).where(labels.c.request_id.in_(chunk), labels.c.current == 1)
                    )
                )
            superseded = [rid for rid in ids if rid in existing and latest[rid][1] >= existing[rid]]
            for chunk in _chunks(superseded, 500):
                conn.execute(update(labels).where(labels.c.request_id.in_(chunk), labels.c.current == 1).values(current=0))
            rows = []
            for rid in ids:
                value, epoch = latest[rid]
                is_current = rid not in existing or epoch >= existing[rid]
                rows.append(
                    {
                        "request_id": rid,
                        "label": value,
                        "ts": epoch,
                        "received_at": received,
                        "current": int(is_current),
                        "matched": int(rid in known),
                    }
                )
            conn.execute(insert(labels), rows)
            self._mark_dirty(conn, touched)
            replaced = len(superseded)
            stored = len(rows)
        unknown = tuple(rid for rid in ids if rid not in known)
        return LabelReport(stored=stored, replaced=replaced, unknown=len(unknown), unknown_ids=unknown[:100])

    def bulk_insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], batch: int = 200_000) -> int:
        """Append many already-normalised rows to `table` (benchmarks, backfills): no per-row checks.

        PostgreSQL: COPY ... FROM STDIN through psycopg's copy (one round trip per batch of rows).
        SQLite: executemany in one transaction per batch. Values must already be in the stored form
        (epoch seconds, `day` strings, features as JSON text); returns the number of rows written.
        Marks no day dirty: it drops every rollout's evaluation summaries instead (the next
        evaluation of a rollout rebuilds them), which is cheaper for a backfill and always correct.
        """
        self._ensure()
        target = metadata.tables[table]
        names = [target.c[c].name for c in columns]  # KeyError on an unknown column
        written = 0
        raw = self.engine.raw_connection()
        try:
            dbapi = raw.driver_connection
            if self.is_sqlite:
                sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
                buf: list[Sequence[Any]] = []

                def flush() -> None:
                    dbapi.execute("BEGIN")
                    dbapi.executemany(sql, buf)
                    dbapi.execute("COMMIT")

                # Index pages of random keys (request ids) need a large page cache to insert fast;
                # the connection goes back to the pool, so the defaults are restored below.
                cache = dbapi.execute("PRAGMA cache_size").fetchone()[0]
                dbapi.execute("PRAGMA cache_size=-1048576")  # 1 GiB, as needed

                for row in rows:
                    buf.append(row)
                    if len(buf) >= batch:
                        flush()
                        written += len(buf)
                        buf = []
                if buf:
                    flush()
                    written += len(buf)
                dbapi.execute(f"PRAGMA cache_size={int(cache)}")
            else:
                with dbapi.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                        written += 1
                dbapi.commit()
        finally:
            raw.close()
            self._snap = None
            with self.engine.begin() as conn:  # after the rows: an evaluation meanwhile rebuilds again
                conn.execute(delete(aggregate_state))
        return written

    def analyze(self) -> None:
        """Refresh the planner's statistics (after a bulk load): ANALYZE on both databases."""
        self._ensure()
        raw = self.engine.raw_connection()
        try:
            if self.is_sqlite:
                raw.driver_connection.execute("ANALYZE")
            else:
                raw.driver_connection.autocommit = True
                raw.driver_connection.execute("ANALYZE")
                raw.driver_connection.autocommit = False
        finally:
            raw.close()

    def unmatched_labels(self) -> int:
        """Current labels whose request id still has no stored prediction."""
        self._ensure()
        known = select(predictions.c.id).where(predictions.c.request_id == labels.c.request_id).exists()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(labels).where(labels.c.current == 1, ~known)).scalar_one())

    # --------------------------------------------------------------- routing

    def open_rollout(
        self,
        mode: str,
        versions: dict[str, str],
        weights: dict[str, float] | None = None,
        salt: str | None = None,
        started_at: datetime | float | None = None,
    ) -> int:
        """Record a new rollout (ending any open one) and return its id."""
        self._ensure()
        if "champion" not in versions:
            raise ValueError("versions needs a 'champion' entry")
        start = to_epoch(started_at) if started_at is not None else self._now()
        with self.engine.begin() as conn:
            conn.execute(
                update(routing)
                .where(routing.c.ended_at.is_(None))
                .values(ended_at=start, end_reason="superseded by a new rollout")
            )
            result = conn.execute(
                insert(routing).values(
                    mode=mode,
                    versions=_json({k: str(v) for k, v in versions.items()}),
                    weights=_json({str(k): float(v) for k, v in (weights or {}).items()}),
                    salt=salt or uuid.uuid4().hex,
                    started_at=start,
                    updated_at=start,
                )
            )
            return int(result.inserted_primary_key[0])

    def current_rollout(self) -> Rollout | None:
        """The open rollout (latest if several), or None."""
        self._ensure()
        query = select(routing).where(routing.c.ended_at.is_(None)).order_by(routing.c.rollout_id.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _rollout(row) if row else None

    def rollout(self, rollout_id: int) -> Rollout | None:
        self._ensure()
        with self.engine.connect() as conn:
            row = conn.execute(select(routing).where(routing.c.rollout_id == rollout_id)).mappings().first()
        return _rollout(row) if row else None

    def rollouts(self) -> list[Rollout]:
        self._ensure()
        with self.engine.connect() as conn:
            rows = conn.execute(select(routing).order_by(routing.c.rollout_id)).mappings().all()
        return [_rollout(r) for r in rows]

    def set_weights(self, rollout_id: int, weights: dict[str, float]) -> None:
        """Replace the traffic weights of a rollout (bandit allocation, exposure change)."""
        self._ensure()
        with self.engine.begin() as conn:
            done = conn.execute(
                update(routing)
                .where(routing.c.rollout_id == rollout_id)
                .values(weights=_json({str(k): float(v) for k, v in weights.items()}), updated_at=self._now())
            )
            if done.rowcount == 0:
                raise KeyError(f"no rollout {rollout_id}")

    def end_rollout(self, rollout_id: int, ended_at: datetime | float | None = None, reason: str = "") -> None:
        self._ensure()
        end = to_epoch(ended_at) if ended_at is not None else self._now()
        with self.engine.begin() as conn:
            conn.execute(
                update(routing)
                .where(routing.c.rollout_id == rollout_id, routing.c.ended_at.is_(None))
                .values(ended_at=end, end_reason=reason, updated_at=end)
            )

    # ------------------------------------------------------------- decisions

    def record_decision(
        self,
        rollout_id: int | None,
        decision: str,
        stats: dict[str, Any],
        alias_moves: list[Any] | None = None,
        actor: str = "",
        ts: datetime | float | None = None,
    ) -> int:
        """Append to the audit log; returns the decision id."""
        self._ensure()
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(decisions).values(
                    ts=to_epoch(ts) if ts is not None else self._now(),
                    rollout_id=rollout_id,
                    decision=decision,
                    stats=_json(stats),
                    alias_moves=_json(list(alias_moves or [])),
                    actor=actor or _default_actor(),
                )
            )
            return int(result.inserted_primary_key[0])

    def decisions(self, rollout_id: int | None = None) -> list[Decision]:
        """The audit log, oldest first (optionally for one rollout)."""
        self._ensure()
        query = select(decisions).order_by(decisions.c.ts, decisions.c.id)
        if rollout_id is not None:
            query = query.where(decisions.c.rollout_id == rollout_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            Decision(
                id=r["id"],
                ts=from_epoch(r["ts"]),  # type: ignore[arg-type]
                rollout_id=r["rollout_id"],
                decision=r["decision"],
                stats=json.loads(r["stats"]),
                alias_moves=json.loads(r["alias_moves"]),
                actor=r["actor"],
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self, name: str, ttl_s: float = 3600.0) -> Iterator[None]:
        """Hold a named lock for acting (promotion, rollback); raises LockHeld if another holder has it.

        PostgreSQL: a session advisory lock on a dedicated connection. SQLite: a row in `locks`
        taken with compare-and-set under BEGIN IMMEDIATE; it expires after `ttl_s` so a crashed
        holder does not block forever.
        """
        self._ensure()
        if self.is_sqlite:
            with self._sqlite_lock(name, ttl_s):
                yield
        else:
            with self._pg_lock(name):
                yield

    @contextlib.contextmanager
    def _pg_lock(self, name: str) -> Iterator[None]:
        key = int.from_bytes(hashlib.sha256(f"rollout:{name}".encode()).digest()[:8], "big", signed=True)
        with self.engine.connect() as conn:
            got = conn.execute(select(func.pg_try_advisory_lock(key))).scalar_one()
            conn.commit()
            if not got:
                raise LockHeld(f"lock {name!r} is held by another process (PostgreSQL advisory lock {key})")
            try:
                yield
            finally:
                conn.execute(select(func.pg_advisory_unlock(key)))
                conn.commit()

    @contextlib.contextmanager
    def _sqlite_lock(self, name: str, ttl_s: float) -> Iterator[None]:
        holder = f"{_default_actor()}:{uuid.uuid4().hex[:8]}"
        now = self._now_wall()
        with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
            row = conn.execute(select(locks).where(locks.c.name == name)).mappings().first()
            if row is not None and row["expires_at"] > now:
                raise LockHeld(f"lock {name!r} is held by {row['holder']} since {from_epoch(row['acquired_at'])}")
            if row is not None:
                conn.execute(locks.delete().where(locks.c.name == name))
            conn.execute(insert(locks).values(name=name, holder=holder, acquired_at=now, expires_at=now + ttl_s))
        try:
            yield
        finally:
            with self.engine.begin() as conn:
                conn.execute(locks.delete().where(and_(locks.c.name == name, locks.c.holder == holder)))

    @staticmethod
    def _now_wall() -> float:
        # Lock expiry uses the wall clock, not the (possibly simulated) business clock.
        return datetime.now(tz=UTC).timestamp()

    # ------------------------------------------------------------ aggregates
    #
    # Every aggregate of an evaluation comes from one _Snapshot (see _aggregates): the per-day
    # summaries (daily_aggregates, daily_usage) of the rollout's days, brought up to date first (only
    # the dirty days are recomputed), plus a live pass over the day of the maturity cut, up to the cut.

    def _mark_dirty(self, conn: Any, pairs: Iterable[tuple[Any, str]]) -> None:
        """Mark the summaries of (rollout, day) stale, inside the writer's own transaction.

        Sorted, so two writers lock the marks in the same order (no deadlock on PostgreSQL); a new
        random token each time, so a refresh that read an older token leaves the mark in place.
        """
        marks = sorted({(int(r), str(d)) for r, d in pairs if r is not None})
        if not marks:
            return
        stmt = (sqlite_insert if self.is_sqlite else pg_insert)(aggregate_dirty)
        stmt = stmt.on_conflict_do_update(index_elements=["rollout_id", "day"], set_={"token": stmt.excluded.token})
        conn.execute(stmt, [{"rollout_id": r, "day": d, "token": secrets.randbits(62)} for r, d in marks])

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        """A write transaction; BEGIN IMMEDIATE on SQLite (the write lock up front, no upgrade failure)."""
        if self.is_sqlite:
            with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
                yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    def _watermark(self, conn: Any) -> tuple[Any, Any]:
        """(max prediction id, max label id): every write of the store inserts a row, so a new write moves it."""
        return tuple(conn.execute(select(select(func.max(predictions.c.id)).scalar_subquery(),
                                         select(func.max(labels.c.id)).scalar_subquery())).one())  # type: ignore[return-value]

    def _fresh(self, snap: _Snapshot | None, conn: Any, match: Any) -> _Snapshot | None:
        if snap is None or not match(snap) or time.monotonic() - snap.taken > self.aggregate_cache_s:
            return None
        return snap if snap.watermark == self._watermark(conn) else None

    def _champion_of(self, conn: Any, rollout_id: int) -> str | None:
        row = conn.execute(select(routing.c.versions).where(routing.c.rollout_id == rollout_id)).scalar()
        return None if row is None else json.loads(row).get("champion")

    def _days_of(self, conn: Any, rollout_id: int) -> list[str]:
        """The days a rollout has predictions on: one index seek per day (ix_predictions_day), not a scan."""
        days: list[str] = []
        p = predictions
        while True:
            query = select(func.min(p.c.day)).where(p.c.rollout_id == rollout_id)
            if days:
                query = query.where(p.c.day > days[-1])
            day = conn.execute(query).scalar()
            if day is None:
                return days
            days.append(day)

    def _build_state(self, rollout_id: int, champion: str | None) -> None:
        """First evaluation of a rollout (or after bulk_insert): mark every day of it dirty."""
        with self._write() as conn:
            built = conn.execute(select(aggregate_state.c.champion)
                                 .where(aggregate_state.c.rollout_id == rollout_id)).first()
            if built is not None and built[0] == champion:
                return  # another evaluation did it meanwhile
            stmt = (sqlite_insert if self.is_sqlite else pg_insert)(aggregate_state)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["rollout_id"], set_={"champion": stmt.excluded.champion, "built_at": stmt.excluded.built_at},
            ), {"rollout_id": rollout_id, "champion": champion, "built_at": self._now_wall()})
            self._mark_dirty(conn, [(rollout_id, d) for d in self._days_of(conn, rollout_id)])

    def _labelled_rows(self, conn: Any, rollout_id: int, champion: str | None, days: list[str] | None,
                       cutoff: float | None = None) -> list[tuple[str, str | None, str, tuple[Any, ...]]]:
        """Summary rows (version, segment, day, values in _SUM_COLS order) computed from predictions.

        predictions p LEFT JOIN its current label LEFT JOIN the champion's row of the same request,
        restricted to `days` (None: every day) and to ts < cutoff when given. An inner query computes
        each row's losses, paired differences and weights once (OFFSET 0 keeps both databases from
        merging it into the outer query, which would evaluate every expression again in each
        aggregate); the outer one sums them per (version, segment, day). Identical to per-aggregate
        queries as long as a request has at most one current label and one row per version (what
        add_labels and the serving log writer keep).
        """
        p = predictions.alias("p")
        lab = labels.alias("l")
        join = p.outerjoin(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
        matured = lab.c.label.is_not(None)

        def loss(m: str, row: Any) -> Any:
            return loss_expr(m, row.c.prediction, row.c.score, lab.c.label)

        # NULL unless matured: accuracy and log loss need the guard, the others are NULL without a label
        cols: list[Any] = [
            p.c.version, p.c.segment, p.c.day,
            case((matured, loss("accuracy", p))).label("acc"), case((matured, loss("log_loss", p))).label("ll"),
            loss("brier", p).label("br"), loss("mse", p).label("se"), loss("mae", p).label("ae"),
            case((and_(matured, p.c.prediction == 1), 1)).label("pp"),
            case((and_(matured, p.c.prediction.is_not(None), lab.c.label == 1), 1)).label("pl"),
            case((and_(matured, p.c.prediction == 1, lab.c.label == 1), 1)).label("tp"),
        ]
        ok = and_(matured, p.c.served == 1, p.c.propensity > 0)
        cols += [case((and_(ok, p.c.prediction.is_not(None)), literal(1.0) / p.c.propensity)).label("wp"),
                 case((and_(ok, p.c.score.is_not(None)), literal(1.0) / p.c.propensity)).label("ws")]
        if champion is not None:
            h = predictions.alias("h")
            # The champion's own rows probe with a NULL key (no index lookup at all) rather than
            # find themselves and be filtered out: half the probes of a shadow rollout.
            join = join.outerjoin(h, and_(
                h.c.request_id == case((p.c.version != str(champion), p.c.request_id)),
                h.c.version == str(champion),
                h.c.rollout_id == rollout_id,
                h.c.error.is_(None),
            ))
            pair = h.c.id.is_not(None)
            cols += [case((and_(matured, pair), loss(m, p) - loss(m, h))).label(f"d_{m}") for m in METRICS]
            cols += [case((pair, 1)).label("pair"), case((and_(pair, p.c.prediction == h.c.prediction), 1)).label("agree"),
                     func.coalesce(h.c.score, h.c.prediction).label("x"),
                     case((pair, func.coalesce(p.c.score, p.c.prediction))).label("y")]
        inner = select(*cols).select_from(join).where(p.c.rollout_id == rollout_id, p.c.error.is_(None))
        if days is not None:
            inner = inner.where(p.c.day.in_(days) if len(days) != 1 else p.c.day == days[0])
        if cutoff is not None:
            inner = inner.where(p.c.ts < cutoff)
        q = inner.offset(0).subquery("q")
        c = q.c
        out: dict[str, Any] = {
            "accuracy_n": func.count(c.acc), "accuracy_sum": func.sum(c.acc),
            "log_loss_n": func.count(c.ll), "log_loss_sum": func.sum(c.ll), "log_loss_sq": func.sum(c.ll * c.ll),
            "brier_sum": func.sum(c.br), "brier_sq": func.sum(c.br * c.br),
            "mse_sum": func.sum(c.se), "mse_sq": func.sum(c.se * c.se), "mae_sum": func.sum(c.ae),
            "tp": func.count(c.tp), "pp": func.count(c.pp), "pl": func.count(c.pl),
            "wp_n": func.count(c.wp), "wp_w": func.sum(c.wp), "wp_w2": func.sum(c.wp * c.wp),
            "ws_n": func.count(c.ws), "ws_w": func.sum(c.ws), "ws_w2": func.sum(c.ws * c.ws),
        }
        for m, col, w in (("accuracy", c.acc, c.wp), ("log_loss", c.ll, c.ws), ("brier", c.br, c.ws),
                          ("mse", c.se, c.wp), ("mae", c.ae, c.wp)):
            out[f"w_{m}_wr"] = func.sum(w * col)
            out[f"w_{m}_w2r"] = func.sum(w * w * col)
            if m != "accuracy":  # a 0/1 loss: w*w*r*r == w*w*r
                out[f"w_{m}_w2r2"] = func.sum(w * w * col * col)
        if champion is not None:
            out["dp_n"], out["ds_n"] = func.count(c.d_accuracy), func.count(c.d_log_loss)
            for m in METRICS:
                d = c[f"d_{m}"]
                out[f"d_{m}_sum"], out[f"d_{m}_sq"] = func.sum(d), func.sum(d * d)
            out.update(pairs=func.count(c.pair), agree=func.count(c.agree), sx=func.sum(c.x), sy=func.sum(c.y),
                       sxx=func.sum(c.x * c.x), syy=func.sum(c.y * c.y), sxy=func.sum(c.x * c.y))
        names = list(out)
        query = select(c.version, c.segment, c.day, *out.values()).group_by(c.version, c.segment, c.day)
        few = days is not None and len(days) <= 7
        if self.is_sqlite:
            # A few days: their rows through ix_predictions_day. Most of the rollout (a first build):
            # walk it in request-id order (ix_predictions_eval), so the probes into labels' and this
            # index for the champion's row move forward through pages just read.
            result = _execute_indexed_by(conn, query, "predictions AS p",
                                         "ix_predictions_day" if few else "ix_predictions_eval")
        else:
            # A few days are a small fraction of the table: probe labels and the champion's rows by
            # index (nested loops) rather than hash the whole of both tables, as the planner would.
            # SET LOCAL: for this read transaction only.
            flag = "off" if few else "on"
            conn.exec_driver_sql(f"SET LOCAL enable_hashjoin = {flag}")
            conn.exec_driver_sql(f"SET LOCAL enable_mergejoin = {flag}")
            result = conn.execute(query)
        rows = []
        for r in result:
            v = dict(zip(names, r[3:], strict=True))
            v["accuracy_sq"] = v["accuracy_sum"]  # 0/1 loss
            v["mae_sq"] = v["mse_sum"]  # |e| * |e| == e * e exactly
            v["mse_n"] = v["mae_n"] = v["accuracy_n"]  # NULL exactly when the prediction (or label) is
            v["brier_n"] = v["log_loss_n"]  # NULL exactly when the score (or label) is
            v["fp"] = (v["pp"] or 0) - (v["tp"] or 0)
            v["fn"] = (v["pl"] or 0) - (v["tp"] or 0)
            v["tn"] = (v["accuracy_n"] or 0) - (v["tp"] or 0) - v["fp"] - v["fn"]
            for m in METRICS:
                w = "ws" if m in ("log_loss", "brier") else "wp"
                v[f"w_{m}_n"], v[f"w_{m}_w"], v[f"w_{m}_w2"] = v[f"{w}_n"], v[f"{w}_w"], v[f"{w}_w2"]
                if champion is not None:
                    v[f"d_{m}_n"] = v["ds_n" if w == "ws" else "dp_n"]
            v["w_accuracy_w2r2"] = v["w_accuracy_w2r"]
            rows.append((r[0], r[1], r[2], tuple(v.get(col) or 0 for col in _SUM_COLS)))
        return rows

    def _usage_rows(self, conn: Any, rollout_id: int, days: list[str]) -> list[tuple[Any, ...]]:
        """(day, version, latency bucket, rows, error rows, served rows) of the given days (no join)."""
        p = predictions
        lat = case((p.c.latency_ms > 1e-4, p.c.latency_ms), else_=1e-4)
        bucket = case((p.c.latency_ms.is_(None), None),
                      else_=cast((func.ln(lat) + _LAT_OFFSET) * _LAT_BUCKETS_PER_E, Integer))
        query = (
            select(p.c.day, p.c.version, bucket.label("b"), func.count(),
                   func.sum(case((p.c.error.is_not(None), 1), else_=0)), func.sum(p.c.served))
            .where(p.c.rollout_id == rollout_id, p.c.day.in_(days))
            .group_by(p.c.day, p.c.version, bucket)
        )
        return [tuple(r) for r in conn.execute(query)]

    def _save(self, rollout_id: int, dirty: dict[str, int], rows: list[tuple[Any, ...]],
              usage: list[tuple[Any, ...]]) -> None:
        """Store the recomputed days whose dirty mark is still the one read (else leave them dirty)."""
        with self._write() as conn:
            done = []
            for day in sorted(dirty):
                gone = conn.execute(delete(aggregate_dirty).where(
                    aggregate_dirty.c.rollout_id == rollout_id, aggregate_dirty.c.day == day,
                    aggregate_dirty.c.token == dirty[day])).rowcount
                if gone:
                    done.append(day)
            if not done:
                return
            for chunk in _chunks(done, 500):
                conn.execute(delete(daily_aggregates).where(daily_aggregates.c.rollout_id == rollout_id,
                                                            daily_aggregates.c.day.in_(chunk)))
                conn.execute(delete(daily_usage).where(daily_usage.c.rollout_id == rollout_id,
                                                       daily_usage.c.day.in_(chunk)))
            keep = set(done)
            summary = [{"rollout_id": rollout_id, "version": v, "segment": s, "day": d, **dict(zip(_SUM_COLS, vals, strict=True))}
                       for v, s, d, vals in rows if d in keep]
            if summary:
                conn.execute(insert(daily_aggregates), summary)
            hist = [{"rollout_id": rollout_id, "day": d, "version": v, "bucket": b, "n": n, "errors": e, "served": s}
                    for d, v, b, n, e, s in usage if d in keep]
            if hist:
                conn.execute(insert(daily_usage), hist)

    def _aggregates(self, rollout_id: int, cutoff: float | None, champion: str | None, match: Any) -> _Snapshot:
        """All evaluation aggregates of a rollout at maturity cut `cutoff`, paired with `champion`.

        1. First time for the rollout (no aggregate_state row): every day of it is marked dirty.
        2. One read transaction (one snapshot on SQLite): the dirty days and their tokens; those days
           recomputed from predictions; the summary rows of every other day; the cut's day live.
        3. A short write transaction stores the recomputed days whose mark did not change meanwhile.
        Days before the cut's day count whole (all their rows are older than the cut), days after it
        have no matured row, so only the cut's own day is computed with the cut. A champion other
        than the rollout's (the summaries pair with the rollout's) is computed live over every day.
        """
        self._ensure()
        with self.engine.connect() as conn:
            hit = self._fresh(self._snap, conn, lambda s: s.rollout_id == rollout_id and match(s))
            if hit is not None:
                return hit
            own = self._champion_of(conn, rollout_id)
            built = conn.execute(select(aggregate_state.c.champion)
                                 .where(aggregate_state.c.rollout_id == rollout_id)).first()
        if built is None or built[0] != own:
            self._build_state(rollout_id, own)
        champion = own if champion is None else champion
        with self.engine.connect() as conn:
            if not self.is_sqlite:  # compiling ~100 expressions costs more than it saves on a few days of rows
                conn.exec_driver_sql("SET LOCAL jit = off")
            watermark = self._watermark(conn)
            dirty = {d: int(t) for d, t in conn.execute(
                select(aggregate_dirty.c.day, aggregate_dirty.c.token).where(aggregate_dirty.c.rollout_id == rollout_id))}
            days = sorted(dirty)
            fresh = self._labelled_rows(conn, rollout_id, own, days) if days else []
            fresh_usage = self._usage_rows(conn, rollout_id, days) if days else []
            a, u = daily_aggregates, daily_usage
            kept = [(r[0], r[1], r[2], tuple(r[3:])) for r in conn.execute(
                select(a.c.version, a.c.segment, a.c.day, *(a.c[c] for c in _SUM_COLS))
                .where(a.c.rollout_id == rollout_id, a.c.day.not_in(days)))]
            kept_usage = [(None, *r) for r in conn.execute(
                select(u.c.version, u.c.bucket, func.sum(u.c.n), func.sum(u.c.errors), func.sum(u.c.served))
                .where(u.c.rollout_id == rollout_id, u.c.day.not_in(days)).group_by(u.c.version, u.c.bucket))]
            live = self._labelled_rows(conn, rollout_id, champion, [day_of(cutoff)], cutoff) if cutoff is not None else []
            other = self._labelled_rows(conn, rollout_id, champion, None) if champion != own else None
        if days:
            self._save(rollout_id, dirty, fresh, fresh_usage)
        snap = _Snapshot(rollout_id, cutoff, champion, watermark, time.monotonic())
        _fill(snap, kept + fresh if other is None else other, live, cutoff)
        traffic: dict[str, list[int]] = {}
        hist: dict[tuple[str, int], int] = {}
        for _day, version, b, n, errors, served in kept_usage + fresh_usage:
            t = traffic.setdefault(version, [0, 0, 0])
            t[0] += int(n)
            t[1] += int(errors or 0)
            t[2] += int(served or 0)
            if b is not None:
                hist[(version, int(b))] = hist.get((version, int(b)), 0) + int(n)
        snap.traffic = {v: TrafficCounts(*t) for v, t in traffic.items()}
        for (version, b), n in sorted(hist.items()):
            snap.latency_hist.setdefault(version, []).append((b, n))
        self._snap = snap
        return snap

    def loss_moments(self, rollout_id: int, metric: str, matured_before: Any = None) -> dict[tuple[str, str | None, str], Moments]:
        """Per (version, segment, day): Moments of the per-request loss over labelled, matured predictions."""
        _check_metric(metric)
        cutoff = _cutoff(matured_before)
        return dict(self._aggregates(rollout_id, cutoff, None, lambda s: s.cutoff == cutoff).loss[metric])

    def paired_moments(
        self, rollout_id: int, metric: str, champion_version: str, matured_before: Any = None
    ) -> dict[tuple[str, str | None, str], Moments]:
        """Per (challenger version, segment, day): Moments of loss(challenger) - loss(champion) on the same request."""
        _check_metric(metric)
        cutoff, champion = _cutoff(matured_before), str(champion_version)
        snap = self._aggregates(rollout_id, cutoff, champion, lambda s: s.cutoff == cutoff and s.champion == champion)
        return dict(snap.paired[metric])

    def confusion(self, rollout_id: int, matured_before: Any = None) -> dict[tuple[str, str | None], Confusion]:
        """Per (version, segment): binary confusion counts (positive = 1) of prediction vs label."""
        cutoff = _cutoff(matured_before)
        return dict(self._aggregates(rollout_id, cutoff, None, lambda s: s.cutoff == cutoff).confusion)

    def traffic(self, rollout_id: int) -> dict[str, TrafficCounts]:
        """Per version: rows logged, rows with an error, rows served to a caller."""
        return dict(self._aggregates(rollout_id, None, None, lambda s: True).traffic)

    def latency_p99(self, rollout_id: int, quantile: float = 0.99) -> dict[str, float]:
        """Per version: approximate latency quantile (ms) from a log-bucket histogram built in SQL (±2.5 %)."""
        hist = self._aggregates(rollout_id, None, None, lambda s: True).latency_hist
        out: dict[str, float] = {}
        for version, buckets in hist.items():
            buckets = sorted(buckets)
            total_n = sum(n for _, n in buckets)
            target = quantile * total_n
            seen = 0
            for b, n in buckets:
                seen += n
                if seen >= target:
                    # PostgreSQL rounds on cast, SQLite truncates: take the bucket's middle either way.
                    out[version] = math.exp((b + 0.5) / _LAT_BUCKETS_PER_E - _LAT_OFFSET)
                    break
        return out

    def agreement(self, rollout_id: int, champion_version: str) -> dict[str, AgreementSums]:
        """Per challenger version: label-free agreement with the champion on the same requests.

        n_agree counts equal predictions; x = champion score, y = challenger score (the prediction
        when a model gives no score), for correlation.
        """
        champion = str(champion_version)
        return dict(self._aggregates(rollout_id, None, champion, lambda s: s.champion == champion).agreement)

    def ipw_sums(self, rollout_id: int, metric: str, matured_before: Any = None) -> dict[str, IPWSums]:
        """Per version, inverse-propensity sums of the loss over served, labelled, matured requests.

        w = 1 / propensity of the arm that served the request, r = loss (lower is better), so
        rollout.stats.bandit.ipw_difference(champion, challenger) is better-is-positive. n_total
        counts matured served requests of every arm (Horvitz-Thompson divides by it).
        """
        _check_metric(metric)
        cutoff = _cutoff(matured_before)
        return dict(self._aggregates(rollout_id, cutoff, None, lambda s: s.cutoff == cutoff).ipw[metric])

    def recent_features(self, limit: int = 10_000, since: Any = None) -> Any:
        """The latest served inputs (newest first) as a DataFrame, for production drift checks."""
        import pandas as pd

        self._ensure()
        p = predictions
        query = select(p.c.features).where(p.c.served == 1, p.c.features.is_not(None))
        if since is not None:
            query = query.where(p.c.ts >= to_epoch(since))
        query = query.order_by(p.c.ts.desc()).limit(int(limit))
        with self.engine.connect() as conn:
            records = [json.loads(r[0]) for r in conn.execute(query)]
        return pd.DataFrame.from_records(records)

    def first_seen(self, rollout_id: int) -> datetime | None:
        return self._seen(rollout_id, func.min)

    def last_seen(self, rollout_id: int) -> datetime | None:
        return self._seen(rollout_id, func.max)

    def _seen(self, rollout_id: int, agg: Any) -> datetime | None:
        self._ensure()
        with self.engine.connect() as conn:
            value = conn.execute(select(agg(predictions.c.ts)).where(predictions.c.rollout_id == rollout_id)).scalar()
        return from_epoch(value)

    def count_predictions(self, rollout_id: int | None = None) -> int:
        self._ensure()
        query = select(func.count()).select_from(predictions)
        if rollout_id is not None:
            query = query.where(predictions.c.rollout_id == rollout_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def served_version_at(self, when: Any) -> str | None:
        """Which version answered callers at time `when` (the latest served prediction at or before it)."""
        self._ensure()
        query = (
            select(predictions.c.version)
            .where(predictions.c.served == 1, predictions.c.error.is_(None), predictions.c.ts <= to_epoch(when))
            .order_by(predictions.c.ts.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()


def loss_expr(metric: str, prediction: Any, score: Any, label: Any) -> Any:
    """SQL expression of the per-request loss (NULL when the inputs it needs are missing)."""
    if metric == "accuracy":
        return case((prediction.is_(None), None), (prediction == label, 0.0), else_=1.0)
    if metric == "log_loss":
        p_true = case((label == 1, score), else_=literal(1.0) - score)
        clipped = case((p_true < EPS, EPS), (p_true > 1.0 - EPS, 1.0 - EPS), else_=p_true)
        return literal(0.0) - func.ln(clipped)
    if metric == "brier":
        return (score - label) * (score - label)
    if metric == "mse":
        return (prediction - label) * (prediction - label)
    if metric == "mae":
        return func.abs(prediction - label)
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def _execute_indexed_by(conn: Any, query: Any, table_sql: str, index: str) -> Any:
    """Run the query on SQLite with `INDEXED BY index` after `table_sql` (SQLAlchemy renders no SQLite hints)."""
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})  # IN lists expanded
    sql = str(compiled)
    if sql.count(f"FROM {table_sql} ") != 1:
        return conn.execute(query)
    params = compiled.construct_params()
    positional = tuple(params[k] for k in compiled.positiontup)
    return conn.exec_driver_sql(sql.replace(f"FROM {table_sql} ", f"FROM {table_sql} INDEXED BY {index} "), positional)


def _cutoff(matured_before: Any) -> float | None:
    return None if matured_before is None else to_epoch(matured_before)


def _fill(snap: _Snapshot, rows: list[tuple[str, str | None, str, tuple[Any, ...]]],
          live: list[tuple[str, str | None, str, tuple[Any, ...]]], cutoff: float | None) -> None:
    """Loss, paired, confusion, ipw and agreement of a snapshot from summary rows (uncut, every day)
    and live rows (the cut's day, up to the cut): labelled sums of days before the cut's day come from
    `rows`, of the cut's day from `live`; agreement (no maturity) from `rows` of every day."""
    ix = {c: i for i, c in enumerate(_SUM_COLS)}
    cut_day = None if cutoff is None else day_of(cutoff)
    loss: dict[str, dict[Any, Moments]] = {m: {} for m in METRICS}
    paired: dict[str, dict[Any, Moments]] = {m: {} for m in METRICS}
    ipw: dict[str, dict[str, list[float]]] = {m: {} for m in METRICS}
    conf: dict[tuple[str, str | None], list[int]] = {}
    agree: dict[str, list[float]] = {}

    def labelled(version: str, segment: str | None, day: str, v: tuple[Any, ...]) -> None:
        key = (version, segment, day)
        for m in METRICS:
            n = v[ix[f"{m}_n"]]
            if n:
                loss[m][key] = Moments(int(n), float(v[ix[f"{m}_sum"]] or 0.0), float(v[ix[f"{m}_sq"]] or 0.0))
            n = v[ix[f"d_{m}_n"]]
            if n:
                paired[m][key] = Moments(int(n), float(v[ix[f"d_{m}_sum"]] or 0.0), float(v[ix[f"d_{m}_sq"]] or 0.0))
            n = v[ix[f"w_{m}_n"]]
            if n:
                acc = ipw[m].setdefault(version, [0, 0.0, 0.0, 0.0, 0.0, 0.0])
                acc[0] += int(n)
                for i, s in enumerate(("w", "wr", "w2", "w2r", "w2r2")):
                    acc[1 + i] += float(v[ix[f"w_{m}_{s}"]] or 0.0)
        c = conf.setdefault((version, segment), [0, 0, 0, 0])
        for i, col in enumerate(_CONF_COLS):
            c[i] += int(v[ix[col]] or 0)

    # Sorted, so the float sums add in the same order whatever the rows came from (table or query).
    rows = sorted(rows, key=_row_key)
    live = sorted(live, key=_row_key)
    for version, segment, day, v in rows:
        if cut_day is None or day < cut_day:
            labelled(version, segment, day, v)
        if v[ix["pairs"]]:
            a = agree.setdefault(version, [0, 0, 0.0, 0.0, 0.0, 0.0, 0.0])
            a[0] += int(v[ix["pairs"]])
            a[1] += int(v[ix["agree"]] or 0)
            for i, col in enumerate(_AGREE_COLS[2:]):
                a[2 + i] += float(v[ix[col]] or 0.0)
    for version, segment, day, v in live:
        labelled(version, segment, day, v)
    snap.loss, snap.paired = loss, paired
    snap.confusion = {k: Confusion(*c) for k, c in conf.items() if sum(c)}
    snap.agreement = {v: AgreementSums(int(a[0]), int(a[1]), *a[2:]) for v, a in agree.items()}
    for m in METRICS:
        n_total = sum(int(acc[0]) for acc in ipw[m].values())
        snap.ipw[m] = {v: IPWSums(n_total, int(acc[0]), *acc[1:]) for v, acc in ipw[m].items()}


def _row_key(row: tuple[Any, ...]) -> tuple[str, str, str, str]:
    return (row[0], "" if row[1] is None else "\x01" + row[1], row[2], "")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def _rollout(row: Any) -> Rollout:
    return Rollout(
        rollout_id=int(row["rollout_id"]),
        mode=row["mode"],
        versions=json.loads(row["versions"]),
        weights=json.loads(row["weights"]),
        salt=row["salt"],
        started_at=from_epoch(row["started_at"]),  # type: ignore[arg-type]
        updated_at=from_epoch(row["updated_at"]),  # type: ignore[arg-type]
        ended_at=from_epoch(row["ended_at"]),
        end_reason=row["end_reason"],
    )


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _default_actor() -> str:
    return f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}"

