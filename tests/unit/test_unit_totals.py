"""The hourly evaluation's per-unit sums come from totals kept incrementally (rollout.outcomes.units): they must
equal a fresh pass over the rows at every look, whatever arrived between looks: new hours, late labels and
relabels (applied by the summaries' refresh, or still pending), rows logged late into hours the totals hold
(which rebuild them), a cut before the kept hours, a shadow rollout's pairs. The in-memory store is the oracle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy import func, select

from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.memory import InMemoryStore
from rollout.outcomes.schema import unit_state, unit_totals
from rollout.roles import Role

T0 = 1_780_000_000.0 - 1_780_000_000.0 % 3600  # an hour's start, in the past (every hour has settled)
METRICS = ("accuracy", "log_loss", "brier")


def _state(store: OutcomeStore, rid: int) -> tuple[int | None, int]:
    with store.engine.connect() as conn:
        through = conn.execute(select(unit_state.c.through_hour).where(unit_state.c.rollout_id == rid)).scalar()
        rows = conn.execute(select(func.count()).select_from(unit_totals).where(unit_totals.c.rollout_id == rid)).scalar()
    return through, int(rows or 0)


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for version, w in want.items():
        g = got[version]
        assert (g.units, g.n) == (w.units, w.n), version
        for field in ("total", "sum_y2", "sum_yn", "sum_n2"):
            assert getattr(g, field) == pytest.approx(getattr(w, field), rel=1e-9, abs=1e-9), (version, field)


@pytest.mark.parametrize("mode", ["ab", "shadow"])
def test_kept_unit_totals_equal_a_fresh_pass_at_every_hourly_look(mode, store_url):
    rng = np.random.default_rng(7)
    sql, memory = OutcomeStore(store_url).create(), InMemoryStore()
    versions = {"champion": "1", "challenger": "2"}
    rids = {id(s): s.open_rollout(mode, versions, {"challenger": 0.5} if mode == "ab" else None, started_at=T0 - 60)
            for s in (sql, memory)}
    champion = "1" if mode == "shadow" else None
    logged: list[tuple[str, float]] = []  # (request id, ts)
    serial = 0

    def log(rows: list[PredictionRow]) -> None:
        for s in (sql, memory):
            s.log_predictions([replace(r, rollout_id=rids[id(s)]) for r in rows])

    def traffic(hour: int, n: int, late: bool = False) -> None:
        nonlocal serial
        rows = []
        if late:  # replayed with labels known before the rows arrive: no label change will bring them in
            for s in (sql, memory):
                s.add_labels([(f"r{serial + 1 + i}", float(i % 2), T0 + hour * 3600) for i in range(n)])
        for _ in range(n):
            serial += 1
            rid, unit = f"r{serial}", f"u{int(rng.integers(40))}"
            ts = T0 + hour * 3600 + float(rng.uniform(0, 3599))
            score = float(rng.uniform(0.05, 0.95))
            arms = (["1", "2"] if mode == "shadow" else ["2" if int(unit[1:]) % 2 else "1"])
            for v in arms:
                s = float(np.clip(score + rng.normal(0, 0.2), 0.01, 0.99))
                rows.append(PredictionRow(rid, v, Role.CHAMPION if v == "1" else Role.CHALLENGER, ts=ts, unit_id=unit,
                                          prediction=float(s > 0.5), score=s, served=int(v == "1" or mode == "ab")))
            logged.append((rid, ts))
        log(rows)

    def labels(now: float, k: int) -> None:
        chosen = [logged[int(i)] for i in rng.integers(len(logged), size=k)]  # repeats: relabels
        items = [(rid, float(rng.random() < 0.5), now) for rid, _ in chosen]
        for s in (sql, memory):
            s.add_labels(items)

    for hour in range(30):
        traffic(hour, 12)
        labels(T0 + hour * 3600 + 3000, 10)
        if hour in (20, 24):  # replayed traffic into an hour the totals hold: rebuilt, or not used until then
            traffic(3, 5, late=True)
        now = T0 + (hour + 1) * 3600
        cut = now - 2 * 3600 - 600
        if hour % 3:  # most looks after the summaries' refresh consumed the label changes, some before
            sql.evidence(rids[id(sql)], cut)
        for metric in METRICS:
            _same(sql.unit_sums(rids[id(sql)], metric, cut, champion),
                  memory.unit_sums(rids[id(memory)], metric, cut, champion))
        through, kept = _state(sql, rids[id(sql)])
        assert through == int(cut // 3600) or hour == 24, "the kept totals answered, not a pass over the rows"
        assert kept > 0 or hour < 4
    # a cut before the kept hours (a report of an earlier day): a fresh pass, the totals untouched
    early = T0 + 10 * 3600 + 5
    _same(sql.unit_sums(rids[id(sql)], "accuracy", early, champion), memory.unit_sums(rids[id(memory)], "accuracy", early, champion))
    assert _state(sql, rids[id(sql)])[0] == int(cut // 3600)
    # another pairing than the rollout's evaluation uses: a fresh pass too
    other = None if mode == "shadow" else "1"
    _same(sql.unit_sums(rids[id(sql)], "accuracy", cut, other), memory.unit_sums(rids[id(memory)], "accuracy", cut, other))


def test_a_new_champion_or_a_bulk_load_forgets_the_totals(store_url):
    sql = OutcomeStore(store_url).create()
    rid = sql.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, started_at=T0 - 60)
    rows = [PredictionRow(f"r{i}", str(1 + i % 2), Role.CHAMPION if i % 2 == 0 else Role.CHALLENGER, ts=T0 + i * 60,
                          unit_id=f"u{i % 7}", rollout_id=rid, prediction=1.0, score=0.8) for i in range(200)]
    sql.log_predictions(rows)
    sql.add_labels([(f"r{i}", float(i % 3 == 0), T0 + 20_000) for i in range(200)])
    cut = T0 + 4 * 3600
    sql.evidence(rid, cut)
    first = sql.unit_sums(rid, "accuracy", cut)
    assert _state(sql, rid)[1] > 0
    sql.summaries.invalidate()  # what a bulk load does
    sql.evidence(rid, cut)
    assert _state(sql, rid) == (None, 0)
    _same(sql.unit_sums(rid, "accuracy", cut), first)  # rebuilt, the same


def test_retention_drops_a_closed_rollouts_totals_and_a_reopened_one_rebuilds_them(store_url):
    sql = OutcomeStore(store_url).create()
    rid = sql.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, started_at=T0 - 60)
    sql.log_predictions([PredictionRow(f"r{i}", str(1 + i % 2), Role.CHAMPION if i % 2 == 0 else Role.CHALLENGER,
                                       ts=T0 + i * 60, unit_id=f"u{i % 7}", rollout_id=rid, prediction=1.0, score=0.8)
                         for i in range(200)])
    sql.add_labels([(f"r{i}", float(i % 3 == 0), T0 + 20_000) for i in range(200)])
    cut = T0 + 4 * 3600
    sql.evidence(rid, cut)  # the hourly refresh: the labels' changes applied
    before = sql.unit_sums(rid, "accuracy", cut)
    sql.expire(T0 - 86_400)  # nothing is old enough; the rollout is open: its totals stay
    assert _state(sql, rid)[1] > 0
    sql.end_rollout(rid, reason="promoted")
    sql.expire(T0 - 86_400)
    assert _state(sql, rid) == (None, 0)
    sql.reopen_rollout(rid)
    _same(sql.unit_sums(rid, "accuracy", cut), before)


def test_label_changes_name_their_days_labels_their_predictions_time_and_an_older_store_still_counts(tmp_path):
    """A label change records the days of its request's rows, so a refresh probes those days only (PostgreSQL's
    day partitions), and a label the time of its request's first prediction; a store from before the columns gets
    them, its pending changes (no days) still apply, and its labels' delays come from the prediction log."""
    import sqlite3

    path = tmp_path / "old.db"
    sql, memory = OutcomeStore(f"sqlite:///{path}").create(), InMemoryStore()
    rids = {id(s): s.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0 - 60)
            for s in (sql, memory)}
    rng = np.random.default_rng(3)
    rows = []
    for i in range(300):  # 50 hours of shadow traffic
        ts = T0 + i * 600.0
        for v in ("1", "2"):
            s = float(rng.uniform(0.05, 0.95))
            rows.append(PredictionRow(f"r{i}", v, Role.CHAMPION if v == "1" else Role.CHALLENGER, ts=ts,
                                      unit_id=f"u{i % 9}", prediction=float(s > 0.5), score=s, served=v == "1"))
    for s in (sql, memory):
        s.log_predictions([replace(r, rollout_id=rids[id(s)]) for r in rows])
        s.add_labels([(f"r{i}", float(i % 2), T0 + 200_000) for i in range(300)])
    cut = T0 + 40 * 3600
    sql.evidence(rids[id(sql)], cut)
    sql.unit_sums(rids[id(sql)], "log_loss", cut, "1")
    for s in (sql, memory):  # relabels, pending when the store is migrated
        s.add_labels([(f"r{i}", float(i % 3 == 0), T0 + 300_000) for i in range(0, 300, 7)])
    with sqlite3.connect(path) as conn:
        days = conn.execute("SELECT day_from, day_to FROM label_changes ORDER BY id").fetchall()
        assert days and all(a is not None and a == b for a, b in days)  # each request's two rows: one day
        assert len({a for a, _ in days}) == 3  # 50 hours of traffic from midnight
        conn.execute("ALTER TABLE label_changes DROP COLUMN day_from")
        conn.execute("ALTER TABLE label_changes DROP COLUMN day_to")
        assert conn.execute("SELECT count(predicted_at) FROM labels").fetchone()[0] > 0
        conn.execute("UPDATE labels SET predicted_at = NULL WHERE id % 2 = 0")  # half as an older store's
        conn.execute("ALTER TABLE labels DROP COLUMN predicted_at")
    rid = rids[id(sql)]
    sql = OutcomeStore(f"sqlite:///{path}").create()
    rids[id(sql)] = rid
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*), count(day_from) FROM label_changes").fetchone()[1] == 0
    evidence = sql.evidence(rids[id(sql)], cut)
    want = memory.evidence(rids[id(memory)], cut)
    for got, exp in ((evidence.paired["log_loss"], want.paired["log_loss"]), (evidence.loss["accuracy"], want.loss["accuracy"])):
        assert sum(m.n for m in got.values()) == sum(m.n for m in exp.values())
        assert sum(m.total for m in got.values()) == pytest.approx(sum(m.total for m in exp.values()), rel=1e-9)
    _same(sql.unit_sums(rids[id(sql)], "log_loss", cut, "1"), memory.unit_sums(rids[id(memory)], "log_loss", cut, "1"))
    assert sql.recent_label_delays() == memory.recent_label_delays()  # labels without their prediction's time: a join
    for s in (sql, memory):
        s.add_labels([(f"r{i}", 1.0, T0 + 400_000) for i in range(0, 300, 5)])
    assert sql.recent_label_delays() == memory.recent_label_delays()  # and with it, read from the label
