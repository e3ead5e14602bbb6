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

Evaluation at scale (benchmarks/evaluation_scale.py). One evaluation (rollout.evaluation.gather)
asks loss_moments, paired_moments, confusion, traffic, latency_p99 and agreement in a row. They used
to be six GROUP BYs, four joining predictions to labels and two joining predictions to itself.
Now two passes answer all of them:
  * _labelled: predictions LEFT JOIN current label LEFT JOIN the champion's row of the same request,
    grouped once by (version, segment, day) with conditional sums (loss, confusion cells, paired
    differences, agreement sums). The champion is the rollout's (routing table) unless given.
  * _usage: predictions grouped by (version, latency bucket): traffic counts and the histogram.
Each result is kept on the store object and reused by the next calls while nothing was written
(max(id) of predictions and labels unchanged: every write inserts) and for at most
`aggregate_cache_s` seconds; set it to 0 to recompute on every call. Results equal the separate
queries' as long as a request has at most one current label and one row per version.
SQLite joins by nested loops: covering indexes ix_predictions_eval (walked in request-id order,
so the probes move forward through pages just read) and ix_labels_current serve its join; they are
SQLite-only (PostgreSQL hash-joins). Still open: SQLite spends most of the pass sorting for its
GROUP BY, PostgreSQL hashing request ids; the next step is a per-day summary of completed days.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
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
    event,
    func,
    insert,
    literal,
    select,
    update,
)
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
    """Aggregates of one rollout computed together, kept for the next calls of the same evaluation."""

    rollout_id: int
    cutoff: float | None
    metric: str | None
    champion: str | None
    watermark: tuple[Any, Any]
    taken: float
    loss: dict[tuple[str, str | None, str], Moments] = field(default_factory=dict)
    paired: dict[tuple[str, str | None, str], Moments] = field(default_factory=dict)
    confusion: dict[tuple[str, str | None], Confusion] = field(default_factory=dict)
    agreement: dict[str, AgreementSums] = field(default_factory=dict)
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
        self._usage_snap: _Snapshot | None = None

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
            existing: dict[str, float] = {}
            for chunk in _chunks(ids, 500):
                known.update(
                    r[0] for r in conn.execute(select(predictions.c.request_id).where(predictions.c.request_id.in_(chunk)).distinct())
                )
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
            replaced = len(superseded)
            stored = len(rows)
        unknown = tuple(rid for rid in ids if rid not in known)
        return LabelReport(stored=stored, replaced=replaced, unknown=len(unknown), unknown_ids=unknown[:100])

    def bulk_insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], batch: int = 200_000) -> int:
        """Append many already-normalised rows to `table` (benchmarks, backfills): no per-row checks.

        PostgreSQL: COPY ... FROM STDIN through psycopg's copy (one round trip per batch of rows).
        SQLite: executemany in one transaction per batch. Values must already be in the stored form
        (epoch seconds, `day` strings, features as JSON text); returns the number of rows written.
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

    def _matured_labelled(self, rollout_id: int, matured_before: Any) -> Any:
        """Error-free predictions of the rollout older than `matured_before`, joined to their current label."""
        p = predictions.alias("p")
        lab = labels.alias("l")
        join = p.join(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
        conds = [p.c.rollout_id == rollout_id, p.c.error.is_(None)]
        if matured_before is not None:
            conds.append(p.c.ts < to_epoch(matured_before))
        return p, lab, join, conds

    # One evaluation asks loss_moments, paired_moments, confusion, traffic, latency_p99 and agreement
    # in a row. Each used to be its own GROUP BY (four of them joining predictions to labels, two of
    # them joining predictions to itself): about seven passes over the table. Now two passes answer
    # all six, and the answers are kept for the next calls of the same evaluation (see _labelled and
    # _usage): the first call of an evaluation pays the passes, the others read the kept result.

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

    def _labelled(self, rollout_id: int, matured_before: Any, metric: str | None = None,
                  champion: str | None = None, need: str = "loss") -> _Snapshot:
        """Loss moments, confusion, paired moments and agreement of one rollout in one pass.

        predictions p LEFT JOIN its current label LEFT JOIN the champion's row of the same request,
        grouped once by (version, segment, day) with conditional sums; the champion defaults to the
        rollout's. Identical to the separate queries as long as a request has at most one current
        label and one row per version (what add_labels and the serving log writer keep).
        """
        self._ensure()
        cutoff = to_epoch(matured_before) if matured_before is not None else None

        def match(s: _Snapshot) -> bool:
            if s.rollout_id != rollout_id:
                return False
            if need == "agreement":
                return s.champion == champion
            ok = s.cutoff == cutoff and (metric is None or s.metric == metric)
            return ok and (need != "paired" or s.champion == champion)

        with self.engine.connect() as conn:
            hit = self._fresh(self._snap, conn, match)
            if hit is not None:
                return hit
            watermark = self._watermark(conn)
            if champion is None:
                champion = self._champion_of(conn, rollout_id)
            metric = metric or "accuracy"
            p = predictions.alias("p")
            lab = labels.alias("l")
            join = p.outerjoin(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
            pair: Any = literal(False)
            if champion is not None:
                h = predictions.alias("h")
                join = join.outerjoin(h, and_(
                    h.c.request_id == p.c.request_id,
                    h.c.version == str(champion),
                    h.c.rollout_id == rollout_id,
                    h.c.error.is_(None),
                    p.c.version != str(champion),
                ))
                pair = h.c.id.is_not(None)
            matured = lab.c.label.is_not(None)
            if cutoff is not None:
                matured = and_(matured, p.c.ts < cutoff)
            loss = case((matured, loss_expr(metric, p.c.prediction, p.c.score, lab.c.label)))
            pos_p, pos_l = p.c.prediction == 1, lab.c.label == 1
            judged = and_(matured, p.c.prediction.is_not(None))

            def count(cond: Any) -> Any:
                return func.sum(case((cond, 1), else_=0))

            cols: list[Any] = [
                p.c.version, p.c.segment, p.c.day, func.count(loss), func.sum(loss), func.sum(loss * loss),
                count(and_(judged, pos_p, pos_l)), count(and_(judged, pos_p, ~pos_l)),
                count(and_(judged, ~pos_p, pos_l)), count(and_(judged, ~pos_p, ~pos_l)),
            ]
            if champion is not None:
                d = case((and_(matured, pair), loss_expr(metric, p.c.prediction, p.c.score, lab.c.label)
                          - loss_expr(metric, h.c.prediction, h.c.score, lab.c.label)))
                x = func.coalesce(h.c.score, h.c.prediction)
                y = case((pair, func.coalesce(p.c.score, p.c.prediction)))
                cols += [func.count(d), func.sum(d), func.sum(d * d), count(pair),
                         count(and_(pair, p.c.prediction == h.c.prediction)),
                         func.sum(x), func.sum(y), func.sum(x * x), func.sum(y * y), func.sum(x * y)]
            query = (select(*cols).select_from(join)
                     .where(p.c.rollout_id == rollout_id, p.c.error.is_(None))
                     .group_by(p.c.version, p.c.segment, p.c.day))
            if self.is_sqlite:  # walk the rollout in request-id order (see ix_predictions_eval)
                rows = _execute_indexed_by(conn, query, "predictions AS p", "ix_predictions_eval")
            else:
                rows = conn.execute(query)
            snap = _Snapshot(rollout_id, cutoff, metric, champion, watermark, time.monotonic())
            agree: dict[str, list[float]] = {}
            conf: dict[tuple[str, str | None], list[int]] = {}
            for r in rows:
                key = (r[0], r[1], r[2])
                if r[3]:
                    snap.loss[key] = Moments(int(r[3]), float(r[4] or 0.0), float(r[5] or 0.0))
                c = conf.setdefault((r[0], r[1]), [0, 0, 0, 0])
                for i in range(4):
                    c[i] += int(r[6 + i] or 0)
                if champion is None:
                    continue
                if r[10]:
                    snap.paired[key] = Moments(int(r[10]), float(r[11] or 0.0), float(r[12] or 0.0))
                if r[13]:
                    a = agree.setdefault(r[0], [0, 0, 0.0, 0.0, 0.0, 0.0, 0.0])
                    a[0] += int(r[13])
                    a[1] += int(r[14] or 0)
                    for i in range(5):
                        a[2 + i] += float(r[15 + i] or 0.0)
        snap.confusion = {k: Confusion(*v) for k, v in conf.items() if sum(v)}
        snap.agreement = {v: AgreementSums(int(a[0]), int(a[1]), *a[2:]) for v, a in agree.items()}
        self._snap = snap
        return snap

    def _usage(self, rollout_id: int) -> _Snapshot:
        """Traffic counts and the latency histogram of one rollout in one pass (no join)."""
        self._ensure()
        p = predictions
        lat = case((p.c.latency_ms > 1e-4, p.c.latency_ms), else_=1e-4)
        bucket = case((p.c.latency_ms.is_(None), None), else_=cast((func.ln(lat) + _LAT_OFFSET) * _LAT_BUCKETS_PER_E, Integer))
        with self.engine.connect() as conn:
            hit = self._fresh(self._usage_snap, conn, lambda s: s.rollout_id == rollout_id)
            if hit is not None:
                return hit
            snap = _Snapshot(rollout_id, None, None, None, self._watermark(conn), time.monotonic())
            query = (
                select(p.c.version, bucket.label("b"), func.count(), func.sum(case((p.c.error.is_not(None), 1), else_=0)),
                       func.sum(p.c.served))
                .where(p.c.rollout_id == rollout_id)
                .group_by(p.c.version, bucket)
            )
            traffic: dict[str, list[int]] = {}
            for version, b, n, errors, served in conn.execute(query):
                t = traffic.setdefault(version, [0, 0, 0])
                t[0] += int(n)
                t[1] += int(errors or 0)
                t[2] += int(served or 0)
                if b is not None:
                    snap.latency_hist.setdefault(version, []).append((int(b), int(n)))
        snap.traffic = {v: TrafficCounts(*t) for v, t in traffic.items()}
        self._usage_snap = snap
        return snap

    def loss_moments(self, rollout_id: int, metric: str, matured_before: Any = None) -> dict[tuple[str, str | None, str], Moments]:
        """Per (version, segment, day): Moments of the per-request loss over labelled, matured predictions."""
        _check_metric(metric)
        return dict(self._labelled(rollout_id, matured_before, metric).loss)

    def paired_moments(
        self, rollout_id: int, metric: str, champion_version: str, matured_before: Any = None
    ) -> dict[tuple[str, str | None, str], Moments]:
        """Per (challenger version, segment, day): Moments of loss(challenger) - loss(champion) on the same request."""
        _check_metric(metric)
        return dict(self._labelled(rollout_id, matured_before, metric, str(champion_version), need="paired").paired)

    def confusion(self, rollout_id: int, matured_before: Any = None) -> dict[tuple[str, str | None], Confusion]:
        """Per (version, segment): binary confusion counts (positive = 1) of prediction vs label."""
        return dict(self._labelled(rollout_id, matured_before, need="confusion").confusion)

    def traffic(self, rollout_id: int) -> dict[str, TrafficCounts]:
        """Per version: rows logged, rows with an error, rows served to a caller."""
        return dict(self._usage(rollout_id).traffic)

    def latency_p99(self, rollout_id: int, quantile: float = 0.99) -> dict[str, float]:
        """Per version: approximate latency quantile (ms) from a log-bucket histogram built in SQL (±2.5 %)."""
        hist = self._usage(rollout_id).latency_hist
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
        snap = self._labelled(rollout_id, None, None, str(champion_version), need="agreement")
        return dict(snap.agreement)

    def ipw_sums(self, rollout_id: int, metric: str, matured_before: Any = None) -> dict[str, IPWSums]:
        """Per version, inverse-propensity sums of the loss over served, labelled, matured requests.

        w = 1 / propensity of the arm that served the request, r = loss (lower is better), so
        rollout.stats.bandit.ipw_difference(champion, challenger) is better-is-positive. n_total
        counts matured served requests of every arm (Horvitz-Thompson divides by it).
        """
        self._ensure()
        p, lab, join, conds = self._matured_labelled(rollout_id, matured_before)
        r = loss_expr(metric, p.c.prediction, p.c.score, lab.c.label)
        w = literal(1.0) / p.c.propensity
        query = (
            select(p.c.version, func.count(r), func.sum(w), func.sum(w * r), func.sum(w * w), func.sum(w * w * r),
                   func.sum(w * w * r * r))
            .select_from(join)
            .where(*conds, p.c.served == 1, p.c.propensity > 0, r.is_not(None))
            .group_by(p.c.version)
        )
        with self.engine.connect() as conn:
            rows = [(str(v), int(n), *(float(x or 0.0) for x in rest)) for v, n, *rest in conn.execute(query)]
        n_total = sum(row[1] for row in rows)
        return {v: IPWSums(n_total, n, *sums) for v, n, *sums in rows}

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
    compiled = query.compile(dialect=conn.dialect)
    sql = str(compiled)
    if sql.count(f"FROM {table_sql} ") != 1:
        return conn.execute(query)
    params = compiled.construct_params()
    positional = tuple(params[k] for k in compiled.positiontup)
    return conn.exec_driver_sql(sql.replace(f"FROM {table_sql} ", f"FROM {table_sql} INDEXED BY {index} "), positional)


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

