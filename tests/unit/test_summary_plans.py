"""The hourly evaluation's work after a day of late labels stays proportional to the labels, not the rollout.

A regression: labels arriving for yesterday's requests are applied to the stored summaries as label
changes. SQLite's planner walked the rollout's rows and scanned the changes for each (rows x changes: 44 s
after five days of 8,000 rows and 3,800 labels a day), and PostgreSQL without statistics on a fresh day
partition probed a whole day per row. Work is counted in SQLite virtual-machine steps (deterministic, not
timed); on PostgreSQL the store analyzes a stale partition itself, whether or not autovacuum runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import event

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.log import analyze_stale
from tests.conftest import fresh_pg_database

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
PER_DAY = 1500


def _day(store: OutcomeStore, rid: int, day: int, rng: np.random.Generator) -> list[str]:
    """A day of shadow traffic (PER_DAY requests, two rows each); the request ids."""
    start = T0 + day * 86400.0 + 10
    ts = np.sort(start + rng.random(PER_DAY) * 86000)
    ids = [f"d{day}-{i}" for i in range(PER_DAY)]
    rows = []
    for version, served in (("1", True), ("2", False)):
        s = rng.random(PER_DAY)
        rows += [PredictionRow(request_id=ids[i], version=version, role="champion" if served else "challenger",
                               ts=float(ts[i]), rollout_id=rid, served=served, propensity=1.0,
                               prediction=float(s[i] > .5), score=float(s[i]), latency_ms=2.0, segment="a")
                 for i in range(PER_DAY)]
    store.log_predictions(rows)
    return ids


def _label(store: OutcomeStore, ids: list[str], day: int, rng: np.random.Generator) -> None:
    store.add_labels([(i, float(rng.random() < .4), T0 + day * 86400.0 + 86300) for i in ids])


def _paired(sums) -> int:  # noqa: ANN001
    """Labelled requests the challenger's paired differences count, over every segment and day."""
    return sum(int(m.n) for key, m in sums.paired["log_loss"].items() if key[0] == "2")


class _Steps:
    """SQLite virtual-machine steps run on the store's connections (in thousands)."""

    def __init__(self, store: OutcomeStore) -> None:
        self.n = 0

        def count() -> int:
            self.n += 1
            return 0

        @event.listens_for(store.engine, "checkout")
        def _watch(dbapi_conn, _record, _proxy) -> None:  # noqa: ANN001
            dbapi_conn.set_progress_handler(count, 1000)


def test_applying_a_days_labels_costs_the_same_on_a_longer_rollout(tmp_path) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: datetime.fromtimestamp(T0, UTC)).create()
    steps = _Steps(store)
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + 1)
    rng = np.random.default_rng(5)
    cost, build = [], []
    for day in range(6):
        ids = _day(store, rid, day, rng)
        before = steps.n
        store.evidence(rid)  # the day's hours summarised: its labels arrive as label changes
        build.append(steps.n - before)
        if day in (0, 5):
            _label(store, ids, day, rng)
            before = steps.n
            sums = store.evidence(rid)
            cost.append(steps.n - before)
        else:
            _label(store, ids, day, rng)
            store.evidence(rid)
    # every label counted once, paired with the champion's row
    assert _paired(sums) == 6 * PER_DAY
    # six days in, the same number of labels costs about what it did on the first (was ~6x: rows x changes)
    assert cost[1] < 1.5 * cost[0], cost
    # and applying a day's labels costs about a pass over the day's rows, not one per label (SQLite read the
    # champion's rows of the whole day for each change: 100x; now ~2x)
    assert cost[1] < 4 * build[5], (cost, build)
    store.dispose()


@pytest.fixture
def pg_store() -> Iterator[OutcomeStore]:
    with fresh_pg_database("rollout_plans") as url:
        store = OutcomeStore(url, clock=lambda: datetime.fromtimestamp(T0, UTC)).create()
        yield store
        store.dispose()


@pytest.mark.postgres
def test_postgres_analyzes_a_filled_day_partition_before_evaluating(pg_store: OutcomeStore) -> None:
    store = pg_store
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + 1)
    rng = np.random.default_rng(6)
    analyze_stale(store.engine)  # whatever creation left
    _day(store, rid, 0, rng)
    assert "predictions_20260101" in analyze_stale(store.engine)
    assert "predictions_20260101" not in analyze_stale(store.engine)  # analyzed: fresh until it grows again
    with store.engine.connect() as conn:
        reltuples = conn.exec_driver_sql(
            "SELECT reltuples FROM pg_class WHERE relname = 'predictions_20260101'").scalar()
    assert reltuples == PER_DAY  # the planner now knows the day's rows (a shadow request's two: one row)
    ids = _day(store, rid, 1, rng)
    _label(store, ids, 1, rng)
    sums = store.evidence(rid)  # analyzes day 2's partition and the labels on its own
    assert _paired(sums) == PER_DAY
    assert analyze_stale(store.engine) == []


@pytest.mark.postgres
def test_postgres_looks_for_a_late_labels_champion_row_near_its_day_only(pg_store: OutcomeStore) -> None:
    """Pairing a label change's challenger row with the champion's row probed every day partition (the
    change's days sat in the join's filter, out of reach of run-time pruning): ~45 index probes a change once
    30 days are kept. The champion's row is looked for within a day of the challenger's, pruned per row."""
    store = pg_store
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + 1)
    rng = np.random.default_rng(7)
    for day in range(6):
        ids = _day(store, rid, day, rng)
        store.evidence(rid)
    _label(store, ids, 5, rng)  # the last day's labels arrive as changes to its summarised hours
    executed: list[int] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _explain(conn, cursor, statement, parameters, context, many) -> None:  # noqa: ANN001
        if "AS sign" in statement and "FROM label_changes AS e" in statement and not executed:
            cursor.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + statement, parameters)
            plan = [r[0] for r in cursor.fetchall()]
            # the champion's row's probes: a day partition's scan whose index condition is the champion's request
            # (alias h on the log itself; on PostgreSQL's paired log the view's table alias, so known by its probe)
            h = [line for line, cond in zip(plan, plan[1:], strict=False) if " on predictions_" in line
                 and (" h_" in line or ("Index Cond" in cond and "CASE WHEN" in cond))]
            executed.append(sum(1 for line in h if "never executed" not in line))
            executed.append(len(h))

    sums = store.evidence(rid)
    event.remove(store.engine, "before_cursor_execute", _explain)
    assert _paired(sums) == PER_DAY  # every late label paired with the champion's row
    probed, partitions = executed
    assert partitions >= 6 and probed <= 3, executed



def test_sqlite_finds_a_rollouts_days_and_times_by_seeks_of_its_time_index(tmp_path) -> None:
    """SQLite's time index is (rollout_id, ts), without the day (11 B a logged row): the rollout's days (what a
    first build marks), its first and last times and first hour cost a few seeks however many rows a day it has,
    and an evaluation's statements are index searches, none a scan of the log or a sort of a rollout's rows."""
    from sqlalchemy import inspect

    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: datetime.fromtimestamp(T0 + 5 * 86400, UTC))
    store.create()
    assert {"ix_predictions_time"} <= {ix["name"] for ix in inspect(store.engine).get_indexes("predictions")}
    small = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    big = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + 1)
    rng = np.random.default_rng(7)
    for day in (0, 1, 3):
        _label(store, _day(store, big, day, rng), day, rng)
        store.log_predictions([PredictionRow(f"s{day}-{i}", "1", "champion", T0 + day * 86400.0 + 60 * i,
                                             rollout_id=small) for i in range(PER_DAY // 10)])
    # a row a hair before midnight is filed under the next day (day_of rounds to microseconds): a day of its own
    store.log_predictions([PredictionRow(f"hair-{rid}", "1", "champion", T0 + 2 * 86400.0 - 2e-7, rollout_id=rid)
                           for rid in (small, big)])
    steps = _Steps(store)
    cost = {}
    for rid in (small, big):
        before = steps.n
        with store.engine.connect() as conn:
            days = store.summaries._days_of(conn, rid)
        seen = store.first_seen(rid), store.last_seen(rid), store.summaries.units._first_hour(rid)
        cost[rid] = steps.n - before
        assert days == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"], days
        assert seen[0] is not None and seen[1] is not None and seen[0].timestamp() < T0 + 86400 < seen[1].timestamp()
        assert seen[2] == int(T0 // 3600) - 1
    assert cost[big] < 2 * cost[small] + 5, cost  # ten times the rows a day: the same seeks
    statements: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, context: object,
                many: bool) -> None:
        if "predictions" in statement and not many and statement.lstrip()[:6].upper() == "SELECT":
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        sums = store.evidence(big)
        store.score_histograms(big)
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert _paired(sums) == 3 * PER_DAY
    with store.engine.connect() as conn:
        assert statements
        for statement, parameters in statements:
            plan = "\n".join(str(row[-1]) for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, parameters))  # type: ignore[arg-type]
            bad = [line for line in plan.splitlines() if "TEMP B-TREE FOR ORDER BY" in line
                   or (line.startswith("SCAN") and ("SCAN p " in line + " " or "SCAN predictions" in line)
                       and "USING" not in line)]
            assert not bad, f"{statement}\n{plan}"
    store.dispose()


@pytest.mark.postgres
def test_postgres_finds_a_rollouts_days_and_times_by_a_seek_of_each_days_time_index(pg_store: OutcomeStore) -> None:
    """PostgreSQL's time index is (rollout_id, ts) on each day partition, without the day (10 B a logged row): the
    rollout's days, its first and last times and where its latest rows start are a seek of each partition's index,
    merged in time order (one row read from each for a first or last row), never a scan of a day or a sort."""
    from rollout.outcomes.schema import predictions

    store = pg_store
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + 1)
    rng = np.random.default_rng(12)
    for day in range(4):
        _day(store, rid, day, rng)
    analyze_stale(store.engine)
    plans: list[tuple[str, list[str]]] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _explain(conn, cursor, statement, parameters, context, many) -> None:  # noqa: ANN001
        if not many and statement.lstrip().upper().startswith("SELECT") and "FROM prediction_log" in statement and (
                "ORDER BY prediction_log.ts" in statement or "(prediction_log.ts)" in statement):
            cursor.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + statement, parameters)
            plans.append((statement, [r[0] for r in cursor.fetchall()]))

    seen = store.first_seen(rid), store.last_seen(rid)
    with store.engine.connect() as conn:
        days = store.summaries._days_of(conn, rid)  # the first day, then the first after each
        recent = store._recent(conn, predictions, rid, None, rows=1000)  # where the latest 1,000 rows start
    event.remove(store.engine, "before_cursor_execute", _explain)
    assert days == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"], days
    assert seen[0] is not None and seen[1] is not None
    assert seen[0].timestamp() < T0 + 86400 and seen[1].timestamp() > T0 + 3 * 86400
    assert recent  # a bound: the rollout has more rows than that
    # min and max ts, five first-day seeks (the last finds none), the backward range
    assert len(plans) == 8, [statement for statement, _ in plans]
    found = 0
    for statement, plan in plans:
        text_ = "\n".join(plan)
        scans = [line for line in plan if " on predictions_" in line]
        assert scans and all("rollout_id_ts_idx" in line for line in scans), text_
        assert "Seq Scan" not in text_ and not any(line.lstrip().startswith(("Sort (", "->  Sort (")) for line in plan)
        rows = [int(line.split("actual rows=")[1].split()[0]) for line in scans if "actual rows=" in line]
        if "DESC" in statement:  # the latest 1,000 rows read backward from the days holding them, no more
            assert 1000 <= sum(rows) <= 1000 + len(scans), text_
        else:  # a first or a last row: at most one index row read from each day
            assert rows and max(rows) <= 1, text_
            found += max(rows)
    assert found >= 6, found  # the seeks that found a row (not only empty days)


def test_sqlite_reads_the_kept_unit_totals_at_the_same_cost_on_a_longer_rollout(tmp_path) -> None:
    """The hourly per-unit sums read the kept totals plus the live hours and the pending label changes; their rows'
    champion rows (and a change's rows) are found by request id. SQLite's planner could instead take the rollout's
    time index for them (rollout_id = ?), reading the whole rollout for every probe: a cost growing with its age."""
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}", clock=lambda: datetime.fromtimestamp(T0, UTC)).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + 1)
    rng = np.random.default_rng(11)
    steps = _Steps(store)
    cost = {}
    for day in range(7):
        ids = _day(store, rid, day, rng)
        store.evidence(rid)
        _label(store, ids[: PER_DAY // 2], day, rng)  # label changes pending until the next refresh
        cut = T0 + day * 86400.0 + 43_200.0  # half the day live
        store.unit_sums(rid, "log_loss", cutoff=cut, champion="1")  # the totals brought up to the cut
        before = steps.n
        sums = store.unit_sums(rid, "log_loss", cutoff=cut, champion="1")
        cost[day] = steps.n - before
        assert sums["2"].n > 0
    assert cost[6] < 1.5 * cost[2], cost
    store.dispose()
