"""Evaluation summaries: every sum an evaluation needs, kept per hour and day and refreshed incrementally.

The evaluation runs hourly over rollouts of up to ~30 days, so it must not rescan every row each hour.
`Summaries.evidence(rollout, cutoff)` answers with one `EvidenceSums`, computed from one read snapshot:

* hourly_aggregates: per (rollout, hour, version, segment) (hour = floor(ts / 3600), as `times.hour_of`),
  over the hour's error-free predictions LEFT JOIN their current label LEFT JOIN the champion's row of
  the same request, with no maturity cut: loss moments (n, sum, sum of squares) of all five metrics,
  confusion cells, paired differences against the rollout's champion, agreement sums and
  inverse-propensity sums. hourly_usage: per (rollout, hour, version, latency bucket) rows, errors and
  served rows. daily_aggregates / daily_usage: the sum of each day's hourly rows (in hour order).
* A prediction marks its (rollout, hour) dirty in the writer's transaction (a new random token each
  time); a dirty hour is recomputed whole.
* A label marks nothing: one that becomes current writes a label change (rollout, request, old label,
  new label). A refresh computes, over the changed requests' rows only, the sums with the new labels
  minus those with the old ones and adds that delta to the hours those rows are in: an hour of labels
  costs its requests' rows, not the ~day of older hours they are spread over.
* `read` (one snapshot: SQLite's read transaction, REPEATABLE READ on PostgreSQL, since a delta must meet
  the rows it was computed against): the state's version, the marks, the label changes; the dirty hours
  recomputed, the deltas applied, the hourly rows of the days they fall on and of the cut's day, the
  daily rows of every other day, and the cut's hour computed live. `save` (a short write transaction)
  stores that only if summary_state.version did not move since the snapshot (checked under the
  rollout's lock: BEGIN IMMEDIATE / the state row FOR UPDATE), and per hour only if its mark still
  holds the token read. So a delta is never applied twice and an older result never overwrites a newer.
* The maturity cut needs no summaries of its own: days before the cut's day count whole, the cut's day
  counts its hours before the cut's hour, and the cut's hour is computed live up to the cut. Traffic,
  latency and agreement have no cut.
* ab/abn rollouts: `save` also inserts the units served in each recomputed hour into rollout_units
  (known ones ignored): distinct counts do not add up across hours.
* A champion other than the rollout's own is computed live over every day (a full pass).
* The first evaluation of a rollout (no summary_state row, another champion, or after `invalidate`,
  which bulk loads call) drops its summaries and marks every hour of it dirty.
Results equal a one-pass GROUP BY: same keys and counts; float sums are per-hour sums added in
(version, segment, day, hour) order plus label deltas, so they agree to rounding.

Losses per request (lower is better), computed in SQL with CASE:
  accuracy  0/1 error: prediction != label
  log_loss  -ln(clip(p_true, 1e-15)) with p_true = score if label == 1 else 1 - score (a multiclass row:
            the labelled class's entry of its JSON list of probabilities)
  brier     (score - label)^2;  mse  (prediction - label)^2;  mae  |prediction - label|
Exact identities save aggregates: a 0/1 loss is its own square, |e|*|e| == e*e, counts are shared by
metrics with the same inputs, fp/fn/tn follow from tp and the marginals. An inner query computes each
row's losses once (OFFSET 0: neither database merges it into the aggregates).
SQLite walks a first build in the order its rows were written (ix_predictions_time) and finds labels and the
champion's row of each request by request id (ix_labels_current, ix_predictions_request);
PostgreSQL gets nested loops for a few hours or label changes (the planner would hash both whole
tables) and no JIT (it costs more than it saves here).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    Integer,
    and_,
    or_,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from rollout.outcomes.engine import SQLITE_HINTS, chunks, is_sqlite, wall_clock, write
from rollout.outcomes.log import analyze_stale, mark_dirty
from rollout.outcomes.partitions import log_source
from rollout.outcomes.sqlexpr import (day_range, first_day, hour_expr, hour_range, in_days_of, loss_expr, near_day,
                                      pair_days, probed)
from rollout.outcomes.units import UnitTotals
from rollout.outcomes.schema import (
    AGREE_COLS,
    CONF_COLS,
    METRICS,
    SUM_COLS,
    UNSCORED_PREFIX,
    aggregate_dirty_hours,
    daily_aggregates,
    daily_usage,
    hourly_aggregates,
    hourly_usage,
    label_changes,
    labels,
    predictions,
    rollout_units,
    routing,
    summary_state,
)
from rollout.roles import UNIT_SPLIT_MODES, Role
from rollout.stats.bandit import IPWSums
from rollout.stats.guardrails import AgreementSums
from rollout.stats.moments import Confusion, Moments
from rollout.times import day_of, day_span, days_between, hour_of

# Latency histogram resolution: 40 buckets per e-fold (about 2.5 % wide); the offset keeps the index positive.
_LAT_BUCKETS_PER_E = 40.0
_LAT_OFFSET = 10.0
# More dirty hours than this (a first build): one pass over the rollout instead of index ranges.
_MANY_HOURS = 168

SegmentDay = tuple[str, str | None, str]  # (version, segment, day)
Row = tuple[Any, ...]  # a summary row: (version, segment, day, [hour,] values in SUM_COLS order)


@dataclass(frozen=True)
class TrafficCounts:
    requests: int
    errors: int
    served: int


@dataclass(frozen=True)
class EvidenceSums:
    """Every sum one evaluation of a rollout needs, from one snapshot of the store.

    Labelled sums (loss, paired, confusion, ipw) count predictions made before `cutoff` (None: all);
    traffic, latency and agreement count every row. `units` is the units served per version in ab/abn
    rollouts (the sample-ratio test's count there), else None."""

    rollout_id: int
    cutoff: float | None
    champion: str | None
    loss: dict[str, dict[SegmentDay, Moments]] = field(default_factory=dict)
    paired: dict[str, dict[SegmentDay, Moments]] = field(default_factory=dict)
    confusion: dict[tuple[str, str | None], Confusion] = field(default_factory=dict)
    agreement: dict[str, AgreementSums] = field(default_factory=dict)
    ipw: dict[str, dict[str, IPWSums]] = field(default_factory=dict)
    traffic: dict[str, TrafficCounts] = field(default_factory=dict)
    latency_hist: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    units: dict[str, int] | None = None

    def latency_buckets(self, version: str) -> list[tuple[float, float, int]]:
        """The version's latency histogram as (lower ms, upper ms, calls) per bucket. The edges cover how either
        database fills a bucket (SQLite truncates the log-scaled value, PostgreSQL rounds it)."""
        return [(math.exp((b - 0.5) / _LAT_BUCKETS_PER_E - _LAT_OFFSET), math.exp((b + 1) / _LAT_BUCKETS_PER_E - _LAT_OFFSET),
                 n) for b, n in self.latency_hist.get(version, [])]

    def latency_quantile(self, quantile: float = 0.99) -> dict[str, float]:
        """Per version: the latency quantile (ms) from the log-bucket histogram, within about 2.5 %."""
        out: dict[str, float] = {}
        for version, buckets in self.latency_hist.items():
            target = quantile * sum(n for _, n in buckets)
            seen = 0
            for b, n in sorted(buckets):
                seen += n
                if seen >= target:
                    # PostgreSQL rounds on cast, SQLite truncates: take the bucket's middle either way.
                    out[version] = math.exp((b + 0.5) / _LAT_BUCKETS_PER_E - _LAT_OFFSET)
                    break
        return out


@dataclass(frozen=True)
class Pending:
    """What the next refresh of a rollout's summaries must do: hours to recompute, label changes to apply."""

    hours: frozenset[int]
    label_changes: tuple[tuple[str, float | None, float], ...]  # (request id, old label, new label), oldest first


@dataclass(frozen=True)
class Refresh:
    """What one snapshot read: the sums it answers with, and what `save` stores (if nothing moved meanwhile)."""

    rollout_id: int
    sums: EvidenceSums
    version: int | None  # summary_state.version at the snapshot
    marks: dict[int, int]  # dirty hour -> token read
    changes: list[int]  # label change ids applied
    rows: list[Row]  # hourly rows (version, segment, day, hour, values) that replace stored ones
    unit_split: bool


class Summaries:
    """The incrementally kept evaluation summaries of one outcome store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        self.units = UnitTotals(engine)  # kept beside the summaries: a refresh moves both in one transaction

    def evidence(self, rollout_id: int, cutoff: float | None = None, champion: str | None = None) -> EvidenceSums:
        """The rollout's sums at maturity cut `cutoff`, paired with `champion` (default: the rollout's own)."""
        refresh = self.read(rollout_id, cutoff, champion)
        self.save(refresh)
        if not refresh.unit_split:
            return refresh.sums
        u = rollout_units
        query = select(u.c.version, func.count()).where(u.c.rollout_id == rollout_id).group_by(u.c.version)
        with self.engine.connect() as conn:  # after the save: it inserted the units of the hours it stored
            units = {str(v): int(n) for v, n in conn.execute(query)}
        return replace(refresh.sums, units=units)

    def pending(self, rollout_id: int) -> Pending:
        t, e = aggregate_dirty_hours, label_changes
        with self.engine.connect() as conn:
            hours = frozenset(int(h) for (h,) in conn.execute(select(t.c.hour).where(t.c.rollout_id == rollout_id)))
            changes = tuple((str(r), o, float(n)) for r, o, n in conn.execute(
                select(e.c.request_id, e.c.old_label, e.c.new_label).where(e.c.rollout_id == rollout_id).order_by(e.c.id)))
        return Pending(hours, changes)

    def invalidate(self) -> None:
        """Forget every rollout's summaries: the next evaluation of each rebuilds them from the rows."""
        with self.engine.begin() as conn:
            conn.execute(delete(summary_state))

    def read(self, rollout_id: int, cutoff: float | None = None, champion: str | None = None) -> Refresh:
        """One snapshot of the rollout's sums at maturity cut `cutoff`, paired with `champion`, and what
        `save` must store to bring the summaries up to date (see the module docstring)."""
        analyze_stale(self.engine)  # PostgreSQL: the index-probe plans below need current statistics
        with self.engine.connect() as conn:
            own, mode = self._champion_and_mode(conn, rollout_id)
            built = conn.execute(select(summary_state.c.champion)
                                 .where(summary_state.c.rollout_id == rollout_id)).first()
        if built is None or built[0] != own:
            self._build_state(rollout_id, own)
        champion = own if champion is None else champion
        cut_day = None if cutoff is None else day_of(cutoff)
        cut_hour = None if cutoff is None else hour_of(cutoff)
        a, u, hu, t = daily_aggregates, daily_usage, hourly_usage, aggregate_dirty_hours
        with self.engine.connect() as conn:
            if not self._sqlite:  # one snapshot: a delta must meet the rows it was computed against
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
                conn.exec_driver_sql("SET LOCAL jit = off")  # compiling ~100 expressions costs more than it saves
            version = conn.execute(select(summary_state.c.version)
                                   .where(summary_state.c.rollout_id == rollout_id)).scalar()
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
                select(a.c.version, a.c.segment, a.c.day, *(a.c[c] for c in SUM_COLS))
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
        if other is None:
            hourly = stored + rows
            day_set = set(days)
            summary = kept + _sum_hours([r for r in hourly if r[2] in day_set])
            if own_cut:  # the cut's day: its hours before the cut's hour, then the cut's hour up to the cut
                live = _sum_hours([r for r in hourly if r[2] == cut_day and r[3] < cut_hour] + live)
        else:
            summary = [(v, s, d, vals) for v, s, d, _h, vals in other]
            live = [(v, s, d, vals) for v, s, d, _h, vals in live]
        sums = _labelled_sums(rollout_id, cutoff, champion, summary, live)
        traffic: dict[str, list[int]] = {}
        hist: dict[tuple[str, int], int] = {}
        for version_, b, n, errors, served in kept_usage + fresh_usage:
            tr = traffic.setdefault(version_, [0, 0, 0])
            tr[0] += int(n)
            tr[1] += int(errors or 0)
            tr[2] += int(served or 0)
            if b is not None:
                hist[(version_, int(b))] = hist.get((version_, int(b)), 0) + int(n)
        latency: dict[str, list[tuple[int, int]]] = {}
        for (version_, b), n in sorted(hist.items()):
            latency.setdefault(version_, []).append((b, n))
        sums = replace(sums, traffic={v: TrafficCounts(*x) for v, x in traffic.items()}, latency_hist=latency)
        return Refresh(rollout_id, sums, None if version is None else int(version), marks, changes, rows,
                       mode in UNIT_SPLIT_MODES)


    @staticmethod
    def _champion_and_mode(conn: Connection, rollout_id: int) -> tuple[str | None, str | None]:
        row = conn.execute(select(routing.c.versions, routing.c.mode).where(routing.c.rollout_id == rollout_id)).first()
        return (None, None) if row is None else (json.loads(row[0]).get(Role.CHAMPION), row[1])

    def _days_of(self, conn: Connection, rollout_id: int) -> list[str]:
        """The days a rollout has predictions on: one index seek per day (the time index), not a scan."""
        days: list[str] = []
        p = log_source(conn.engine)  # a pair shares its day: the table's own index seeks
        while True:
            day = conn.execute(first_day(p, rollout_id, days[-1] if days else None)).scalar()
            if day is None:
                return days
            days.append(day)

    def _build_state(self, rollout_id: int, champion: str | None) -> None:
        """First evaluation of a rollout (or after bulk_insert, or with a new champion): drop its summaries
        and label changes, mark every hour of every day it has predictions on dirty, and move the state's
        version on (a refresh from before cannot store over the new build)."""
        with write(self.engine) as conn:
            built = conn.execute(select(summary_state.c.champion)
                                 .where(summary_state.c.rollout_id == rollout_id)).first()
            if built is not None and built[0] == champion:
                return  # another evaluation did it meanwhile
            s = summary_state
            stmt = (sqlite_insert if self._sqlite else pg_insert)(s)
            conn.execute(stmt.on_conflict_do_update(index_elements=["rollout_id"], set_={
                "champion": stmt.excluded.champion, "built_at": stmt.excluded.built_at, "version": s.c.version + 1,
            }), {"rollout_id": rollout_id, "champion": champion, "built_at": wall_clock(), "version": 0})
            for table in (hourly_aggregates, daily_aggregates, hourly_usage, daily_usage, label_changes, rollout_units):
                conn.execute(delete(table).where(table.c.rollout_id == rollout_id))
            UnitTotals.forget(conn, rollout_id)
            hours: set[int] = set()
            for day in self._days_of(conn, rollout_id):
                lo, hi = day_span(day)
                hours.update(range(hour_of(lo), hour_of(hi) + 1))
            mark_dirty(conn, [(rollout_id, h) for h in hours])

    def _hour_rows(self, conn: Connection, rollout_id: int, champion: str | None,
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

    def _labelled_rows(self, conn: Connection, rollout_id: int, champion: str | None, hours: tuple[int, int] | None = None,
                       *, day: str | None = None, cutoff: float | None = None, by_hour: bool = True,
                       changes: bool = False) -> list[tuple[Any, ...]]:
        """Summary rows (version, segment, day, hour or None, values in SUM_COLS order) of the hours [first, last],
        or one `day`, or the whole rollout, up to `cutoff`; with `changes`, the label changes' deltas instead."""
        # predictions LEFT JOIN its current label LEFT JOIN the champion's row of the same request. With
        # `changes`: the rows of the requests in label_changes, once with the new label (sign 1) and once with
        # the old one (sign -1), grouped by sign too (a 6th item): their difference is the change's delta.
        # An inner query computes each row's losses, differences and weights once (OFFSET 0 keeps both
        # databases from merging it into the outer sums, which would evaluate every expression again). Exact
        # while a request has at most one current label and one row per version, as the write path keeps.
        few = hours is not None or day is not None or changes
        p = predictions.alias("p")
        where = [p.c.rollout_id == rollout_id, p.c.error.is_(None)]
        if hours is not None:  # always with a cut (the range's end by default): one statement to compile
            where += hour_range(p, hours)
            cutoff = (hours[1] + 1) * 3600.0 + 1.0 if cutoff is None else cutoff
        if day is not None:
            where += day_range(p, day)
        if cutoff is not None:
            where.append(p.c.ts < cutoff)
        sign: Any = None
        label: Any
        if changes:
            lab = label_changes.alias("e")
            signs = select(literal(1, Integer).label("sign")).union_all(select(literal(-1, Integer))).subquery("s")
            sign = signs.c.sign
            join = lab.join(p, and_(p.c.request_id == lab.c.request_id, in_days_of(lab, p))).join(signs, true())
            where.append(lab.c.rollout_id == rollout_id)
            label = case((sign == 1, lab.c.new_label), else_=lab.c.old_label)
        else:
            lab = labels.alias("l")
            join = p.outerjoin(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
            label = lab.c.label
        matured = label.is_not(None)

        def loss(m: str, prediction: Any, score: Any, probabilities: Any) -> Any:
            return loss_expr(m, prediction, score, label, probabilities)

        def own(m: str) -> Any:
            return loss(m, p.c.prediction, p.c.score, p.c.probabilities)

        # NULL unless matured: accuracy and log loss need the guard, the others are NULL without a label
        cols: list[Any] = [
            p.c.version, p.c.segment, p.c.day, *([hour_expr(self._sqlite, p.c.ts).label("hour")] if by_hour else []),
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
                probed(self._sqlite, h.c.rollout_id, rollout_id),
                h.c.error.is_(None),
                *([in_days_of(lab, h), near_day(p, h)] if changes else []),
                *([h.c.day.in_(pair_days(hours))] if hours is not None else []),
            ))
            pair = h.c.id.is_not(None)
            h_pred, h_score = h.c.prediction, h.c.score
            cols += [case((and_(matured, pair), own(m) - loss(m, h_pred, h_score, h.c.probabilities))).label(f"d_{m}") for m in METRICS]
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
        if self._sqlite:
            # Hours, a day or the whole rollout (a first build): their rows through ix_predictions_time, in
            # time order, the order they were written in, so the table reads move forward.
            # Label changes: the changes lead (CROSS JOIN fixes SQLite's join order) and each finds its
            # request's rows by ix_predictions_request. Left to itself the planner walks the rollout's rows and
            # scans the changes for each: rows x changes.
            # The champion's row of each request: by ix_predictions_request. Given the day terms, SQLite chose
            # the rollout's (rollout_id, day) index range instead, a day's rows read for every label change
            # (20 s for 8,000 rows a day, benchmarks/retention.py).
            champion_row = ("LEFT OUTER JOIN predictions AS h ON ",
                            "LEFT OUTER JOIN predictions AS h INDEXED BY ix_predictions_request ON ")
            if changes:
                result = _execute_hinted(conn, query, [(
                    "FROM label_changes AS e JOIN predictions AS p ",
                    "FROM label_changes AS e CROSS JOIN predictions AS p INDEXED BY ix_predictions_request "),
                    champion_row])
            else:
                result = _execute_hinted(conn, query, [("FROM predictions AS p ",
                                                        "FROM predictions AS p INDEXED BY ix_predictions_time "),
                                                       champion_row])
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
            rows.append((*head[:4], tuple(v.get(col) or 0 for col in SUM_COLS), *head[4:]))
        return rows

    def _usage_select(self, rollout_id: int, hours: Sequence[int], by_hour: bool) -> Any:
        """(version, latency bucket, rows, error rows, served rows) over the rows of exactly these hours,
        per (day, hour) first when `by_hour` (no join: counts only)."""
        p = predictions
        lat = case((p.c.latency_ms > 1e-4, p.c.latency_ms), else_=1e-4)
        bucket = case((p.c.latency_ms.is_(None), None),
                      else_=cast((func.ln(lat) + _LAT_OFFSET) * _LAT_BUCKETS_PER_E, Integer))
        hour = hour_expr(self._sqlite, p.c.ts)
        keys = [p.c.day, hour, p.c.version, bucket] if by_hour else [p.c.version, bucket]
        failed = and_(p.c.error.is_not(None), p.c.error.not_like(f"{UNSCORED_PREFIX}%"))  # the model's own errors
        return (select(*keys, func.count(), func.sum(case((failed, 1), else_=0)), func.sum(p.c.served))
                .where(*self._in_hours(rollout_id, hours)).group_by(*keys))

    def _in_hours(self, rollout_id: int, hours: Sequence[int]) -> list[Any]:
        """WHERE terms for a rollout's prediction rows of exactly these hours (through the time index
        when they are few)."""
        p = predictions
        terms = [p.c.rollout_id == rollout_id, hour_expr(self._sqlite, p.c.ts).in_(sorted(hours))]
        if len(hours) <= _MANY_HOURS:
            terms += hour_range(p, (min(hours), max(hours)))
        return terms

    def _usage_rows(self, conn: Connection, rollout_id: int, hours: Sequence[int]) -> list[tuple[Any, ...]]:
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
            days.update(days_between(a * 3600.0 - 1.0, (b + 1) * 3600.0 + 1.0))
        return sorted(days)

    def save(self, refresh: Refresh) -> bool:
        """Store a refresh, unless another was stored since its snapshot (then the next refresh redoes its work);
        returns whether it stored. Hours marked again since the snapshot stay dirty."""
        # Checked under the rollout's lock (BEGIN IMMEDIATE on SQLite, the state row FOR UPDATE on PostgreSQL).
        # The recomputed hours' usage rows are computed here, in SQL: a row logged into such an hour since the
        # snapshot marked it again, so the next refresh recomputes it.
        rollout_id, version, marks, changes, rows = (refresh.rollout_id, refresh.version, refresh.marks,
                                                     refresh.changes, refresh.rows)
        if version is None or not (marks or changes):
            return False
        ha, hu, da, du, t, s = (hourly_aggregates, hourly_usage, daily_aggregates, daily_usage,
                                aggregate_dirty_hours, summary_state)
        with write(self.engine) as conn:
            query = select(s.c.version).where(s.c.rollout_id == rollout_id)
            now = conn.execute(query if self._sqlite else query.with_for_update()).scalar()
            if now is None or int(now) != version:
                return False
            conn.execute(update(s).where(s.c.rollout_id == rollout_id).values(version=version + 1))
            self.units.on_refresh(conn, rollout_id, sorted(marks), changes)  # before the changes are deleted
            done: set[int] = set()
            for chunk in chunks(sorted(marks), 500):
                done.update(int(h) for (h,) in conn.execute(
                    delete(t).where(t.c.rollout_id == rollout_id,
                                    tuple_(t.c.hour, t.c.token).in_([(h, marks[h]) for h in chunk]))
                    .returning(t.c.hour)))
            for chunk in chunks(changes, 1000):
                conn.execute(delete(label_changes).where(label_changes.c.id.in_(chunk)))
            stored = done | {r[3] for r in rows if r[3] not in marks}  # recomputed and kept, or moved by labels
            if not stored:
                return True
            days: set[str] = {r[2] for r in rows if r[3] in stored}
            for chunk in chunks(sorted(stored), 500):
                days.update(d for (d,) in conn.execute(select(ha.c.day).distinct()
                                                       .where(ha.c.rollout_id == rollout_id, ha.c.hour.in_(chunk))))
                conn.execute(delete(ha).where(ha.c.rollout_id == rollout_id, ha.c.hour.in_(chunk)))
            cols = ["day", "hour", "version", "bucket", "n", "errors", "served"]
            for chunk in chunks(sorted(done), 20_000):  # a first build: one pass over the rollout
                conn.execute(delete(hu).where(hu.c.rollout_id == rollout_id, hu.c.hour.in_(chunk)))
                conn.execute(insert(hu).from_select(["rollout_id", *cols], select(
                    literal(rollout_id, Integer), *self._usage_select(rollout_id, chunk, by_hour=True).subquery().c)))
                if refresh.unit_split:
                    conn.execute(self._units_insert(rollout_id, chunk))
            fresh = [{"rollout_id": rollout_id, "version": v, "segment": sg, "day": d, "hour": h,
                      **dict(zip(SUM_COLS, vals, strict=True))} for v, sg, d, h, vals in rows if h in stored]
            if fresh:
                conn.execute(insert(ha), fresh)
            for some_days in chunks(sorted(days), 100):
                summary = [{"rollout_id": rollout_id, "version": v, "segment": sg, "day": d,
                            **dict(zip(SUM_COLS, vals, strict=True))}
                           for v, sg, d, vals in _sum_hours(self._stored_hours(conn, rollout_id, some_days))]
                conn.execute(delete(da).where(da.c.rollout_id == rollout_id, da.c.day.in_(some_days)))
                if summary:
                    conn.execute(insert(da), summary)
            for some_days in chunks(self._usage_days(sorted(done)), 100):  # counts: summed in SQL, exactly
                conn.execute(delete(du).where(du.c.rollout_id == rollout_id, du.c.day.in_(some_days)))
                conn.execute(insert(du).from_select(
                    ["rollout_id", "day", "version", "bucket", "n", "errors", "served"],
                    select(hu.c.rollout_id, hu.c.day, hu.c.version, hu.c.bucket, func.sum(hu.c.n), func.sum(hu.c.errors),
                           func.sum(hu.c.served))
                    .where(hu.c.rollout_id == rollout_id, hu.c.day.in_(some_days))
                    .group_by(hu.c.rollout_id, hu.c.day, hu.c.version, hu.c.bucket)))
        return True

    def _stored_hours(self, conn: Connection, rollout_id: int, days: Sequence[str]) -> list[tuple[Any, ...]]:
        """Stored hourly summary rows (version, segment, day, hour, values) of the given days."""
        if not days:
            return []
        ha = hourly_aggregates
        query = (select(ha.c.version, ha.c.segment, ha.c.day, ha.c.hour, *(ha.c[c] for c in SUM_COLS))
                 .where(ha.c.rollout_id == rollout_id, ha.c.day.in_(list(days))))
        return [(r[0], r[1], r[2], int(r[3]), tuple(r[4:])) for r in conn.execute(query)]

    def _units_insert(self, rollout_id: int, hours: Sequence[int]) -> Any:
        """INSERT of the units assigned in these hours that rollout_units does not hold yet: units a version served
        as the router chose it, and units of a challenger's failed rows (the router chose it; the champion answered
        as a fallback, logged with propensity 0, which does not count as the champion's assignment)."""
        p = predictions
        kind = case((p.c.unit_id.is_(None), "r"), else_="u")
        assigned = or_(and_(p.c.served == 1, or_(p.c.propensity.is_(None), p.c.propensity > 0)),
                       and_(p.c.role != Role.CHAMPION.value, p.c.error.is_not(None)))
        query = (select(literal(rollout_id, Integer), p.c.version, kind, func.coalesce(p.c.unit_id, p.c.request_id))
                 .where(*self._in_hours(rollout_id, hours), assigned).distinct())
        stmt = (sqlite_insert if self._sqlite else pg_insert)(rollout_units)
        return stmt.from_select(["rollout_id", "version", "kind", "unit"], query).on_conflict_do_nothing()


def _execute_hinted(conn: Connection, query: Any, hints: Sequence[tuple[str, str]]) -> Any:
    """Run the query on SQLite with each (clause, hinted) pair's FROM or JOIN `clause` rewritten to `hinted` (an
    INDEXED BY, a CROSS JOIN fixing the join order; engine.SQLITE_HINTS). A clause not found exactly once is left as
    it is (the champion's row is joined only when there is a champion)."""
    return conn.execute(query.execution_options(**{SQLITE_HINTS: tuple(hints)}))


def _labelled_sums(rollout_id: int, cutoff: float | None, champion: str | None, rows: list[Row],
                   live: list[Row]) -> EvidenceSums:
    """Loss, paired, confusion, ipw and agreement sums from summary rows (uncut, every day) and live rows
    (the cut's day, up to the cut): labelled sums of days before the cut's day come from `rows`, of the
    cut's day from `live`; agreement (no maturity) from `rows` of every day."""
    ix = {c: i for i, c in enumerate(SUM_COLS)}
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
        for i, col in enumerate(CONF_COLS):
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
            for i, col in enumerate(AGREE_COLS[2:]):
                a[2 + i] += float(v[ix[col]] or 0.0)
    for version, segment, day, v in live:
        labelled(version, segment, day, v)
    ipw_sums: dict[str, dict[str, IPWSums]] = {}
    for m in METRICS:
        n_total = sum(int(acc[0]) for acc in ipw[m].values())
        ipw_sums[m] = {v: IPWSums(n_total, int(acc[0]), *acc[1:]) for v, acc in ipw[m].items()}
    return EvidenceSums(
        rollout_id, cutoff, champion, loss=loss, paired=paired,
        confusion={k: Confusion(*c) for k, c in conf.items() if sum(c)},
        agreement={v: AgreementSums(int(a[0]), int(a[1]), *a[2:]) for v, a in agree.items()},
        ipw=ipw_sums,
    )


def _moved(base: list[tuple[Any, ...]], new: list[tuple[Any, ...]],
           old: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Hourly rows (version, segment, day, hour, values) moved by label changes: for each key the
    changed rows touch, the stored values (`base`) plus the sums with the new labels minus the sums
    with the old ones. Every other stored row of those hours is returned unchanged."""
    acc = {(v, s, d, h): list(vals) for v, s, d, h, vals in base}
    for sign, part in ((1, new), (-1, old)):
        for v, s, d, h, vals in part:
            cur = acc.setdefault((v, s, d, h), [0] * len(SUM_COLS))
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



def _hour_runs(hours: Iterable[int], gap: int = 2) -> list[tuple[int, int]]:
    """Sorted hours as inclusive runs [first, last]; runs fewer than `gap` clean hours apart are merged."""
    runs: list[list[int]] = []
    for h in sorted(set(hours)):
        if runs and h - runs[-1][1] <= gap + 1:
            runs[-1][1] = h
        else:
            runs.append([h, h])
    return [(a, b) for a, b in runs]


