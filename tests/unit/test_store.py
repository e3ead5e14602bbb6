"""The outcome store on SQLite and PostgreSQL: labels, routing, audit log, lock, and SQL aggregates vs numpy."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from rollout.stats.moments import Confusion, Moments
from rollout.store import LockHeld, OutcomeStore, metadata

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A uniquely named PostgreSQL database for this session, dropped at the end."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432 as user postgres ({type(exc).__name__}: {exc})")
    name = f"rollout_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[OutcomeStore]:
    if request.param == "sqlite":
        s = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}", clock=lambda: T0)
    else:
        s = OutcomeStore(request.getfixturevalue("pg_url"), clock=lambda: T0)
        metadata.drop_all(s.engine)
    s.create()
    yield s
    s.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: Any) -> None:
    s = OutcomeStore(f"sqlite:///{tmp_path / 'wal.db'}").create()
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def _rows(n: int, seed: int = 3) -> pd.DataFrame:
    """Paired shadow traffic: champion v1 serves, challenger v2 scores the same requests."""
    rng = np.random.default_rng(seed)
    ts = T0.timestamp() + np.sort(rng.uniform(0, 3 * 86400, n))
    label = (rng.random(n) < 0.4).astype(float)
    out = []
    for version, served, noise in (("1", 1, 0.25), ("2", 0, 0.35)):
        score = np.clip(label * 0.6 + 0.2 + rng.normal(0, noise, n), 0.0, 1.0)
        score[:3] = [0.0, 1.0, 0.5]  # exercise the log-loss clip
        out.append(
            pd.DataFrame(
                {
                    "request_id": [f"r{i}" for i in range(n)],
                    "unit_id": [f"u{i % 50}" for i in range(n)],
                    "ts": ts,
                    "version": version,
                    "role": "champion" if served else "challenger",
                    "served": served,
                    "propensity": 1.0 if served else 1.0,
                    "prediction": (score >= 0.5).astype(float),
                    "score": score,
                    "latency_ms": rng.lognormal(1.0 + 0.3 * served, 0.4, n),
                    "segment": rng.choice(["standard", "VIP"], n, p=[0.8, 0.2]),
                    "label": label,
                }
            )
        )
    return pd.concat(out, ignore_index=True)


def _shadow_rollout(store: OutcomeStore, n: int) -> tuple[pd.DataFrame, int]:
    """`_rows(n)` logged and labelled in a new shadow rollout of champion v1 and challenger v2."""
    frame = _rows(n)
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    _load(store, frame, rid)
    return frame, rid


def _load(store: OutcomeStore, frame: pd.DataFrame, rollout_id: int) -> None:
    rows = frame.drop(columns=["label"]).assign(rollout_id=rollout_id).to_dict("records")
    for row in rows:
        row["features"] = {"x": 1}
    store.log_predictions(rows)
    first = frame[frame.version == "1"]
    store.add_labels(list(zip(first.request_id, first.label, first.ts + 3600, strict=True)))


def _loss(metric: str, frame: pd.DataFrame) -> pd.Series:
    y, p, s = frame.label, frame.prediction, frame.score
    if metric == "accuracy":
        return (p != y).astype(float)
    if metric == "log_loss":
        p_true = np.clip(np.where(y == 1, s, 1 - s), 1e-15, 1 - 1e-15)
        return pd.Series(-np.log(p_true), index=frame.index)
    if metric == "brier":
        return (s - y) ** 2
    if metric == "mse":
        return (p - y) ** 2
    return (p - y).abs()


def _close(a: Moments, b: Moments) -> bool:
    return a.n == b.n and math.isclose(a.total, b.total, rel_tol=1e-9, abs_tol=1e-9) and math.isclose(
        a.total_sq, b.total_sq, rel_tol=1e-9, abs_tol=1e-9
    )


@pytest.mark.parametrize("metric", ["accuracy", "log_loss", "brier", "mse", "mae"])
def test_loss_moments_match_numpy_per_version_segment_day(store: OutcomeStore, metric: str) -> None:
    frame, rid = _shadow_rollout(store, 400)
    cutoff = T0 + timedelta(days=2)
    got = store.loss_moments(rid, metric, matured_before=cutoff)
    matured = frame[frame.ts < cutoff.timestamp()].assign(
        day=lambda f: pd.to_datetime(f.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d"), loss=lambda f: _loss(metric, f)
    )
    expected = {key: Moments.of(g.loss.to_numpy()) for key, g in matured.groupby(["version", "segment", "day"])}
    assert set(got) == set(expected)
    assert all(_close(got[k], expected[k]) for k in expected), (got, expected)


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_paired_moments_are_challenger_minus_champion_on_the_same_request(store: OutcomeStore, metric: str) -> None:
    frame, rid = _shadow_rollout(store, 300)
    got = store.paired_moments(rid, metric, champion_version="1", matured_before=T0 + timedelta(days=10))
    champ = frame[frame.version == "1"].set_index("request_id")
    chall = frame[frame.version == "2"].set_index("request_id")
    d = _loss(metric, chall) - _loss(metric, champ)
    day = pd.to_datetime(chall.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d")
    expected = {("2", seg, dd): Moments.of(g.to_numpy()) for (seg, dd), g in d.groupby([chall.segment, day])}
    assert set(got) == set(expected)
    assert all(_close(got[k], expected[k]) for k in expected)


def test_confusion_traffic_latency_agreement_ipw(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 300)
    store.log_predictions([{"request_id": "bad", "rollout_id": rid, "ts": T0, "version": "2", "role": "challenger", "served": 0, "error": "boom"}])

    conf = store.confusion(rid, matured_before=T0 + timedelta(days=10))
    v1 = frame[frame.version == "1"]
    vip = v1[v1.segment == "VIP"]
    assert conf[("1", "VIP")] == Confusion(
        tp=int(((vip.prediction == 1) & (vip.label == 1)).sum()),
        fp=int(((vip.prediction == 1) & (vip.label == 0)).sum()),
        fn=int(((vip.prediction == 0) & (vip.label == 1)).sum()),
        tn=int(((vip.prediction == 0) & (vip.label == 0)).sum()),
    )

    traffic = store.traffic(rid)
    assert (traffic["1"].requests, traffic["1"].served, traffic["1"].errors) == (300, 300, 0)
    assert (traffic["2"].requests, traffic["2"].served, traffic["2"].errors) == (301, 0, 1)

    p99 = store.latency_p99(rid)
    for version in ("1", "2"):
        exact = np.quantile(frame[frame.version == version].latency_ms, 0.99)
        assert abs(p99[version] / exact - 1) < 0.06

    agree = store.agreement(rid, "1")["2"]
    champ = frame[frame.version == "1"].reset_index()
    chall = frame[frame.version == "2"].reset_index()
    assert agree.n == 300 and agree.n_agree == int((champ.prediction == chall.prediction).sum())
    assert math.isclose(agree.sxy, float((champ.score * chall.score).sum()), rel_tol=1e-9)

    sums = store.ipw_sums(rid, "accuracy", matured_before=T0 + timedelta(days=10))["1"]
    loss = _loss("accuracy", v1)
    assert (sums.n, sums.sum_w) == (300, 300.0)
    assert math.isclose(sums.sum_wr, loss.sum()) and math.isclose(sums.sum_w2r2, (loss**2).sum())


def test_labels_later_wins_history_kept_unknown_reported(store: OutcomeStore) -> None:
    rid = store.open_rollout("ab", {"champion": "1"}, {}, "s", T0)
    store.log_predictions(
        [{"request_id": "a", "rollout_id": rid, "ts": T0, "version": "1", "served": 1, "prediction": 1.0, "score": 0.9}]
    )
    first = store.add_labels([("a", 0, T0 + timedelta(days=3)), ("ghost", 1, T0)])
    assert (first.stored, first.replaced, first.unknown, first.unknown_ids) == (2, 0, 1, ("ghost",))
    second = store.add_labels([("a", 1, T0 + timedelta(days=4))])
    assert (second.stored, second.replaced, second.unknown) == (1, 1, 0)
    stale = store.add_labels([("a", 0, T0 + timedelta(days=1))])  # older than the current label: kept, not used
    assert (stale.stored, stale.replaced) == (1, 0)
    moments = store.loss_moments(rid, "accuracy", matured_before=T0 + timedelta(days=9))
    assert sum(m.n for m in moments.values()) == 1
    assert sum(m.total for m in moments.values()) == 0.0  # the latest label (1) matches the prediction
    assert store.unmatched_labels() == 1


def test_routing_lifecycle_and_audit_log(store: OutcomeStore) -> None:
    assert store.current_rollout() is None
    first = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"2": 0.1}, "salt-1", T0)
    store.set_weights(first, {"1": 0.7, "2": 0.3})
    current = store.current_rollout()
    assert current is not None and current.rollout_id == first
    assert current.weights == {"1": 0.7, "2": 0.3} and current.versions["challenger"] == "2" and current.salt == "salt-1"
    second = store.open_rollout("shadow", {"champion": "1", "challenger": "3"}, {}, "salt-2", T0 + timedelta(days=1))
    assert store.rollout(first).ended_at is not None  # opening a rollout ends the previous one
    store.end_rollout(second, T0 + timedelta(days=2), "promoted")
    assert store.current_rollout() is None and store.rollout(second).end_reason == "promoted"

    moves = [{"alias": "champion", "from": "1", "to": "3"}]
    did = store.record_decision(second, "promote", {"lower": 0.01, "n": 1200}, moves, "online-evaluation")
    log = store.decisions(second)
    assert [d.id for d in log] == [did] and log[0].stats == {"lower": 0.01, "n": 1200} and log[0].alias_moves == moves
    assert store.decisions(first) == []


def test_lock_is_exclusive_and_released(store: OutcomeStore) -> None:
    with store.lock("evaluation"):
        with pytest.raises(LockHeld, match="evaluation"):
            with store.lock("evaluation"):
                pass
        with store.lock("other"):  # names are independent
            pass
    with store.lock("evaluation"):
        pass


def test_recent_features_and_first_last_seen(store: OutcomeStore) -> None:
    rid = store.open_rollout("shadow", {"champion": "1"}, {}, "s", T0)
    rows = [
        {"request_id": f"r{i}", "rollout_id": rid, "ts": T0 + timedelta(hours=i), "version": "1", "served": 1,
         "prediction": 1.0, "features": {"income": float(i), "tier": "VIP"}}
        for i in range(5)
    ]
    store.log_predictions(rows)
    recent = store.recent_features(limit=3)
    assert list(recent.income) == [4.0, 3.0, 2.0] and list(recent.columns) == ["income", "tier"]
    assert len(store.recent_features(limit=10, since=T0 + timedelta(hours=3))) == 2
    assert store.first_seen(rid) == T0 and store.last_seen(rid) == T0 + timedelta(hours=4)
    assert store.served_version_at(T0 + timedelta(hours=2)) == "1"


def test_one_pass_aggregates_equal_fresh_queries_and_follow_writes(store: OutcomeStore) -> None:
    """gather() asks six aggregates in a row; they come from two kept passes, and a write invalidates them."""
    frame, rid = _shadow_rollout(store, 200)
    cutoff = T0 + timedelta(days=2)

    def everything() -> tuple:
        return (store.loss_moments(rid, "log_loss", cutoff), store.paired_moments(rid, "log_loss", "1", cutoff),
                store.confusion(rid, cutoff), store.traffic(rid), store.latency_p99(rid), store.agreement(rid, "1"))

    kept = everything()
    store.aggregate_cache_s = 0.0  # every call computes afresh
    fresh = everything()
    assert kept[2:] == fresh[2:]
    for a, b in zip(kept[:2], fresh[:2], strict=True):
        assert set(a) == set(b) and all(_close(a[k], b[k]) for k in a)
    # another metric or cutoff is not served from the kept pass
    store.aggregate_cache_s = 30.0
    store.loss_moments(rid, "accuracy", cutoff)
    acc = store.loss_moments(rid, "accuracy", T0 + timedelta(days=10))
    assert sum(m.n for m in acc.values()) == 400
    # a write (new prediction, new label) is seen by the next call
    store.log_predictions([{"request_id": "late", "rollout_id": rid, "ts": T0, "version": "1", "served": 1,
                            "prediction": 1.0, "score": 0.9, "segment": "VIP"}])
    assert store.traffic(rid)["1"].requests == 201
    store.add_labels([("late", 1, T0 + timedelta(hours=1))])
    acc2 = store.loss_moments(rid, "accuracy", T0 + timedelta(days=10))
    assert sum(m.n for m in acc2.values()) == 401


# ------------------------------------------------- per-day summaries, maintained incrementally


def _everything(store: OutcomeStore, rid: int, cutoff: Any) -> tuple:
    """Every aggregate of an evaluation (all metrics), for comparing two ways of computing them."""
    out: list[Any] = [store.confusion(rid, cutoff), store.traffic(rid), store.latency_p99(rid), store.agreement(rid, "1")]
    for metric in ("accuracy", "log_loss", "brier", "mse", "mae"):
        out += [store.loss_moments(rid, metric, cutoff), store.paired_moments(rid, metric, "1", cutoff),
                store.ipw_sums(rid, metric, cutoff)]
    return tuple(out)


def _same(a: tuple, b: tuple) -> bool:
    """Equal keys and counts; float sums equal up to rounding (they add per day, in another order)."""
    def close(x: Any, y: Any) -> bool:
        if isinstance(x, dict):
            return set(x) == set(y) and all(close(x[k], y[k]) for k in x)
        if isinstance(x, float):
            return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
        if hasattr(x, "__dataclass_fields__"):
            return all(close(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
        return x == y
    return all(close(x, y) for x, y in zip(a, b, strict=True))


def _rebuilt(store: OutcomeStore, rid: int, cutoff: Any) -> tuple:
    """The same aggregates from summaries rebuilt from scratch (what bulk_insert forces), on a new store object."""
    from rollout.store import summary_state

    with store.engine.begin() as conn:
        conn.execute(summary_state.delete())
    other = OutcomeStore(store.url, clock=store.clock)
    try:
        return _everything(other, rid, cutoff)
    finally:
        other.dispose()


def _dirty_hours(store: OutcomeStore, rid: int) -> set[int]:
    from rollout.store import aggregate_dirty_hours as t

    with store.engine.connect() as conn:
        return {int(h) for (h,) in conn.execute(t.select().with_only_columns(t.c.hour).where(t.c.rollout_id == rid))}


def _dirty_days(store: OutcomeStore, rid: int) -> set[str]:
    return {day_of_ts(h * 3600.0) for h in _dirty_hours(store, rid)}


def _changes(store: OutcomeStore, rid: int) -> list[tuple[str, float | None, float]]:
    """(request id, old label, new label) of the rollout's pending label changes, oldest first."""
    from rollout.store import label_changes as e

    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(e.select().with_only_columns(e.c.request_id, e.c.old_label, e.c.new_label)
                                                .where(e.c.rollout_id == rid).order_by(e.c.id))]


def test_late_label_for_an_old_day_changes_the_answer(store: OutcomeStore) -> None:
    frame = _rows(300)
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    rows = frame.drop(columns=["label"]).assign(rollout_id=rid).to_dict("records")
    store.log_predictions(rows)
    first = frame[frame.version == "1"]
    late = first.iloc[5]  # a request of the first day, left unlabelled for now
    assert late.ts < (T0 + timedelta(days=1)).timestamp()
    store.add_labels([(r, y, t + 3600) for r, y, t in zip(first.request_id, first.label, first.ts, strict=True)
                      if r != late.request_id])
    cutoff = T0 + timedelta(days=10)
    before = store.loss_moments(rid, "accuracy", cutoff)  # builds the summaries
    assert _dirty_days(store, rid) == set()
    store.add_labels([(late.request_id, late.label, T0 + timedelta(days=4))])
    assert _dirty_days(store, rid) == set()  # a label marks no hour: it logs a change (a delta for the next refresh)
    assert _changes(store, rid) == [(late.request_id, None, late.label)]
    after = store.loss_moments(rid, "accuracy", cutoff)
    key = ("1", late.segment, day_of_ts(late.ts))
    assert after[key].n == before[key].n + 1
    assert sum(m.n for m in after.values()) == 600
    assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_relabel_of_an_old_request_changes_the_answer(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 300)
    cutoff = T0 + timedelta(days=10)
    before = store.loss_moments(rid, "mse", cutoff)
    target = frame[frame.version == "1"].iloc[10]
    flipped = 1.0 - target.label
    report = store.add_labels([(target.request_id, flipped, T0 + timedelta(days=5))])
    assert report.replaced == 1
    after = store.loss_moments(rid, "mse", cutoff)
    key = ("1", target.segment, day_of_ts(target.ts))
    delta = (target.prediction - flipped) ** 2 - (target.prediction - target.label) ** 2
    assert after[key].n == before[key].n and math.isclose(after[key].total, before[key].total + delta, abs_tol=1e-9)
    assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_predictions_logged_after_a_refresh_are_counted(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 200)
    cutoff = T0 + timedelta(days=10)
    first = _everything(store, rid, cutoff)
    new = [{"request_id": f"n{i}", "rollout_id": rid, "ts": T0 + timedelta(days=d, hours=3), "version": v,
            "served": int(v == "1"), "propensity": 1.0, "prediction": 1.0, "score": 0.8, "latency_ms": 5.0,
            "segment": "VIP"} for i, d in enumerate((0, 5)) for v in ("1", "2")]
    store.log_predictions(new)
    store.add_labels([("n0", 1.0, T0 + timedelta(days=6)), ("n1", 0.0, T0 + timedelta(days=6))])
    assert _dirty_days(store, rid) == {"2026-03-01", "2026-03-06"}
    second = _everything(store, rid, cutoff)
    assert second[1]["1"].requests == first[1]["1"].requests + 2  # traffic
    assert store.agreement(rid, "1")["2"].n == 202
    acc = store.loss_moments(rid, "accuracy", cutoff)
    assert acc[("1", "VIP", "2026-03-06")] == Moments(1, 1.0, 1.0)  # predicted 1, label 0
    assert _same(second, _rebuilt(store, rid, cutoff))


@pytest.mark.parametrize("hours", [36.0, 49.5, 0.0, 100.0])
def test_partial_day_cut_by_matured_before_matches_numpy(store: OutcomeStore, hours: float) -> None:
    """Days before the cut's day come from the summaries, the cut's day is computed live up to the cut."""
    frame, rid = _shadow_rollout(store, 400)
    store.loss_moments(rid, "log_loss", None)  # summaries of every (uncut) day first
    cutoff = T0 + timedelta(hours=hours)
    for metric in ("log_loss", "accuracy"):
        got = store.loss_moments(rid, metric, cutoff)
        matured = frame[frame.ts < cutoff.timestamp()].assign(
            day=lambda f: pd.to_datetime(f.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d"), loss=lambda f: _loss(metric, f))
        expected = {k: Moments.of(g.loss.to_numpy()) for k, g in matured.groupby(["version", "segment", "day"])}
        assert set(got) == set(expected)
        assert all(_close(got[k], expected[k]) for k in expected)
    conf = store.confusion(rid, cutoff)
    v1 = frame[(frame.version == "1") & (frame.ts < cutoff.timestamp())]
    assert sum(c.tp + c.fp + c.fn + c.tn for (v, _), c in conf.items() if v == "1") == len(v1)
    assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_paired_with_another_champion_is_computed_live(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 200)
    cutoff = T0 + timedelta(hours=40)
    got = store.paired_moments(rid, "brier", champion_version="2", matured_before=cutoff)
    base = frame[frame.ts < cutoff.timestamp()]
    champ = base[base.version == "2"].set_index("request_id")
    chall = base[base.version == "1"].set_index("request_id")
    d = _loss("brier", chall) - _loss("brier", champ)
    day = pd.to_datetime(chall.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d")
    expected = {("1", seg, dd): Moments.of(g.to_numpy()) for (seg, dd), g in d.groupby([chall.segment, day])}
    assert set(got) == set(expected) and all(_close(got[k], expected[k]) for k in expected)
    assert store.agreement(rid, "2")["1"].n == 200


def test_a_write_during_a_refresh_leaves_its_day_dirty(store: OutcomeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer marking a day between the refresh's read and its save: the day stays dirty, nothing is lost."""
    frame, rid = _shadow_rollout(store, 200)
    store.traffic(rid)  # summaries built
    store.log_predictions([{"request_id": "x1", "rollout_id": rid, "ts": T0, "version": "1", "served": 1, "prediction": 1.0}])
    save = OutcomeStore._save
    calls = []

    def racing_save(self: OutcomeStore, *args: Any, **kwargs: Any) -> None:
        if not calls:  # another writer commits after the refresh read its rows
            self.log_predictions([{"request_id": "x2", "rollout_id": rid, "ts": T0 + timedelta(hours=1), "version": "1",
                                   "served": 1, "prediction": 1.0}])
        calls.append(1)
        save(self, *args, **kwargs)

    monkeypatch.setattr(OutcomeStore, "_save", racing_save)
    assert store.traffic(rid)["1"].requests == 201  # as of the refresh's snapshot
    assert _dirty_days(store, rid) == {"2026-03-01"}  # re-marked by the writer: not cleared
    store.aggregate_cache_s = 0.0
    assert store.traffic(rid)["1"].requests == 202
    assert _dirty_days(store, rid) == set()
    assert _same(_everything(store, rid, None), _rebuilt(store, rid, None))


def test_bulk_insert_drops_the_summaries_and_the_next_evaluation_rebuilds_them(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 100)
    assert store.traffic(rid)["1"].requests == 100
    ts = (T0 + timedelta(days=1)).timestamp()
    store.bulk_insert("predictions", ["request_id", "rollout_id", "ts", "day", "version", "role", "served"],
                      [(f"b{i}", rid, ts, "2026-03-02", "1", "champion", 1) for i in range(5)])
    assert store.traffic(rid)["1"].requests == 105


# ------------------------------------------- hourly marks for predictions, deltas for label changes


def _pred(rid: int, request_id: str, version: str, ts: Any, prediction: float, score: float, segment: str = "VIP") -> dict:
    return {"request_id": request_id, "rollout_id": rid, "ts": ts, "version": version, "served": int(version == "1"),
            "propensity": 1.0, "prediction": prediction, "score": score, "latency_ms": 4.0, "segment": segment}


def test_hourly_refreshes_and_label_deltas_equal_a_full_recomputation(store: OutcomeStore) -> None:
    """Late labels, relabels (and back), stale labels, a label before its prediction, a late prediction
    into an old hour, and rows on hour boundaries: after every refresh the summaries equal a rebuild."""
    frame = _rows(300)
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    rows = frame.drop(columns=["label"]).assign(rollout_id=rid).to_dict("records")
    store.log_predictions(rows)
    first = frame[frame.version == "1"].reset_index(drop=True)
    store.add_labels([(r, y, t + 3600) for r, y, t in zip(first.request_id[:200], first.label[:200], first.ts[:200],
                                                           strict=True)])
    cutoffs = [T0 + timedelta(days=10), T0 + timedelta(hours=30), T0 + timedelta(hours=30, minutes=20), None]

    def check() -> None:
        """Every cut from the incrementally kept summaries, then from summaries rebuilt from scratch."""
        mine = [_everything(store, rid, c) for c in cutoffs]
        assert _dirty_hours(store, rid) == set() and _changes(store, rid) == []  # all applied
        rebuilt = _rebuilt(store, rid, cutoffs[0])
        other = OutcomeStore(store.url, clock=store.clock)
        try:
            assert _same(mine[0], rebuilt)
            assert all(_same(m, _everything(other, rid, c)) for m, c in zip(mine[1:], cutoffs[1:], strict=True))
        finally:
            other.dispose()

    check()
    later = T0 + timedelta(days=4)
    steps = [
        lambda: store.add_labels([(r, y, later) for r, y in zip(first.request_id[200:260], first.label[200:260],
                                                                strict=True)]),  # late labels, old hours
        lambda: store.add_labels([(r, 1.0 - y, later) for r, y in zip(first.request_id[:40], first.label[:40],
                                                                      strict=True)]),  # relabels
        lambda: store.add_labels([(r, y, later + timedelta(hours=1)) for r, y in zip(
            first.request_id[:20], first.label[:20], strict=True)]),  # ... and back
        lambda: store.add_labels([(first.request_id[50], 1.0 - first.label[50], T0)]),  # stale: not current
        lambda: store.add_labels([("early", 1.0, later)]),  # before its prediction
        lambda: store.log_predictions([  # the early label's prediction, and a late one into an old hour
            _pred(rid, "early", v, T0 + timedelta(hours=5), 1.0, 0.7) for v in ("1", "2")]
            + [_pred(rid, "edge", v, T0 + timedelta(hours=29), 0.0, 0.2) for v in ("1", "2")]),  # on a boundary
        lambda: store.add_labels([("edge", 1.0, later)]),
        lambda: (store.log_predictions([_pred(rid, "both", v, T0 + timedelta(hours=7), 1.0, 0.9) for v in ("1", "2")]),
                 store.add_labels([("both", 0.0, later), (first.request_id[60], 1.0 - first.label[60], later)])),
    ]
    for step in steps:
        step()
        check()


def test_a_label_change_refreshes_its_rows_only(store: OutcomeStore) -> None:
    """A relabel marks no hour: the next refresh applies (new label) - (old label) to its hour's sums."""
    frame, rid = _shadow_rollout(store, 300)
    cutoff = T0 + timedelta(days=10)
    before = store.loss_moments(rid, "log_loss", cutoff)
    target = frame[frame.version == "2"].iloc[7]
    store.add_labels([(target.request_id, 1.0 - target.label, T0 + timedelta(days=5))])
    assert _dirty_hours(store, rid) == set()
    assert _changes(store, rid) == [(target.request_id, target.label, 1.0 - target.label)]
    store.add_labels([(target.request_id, 1.0 - target.label, T0 + timedelta(days=6))])  # same value: no change
    assert len(_changes(store, rid)) == 1
    after = store.loss_moments(rid, "log_loss", cutoff)
    assert _changes(store, rid) == []
    both = frame[frame.request_id == target.request_id]  # the label scores the request's row of each version
    keys = {(v, s, day_of_ts(t)) for v, s, t in zip(both.version, both.segment, both.ts, strict=True)}
    assert {k for k in after if not _close(after[k], before[k])} == keys
    assert all(after[k].n == before[k].n for k in keys)
    assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_a_refresh_stores_nothing_when_another_stored_since_its_snapshot(store: OutcomeStore,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two evaluations refresh at once: the later save would apply the same deltas twice; it stores nothing."""
    frame, rid = _shadow_rollout(store, 200)
    cutoff = T0 + timedelta(days=10)
    store.traffic(rid)  # built
    target = frame[frame.version == "1"].iloc[3]
    store.add_labels([(target.request_id, 1.0 - target.label, T0 + timedelta(days=5))])
    store.log_predictions([_pred(rid, "new", v, T0 + timedelta(hours=2), 1.0, 0.8) for v in ("1", "2")])
    other = OutcomeStore(store.url, clock=store.clock)
    save = OutcomeStore._save
    calls = []

    def racing_save(self: OutcomeStore, *args: Any, **kwargs: Any) -> None:
        if self is store and not calls:
            calls.append(1)
            other.loss_moments(rid, "accuracy", cutoff)  # refreshes and stores first
            assert _changes(store, rid) == [] and _dirty_hours(store, rid) == set()
        save(self, *args, **kwargs)

    monkeypatch.setattr(OutcomeStore, "_save", racing_save)
    try:
        mine = store.loss_moments(rid, "accuracy", cutoff)  # its save finds the version moved: stores nothing
        store.aggregate_cache_s = 0.0
        assert _same((mine,), (store.loss_moments(rid, "accuracy", cutoff),))
        assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))
    finally:
        other.dispose()


def test_hour_of_agrees_with_sql_on_boundaries(store: OutcomeStore) -> None:
    """Rows a hair before, on and after hour boundaries land in the hour Python's hour_of gives them."""
    from rollout.store import hour_of
    from rollout.store import hourly_aggregates as ha

    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    base = (T0 + timedelta(days=1)).timestamp()  # midnight
    times = [base - 1e-6, base - 2.5e-7, base, base + 1e-6, base + 3600.0 - 1e-6, base + 3600.0]
    store.log_predictions([_pred(rid, f"b{i}", "1", t, 1.0, 0.9) for i, t in enumerate(times)])
    store.add_labels([(f"b{i}", 1.0, base + 7200) for i in range(len(times))])
    store.traffic(rid)
    query = ha.select().with_only_columns(ha.c.hour, ha.c.day, ha.c.accuracy_n).where(ha.c.rollout_id == rid)
    with store.engine.connect() as conn:
        got = sorted((int(h), d, int(n)) for h, d, n in conn.execute(query))
    expected: dict[tuple[int, str], int] = {}
    for t in times:
        key = (hour_of(t), day_of_ts(t))
        expected[key] = expected.get(key, 0) + 1
    assert got == sorted((h, d, n) for (h, d), n in expected.items())
    for cutoff in (base, base + 1e-6, base + 3600.0):
        assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))
        n = sum(m.n for m in store.loss_moments(rid, "accuracy", cutoff).values())
        assert n == sum(t < cutoff for t in times)


def day_of_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


def test_logged_day_is_day_of_even_a_hair_before_midnight():
    from rollout.store import _day_of_cached, day_of

    midnight = 1_770_076_800.0  # 2026-02-03T00:00:00Z
    times = [midnight + d for d in (-86400.0, -1.0, -1e-3, -1e-6, -4e-7, 0.0, 1e-7, 3599.5, 86399.999999)]
    assert [_day_of_cached(t) for t in times] == [day_of(t) for t in times]
    assert [_day_of_cached(t) for t in times] == [day_of(t) for t in times]  # the second time from the cache


def test_units_served_counts_each_unit_once_and_each_anonymous_request(store: OutcomeStore) -> None:
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "salt", T0)
    rows = []
    for i in range(30):  # 10 units come back 3 times each; the last 5 requests carry no unit id
        version = "1" if i % 10 < 6 else "2"
        unit = None if i >= 25 else f"u{i % 10}"
        rows.append({"request_id": f"q{i}", "unit_id": unit, "rollout_id": rid, "ts": T0.timestamp() + i,
                     "version": version, "role": "champion" if version == "1" else "challenger", "served": 1,
                     "prediction": 1.0})
    rows.append({"request_id": "q0", "unit_id": "u0", "rollout_id": rid, "ts": T0.timestamp(), "version": "2",
                 "role": "challenger", "served": 0, "prediction": 0.0})  # a shadow scoring: not served
    store.log_predictions(rows)
    # v1: units u0-u5 and the anonymous q25; v2: units u6-u9 and the anonymous q26-q29
    assert store.units_served(rid) == {"1": 6 + 1, "2": 4 + 4}


def test_units_served_follows_writes_as_a_direct_count_does(store: OutcomeStore) -> None:
    from sqlalchemy import text

    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.4}, "salt", T0)
    rng = np.random.default_rng(5)
    direct = text("SELECT version, COUNT(DISTINCT unit_id) + SUM(CASE WHEN unit_id IS NULL THEN 1 ELSE 0 END) "
                  "FROM predictions WHERE rollout_id = :r AND served = 1 GROUP BY version")
    k = 0
    for step in range(4):  # each step: new and returning units, anonymous requests, late rows into old hours
        rows = []
        for _ in range(300):
            k += 1
            unit = None if rng.random() < 0.1 else f"u{rng.integers(0, 200)}"
            version = "2" if (unit is None and rng.random() < 0.4) or (unit and int(unit[1:]) % 5 < 2) else "1"
            rows.append({"request_id": f"q{k}", "unit_id": unit, "rollout_id": rid, "version": version,
                         "role": "champion" if version == "1" else "challenger", "served": 1, "prediction": 1.0,
                         "ts": T0.timestamp() + rng.uniform(0, (step + 1) * 5 * 3600)})
        rows.append({**rows[0], "served": 0, "version": "3", "role": "challenger-2"})  # not served: not a unit
        store.log_predictions(rows)
        with store.engine.connect() as conn:
            expected = {str(v): int(n) for v, n in conn.execute(direct, {"r": rid})}
        assert store.units_served(rid) == expected
    assert sum(expected.values()) > 200  # anonymous requests count one each


def test_a_store_from_before_unit_counts_rebuilds_its_summaries(store: OutcomeStore) -> None:
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "salt", T0)
    rows = [{"request_id": f"q{i}", "unit_id": f"u{i % 40}", "rollout_id": rid, "version": "12"[i % 40 % 2],
             "role": "champion", "served": 1, "prediction": 1.0, "ts": T0.timestamp() + i * 60} for i in range(200)]
    store.log_predictions(rows)
    assert store.units_served(rid) == {"1": 20, "2": 20}
    with store.engine.begin() as conn:  # as an older store: summaries built, no rollout_units table
        conn.exec_driver_sql("DROP TABLE rollout_units")
    upgraded = OutcomeStore(str(store.engine.url.render_as_string(hide_password=False)))
    upgraded.log_predictions([{**rows[0], "request_id": "late", "unit_id": "u-new", "ts": T0.timestamp() + 3 * 86400}])
    assert upgraded.units_served(rid) == {"1": 21, "2": 20}  # every unit, not only those of later hours
    upgraded.dispose()
