"""SQL expressions the evaluation summaries and the per-unit totals both compute: per-request losses, and a
prediction row's UTC hour with the index range that finds the rows of some hours."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Float, Integer, String, and_, case, cast, func, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from rollout.outcomes.schema import METRICS
from rollout.times import day_span, day_start, days_between

EPS = 1e-15  # log loss clips probabilities to [EPS, 1 - EPS]


def hour_expr(sqlite: bool, ts: Any) -> Any:
    """hour_of(ts) in SQL: the same IEEE double division, then floor (SQLite: cast truncates, ts > 0)."""
    q = ts / literal(3600.0, Float)
    return cast(q, Integer) if sqlite else cast(func.floor(q), BigInteger)


def hour_range(p: Any, hours: tuple[int, int]) -> list[Any]:
    """WHERE terms for the rows of hours [first, last], and a second more: a range of the time index.

    The margin catches a row whose hour_of (a rounded division) or day_of (rounded to microseconds)
    disagrees with its time near a boundary; results are grouped by hour (or filtered by `hour_expr`), so
    callers keep the hours they asked for."""
    first, last = hours
    lo, hi = first * 3600.0 - 1.0, (last + 1) * 3600.0 + 1.0
    days = days_between(lo, hi)
    return [p.c.day.in_(days), p.c.ts >= lo, p.c.ts < hi]


def day_range(p: Any, day: str) -> list[Any]:
    """WHERE terms for the rows of one `day`: the day itself (PostgreSQL's partition) and its times with a second
    either side (SQLite's time index; `times.day_span`)."""
    lo, hi = day_span(day)
    return [p.c.day == day, p.c.ts >= lo, p.c.ts < hi]


def first_day(p: Any, rollout_id: int | None, after: str | None = None) -> Any:
    """SELECT of the first day (after `after`) a rollout has predictions on: a seek of its time index (rollout_id,
    ts), so the day of its first row from a second before the next midnight (on PostgreSQL the later day's
    partitions only)."""
    query = select(p.c.day).where(p.c.rollout_id == rollout_id).order_by(p.c.ts).limit(1)
    return query if after is None else query.where(p.c.ts >= day_start(after) + 86_399.0, p.c.day > after)


def probed(sqlite: bool, column: Any, rollout_id: int) -> Any:
    """`column = rollout_id` on a row found by request id (the champion's row of a request, a label change's rows):
    on SQLite as `column + 0`, which no index serves, so its planner cannot look the row up by the rollout's time
    index (rollout_id, ts) and read the whole rollout for every probe, as it did for the kept unit totals
    (tests/unit/test_summary_plans.py); the request-id index is left to find it."""
    return (column + 0 if sqlite else column) == rollout_id


PAIR_MARGIN_S = 86_400.0  # how far apart in time two rows of one request (the champion's, a challenger's) may lie


def pair_days(hours: tuple[int, int]) -> list[str]:
    """The days the champion's row of a request logged in hours [first, last] can be on: those hours' days and a
    day either side (both rows carry the request's time; the margin covers a shadow row stamped when it was
    scored). A few day partitions to probe for each row on PostgreSQL instead of all of them."""
    first, last = hours
    return days_between(first * 3600.0 - PAIR_MARGIN_S, (last + 1) * 3600.0 + PAIR_MARGIN_S)


def near_day(row: Any, other: Any) -> Any:
    """`other` (the champion's row of the request of `row`) on row's day or a day either side (PAIR_MARGIN_S). The
    days are computed from row's, so PostgreSQL prunes the day partitions at run time for each row: a label
    change whose days are not known (NULL) probed every day partition for the champion's row, ~45 index probes
    per change once 30 days are kept."""
    return and_(other.c.day >= DayShift(row.c.day, -1), other.c.day <= DayShift(row.c.day, 1))


class DayShift(FunctionElement[str]):
    """SQL of a day (YYYY-MM-DD) moved by a whole number of days, as YYYY-MM-DD."""

    type = String()
    name = "day_shift"
    inherit_cache = True


@compiles(DayShift, "sqlite")
def _day_shift_sqlite(element: DayShift, compiler: Any, **kw: Any) -> str:
    day, days = element.clauses
    return f"date({compiler.process(day, **kw)}, '{int(days.value):+d} day')"


@compiles(DayShift, "postgresql")
def _day_shift_pg(element: DayShift, compiler: Any, **kw: Any) -> str:
    day, days = element.clauses
    return f"to_char(CAST({compiler.process(day, **kw)} AS DATE) + {int(days.value)}, 'YYYY-MM-DD')"


def in_days_of(change: Any, row: Any) -> Any:
    """A prediction row within the days its label change names (label_changes.day_from/day_to; NULL: any day):
    PostgreSQL then probes those days' partitions only, pruned at run time, not all of them."""
    return and_(row.c.day >= func.coalesce(change.c.day_from, "0000-00-00"),
                row.c.day <= func.coalesce(change.c.day_to, "9999-12-31"))


class ClassProbability(FunctionElement[float]):
    """SQL of the probability a multiclass row gave the labelled class: entry `label` of its JSON list of
    class probabilities, 0 when the list has no such entry (a class the model does not know)."""

    type = Float()
    name = "class_probability"
    inherit_cache = True


@compiles(ClassProbability, "sqlite")
def _class_probability_sqlite(element: ClassProbability, compiler: Any, **kw: Any) -> str:
    probabilities, label = (compiler.process(c, **kw) for c in element.clauses)
    return f"coalesce(json_extract({probabilities}, '$[' || CAST({label} AS INTEGER) || ']'), 0.0)"


@compiles(ClassProbability, "postgresql")
def _class_probability_pg(element: ClassProbability, compiler: Any, **kw: Any) -> str:
    probabilities, label = (compiler.process(c, **kw) for c in element.clauses)
    return (f"coalesce(CAST((CAST({probabilities} AS JSON) ->> CAST({label} AS INTEGER)) AS DOUBLE PRECISION), "
            "0.0)")


def loss_expr(metric: str, prediction: Any, score: Any, label: Any, probabilities: Any = None) -> Any:
    """SQL expression of the per-request loss (NULL when the inputs it needs are missing). A multiclass row
    (its `probabilities` not NULL) has the log loss of the labelled class's probability."""
    if metric == "accuracy":
        return case((prediction.is_(None), None), (prediction == label, 0.0), else_=1.0)
    if metric == "log_loss":
        p_true = case((label == 1, score), else_=literal(1.0) - score)
        if probabilities is not None:
            p_true = case((probabilities.is_not(None), ClassProbability(probabilities, label)), else_=p_true)
        clipped = case((p_true < EPS, EPS), (p_true > 1.0 - EPS, 1.0 - EPS), else_=p_true)
        return literal(0.0) - func.ln(clipped)
    if metric == "brier":
        return (score - label) * (score - label)
    if metric == "mse":
        return (prediction - label) * (prediction - label)
    if metric == "mae":
        return func.abs(prediction - label)
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
