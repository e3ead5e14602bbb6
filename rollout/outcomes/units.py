"""Per-unit totals for the cluster-robust standard error, kept incrementally.

A/B rollouts randomise units (a customer's visits all go to one arm), so the standard error of a version's
mean loss comes from each unit's total and row count (`rollout.stats.moments.ClusterSums`): sums of squares of
unit totals, which do not add up across the hourly summaries. Grouping the rollout's rows by unit every hour
was a pass over the rollout (7x / 17x a bare scan at 1M rows). Instead:

* unit_totals holds per (rollout, version, unit) the count and the sum of each metric's per-row value (the loss;
  in shadow rollouts the loss minus the champion's on the same request) over the labelled, error-free rows of
  the hours before unit_state.through_hour (W). `sums` first adds the hours from W up to those that ended at
  least SETTLE_S ago, a day of them per write transaction (INSERT ... SELECT grouped by unit, added to the
  stored totals on conflict), then answers with one statement: the stored totals plus the rows from W up to
  the maturity cut, grouped by unit, summed over units.
* Labels: the totals count each row with its label as it was before every change still in label_changes
  (rows are added with the oldest pending change's old label, read in the same statement: one snapshot).
  The summaries' refresh, which consumes label changes, adds their delta (new label minus old) to the totals
  of the rows before W in the same transaction (`on_refresh`), so each change counts exactly once.
* A prediction logged into an hour before W (replayed or late traffic) marks that hour dirty; the refresh that
  sees the mark forgets the totals, and the next `sums` rebuilds them a day at a time. A new champion or a bulk
  load (the summaries rebuilt) forgets them too.
* Kept only once asked for (a policy with a unit column), paired as first asked. Another pairing, or a cut
  before W, gets None: the caller makes its one pass over the rollout.
An answer read while rows sit unrefreshed in a held hour (a dirty mark before W) is not given: None.
Every statement that moves the totals holds the unit_state row (BEGIN IMMEDIATE on SQLite, FOR UPDATE on
PostgreSQL, taken after the summaries' own state row where both are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Integer, and_, bindparam, case, delete, func, literal, select, union_all, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from rollout.outcomes.engine import chunks, is_sqlite, wall_clock, write
from rollout.outcomes.schema import METRICS, aggregate_dirty_hours, label_changes, labels, predictions, unit_state, unit_totals
from rollout.outcomes.sqlexpr import (first_day, hour_expr, hour_range, in_days_of, loss_expr, near_day, pair_days,
                                      probed)
from rollout.stats.moments import ClusterSums
from rollout.times import day_start, hour_of

SETTLE_S = 300.0  # an hour is added once it ended this long ago: a row logged late into it would force a rebuild
# Hours added per write transaction: a rebuild walks the rollout a day at a time on SQLite (its one write lock is
# held meanwhile, and the service's log writer waits for it); PostgreSQL locks only the rows it writes.
STEP_HOURS = {"sqlite": 24, "postgresql": 24 * 60}
_N = tuple(f"n_{m}" for m in METRICS)
_Y = tuple(f"y_{m}" for m in METRICS)


class UnitTotals:
    """The per-unit totals of one outcome store's rollouts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)

    # ------------------------------------------------------------------ reading
    def sums(self, rollout_id: int, metric: str, cutoff: float, champion: str | None) -> dict[str, ClusterSums] | None:
        """Per version, the metric's per-row values summed per unit over the labelled error-free rows before
        `cutoff` (paired with `champion`'s row of the same request when given); None when the kept totals cannot
        answer (paired otherwise, or a cut before them)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        cut_hour = hour_of(cutoff)
        settled = min(cut_hour, hour_of(wall_clock() - SETTLE_S))
        misses = 0
        while misses < 8:  # another evaluation may move the state between our reads: read it again
            state = self._state(rollout_id)
            if state is None:
                first = self._first_hour(rollout_id)
                if first is None:
                    return {}
                self._start(rollout_id, champion, min(first, settled))
                misses += 1
                continue
            paired, through = state
            if paired != champion or through > cut_hour:
                return None
            if through >= settled:
                got = self._read(rollout_id, metric, cutoff, champion, through)
                # rows logged into a held hour that no refresh has seen yet (it would have forgotten the
                # totals), or the totals moved meanwhile: not the snapshot the answer needs
                return None if self._stale(rollout_id, champion, through) else got
            step = STEP_HOURS.get(self.engine.dialect.name, 24)
            if not self._advance(rollout_id, champion, through, min(through + step, settled)):
                misses += 1
        return None

    def _state(self, rollout_id: int) -> tuple[str | None, int] | None:
        with self.engine.connect() as conn:
            return self._locked_state(conn, rollout_id, lock=False)

    def _stale(self, rollout_id: int, champion: str | None, through: int) -> bool:
        t = aggregate_dirty_hours
        with self.engine.connect() as conn:
            marked = conn.execute(select(t.c.hour).where(t.c.rollout_id == rollout_id, t.c.hour < through).limit(1)).first()
        return marked is not None or self._state(rollout_id) != (champion, through)

    def _first_hour(self, rollout_id: int) -> int | None:
        """The hour before the rollout's first day (rows near midnight may carry either day): one index seek."""
        p = predictions
        with self.engine.connect() as conn:
            day = conn.execute(first_day(p, rollout_id)).scalar()
        if day is None:
            return None
        return hour_of(day_start(day) - 1.0)

    def _read(self, rollout_id: int, metric: str, cutoff: float, champion: str | None,
              through: int) -> dict[str, ClusterSums]:
        """One statement (one snapshot): the stored totals, moved to the current labels by the label changes not
        yet applied, plus the rows from the state's hour up to the cut."""
        t = unit_totals
        p, h, join, label, where = self._rows(rollout_id, champion, pending=False, hours=(through, hour_of(cutoff)))
        hour = hour_expr(self._sqlite, p.c.ts)
        w = select(unit_state.c.through_hour).where(unit_state.c.rollout_id == rollout_id).scalar_subquery()
        where += [*hour_range(p, (through, hour_of(cutoff))), hour >= w, p.c.ts < cutoff]
        value = self._value(metric, p, h, label)
        live = self._per_unit(rollout_id, p, join, where, [func.count(value).label("n"),
                                                           func.coalesce(func.sum(value), 0.0).label("y")])
        pending = self._changes(rollout_id, champion, [metric], w)  # the totals' rows to their current labels
        parts = [q.with_only_columns(*list(q.selected_columns)[1:]) for q in (live, pending)]
        # every unit's stored totals summed as they are (one scan, no join), plus, for the few units the live rows
        # or the pending changes touch, what they add: their merged totals' terms minus their stored ones
        touched = union_all(*parts).subquery("d")
        moved = (select(touched.c.version.label("version"), touched.c.unit.label("unit"),
                        func.sum(touched.c.n).label("n"), func.sum(touched.c.y).label("y"))
                 .group_by(touched.c.version, touched.c.unit).subquery("m"))
        m = moved.c
        n_s, y_s = t.c[f"n_{metric}"], t.c[f"y_{metric}"]
        stored = select(t.c.version, func.count(), func.sum(n_s), func.sum(y_s), func.sum(y_s * y_s),
                        func.sum(y_s * n_s), func.sum(n_s * n_s)).where(t.c.rollout_id == rollout_id, n_s > 0)
        n_o, y_o = func.coalesce(n_s, 0), func.coalesce(y_s, 0.0)
        n_n, y_n = m.n + n_o, m.y + y_o

        def term(n: Any, y: Any, value: Any) -> Any:  # a unit's term while it has rows, else nothing
            return case((n > 0, value), else_=0)

        terms = [(literal(1), literal(1)), (n_n, n_o), (y_n, y_o), (y_n * y_n, y_o * y_o), (y_n * n_n, y_o * n_o),
                 (n_n * n_n, n_o * n_o)]
        delta = (select(m.version, *(func.sum(term(n_n, y_n, new) - term(n_o, y_o, old)) for new, old in terms))
                 .select_from(moved.outerjoin(t, and_(t.c.rollout_id == rollout_id, t.c.version == m.version,
                                                      t.c.unit == m.unit))))
        query = union_all(stored.group_by(t.c.version), delta.group_by(m.version))
        out: dict[str, list[float]] = {}
        with self.engine.connect() as conn:
            self._few_rows(conn)
            for version, *sums in conn.execute(query):
                acc = out.setdefault(str(version), [0.0] * 6)
                for i, x in enumerate(sums):
                    acc[i] += float(x or 0)
        return {v: ClusterSums(int(a[0]), int(a[1]), a[2], a[3], a[4], a[5]) for v, a in out.items() if a[1] > 0}

    def _few_rows(self, conn: Connection, on: bool = True) -> None:
        """PostgreSQL, for this transaction (`on`; else back to the defaults): the statements here join a few rows
        (an hour, the label changes) to the big tables by index, where the planner would hash all of labels and
        predictions (2 s at 3M rows); and they compute ~50 expressions a row, which JIT compiles for longer than
        they run (0.4 s a statement), as in the summaries' refresh."""
        if not self._sqlite:
            for setting, value in (("enable_hashjoin", "off"), ("enable_mergejoin", "off"), ("jit", "off")):
                conn.exec_driver_sql(f"SET LOCAL {setting} {'= ' + value if on else 'TO DEFAULT'}")

    # ------------------------------------------------------------------ keeping
    def _start(self, rollout_id: int, champion: str | None, first_hour: int) -> None:
        """Begin the rollout's totals at `first_hour`, unless another evaluation just did; totals left without a state
        (retention stopped halfway through a closed rollout's, which was then reopened) go first."""
        with write(self.engine) as conn:
            if self._locked_state(conn, rollout_id) is not None:
                return
            conn.execute(delete(unit_totals).where(unit_totals.c.rollout_id == rollout_id))
            conn.execute((sqlite_insert if self._sqlite else pg_insert)(unit_state).on_conflict_do_nothing(),
                         {"rollout_id": rollout_id, "champion": champion, "through_hour": first_hour})

    def _advance(self, rollout_id: int, champion: str | None, start: int, stop: int) -> bool:
        """Add the rows of hours [start, stop) to the totals, if the state still says `start`."""
        with write(self.engine) as conn:
            state = self._locked_state(conn, rollout_id)
            if state is None or state != (champion, start):
                return False
            if stop - start <= 24:
                self._few_rows(conn)
            p, h, join, label, where = self._rows(rollout_id, champion, pending=True, hours=(start, stop - 1))
            hour = hour_expr(self._sqlite, p.c.ts)
            where += [*hour_range(p, (start, stop - 1)), hour >= start, hour < stop, label.is_not(None)]
            values = [self._value(m, p, h, label) for m in METRICS]
            sums = [func.count(v) for v in values] + [func.coalesce(func.sum(v), 0.0) for v in values]
            conn.execute(self._upsert(self._per_unit(rollout_id, p, join, where, sums)))
            conn.execute(update(unit_state).where(unit_state.c.rollout_id == rollout_id).values(through_hour=stop))
        return True

    def on_refresh(self, conn: Connection, rollout_id: int, marked_hours: Sequence[int], changes: Sequence[int]) -> None:
        """In the summaries' refresh transaction, before it deletes the label changes it consumed: forget the totals
        if rows were logged into an hour they hold, else add the consumed changes' deltas to the rows they hold."""
        state = self._locked_state(conn, rollout_id)
        if state is None:
            return
        champion, through = state
        if any(h < through for h in marked_hours):
            self.forget(conn, rollout_id)
            return
        if not changes:
            return
        self._few_rows(conn)
        # PostgreSQL: the ids as one array (= ANY, looked up in a hash) rather than an IN list of 1,000 parameters,
        # which it compares one by one with every change of the rollout (0.1 s a chunk at 7,000 changes)
        for chunk in chunks(list(changes), 1000 if self._sqlite else 100_000):
            conn.execute(self._upsert(self._changes(rollout_id, champion, METRICS, through, ids=chunk)))
        self._few_rows(conn, on=False)  # the rest of the refresh's transaction plans as it did

    @staticmethod
    def forget(conn: Connection, rollout_id: int) -> None:
        """Drop the rollout's totals: the next `sums` rebuilds them."""
        for table in (unit_totals, unit_state):
            conn.execute(delete(table).where(table.c.rollout_id == rollout_id))

    def _locked_state(self, conn: Connection, rollout_id: int, lock: bool = True) -> tuple[str | None, int] | None:
        """(paired champion, through hour) of the rollout's totals; held (FOR UPDATE on PostgreSQL) with `lock`."""
        query = select(unit_state.c.champion, unit_state.c.through_hour).where(unit_state.c.rollout_id == rollout_id)
        row = conn.execute(query if self._sqlite or not lock else query.with_for_update()).first()
        return None if row is None else (row[0], int(row[1]))

    def _upsert(self, query: Any) -> Any:
        """INSERT of per-(version, unit) sums (rollout_id, version, unit, n_..., y_...), added to the stored ones."""
        stmt = (sqlite_insert if self._sqlite else pg_insert)(unit_totals).from_select(
            ["rollout_id", "version", "unit", *_N, *_Y], query)
        t = unit_totals
        return stmt.on_conflict_do_update(index_elements=["rollout_id", "version", "unit"],
                                          set_={c: t.c[c] + stmt.excluded[c] for c in (*_N, *_Y)})

    def _changes(self, rollout_id: int, champion: str | None, metrics: Sequence[str], before: Any,
                 ids: Sequence[int] | None = None) -> Any:
        """Per (version, unit), the count and sum of each metric's value with the label changes' new labels minus
        with their old ones, over the rows of the hours before `before` (a chain of changes of one request adds up
        to its latest label minus its label before the first): the rollout's changes, or those of `ids`."""
        e, p = label_changes.alias("e"), predictions.alias("p")
        join: Any = e.join(p, and_(p.c.request_id == e.c.request_id, probed(self._sqlite, p.c.rollout_id, rollout_id),
                                   in_days_of(e, p)))
        where = [e.c.rollout_id == rollout_id, p.c.error.is_(None), hour_expr(self._sqlite, p.c.ts) < before]
        if ids is not None:
            where.append(e.c.id.in_(ids) if self._sqlite else e.c.id == func.any(bindparam("ids", list(ids), ARRAY(Integer))))
        h = None
        if champion is not None:
            h, join, where = self._paired(rollout_id, champion, p, join, where, self._sqlite, change=e)
        new = [self._value(m, p, h, e.c.new_label) for m in metrics]
        old = [self._value(m, p, h, e.c.old_label) for m in metrics]
        counts = [func.sum(case((n.is_not(None), 1), else_=0) - case((o.is_not(None), 1), else_=0))
                  for n, o in zip(new, old, strict=True)]
        totals = [func.sum(func.coalesce(n, 0.0) - func.coalesce(o, 0.0)) for n, o in zip(new, old, strict=True)]
        return self._per_unit(rollout_id, p, join, where, counts + totals)

    @staticmethod
    def _per_unit(rollout_id: int, p: Any, join: Any, where: list[Any], sums: list[Any]) -> Any:
        unit = func.coalesce(p.c.unit_id, p.c.request_id).label("unit")
        return (select(literal(rollout_id, Integer), p.c.version, unit, *sums).select_from(join).where(*where)
                .group_by(p.c.version, unit))

    # ------------------------------------------------------------------ the rows and their values
    def _rows(self, rollout_id: int, champion: str | None, pending: bool,
              hours: tuple[int, int]) -> tuple[Any, Any, Any, Any, list[Any]]:
        """Predictions `p` of the rollout, error-free, with their label (the current one; with `pending`, as it
        was before the label changes still to apply), joined to the champion's row of the request if paired; the
        caller keeps the rows of `hours`, near which the champion's rows are looked for."""
        p, lab = predictions.alias("p"), labels.alias("l")
        where: list[Any] = [p.c.rollout_id == rollout_id, p.c.error.is_(None)]
        if pending:
            e = label_changes
            first = select(func.min(e.c.id)).where(e.c.rollout_id == rollout_id).group_by(e.c.request_id)
            before = select(e.c.request_id, e.c.old_label).where(e.c.id.in_(first)).subquery("pend")
            join: Any = (p.outerjoin(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
                         .outerjoin(before, before.c.request_id == p.c.request_id))
            label: Any = case((before.c.request_id.is_not(None), before.c.old_label), else_=lab.c.label)
        else:
            join = p.join(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
            label = lab.c.label
        h = None
        if champion is not None:
            h, join, where = self._paired(rollout_id, champion, p, join, where, self._sqlite, days=pair_days(hours))
        return p, h, join, label, where

    @staticmethod
    def _paired(rollout_id: int, champion: str, p: Any, join: Any, where: list[Any], sqlite: bool, change: Any = None,
                days: list[str] | None = None) -> tuple[Any, Any, list[Any]]:
        """The champion's error-free row of the same request, `h`, joined (a shadow rollout's pairs); looked for in
        a label `change`'s days, or in `days`, only."""
        h = predictions.alias("h")
        join = join.join(h, and_(h.c.request_id == p.c.request_id, h.c.version == champion,
                                 probed(sqlite, h.c.rollout_id, rollout_id), h.c.error.is_(None),
                                 *([in_days_of(change, h), near_day(p, h)] if change is not None else []),
                                 *([h.c.day.in_(days)] if days is not None else [])))
        return h, join, [*where, p.c.version != champion]

    @staticmethod
    def _value(metric: str, p: Any, h: Any, label: Any) -> Any:
        """A row's value: its loss against `label` (minus the champion's when paired); NULL without a label or
        without the inputs the metric needs."""
        value = loss_expr(metric, p.c.prediction, p.c.score, label, p.c.probabilities)
        if h is not None:
            value = value - loss_expr(metric, h.c.prediction, h.c.score, label, h.c.probabilities)
        return case((label.is_not(None), value))

