"""The outcome store's tables (SQLAlchemy Core): the prediction log, labels, routing and audit, the
evaluation summaries and their bookkeeping, and the lock rows. Every module of `rollout.outcomes`
reads and writes through these definitions."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateColumn
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.types import TypeDecorator

from rollout.outcomes.ids import pack, unpack

METRICS = ("accuracy", "log_loss", "brier", "mse", "mae")  # the per-request losses the summaries keep

metadata = MetaData()


class RequestId(TypeDecorator[Any]):
    """A request id column: text, but on SQLite a ULID is kept as its 16 bytes (rollout.outcomes.ids), packed
    in every bound value and unpacked in every result, so the rest of the code sees strings."""

    impl = String(64)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return pack(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return unpack(value)


predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", RequestId, nullable=False),
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
    # A multiclass prediction's class probabilities (JSON list, classes 0..K-1); `score` then holds the
    # predicted class's. The log loss of a label reads its class's entry.
    Column("probabilities", Text),
)
# PostgreSQL stores the log in `prediction_log` (partitioned by day): a shadow request's champion row and its shadow
# row as one row when they are logged together (the shadow's answer in the `shadow_*` columns), and `predictions` is a
# view that gives every reader the two rows (rollout.outcomes.partitions.PAIRED_VIEW). A heap tuple's 32-byte header
# and 4-byte line pointer, and the request and time index entries, then come once a shadow request instead of twice.
# A shadow row's served (0), propensity (1.0) and features (none) are implied: a row pairs only when they hold.
LOG_TABLE = "prediction_log"
SHADOW_STORED = ("version", "role", "prediction", "score", "latency_ms", "error", "probabilities")  # `shadow_<name>`
SHADOW_IMPLIED = {"served": 0, "propensity": 1.0, "features": None}  # the shadow half's other columns that differ
SHADOW_COLUMNS = tuple(f"shadow_{c}" for c in SHADOW_STORED)
prediction_log = Table(
    LOG_TABLE,
    MetaData(),  # never created from the metadata: partitions.create_partitioned makes it (and the view)
    *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in predictions.columns),
    *(Column(f"shadow_{c}", predictions.c[c].type) for c in SHADOW_STORED),  # nullable: NULL when unpaired
)

# SQLite: `day` is a VIRTUAL generated column, computed from ts when read and not stored (11 B a row). The UTC
# day of ts rounded to microseconds, as rollout.times.day_of files it (both may differ within a microsecond
# of midnight, SQLite's round() halving away from zero; every query that reads by day bounds ts with a second
# either side, times.day_span). PostgreSQL stores it: its partitions are keyed by it.
SQLITE_DAY = "date(CAST(round(ts * 1000000) AS INTEGER) / 86400000000 * 86400, 'unixepoch')"


@compiles(CreateColumn, "sqlite")
def _sqlite_day(element: CreateColumn, compiler: DDLCompiler, **kw: Any) -> str:
    column = element.element
    if column.table is predictions and column.name == "day":
        return f"day VARCHAR(10) GENERATED ALWAYS AS ({SQLITE_DAY}) VIRTUAL"
    return str(compiler.visit_create_column(element, **kw))  # type: ignore[no-untyped-call]


# No (rollout_id, version, ts) index: a rollout's rows are found by its time index's prefix (below), its first
# and last time by seeks there. It cost 21 B a row on SQLite, 32 on PostgreSQL.
# No index on ts alone (18 B a row on SQLite, 23 on PostgreSQL): retention finds old rows rollout by rollout
# through the time index; the newest served inputs (drift checks, training on production data) are found
# by ix_predictions_features, which holds only the rows with logged features.
# Removed from stores made before (OutcomeStore.create), on every backend (ix_predictions_day: see below):
DROPPED_INDEXES = ("ix_predictions_rollout", "ix_predictions_ts", "ix_predictions_eval", "ix_predictions_day")
Index("ix_predictions_request", predictions.c.request_id)
# A partial index is used only by a query whose WHERE implies its condition; the queries use this same text,
# literals and all (a bound parameter for `served` is matched only by some SQLite builds and PostgreSQL's
# custom plans). tests/unit/test_retention.py checks the plans.
FEATURES_SERVED = text("served = 1 AND features IS NOT NULL")
Index("ix_predictions_features", predictions.c.ts, sqlite_where=FEATURES_SERVED, postgresql_where=FEATURES_SERVED)
# The rollout's time index. The refresh of the evaluation summaries reads one rollout's rows of a few hours (a
# range of ts); the live part of an evaluation reads the hour of its maturity cut up to the cut; a first build
# walks the rollout's rows in time order, which is the table's own order, so its reads move forward through pages.
# (rollout_id, ts) on both backends, on each day partition of PostgreSQL's: every query that reads by day bounds ts
# too (sqlexpr.day_range), so the day in it only cost space. It was (rollout_id, day, ts): 12 B a row more on
# SQLite, 10 on PostgreSQL, where the day is constant within a partition. A rollout's first row, its first and
# last times and a backward range are then a seek of each day partition, merged (MergeAppend), not one seek.
Index("ix_predictions_time", predictions.c.rollout_id, predictions.c.ts)
# No covering (rollout_id, request_id, ...) index on SQLite any more (83 B a row, a third of a logged row): it let
# a first build walk the rollout in request-id order when request ids were random UUIDs. The champion's row of a
# request and a label change's rows are found by ix_predictions_request (measured in benchmarks/evaluation_scale.py
# with request ids in random order).


labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", RequestId, nullable=False),
    Column("label", Float, nullable=False),
    Column("ts", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    # 1 for the label that counts; earlier labels of the same request stay as history with 0.
    Column("current", Integer, nullable=False, default=1),
    # 0 when no prediction with this request id was stored at arrival (kept and reported).
    Column("matched", Integer, nullable=False, default=1),
    # The time of the request's first prediction at arrival (NULL: none, or a label stored before the column): the
    # label's delay without a probe into every day partition of the prediction log.
    Column("predicted_at", Float),
)
Index("ix_labels_request", labels.c.request_id, labels.c.current)
Index("ix_labels_ts", labels.c.ts)  # retention finds the old labels without reading the table
Index("ix_labels_current", labels.c.request_id, labels.c.current, labels.c.label).ddl_if(dialect="sqlite")
# At most one current label per request, whatever the concurrency: a second writer's insert fails and retries.
Index("ux_labels_current", labels.c.request_id, unique=True, sqlite_where=labels.c.current == 1,
      postgresql_where=labels.c.current == 1)

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

# A multi-step change (promotion, rejection, rollback) written before its first step: its steps (JSON),
# how many are done, and the audit row it writes when it finishes (decision, stats, actor, ts).
plans = Table(
    "plans",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer),
    Column("decision", String(32), nullable=False),
    Column("steps", Text, nullable=False),
    Column("done", Integer, nullable=False, default=0),
    Column("status", String(16), nullable=False, default="pending"),  # pending, done, reversed
    Column("stats", Text, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("ts", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
)
Index("ix_plans_status", plans.c.status)

# A row the store refused (too long for its column, a NUL byte, a time out of range), kept with the reason
# instead of failing the batch it came in: one bad row never takes other callers' rows with it.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # prediction
    Column("received_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("payload", Text, nullable=False),  # the row as JSON (escaped, so NULs and any text are safe)
)

# The column names of logged features, once: a row's `features` is `[set id, values...]` (rollout.outcomes.features).
# `digest` (SHA-256 of `columns`) is the unique key: an index on the names themselves would refuse a wide record.
feature_sets = Table(
    "feature_sets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("columns", Text, nullable=False),
    sqlite_autoincrement=True,  # an id is never given to another set, even after a delete
)

# The error text of a shadow row the service did not score for want of capacity (the challenger's bounded queue
# was full under a burst): logged, so the challenger's count still pairs with the champion's (the sample-ratio
# test), but never counted as the challenger's error. The model did not fail; the service was busy.
UNSCORED_PREFIX = "queue full: "

# The columns of a prediction row, in the order the log writes them (on SQLite without the day, computed).
LOG_COLUMNS = ("request_id", "unit_id", "rollout_id", "ts", "day", "version", "role", "served", "propensity",
               "prediction", "score", "latency_ms", "error", "segment", "features", "probabilities")
SQLITE_LOG_COLUMNS = tuple(c for c in LOG_COLUMNS if c != "day")


def log_columns(sqlite: bool) -> tuple[str, ...]:
    return SQLITE_LOG_COLUMNS if sqlite else LOG_COLUMNS

# ------------------------------------------------------------------ evaluation summaries
# Per (rollout, day, version, segment), over the day's error-free predictions and without a maturity
# cut, every sum an evaluation needs, for all five metrics at once (rollout.outcomes.summaries):
#   <metric>_n/_sum/_sq         loss moments                     (EvidenceSums.loss)
#   tp, fp, fn, tn              confusion cells                  (EvidenceSums.confusion)
#   d_<metric>_n/_sum/_sq       loss(row) - loss(champion's row) (EvidenceSums.paired)
#   pairs, agree, sx..sxy       agreement with the champion      (EvidenceSums.agreement)
#   w_<metric>_n/_w/_wr/_w2/_w2r/_w2r2  inverse-propensity sums  (EvidenceSums.ipw)
LOSS_COLS = tuple(f"{m}_{s}" for m in METRICS for s in ("n", "sum", "sq"))
CONF_COLS = ("tp", "fp", "fn", "tn")
PAIR_COLS = tuple(f"d_{m}_{s}" for m in METRICS for s in ("n", "sum", "sq"))
AGREE_COLS = ("pairs", "agree", "sx", "sy", "sxx", "syy", "sxy")
IPW_COLS = tuple(f"w_{m}_{s}" for m in METRICS for s in ("n", "w", "wr", "w2", "w2r", "w2r2"))
SUM_COLS = LOSS_COLS + CONF_COLS + PAIR_COLS + AGREE_COLS + IPW_COLS
INT_COLS = {c for c in SUM_COLS if c.endswith("_n")} | set(CONF_COLS) | {"pairs", "agree"}

# Per (rollout, hour, version, segment): the same sums over the error-free predictions of one UTC hour
# (hour = floor(ts / 3600), the same double division in SQL and in Python). Writes mark hours dirty,
# an evaluation recomputes the dirty hours only and rolls their days up into daily_aggregates, which
# always equals the sum of its day's hourly rows (added in hour order) for a day with no dirty hour.


def _summary_keys(hourly: bool) -> list[Column[Any]]:
    """(rollout, [hour,] day, version): the columns every summary table starts with."""
    return [Column("rollout_id", Integer, nullable=False), *([Column("hour", BigInteger, nullable=False)] if hourly else []),
            Column("day", String(10), nullable=False), Column("version", String(32), nullable=False)]


def _summary_columns(hourly: bool) -> list[Column[Any]]:
    return [*_summary_keys(hourly), Column("segment", String(64)),
            *(Column(c, BigInteger if c in INT_COLS else Float) for c in SUM_COLS)]


def _usage_columns(hourly: bool) -> list[Column[Any]]:
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
    Column("request_id", RequestId, nullable=False),
    Column("old_label", Float),
    Column("new_label", Float, nullable=False),
    # The first and last `day` of the request's rows in the rollout when the label came: a refresh finds them in
    # those days' partitions only (PostgreSQL prunes the others at run time) instead of probing every day's.
    # NULL in changes written before the columns: every day is searched.
    Column("day_from", String(10)),
    Column("day_to", String(10)),
)
Index("ix_label_changes", label_changes.c.rollout_id, label_changes.c.id)

# Label requests (active evaluation, `rollout.label_requests`): each batch considered the rollout's rows logged
# in (ts_from, ts_to] (the next batch starts where this one ended, so no row gets a second chance) and drew
# `requested` of them, each with its known inclusion probability; the evaluation weighs a requested row's
# label by 1 / that probability.
label_request_batches = Table(
    "label_request_batches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("ts_from", Float, nullable=False),
    Column("ts_to", Float, nullable=False),
    Column("pool", Integer, nullable=False),
    Column("budget", Integer, nullable=False),
    Column("requested", Integer, nullable=False),
)
Index("ix_label_request_batches", label_request_batches.c.rollout_id, label_request_batches.c.ts_to)

label_requests = Table(
    "label_requests",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("request_id", RequestId, primary_key=True),
    Column("batch_id", Integer, nullable=False),
    Column("probability", Float, nullable=False),
)

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

# Per (rollout, version, unit): the unit's labelled, error-free rows of the hours before unit_state.through_hour,
# counted and summed per metric (the loss, or in shadow rollouts the loss minus the champion's on the same
# request): the cluster-robust standard error's unit totals (rollout.outcomes.units), kept so the hourly
# evaluation adds an hour's rows instead of regrouping the rollout. Kept only for rollouts whose evaluation
# asked for them (a policy with a unit column).
unit_totals = Table(
    "unit_totals",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("version", String(32), primary_key=True),
    Column("unit", String(128), primary_key=True),
    *(Column(f"n_{m}", BigInteger, nullable=False, default=0) for m in METRICS),
    *(Column(f"y_{m}", Float, nullable=False, default=0.0) for m in METRICS),
)
unit_state = Table(
    "unit_state",
    metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("champion", String(32)),  # the version paired with (shadow), NULL: each version's own loss
    Column("through_hour", BigInteger, nullable=False),  # unit_totals hold the rows of the hours before it
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


def to_json(value: Any) -> str:
    """The stored form of a JSON column (features, versions, weights, statistics): orjson (a logged row's
    features in a fifth of the standard library's time; a non-finite number is null, valid JSON), else, for
    what orjson refuses (an integer beyond 64 bits), the standard library."""
    try:
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return _ENCODER.encode(value)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# The standard library's encoder, built once (json.dumps with options builds one per call).
_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))
