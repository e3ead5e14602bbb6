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

Evaluation at scale (benchmarks/evaluation_scale.py): hourly summaries, maintained incrementally.
The evaluation runs hourly over a rollout of up to ~30 days, so it must not rescan every row each hour.
  * hourly_aggregates: per (rollout, hour, version, segment) (hour = floor(ts / 3600), the same double
    division in Python's hour_of and in SQL), over the hour's error-free predictions LEFT JOIN their
    current label LEFT JOIN the champion's row of the same request, with NO maturity cut: loss moments
    (n, sum, sum of squares) of all five metrics, confusion cells, paired differences of all five
    metrics against the rollout's champion (summary_state.champion, from routing), agreement sums, and
    inverse-propensity sums of all five metrics. hourly_usage: per (rollout, hour, version, latency
    bucket) the row, error and served counts (traffic and the latency histogram). daily_aggregates /
    daily_usage: the same per day, the sum of the day's hourly rows (in hour order; counts in SQL).
  * Predictions mark their (rollout, hour) dirty in aggregate_dirty_hours, in the writer's transaction
    (a new random token each time, upsert); a dirty hour is recomputed whole.
  * Labels mark nothing: a label that becomes current (new label or relabel to another value) writes a
    row to label_changes (rollout, request id, old label or NULL, new label) in add_labels' transaction
    (add_labels already looked the request's predictions up to report unknown ids). A refresh computes,
    over the rows of the changed requests only, the sums with the new labels minus the sums with the
    old ones, and adds that delta to the hours those rows are in. So an hour of traffic costs the
    refresh its own new rows plus the rows of the requests labelled in it, not the ~day of older hours
    those labels are spread over (labels arrive hours after their predictions).
  * Every aggregate call (_aggregates): the first time for a rollout (no summary_state row, or another
    champion), its summaries and label changes are dropped and every hour of it is marked dirty. Then,
    in ONE read snapshot (SQLite's read transaction; REPEATABLE READ on PostgreSQL, since a delta must
    meet the rows it was computed against): the state's version, the marks, the label changes;
    recompute the dirty hours (an index range of ix_predictions_day per run of nearby hours, or one pass
    when there are many); apply the changes' deltas to the stored rows of their hours (changes of a
    dirty hour are already in its recomputation); read the hourly rows of the days these hours fall on
    and of the cut's day, and the daily rows of every other day; compute the cut's hour live. Then a
    short write transaction (_save) stores all that only if summary_state.version did not move since
    the snapshot (checked under the rollout's lock: BEGIN IMMEDIATE / the state row FOR UPDATE), and
    then moves it: a dirty hour is stored only if its mark still holds the token read (a writer that
    marked it meanwhile leaves it dirty), the changes read are deleted, the touched days rolled up.
    Two concurrent refreshes cannot apply a delta twice or store an older result over a newer one.
    The answer is built from the read snapshot alone.
  * The maturity cut (matured_before) needs no per-cut summaries: days before the cut's day lie wholly
    before the cut, the cut's day counts its hours before the cut's hour (hour order is ts order), only
    the cut's hour is computed live. Traffic, latency and agreement have no cut: summaries of all days.
  * ab/abn rollouts: the refresh also inserts the units served in each recomputed hour into
    rollout_units (unit id, or request id without one; known ones ignored), for units_served.
  * A champion other than the rollout's own (paired_moments / agreement) is computed live over every
    day (a full pass). bulk_insert (backfills, benchmarks) marks nothing; it drops summary_state, so
    the next evaluation of each rollout rebuilds its summaries.
Results equal the one-pass GROUP BY: same keys and counts; float sums are per-hour sums added in
(version, segment, day, hour) order, plus label deltas, so they agree to rounding (and exactly between
two calls on the same stored summaries).
Exact identities save aggregates: a 0/1 loss is its own square, |e|*|e| == e*e (mae_sq = mse_sum),
counts shared by metrics that need the same inputs, fp/fn/tn from tp and the marginals. An inner
query computes each row's losses once (OFFSET 0: neither database merges it into the aggregates).
Each result is also kept on the store object and reused by the next calls of the same evaluation
while nothing was written (max(id) of predictions and labels unchanged) and for at most
`aggregate_cache_s` seconds (0: recompute always): gather() asks six aggregates in a row, and this
keeps them one snapshot and one refresh.
SQLite walks a first build in request-id order through the covering ix_predictions_eval (probes into
ix_labels_current and into the same index for the champion's row move forward through pages just
read); PostgreSQL gets nested loops for a few hours or label changes (SET LOCAL enable_hashjoin/
mergejoin off: the planner would hash both whole tables) and no JIT (it costs more than it saves here).
Label changes of a rollout nobody evaluates any more (an ended one) stay in label_changes until its
summaries are rebuilt.
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
    inspect,
    insert,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from rollout.config import UNIT_SPLIT_MODES
from rollout.stats.bandit import IPWSums
from rollout.stats.guardrails import AgreementSums
from rollout.stats.moments import Confusion, Moments

METRICS = ("accuracy", "log_loss", "brier", "mse", "mae")
EPS = 1e-15
# Latency histogram resolution: 40 buckets per e-fold (about 2.5 % wide), offset keeps the index positive.
_LAT_BUCKETS_PER_E = 40.0
_LAT_OFFSET = 10.0
# More dirty hours than this (a first build): one pass over the rollout instead of index ranges.
_MANY_HOURS = 168

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
# The refresh of the evaluation summaries reads one rollout's rows of a few hours (a range of day and ts);
# the live part of an evaluation reads the hour of its maturity cut up to the cut.
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

# Per (rollout, hour, version, segment): the same sums over the error-free predictions of one UTC hour
# (hour = floor(ts / 3600), the same double division in SQL and in Python). Writes mark hours dirty,
# an evaluation recomputes the dirty hours only and rolls their days up into daily_aggregates, which
# always equals the sum of its day's hourly rows (added in hour order) for a day with no dirty hour.


def _summary_keys(hourly: bool) -> list[Column]:
    """(rollout, [hour,] day, version): the columns every summary table starts with."""
    return [Column("rollout_id", Integer, nullable=False), *([Column("hour", BigInteger, nullable=False)] if hourly else []),
            Column("day", String(10), nullable=False), Column("version", String(32), nullable=False)]


def _summary_columns(hourly: bool) -> list[Column]:
    return [*_summary_keys(hourly), Column("segment", String(64)),
            *(Column(c, BigInteger if c in _INT_COLS else Float) for c in _SUM_COLS)]


def _usage_columns(hourly: bool) -> list[Column]:
    return [*_summary_keys(hourly), Column("bucket", Integer), Column("n", BigInteger, nullable=False),
            Column("errors", BigInteger, nullable=False), Column("served", BigInteger, nullable=False)]


hourly_aggregates = Table("hourly_aggregates", metadata, *_summary_columns(hourly=True))
Index("ix_hourly_aggregates", hourly_aggregates.c.rollout_id, hourly_aggregates.c.day, hourly_aggregates.c.hour)

daily_aggregates = Table("daily_aggregates", metadata, *_summary_columns(hourly=False))
Index("ix_daily_aggregates", daily_aggregates.c.rollout_id, daily_aggregates.c.day)

# Per (rollout, hour / day, version, latency bucket): rows, error rows, served rows (traffic and
# latency_p99). Counts only, so the daily rows are rolled up in SQL (integer sums are exact).
hourly_usage = Table("hourly_usage", metadata, *_usage_columns(hourly=True))
Index("ix_hourly_usage", hourly_usage.c.rollout_id, hourly_usage.c.day, hourly_usage.c.hour)

daily_usage = Table("daily_usage", metadata, *_usage_columns(hourly=False))
Index("ix_daily_usage", daily_usage.c.rollout_id, daily_usage.c.day)

# A (rollout, hour) that got prediction rows since its summary rows were computed: recomputed whole.
# Every mark writes a new random token, so a refresh clears a mark only if nobody marked the hour
# again since the refresh read it (no ABA).
aggregate_dirty_hours = Table(
    "aggregate_dirty_hours",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("hour", BigInteger, primary_key=True, autoincrement=False),
    Column("token", BigInteger, nullable=False),
)

# A label that became current for a request with predictions in `rollout_id` (new label or relabel,
# old_label NULL when there was none), written in add_labels' transaction. The next refresh applies
# it to the summaries of the hours of the request's rows as a delta (sums with the new label minus
# sums with the old one) and deletes it, so a label costs its request's rows, not its hour's.
label_changes = Table(
    "label_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("old_label", Float),
    Column("new_label", Float, nullable=False),
)
Index("ix_label_changes", label_changes.c.rollout_id, label_changes.c.id)

# The randomisation units an A/B (ab/abn) rollout served, per version: a unit id, or the request id of a
# request without one (kind 'r'). Filled by the summary refresh from the hours it recomputes (inserts
# that ignore known units, so a redone hour adds nothing) and counted for the sample-ratio test, which
# must count units there; distinct counts do not add up across the hourly summaries.
rollout_units = Table(
    "rollout_units",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("version", String(32), primary_key=True),
    Column("kind", String(1), primary_key=True),
    Column("unit", String(128), primary_key=True),
)

# One row per rollout whose summaries exist; `champion` is the version they pair with; `version`
# counts the refreshes stored, so a refresh stores only if none was stored since its snapshot (a
# delta applies to the summary rows it was computed against). Stores made before the hourly
# summaries have aggregate_state / aggregate_dirty tables instead: left unused, so their first
# evaluation builds the hourly summaries from scratch.
summary_state = Table(
    "summary_state",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("champion", String(32)),
    Column("built_at", Float, nullable=False),
    Column("version", BigInteger, nullable=False, default=0),
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


_LOG_COLUMNS = ("request_id", "unit_id", "rollout_id", "ts", "day", "version", "role", "served", "propensity",
                "prediction", "score", "latency_ms", "error", "segment", "features")
_DAYS: dict[int, str] = {}


def _day_of_cached(epoch: float) -> str:
    """day_of(epoch), remembered per UTC day (strftime per logged row was a tenth of its cost). Within a
    microsecond of midnight day_of's rounding may name the next day: computed, not cached, there."""
    k = math.floor(epoch / 86400.0)
    if (k + 1) * 86400.0 - epoch <= 1e-6:
        return day_of(epoch)
    day = _DAYS.get(k)
    if day is None:
        day = _DAYS[k] = day_of(epoch)
    return day


def hour_of(epoch: float) -> int:
    """The UTC hour (hours since the epoch) of a time: floor(ts / 3600.0), computed in SQL the same way."""
    return math.floor(float(epoch) / 3600.0)


def _hour_runs(hours: Iterable[int], gap: int = 2) -> list[tuple[int, int]]:
    """Sorted hours as inclusive runs [first, last]; runs fewer than `gap` clean hours apart are merged."""
    runs: list[list[int]] = []
    for h in sorted(set(hours)):
        if runs and h - runs[-1][1] <= gap + 1:
            runs[-1][1] = h
        else:
            runs.append([h, h])
    return [(a, b) for a, b in runs]


def _days_between(first: float, last: float) -> list[str]:
    """Every `day` value from day_of(first) to day_of(last)."""
    out, t = [], math.floor(first / 86400.0) * 86400.0
    while t <= last:
        out.append(day_of(max(t, first)))
        t += 86400.0
    return sorted(set(out) | {day_of(last)})


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
        # A checkpoint (WAL pages copied back, two fsyncs) runs in the commit that crosses this many WAL
        # pages. SQLite's 1,000 made it most of a logged batch's cost once the table outgrew the cache:
        # every ~3 batches of 500 rows. 10,000 pages (a WAL of up to 40 MB) write back each hot index page
        # once for many batches. Measured, two writers, 500-row batches, 300k rows: 28 us a row, was 66.
        cur.execute("PRAGMA wal_autocheckpoint=10000")
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
        existing = inspect(self.engine)
        had_summaries = existing.has_table(summary_state.name)
        new_units = not existing.has_table(rollout_units.name)
        metadata.create_all(self.engine, checkfirst=True)
        if had_summaries and new_units:  # a store from before rollout_units: rebuild its summaries, units too
            with self.engine.begin() as conn:
                conn.execute(delete(summary_state))
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
        """Insert prediction rows in one statement; `features` may be a dict (stored as JSON).

        The serving log writers call this for every prediction (the service for served rows, a shadow
        child for its own), so rows go to the driver as tuples (executemany) rather than through
        SQLAlchemy's per-row parameter processing: about 3x less CPU per row.
        """
        if not rows:
            return 0
        self._ensure()
        now = None
        payload: list[tuple[Any, ...]] = []
        append = payload.append
        touched: set[tuple[Any, int]] = set()  # (rollout, hour) of the rows: their summaries are stale
        clean = _clean_float
        for row in rows:
            get = row.get
            ts = get("ts")
            if ts is None:
                now = now if now is not None else self._now()
                ts = now
            ts = float(to_epoch(ts))  # type: ignore[arg-type]
            rollout_id = get("rollout_id")
            touched.add((rollout_id, hour_of(ts)))
            features, unit_id, segment = get("features"), get("unit_id"), get("segment")
            append((
                str(row["request_id"]),
                None if unit_id is None else str(unit_id),
                rollout_id,
                ts,
                _day_of_cached(ts),
                str(row["version"]),
                str(get("role") or "champion"),
                int(bool(get("served", True))),
                clean(get("propensity")),
                clean(get("prediction")),
                clean(get("score")),
                clean(get("latency_ms")),
                get("error"),
                None if segment is None else str(segment),
                features if features is None or isinstance(features, str) else _json(features),
            ))
        mark = "?" if self.is_sqlite else "%s"
        sql = f"INSERT INTO predictions ({', '.join(_LOG_COLUMNS)}) VALUES ({', '.join([mark] * len(_LOG_COLUMNS))})"
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql, payload)
            self._mark_dirty(conn, touched)
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
            known: dict[str, set[int]] = {}  # request id -> rollouts its predictions belong to
            existing: dict[str, tuple[float, float]] = {}  # request id -> (ts, label) of its current label
            for chunk in _chunks(ids, 500):
                for rid, rollout_id in conn.execute(
                    select(predictions.c.request_id, predictions.c.rollout_id)
                    .where(predictions.c.request_id.in_(chunk)).distinct()
                ):
                    rollouts = known.setdefault(rid, set())
                    if rollout_id is not None:
                        rollouts.add(int(rollout_id))
                existing.update(
                    (r[0], (r[1], r[2]))
                    for r in conn.execute(
                        select(labels.c.request_id, labels.c.ts, labels.c.label)
                        .where(labels.c.request_id.in_(chunk), labels.c.current == 1)
                    )
                )
            superseded = [rid for rid in ids if rid in existing and latest[rid][1] >= existing[rid][0]]
            for chunk in _chunks(superseded, 500):
                conn.execute(update(labels).where(labels.c.request_id.in_(chunk), labels.c.current == 1).values(current=0))
            rows = []
            changes = []
            for rid in ids:
                value, epoch = latest[rid]
                is_current = rid not in existing or epoch >= existing[rid][0]
                old = existing[rid][1] if rid in existing else None
                if is_current and old != value:  # the evaluation summaries apply these as deltas
                    changes += [{"rollout_id": r, "request_id": rid, "old_label": old, "new_label": value}
                                for r in sorted(known.get(rid, ()))]
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
            if changes:
                conn.execute(insert(label_changes), changes)
            replaced = len(superseded)
            stored = len(rows)
        unknown = tuple(rid for rid in ids if rid not in known)
        return LabelReport(stored=stored, replaced=replaced, unknown=len(unknown), unknown_ids=unknown[:100])

    def bulk_insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], batch: int = 200_000) -> int:
        """Append many already-normalised rows to `table` (benchmarks, backfills): no per-row checks.

        PostgreSQL: COPY ... FROM STDIN through psycopg's copy (one round trip per batch of rows).
        SQLite: executemany in one transaction per batch. Values must already be in the stored form
        (epoch seconds, `day` strings, features as JSON text); returns the number of rows written.
        Marks no hour dirty: it drops every rollout's evaluation summaries instead (the next
        evaluation of a rollout rebuilds them), which is cheaper for a backfill and always correct.
        """
        self._ensure()
        target = metadata.tables[table]
        names = [target.c[c].name for c in columns]  # KeyError on an unknown column
        written = 0
        raw = self.engine.raw_connection()
        try:
            dbapi: Any = raw.driver_connection
            assert dbapi is not None, "the pool handed out a closed connection"
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
                conn.execute(delete(summary_state))
        return written

    def analyze(self) -> None:
        """After a bulk load: refresh the planner's statistics (ANALYZE); on PostgreSQL VACUUM (ANALYZE), which
        also sets the loaded rows' hint bits and visibility map at once (rather than the first scans and a
        later autovacuum doing it)."""
        self._ensure()
        raw = self.engine.raw_connection()
        try:
            dbapi: Any = raw.driver_connection
            assert dbapi is not None, "the pool handed out a closed connection"
            if self.is_sqlite:
                dbapi.execute("ANALYZE")
            else:
                dbapi.autocommit = True
                dbapi.execute("VACUUM (ANALYZE)")
                dbapi.autocommit = False
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
            return int(result.inserted_primary_key[0])  # type: ignore[index]  # an insert always has one

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
            return int(result.inserted_primary_key[0])  # type: ignore[index]  # an insert always has one

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
    # Every aggregate of an evaluation comes from one _Snapshot (see _aggregates): the hourly and daily
    # summaries of the rollout, brought up to date first (dirty hours recomputed, label changes applied
    # as deltas), plus a live pass over the hour of the maturity cut, up to the cut.

    def _mark_dirty(self, conn: Any, pairs: Iterable[tuple[Any, int]]) -> None:
        """Mark the summaries of (rollout, hour) stale, inside the writer's own transaction.

        Sorted, so two writers lock the marks in the same order (no deadlock on PostgreSQL); a new
        random token each time, so a refresh that read an older token leaves the mark in place.
        """
        marks = sorted({(int(r), int(h)) for r, h in pairs if r is not None})
        if not marks:
            return
        stmt = (sqlite_insert if self.is_sqlite else pg_insert)(aggregate_dirty_hours)
        stmt = stmt.on_conflict_do_update(index_elements=["rollout_id", "hour"], set_={"token": stmt.excluded.token})
        conn.execute(stmt, [{"rollout_id": r, "hour": h, "token": secrets.randbits(62)} for r, h in marks])

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
        """First evaluation of a rollout (or after bulk_insert, or with a new champion): drop its summaries
        and label changes, mark every hour of every day it has predictions on dirty, and move the state's
        version on (a refresh from before cannot store over the new build)."""
        with self._write() as conn:
            built = conn.execute(select(summary_state.c.champion)
                                 .where(summary_state.c.rollout_id == rollout_id)).first()
            if built is not None and built[0] == champion:
                return  # another evaluation did it meanwhile
            s = summary_state
            stmt = (sqlite_insert if self.is_sqlite else pg_insert)(s)
            conn.execute(stmt.on_conflict_do_update(index_elements=["rollout_id"], set_={
                "champion": stmt.excluded.champion, "built_at": stmt.excluded.built_at, "version": s.c.version + 1,
            }), {"rollout_id": rollout_id, "champion": champion, "built_at": self._now_wall(), "version": 0})
            for table in (hourly_aggregates, daily_aggregates, hourly_usage, daily_usage, label_changes, rollout_units):
                conn.execute(delete(table).where(table.c.rollout_id == rollout_id))
            hours: set[int] = set()
            for day in self._days_of(conn, rollout_id):
                start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
                hours.update(range(hour_of(start - 1.0), hour_of(start + 86401.0) + 1))
            self._mark_dirty(conn, [(rollout_id, h) for h in hours])

    def _hour_expr(self, ts: Any) -> Any:
        """hour_of(ts) in SQL: the same IEEE double division, then floor (SQLite: cast truncates, ts > 0)."""
        q = ts / literal(3600.0, Float)
        return cast(q, Integer) if self.is_sqlite else cast(func.floor(q), BigInteger)

    @staticmethod
    def _range(p: Any, hours: tuple[int, int]) -> list[Any]:
        """WHERE terms for the rows of hours [first, last], and a second more: a range of ix_predictions_day.

        The margin catches a row whose hour_of (a rounded division) or day_of (rounded to microseconds)
        disagrees with its time near a boundary; results are grouped by hour, so callers keep the hours
        they asked for (no hour filter in SQL, which would spoil the planner's row estimate).
        """
        first, last = hours
        lo, hi = first * 3600.0 - 1.0, (last + 1) * 3600.0 + 1.0
        days = _days_between(lo, hi)
        return [p.c.day.in_(days), p.c.ts >= lo, p.c.ts < hi]

    def _hour_rows(self, conn: Any, rollout_id: int, champion: str | None,
                   hours: Sequence[int]) -> list[tuple[str, str | None, str, int, tuple[Any, ...]]]:
        """Hourly summary rows of the given hours: one query per run of nearby hours (index ranges), or one
        pass over the whole rollout when they are many (a first build)."""
        wanted = set(hours)
        if not wanted:
            return []
        if len(wanted) > _MANY_HOURS:
            rows = self._labelled_rows(conn, rollout_id, champion)
        else:
            rows = [r for run in _hour_runs(wanted) for r in self._labelled_rows(conn, rollout_id, champion, run)]
        return [r for r in rows if r[3] in wanted]

    def _labelled_rows(self, conn: Any, rollout_id: int, champion: str | None, hours: tuple[int, int] | None = None,
                       *, day: str | None = None, cutoff: float | None = None, by_hour: bool = True,
                       changes: bool = False) -> list[tuple[Any, ...]]:
        """Summary rows (version, segment, day, hour or None, values in _SUM_COLS order) from predictions.

        predictions p LEFT JOIN its current label LEFT JOIN the champion's row of the same request,
        restricted to the hours [first, last] or to one `day` (neither: the whole rollout) and to
        ts < cutoff when given, grouped by hour too unless `by_hour` is false. With `changes`: the rows
        of the requests in label_changes instead, once with the change's new label (sign 1) and once
        with its old one (sign -1), grouped by sign too (a 6th item of each row): the difference of the
        two sums is the change's delta.
        An inner query computes each row's losses, paired differences and weights once (OFFSET 0 keeps
        both databases from merging it into the outer query, which would evaluate every expression again
        in each aggregate); the outer one sums them per (version, segment, day, hour). Identical to
        per-aggregate queries as long as a request has at most one current label and one row per
        version (what add_labels and the serving log writer keep).
        """
        few = hours is not None or day is not None or changes
        p = predictions.alias("p")
        where = [p.c.rollout_id == rollout_id, p.c.error.is_(None)]
        if hours is not None:  # always with a cut (the range's end by default): one statement to compile
            where += self._range(p, hours)
            cutoff = (hours[1] + 1) * 3600.0 + 1.0 if cutoff is None else cutoff
        if day is not None:
            where.append(p.c.day == day)
        if cutoff is not None:
            where.append(p.c.ts < cutoff)
        sign: Any = None
        label: Any
        if changes:
            lab = label_changes.alias("e")
            signs = select(literal(1, Integer).label("sign")).union_all(select(literal(-1, Integer))).subquery("s")
            sign = signs.c.sign
            join = lab.join(p, p.c.request_id == lab.c.request_id).join(signs, true())
            where.append(lab.c.rollout_id == rollout_id)
            label = case((sign == 1, lab.c.new_label), else_=lab.c.old_label)
        else:
            lab = labels.alias("l")
            join = p.outerjoin(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
            label = lab.c.label
        matured = label.is_not(None)

        def loss(m: str, prediction: Any, score: Any) -> Any:
            return loss_expr(m, prediction, score, label)

        def own(m: str) -> Any:
            return loss(m, p.c.prediction, p.c.score)

        # NULL unless matured: accuracy and log loss need the guard, the others are NULL without a label
        cols: list[Any] = [
            p.c.version, p.c.segment, p.c.day, *([self._hour_expr(p.c.ts).label("hour")] if by_hour else []),
            *([sign.label("sign")] if changes else []),
            case((matured, own("accuracy"))).label("acc"), case((matured, own("log_loss"))).label("ll"),
            own("brier").label("br"), own("mse").label("se"), own("mae").label("ae"),
            case((and_(matured, p.c.prediction == 1), 1)).label("pp"),
            case((and_(matured, p.c.prediction.is_not(None), label == 1), 1)).label("pl"),
            case((and_(matured, p.c.prediction == 1, label == 1), 1)).label("tp"),
        ]
        ok = and_(matured, p.c.served == 1, p.c.propensity > 0)
        cols += [case((and_(ok, p.c.prediction.is_not(None)), literal(1.0) / p.c.propensity)).label("wp"),
                 case((and_(ok, p.c.score.is_not(None)), literal(1.0) / p.c.propensity)).label("ws")]
        if champion is not None:
            champ = str(champion)
            h = predictions.alias("h")
            # The champion's own rows probe with a NULL key (no index lookup at all) rather than
            # find themselves and be filtered out: half the probes of a shadow rollout.
            join = join.outerjoin(h, and_(
                h.c.request_id == case((p.c.version != champ, p.c.request_id)),
                h.c.version == champ,
                h.c.rollout_id == rollout_id,
                h.c.error.is_(None),
            ))
            pair = h.c.id.is_not(None)
            h_pred, h_score = h.c.prediction, h.c.score
            cols += [case((and_(matured, pair), own(m) - loss(m, h_pred, h_score))).label(f"d_{m}") for m in METRICS]
            cols += [case((pair, 1)).label("pair"), case((and_(pair, p.c.prediction == h_pred), 1)).label("agree"),
                     func.coalesce(h_score, h_pred).label("x"),
                     case((pair, func.coalesce(p.c.score, p.c.prediction))).label("y")]
        inner = select(*cols).select_from(join).where(*where)
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
        keys = (c.version, c.segment, c.day, *([c.hour] if by_hour else []), *([c.sign] if changes else []))
        query = select(*keys, *out.values()).group_by(*keys)
        if self.is_sqlite:
            # A few hours or a day: their rows through ix_predictions_day. The rollout (a first build):
            # walk it in request-id order (ix_predictions_eval), so the probes into labels' and this
            # index for the champion's row move forward through pages just read.
            result = _execute_indexed_by(conn, query, "predictions AS p",
                                         "ix_predictions_day" if few else "ix_predictions_eval")
        else:
            # A few hours or label changes are a small fraction of the table: probe labels and the
            # champion's rows by index (nested loops) rather than hash the whole of both tables, as the
            # planner would. SET LOCAL: for this read transaction only.
            flag = "off" if few else "on"
            conn.exec_driver_sql(f"SET LOCAL enable_hashjoin = {flag}")
            conn.exec_driver_sql(f"SET LOCAL enable_mergejoin = {flag}")
            result = conn.execute(query)
        rows = []
        for r in result:
            head = (*r[:3], int(r[3]) if by_hour else None, *([int(r[len(keys) - 1])] if changes else []))
            v = dict(zip(names, r[len(keys):], strict=True))
            v["accuracy_sq"] = v["accuracy_sum"]  # 0/1 loss
            v["mae_sq"] = v["mse_sum"]  # |e| * |e| == e * e exactly
            v["mse_n"] = v["mae_n"] = v["accuracy_n"]  # NULL exactly when the prediction (or label) is
            v["brier_n"] = v["log_loss_n"]  # NULL exactly when the score (or label) is
            v["fp"] = (v["pp"] or 0) - (v["tp"] or 0)
            v["fn"] = (v["pl"] or 0) - (v["tp"] or 0)
            v["tn"] = (v["accuracy_n"] or 0) - (v["tp"] or 0) - v["fp"] - v["fn"]
            for m in METRICS:
                wk = "ws" if m in ("log_loss", "brier") else "wp"
                v[f"w_{m}_n"], v[f"w_{m}_w"], v[f"w_{m}_w2"] = v[f"{wk}_n"], v[f"{wk}_w"], v[f"{wk}_w2"]
                if champion is not None:
                    v[f"d_{m}_n"] = v["ds_n" if wk == "ws" else "dp_n"]
            v["w_accuracy_w2r2"] = v["w_accuracy_w2r"]
            rows.append((*head[:4], tuple(v.get(col) or 0 for col in _SUM_COLS), *head[4:]))
        return rows

    def _usage_select(self, rollout_id: int, hours: Sequence[int], by_hour: bool) -> Any:
        """(version, latency bucket, rows, error rows, served rows) over the rows of exactly these hours,
        per (day, hour) first when `by_hour` (no join: counts only)."""
        p = predictions
        lat = case((p.c.latency_ms > 1e-4, p.c.latency_ms), else_=1e-4)
        bucket = case((p.c.latency_ms.is_(None), None),
                      else_=cast((func.ln(lat) + _LAT_OFFSET) * _LAT_BUCKETS_PER_E, Integer))
        hour = self._hour_expr(p.c.ts)
        keys = [p.c.day, hour, p.c.version, bucket] if by_hour else [p.c.version, bucket]
        return (select(*keys, func.count(), func.sum(case((p.c.error.is_not(None), 1), else_=0)), func.sum(p.c.served))
                .where(*self._in_hours(rollout_id, hours)).group_by(*keys))

    def _in_hours(self, rollout_id: int, hours: Sequence[int]) -> list[Any]:
        """WHERE terms for a rollout's prediction rows of exactly these hours (through ix_predictions_day
        when they are few)."""
        p = predictions
        terms = [p.c.rollout_id == rollout_id, self._hour_expr(p.c.ts).in_(sorted(hours))]
        if len(hours) <= _MANY_HOURS:
            terms += self._range(p, (min(hours), max(hours)))
        return terms

    def _usage_rows(self, conn: Any, rollout_id: int, hours: Sequence[int]) -> list[tuple[Any, ...]]:
        """(version, latency bucket, rows, error rows, served rows) over the rows of the given hours."""
        out: list[tuple[Any, ...]] = []
        for run in ([sorted(hours)] if len(hours) > _MANY_HOURS else [
                [h for h in hours if a <= h <= b] for a, b in _hour_runs(hours)]):
            if run:
                out += [tuple(r) for r in conn.execute(self._usage_select(rollout_id, run, by_hour=False))]
        return out

    def _usage_days(self, hours: Sequence[int]) -> list[str]:
        """Every `day` value rows of these hours can carry (a generous superset: see _range)."""
        days: set[str] = set()
        for a, b in _hour_runs(hours):
            days.update(_days_between(a * 3600.0 - 1.0, (b + 1) * 3600.0 + 1.0))
        return sorted(days)

    def _save(self, rollout_id: int, version: int, marks: dict[int, int], changes: list[int],
              rows: list[tuple[Any, ...]]) -> None:
        """Store a refresh: the recomputed hours whose dirty mark is still the one read (else they stay
        dirty), the hours a label change moved; delete the changes applied; roll the days of the stored
        hours up into daily_aggregates / daily_usage.

        Only if no refresh was stored since this one's snapshot (summary_state.version unchanged,
        checked under the rollout's lock: BEGIN IMMEDIATE on SQLite, the state row locked on
        PostgreSQL); else nothing is stored, marks and changes stay, and the next call redoes them.
        `rows`: hourly rows of the recomputed hours and of the hours changed by labels (stored + delta).
        The usage rows of the recomputed hours are computed here, in SQL (INSERT ... SELECT): a row logged
        into such an hour since the snapshot marked it again, so it is recomputed at the next refresh.
        """
        ha, hu, da, du, t, s = (hourly_aggregates, hourly_usage, daily_aggregates, daily_usage,
                                aggregate_dirty_hours, summary_state)
        with self._write() as conn:
            query = select(s.c.version).where(s.c.rollout_id == rollout_id)
            now = conn.execute(query if self.is_sqlite else query.with_for_update()).scalar()
            if now is None or int(now) != version:
                return
            conn.execute(update(s).where(s.c.rollout_id == rollout_id).values(version=version + 1))
            done: set[int] = set()
            for chunk in _chunks(sorted(marks), 500):
                done.update(int(h) for (h,) in conn.execute(
                    delete(t).where(t.c.rollout_id == rollout_id,
                                    tuple_(t.c.hour, t.c.token).in_([(h, marks[h]) for h in chunk]))
                    .returning(t.c.hour)))
            for chunk in _chunks(changes, 1000):
                conn.execute(delete(label_changes).where(label_changes.c.id.in_(chunk)))
            stored = done | {r[3] for r in rows if r[3] not in marks}  # recomputed and kept, or moved by labels
            if not stored:
                return
            days: set[str] = {r[2] for r in rows if r[3] in stored}
            for chunk in _chunks(sorted(stored), 500):
                days.update(d for (d,) in conn.execute(select(ha.c.day).distinct()
                                                       .where(ha.c.rollout_id == rollout_id, ha.c.hour.in_(chunk))))
                conn.execute(delete(ha).where(ha.c.rollout_id == rollout_id, ha.c.hour.in_(chunk)))
            cols = ["day", "hour", "version", "bucket", "n", "errors", "served"]
            by_unit = conn.execute(select(routing.c.mode).where(routing.c.rollout_id == rollout_id)).scalar() in UNIT_SPLIT_MODES
            for chunk in _chunks(sorted(done), 20_000):  # a first build: one pass over the rollout
                conn.execute(delete(hu).where(hu.c.rollout_id == rollout_id, hu.c.hour.in_(chunk)))
                conn.execute(insert(hu).from_select(["rollout_id", *cols], select(
                    literal(rollout_id, Integer), *self._usage_select(rollout_id, chunk, by_hour=True).subquery().c)))
                if by_unit:
                    conn.execute(self._units_insert(rollout_id, chunk))
            fresh = [{"rollout_id": rollout_id, "version": v, "segment": sg, "day": d, "hour": h,
                      **dict(zip(_SUM_COLS, vals, strict=True))} for v, sg, d, h, vals in rows if h in stored]
            if fresh:
                conn.execute(insert(ha), fresh)
            for chunk in _chunks(sorted(days), 100):
                summary = [{"rollout_id": rollout_id, "version": v, "segment": sg, "day": d,
                            **dict(zip(_SUM_COLS, vals, strict=True))}
                           for v, sg, d, vals in _sum_hours(self._stored_hours(conn, rollout_id, chunk))]
                conn.execute(delete(da).where(da.c.rollout_id == rollout_id, da.c.day.in_(chunk)))
                if summary:
                    conn.execute(insert(da), summary)
            for chunk in _chunks(self._usage_days(sorted(done)), 100):  # counts: summed in SQL, exactly
                conn.execute(delete(du).where(du.c.rollout_id == rollout_id, du.c.day.in_(chunk)))
                conn.execute(insert(du).from_select(
                    ["rollout_id", "day", "version", "bucket", "n", "errors", "served"],
                    select(hu.c.rollout_id, hu.c.day, hu.c.version, hu.c.bucket, func.sum(hu.c.n), func.sum(hu.c.errors),
                           func.sum(hu.c.served))
                    .where(hu.c.rollout_id == rollout_id, hu.c.day.in_(chunk))
                    .group_by(hu.c.rollout_id, hu.c.day, hu.c.version, hu.c.bucket)))

    def _stored_hours(self, conn: Any, rollout_id: int, days: Sequence[str]) -> list[tuple[Any, ...]]:
        """Stored hourly summary rows (version, segment, day, hour, values) of the given days."""
        if not days:
            return []
        ha = hourly_aggregates
        query = (select(ha.c.version, ha.c.segment, ha.c.day, ha.c.hour, *(ha.c[c] for c in _SUM_COLS))
                 .where(ha.c.rollout_id == rollout_id, ha.c.day.in_(list(days))))
        return [(r[0], r[1], r[2], int(r[3]), tuple(r[4:])) for r in conn.execute(query)]

    def _aggregates(self, rollout_id: int, cutoff: float | None, champion: str | None, match: Any) -> _Snapshot:
        """All evaluation aggregates of a rollout at maturity cut `cutoff`, paired with `champion`.

        1. First time for the rollout (no summary_state row): every hour of it is marked dirty.
        2. One read transaction, one snapshot (SQLite's read transaction; REPEATABLE READ on
           PostgreSQL): the state's version, the dirty hours and their tokens, the label changes; the
           dirty hours recomputed from predictions; the hours the label changes touch moved by their
           deltas; the stored hourly rows of the days those hours fall on (and of the cut's day); the
           daily rows of every other day; the cut's hour live, up to the cut.
        3. A short write transaction stores all that if the version did not move (see _save).
        Days before the cut's day count whole (all their rows are older than the cut), the cut's day
        counts its hours before the cut's hour plus the cut's hour live, later rows are not matured.
        A champion other than the rollout's (the summaries pair with the rollout's) is computed live
        over every day.
        """
        self._ensure()
        with self.engine.connect() as conn:
            hit = self._fresh(self._snap, conn, lambda s: s.rollout_id == rollout_id and match(s))
            if hit is not None:
                return hit
            own = self._champion_of(conn, rollout_id)
            built = conn.execute(select(summary_state.c.champion)
                                 .where(summary_state.c.rollout_id == rollout_id)).first()
        if built is None or built[0] != own:
            self._build_state(rollout_id, own)
        champion = own if champion is None else champion
        cut_day = None if cutoff is None else day_of(cutoff)
        cut_hour = None if cutoff is None else hour_of(cutoff)
        a, u, hu, t = daily_aggregates, daily_usage, hourly_usage, aggregate_dirty_hours
        with self.engine.connect() as conn:
            if not self.is_sqlite:  # one snapshot: a delta must meet the rows it was computed against
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
                conn.exec_driver_sql("SET LOCAL jit = off")  # compiling ~100 expressions costs more than it saves
            version = conn.execute(select(summary_state.c.version)
                                   .where(summary_state.c.rollout_id == rollout_id)).scalar()
            watermark = self._watermark(conn)
            marks = {int(h): int(tok) for h, tok in conn.execute(
                select(t.c.hour, t.c.token).where(t.c.rollout_id == rollout_id))}
            changes = [int(i) for (i,) in conn.execute(
                select(label_changes.c.id).where(label_changes.c.rollout_id == rollout_id))]
            fresh = self._hour_rows(conn, rollout_id, own, sorted(marks))
            fresh_usage = self._usage_rows(conn, rollout_id, sorted(marks))
            # usage of the days the dirty hours can fall on from their hourly rows, other days' from daily rows
            usage_days = [] if len(marks) > _MANY_HOURS else self._usage_days(sorted(marks))
            moved: list[tuple[Any, ...]] = []
            if changes:  # sums over the changed requests' rows with the new labels, and with the old ones
                delta = self._labelled_rows(conn, rollout_id, own, changes=True)
                hours = {r[3] for r in delta if r[3] not in marks}  # a dirty hour is recomputed anyway
                near = sorted({r[2] for r in delta if r[3] in hours})
                base = [r for r in self._stored_hours(conn, rollout_id, near) if r[3] in hours]
                moved = _moved(base, [r[:5] for r in delta if r[3] in hours and r[5] > 0],
                               [r[:5] for r in delta if r[3] in hours and r[5] < 0])
            rows = fresh + moved  # hourly rows that replace stored ones
            replaced = {r[3] for r in rows} | set(marks)
            days = sorted({r[2] for r in rows})  # days whose daily rows are stale: rolled up from their hours
            own_cut = cut_day is not None and champion == own
            cut_days = {cut_day} if own_cut and cut_day is not None else set()
            stored = [r for r in self._stored_hours(conn, rollout_id, sorted(set(days) | cut_days))
                      if r[3] not in replaced]
            kept = [(r[0], r[1], r[2], tuple(r[3:])) for r in conn.execute(
                select(a.c.version, a.c.segment, a.c.day, *(a.c[c] for c in _SUM_COLS))
                .where(a.c.rollout_id == rollout_id, a.c.day.not_in(days)))]
            kept_usage = [] if len(marks) > _MANY_HOURS else [tuple(r) for r in conn.execute(
                select(u.c.version, u.c.bucket, func.sum(u.c.n), func.sum(u.c.errors), func.sum(u.c.served))
                .where(u.c.rollout_id == rollout_id, u.c.day.not_in(usage_days)).group_by(u.c.version, u.c.bucket))]
            if usage_days or len(marks) > _MANY_HOURS:
                kept_usage += [tuple(r) for r in conn.execute(
                    select(hu.c.version, hu.c.bucket, func.sum(hu.c.n), func.sum(hu.c.errors), func.sum(hu.c.served))
                    .where(hu.c.rollout_id == rollout_id, hu.c.hour.not_in(sorted(marks)),
                           *([hu.c.day.in_(usage_days)] if usage_days else []))
                    .group_by(hu.c.version, hu.c.bucket))]
            live: list[tuple[Any, ...]] = []
            if own_cut and cut_hour is not None:
                live = [r for r in self._labelled_rows(conn, rollout_id, own, (cut_hour, cut_hour), cutoff=cutoff)
                        if r[3] == cut_hour]
            elif cut_day is not None:
                live = self._labelled_rows(conn, rollout_id, champion, day=cut_day, cutoff=cutoff, by_hour=False)
            other = self._labelled_rows(conn, rollout_id, champion, by_hour=False) if champion != own else None
        if (marks or changes) and version is not None:
            self._save(rollout_id, int(version), marks, changes, rows)
        snap = _Snapshot(rollout_id, cutoff, champion, watermark, time.monotonic())
        if other is None:
            hourly = stored + rows
            day_set = set(days)
            summary = kept + _sum_hours([r for r in hourly if r[2] in day_set])
            if own_cut:  # the cut's day: its hours before the cut's hour, then the cut's hour up to the cut
                live = _sum_hours([r for r in hourly if r[2] == cut_day and r[3] < cut_hour] + live)
        else:
            summary = [(v, s, d, vals) for v, s, d, _h, vals in other]
            live = [(v, s, d, vals) for v, s, d, _h, vals in live]
        _fill(snap, summary, live, cutoff)
        traffic: dict[str, list[int]] = {}
        hist: dict[tuple[str, int], int] = {}
        for version_, b, n, errors, served in kept_usage + fresh_usage:
            tr = traffic.setdefault(version_, [0, 0, 0])
            tr[0] += int(n)
            tr[1] += int(errors or 0)
            tr[2] += int(served or 0)
            if b is not None:
                hist[(version_, int(b))] = hist.get((version_, int(b)), 0) + int(n)
        snap.traffic = {v: TrafficCounts(*x) for v, x in traffic.items()}
        for (version_, b), n in sorted(hist.items()):
            snap.latency_hist.setdefault(version_, []).append((b, n))
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

    def units_served(self, rollout_id: int) -> dict[str, int]:
        """Per version: randomization units served, for the sample-ratio test of a split by unit (ab/abn):
        distinct unit ids, plus each served request without one (the service splits those by request id).

        Requests are the wrong count there: a unit's repeat requests all go to its arm, so a split that
        is one standard deviation off in units looks like a broken one in requests once units come back
        often enough. Kept in rollout_units by the summary refresh (brought up to date here), so an
        hourly evaluation pays for the hour's new rows, not the rollout's; only ab/abn rollouts keep it.
        """
        self._aggregates(rollout_id, None, None, lambda s: True)
        u = rollout_units
        query = select(u.c.version, func.count()).where(u.c.rollout_id == rollout_id).group_by(u.c.version)
        with self.engine.connect() as conn:
            return {str(v): int(n) for v, n in conn.execute(query)}

    def _units_insert(self, rollout_id: int, hours: Sequence[int]) -> Any:
        """INSERT of the units served in these hours that rollout_units does not hold yet."""
        p = predictions
        kind = case((p.c.unit_id.is_(None), "r"), else_="u")
        query = (select(literal(rollout_id, Integer), p.c.version, kind, func.coalesce(p.c.unit_id, p.c.request_id))
                 .where(*self._in_hours(rollout_id, hours), p.c.served == 1).distinct())
        stmt = (sqlite_insert if self.is_sqlite else pg_insert)(rollout_units)
        return stmt.from_select(["rollout_id", "version", "kind", "unit"], query).on_conflict_do_nothing()

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


def _moved(base: list[tuple[Any, ...]], new: list[tuple[Any, ...]],
           old: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Hourly rows (version, segment, day, hour, values) moved by label changes: for each key the
    changed rows touch, the stored values (`base`) plus the sums with the new labels minus the sums
    with the old ones. Every other stored row of those hours is returned unchanged."""
    acc = {(v, s, d, h): list(vals) for v, s, d, h, vals in base}
    for sign, part in ((1, new), (-1, old)):
        for v, s, d, h, vals in part:
            cur = acc.setdefault((v, s, d, h), [0] * len(_SUM_COLS))
            for i, x in enumerate(vals):
                cur[i] = cur[i] + x if sign > 0 else cur[i] - x
    return [(*k, tuple(vals)) for k, vals in acc.items()]


def _sum_hours(rows: list[tuple[Any, ...]]) -> list[tuple[str, str | None, str, tuple[Any, ...]]]:
    """Hourly rows (version, segment, day, hour, values) summed per (version, segment, day), in hour order."""
    acc: dict[tuple[str, str | None, str], tuple[Any, ...]] = {}
    for v, s, d, _h, vals in sorted(rows, key=lambda r: (*_row_key(r), r[3])):
        prev = acc.get((v, s, d))
        acc[(v, s, d)] = vals if prev is None else tuple(x + y for x, y in zip(prev, vals, strict=True))
    return [(*k, vals) for k, vals in acc.items()]


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


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _default_actor() -> str:
    return f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}"

