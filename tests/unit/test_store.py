"""The outcome store on SQLite and PostgreSQL: labels, routing, audit log, lock, and SQL aggregates vs numpy."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from rollout.outcomes import EvidenceSums, LockHeld, OutcomeStore, PredictionRow
from rollout.stats.moments import Confusion, Moments
from rollout.times import day_of, day_of_cached, hour_of

T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def store(store_url: str) -> Iterator[OutcomeStore]:
    s = OutcomeStore(store_url, clock=lambda: T0).create()
    yield s
    s.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: Any) -> None:
    s = OutcomeStore(f"sqlite:///{tmp_path / 'wal.db'}").create()
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_sqlite_log_writers_take_turns_by_a_lock_file_beside_the_store(tmp_path: Any) -> None:
    """Another process holding the store's write-lock file (its own open of it, as another process's is) makes a
    log write wait until it lets go, instead of sleeping through SQLite's busy timeout; then the rows are there."""
    import fcntl
    import os
    import threading

    s = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    fd = os.open(tmp_path / "o.db.write-lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()

    def write() -> None:
        s.log_predictions([PredictionRow(f"r{i}", "1", ts=T0) for i in range(3)])
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert not done.wait(0.5)  # its turn has not come
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert done.wait(10)
    writer.join()
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one() == 3
    s.dispose()



def test_a_log_write_does_not_wait_past_its_deadline_for_a_turn_a_stuck_holder_keeps(tmp_path: Any,
                                                                                     monkeypatch: Any) -> None:
    """A process that holds the write-lock file and never lets go (hung, stopped) delays a log write by the turn's
    deadline only: then the write goes ahead under SQLite's own lock, and its rows are there."""
    import fcntl
    import os
    import time

    from rollout.outcomes import engine

    monkeypatch.setattr(engine, "TURN_WAIT_S", 0.3)
    s = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    fd = os.open(tmp_path / "o.db.write-lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        s.log_predictions([PredictionRow(f"r{i}", "1", ts=T0) for i in range(3)])
        waited = time.monotonic() - started
    finally:
        os.close(fd)
    assert 0.3 <= waited < 5
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one() == 3
    s.dispose()

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


def _log(store: OutcomeStore, rows: list[dict[str, Any]]) -> None:
    """Log rows written as dicts of PredictionRow's fields."""
    store.log_predictions([PredictionRow(**row) for row in rows])


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
    _log(store, rows)
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
    got = store.evidence(rid, cutoff).loss[metric]
    matured = frame[frame.ts < cutoff.timestamp()].assign(
        day=lambda f: pd.to_datetime(f.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d"), loss=lambda f: _loss(metric, f)
    )
    expected = {key: Moments.of(g.loss.to_numpy()) for key, g in matured.groupby(["version", "segment", "day"])}
    assert set(got) == set(expected)
    assert all(_close(got[k], expected[k]) for k in expected), (got, expected)


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_paired_moments_are_challenger_minus_champion_on_the_same_request(store: OutcomeStore, metric: str) -> None:
    frame, rid = _shadow_rollout(store, 300)
    got = store.evidence(rid, T0 + timedelta(days=10)).paired[metric]
    champ = frame[frame.version == "1"].set_index("request_id")
    chall = frame[frame.version == "2"].set_index("request_id")
    d = _loss(metric, chall) - _loss(metric, champ)
    day = pd.to_datetime(chall.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d")
    expected = {("2", seg, dd): Moments.of(g.to_numpy()) for (seg, dd), g in d.groupby([chall.segment, day])}
    assert set(got) == set(expected)
    assert all(_close(got[k], expected[k]) for k in expected)


def test_confusion_traffic_latency_agreement_ipw(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 300)
    _log(store, [{"request_id": "bad", "rollout_id": rid, "ts": T0, "version": "2", "role": "challenger", "served": 0, "error": "boom"}])
    # A shadow row the service refused under a burst (the challenger's queue was full): the challenger's request,
    # not its error (the error-rate guardrail must not reject a good challenger for the service's load).
    _log(store, [{"request_id": "busy", "rollout_id": rid, "ts": T0, "version": "2", "role": "challenger", "served": 0,
                  "error": "queue full: challenger cannot keep up"}])

    conf = store.evidence(rid, T0 + timedelta(days=10)).confusion
    v1 = frame[frame.version == "1"]
    vip = v1[v1.segment == "VIP"]
    assert conf[("1", "VIP")] == Confusion(
        tp=int(((vip.prediction == 1) & (vip.label == 1)).sum()),
        fp=int(((vip.prediction == 1) & (vip.label == 0)).sum()),
        fn=int(((vip.prediction == 0) & (vip.label == 1)).sum()),
        tn=int(((vip.prediction == 0) & (vip.label == 0)).sum()),
    )

    traffic = store.evidence(rid).traffic
    assert (traffic["1"].requests, traffic["1"].served, traffic["1"].errors) == (300, 300, 0)
    assert (traffic["2"].requests, traffic["2"].served, traffic["2"].errors) == (302, 0, 1)

    p99 = store.evidence(rid).latency_quantile(0.99)
    for version in ("1", "2"):
        exact = np.quantile(frame[frame.version == version].latency_ms, 0.99)
        assert abs(p99[version] / exact - 1) < 0.06

    agree = store.evidence(rid).agreement["2"]
    champ = frame[frame.version == "1"].reset_index()
    chall = frame[frame.version == "2"].reset_index()
    assert agree.n == 300 and agree.n_agree == int((champ.prediction == chall.prediction).sum())
    assert math.isclose(agree.sxy, float((champ.score * chall.score).sum()), rel_tol=1e-9)

    sums = store.evidence(rid, T0 + timedelta(days=10)).ipw["accuracy"]["1"]
    loss = _loss("accuracy", v1)
    assert (sums.n, sums.sum_w) == (300, 300.0)
    assert math.isclose(sums.sum_wr, loss.sum()) and math.isclose(sums.sum_w2r2, (loss**2).sum())


def test_labels_later_wins_history_kept_unknown_reported(store: OutcomeStore) -> None:
    rid = store.open_rollout("ab", {"champion": "1"}, {}, "s", T0)
    _log(store, 
        [{"request_id": "a", "rollout_id": rid, "ts": T0, "version": "1", "served": 1, "prediction": 1.0, "score": 0.9}]
    )
    first = store.add_labels([("a", 0, T0 + timedelta(days=3)), ("ghost", 1, T0)])
    assert (first.stored, first.replaced, first.unknown, first.unknown_ids) == (2, 0, 1, ("ghost",))
    second = store.add_labels([("a", 1, T0 + timedelta(days=4))])
    assert (second.stored, second.replaced, second.unknown) == (1, 1, 0)
    stale = store.add_labels([("a", 0, T0 + timedelta(days=1))])  # older than the current label: kept, not used
    assert (stale.stored, stale.replaced) == (1, 0)
    moments = store.evidence(rid, T0 + timedelta(days=9)).loss["accuracy"]
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
    log = store.audit_log(second)
    assert [d.id for d in log] == [did] and log[0].stats == {"lower": 0.01, "n": 1200} and log[0].alias_moves == moves
    assert store.audit_log(first) == []


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
    _log(store, rows)
    recent = store.recent_features(limit=3)
    assert list(recent.income) == [4.0, 3.0, 2.0] and list(recent.columns) == ["income", "tier"]
    assert len(store.recent_features(limit=10, since=T0 + timedelta(hours=3))) == 2
    assert store.first_seen(rid) == T0 and store.last_seen(rid) == T0 + timedelta(hours=4)
    assert store.served_version_at(T0 + timedelta(hours=2)) == "1"


def test_evidence_is_one_snapshot_and_follows_writes(store: OutcomeStore) -> None:
    """Two calls with nothing written between agree exactly; a new prediction or label is in the next answer."""
    frame, rid = _shadow_rollout(store, 200)
    cutoff = T0 + timedelta(days=2)
    first = store.evidence(rid, cutoff)
    assert first == store.evidence(rid, cutoff)
    assert sum(m.n for m in store.evidence(rid, T0 + timedelta(days=10)).loss["accuracy"].values()) == 400
    _log(store, [{"request_id": "late", "rollout_id": rid, "ts": T0, "version": "1", "served": 1,
                  "prediction": 1.0, "score": 0.9, "segment": "VIP"}])
    assert store.evidence(rid).traffic["1"].requests == 201
    store.add_labels([("late", 1, T0 + timedelta(hours=1))])
    acc = store.evidence(rid, T0 + timedelta(days=10)).loss["accuracy"]
    assert sum(m.n for m in acc.values()) == 401


# ------------------------------------------------- per-day summaries, maintained incrementally


def _everything(store: OutcomeStore, rid: int, cutoff: Any) -> EvidenceSums:
    """Every sum of an evaluation (all metrics), for comparing two ways of computing them."""
    return store.evidence(rid, cutoff)


def _same(a: Any, b: Any) -> bool:
    """Equal keys and counts; float sums equal up to rounding (they add per day, in another order)."""
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if hasattr(a, "__dataclass_fields__"):
        return all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return bool(a == b)


def _rebuilt(store: OutcomeStore, rid: int, cutoff: Any) -> EvidenceSums:
    """The same sums from summaries rebuilt from scratch (what a bulk load forces), on a new store object."""
    store.summaries.invalidate()
    other = OutcomeStore(store.url, clock=store.clock)
    try:
        return _everything(other, rid, cutoff)
    finally:
        other.dispose()


def _dirty_hours(store: OutcomeStore, rid: int) -> set[int]:
    return set(store.summaries.pending(rid).hours)


def _dirty_days(store: OutcomeStore, rid: int) -> set[str]:
    return {day_of(h * 3600.0) for h in _dirty_hours(store, rid)}


def _changes(store: OutcomeStore, rid: int) -> list[tuple[str, float | None, float]]:
    """(request id, old label, new label) of the rollout's pending label changes, oldest first."""
    return list(store.summaries.pending(rid).label_changes)


def test_late_label_for_an_old_day_changes_the_answer(store: OutcomeStore) -> None:
    frame = _rows(300)
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    rows = frame.drop(columns=["label"]).assign(rollout_id=rid).to_dict("records")
    _log(store, rows)
    first = frame[frame.version == "1"]
    late = first.iloc[5]  # a request of the first day, left unlabelled for now
    assert late.ts < (T0 + timedelta(days=1)).timestamp()
    store.add_labels([(r, y, t + 3600) for r, y, t in zip(first.request_id, first.label, first.ts, strict=True)
                      if r != late.request_id])
    cutoff = T0 + timedelta(days=10)
    before = store.evidence(rid, cutoff).loss["accuracy"]  # builds the summaries
    assert _dirty_days(store, rid) == set()
    store.add_labels([(late.request_id, late.label, T0 + timedelta(days=4))])
    assert _dirty_days(store, rid) == set()  # a label marks no hour: it logs a change (a delta for the next refresh)
    assert _changes(store, rid) == [(late.request_id, None, late.label)]
    after = store.evidence(rid, cutoff).loss["accuracy"]
    key = ("1", late.segment, day_of(late.ts))
    assert after[key].n == before[key].n + 1
    assert sum(m.n for m in after.values()) == 600
    assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_relabel_of_an_old_request_changes_the_answer(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 300)
    cutoff = T0 + timedelta(days=10)
    before = store.evidence(rid, cutoff).loss["mse"]
    target = frame[frame.version == "1"].iloc[10]
    flipped = 1.0 - target.label
    report = store.add_labels([(target.request_id, flipped, T0 + timedelta(days=5))])
    assert report.replaced == 1
    after = store.evidence(rid, cutoff).loss["mse"]
    key = ("1", target.segment, day_of(target.ts))
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
    _log(store, new)
    store.add_labels([("n0", 1.0, T0 + timedelta(days=6)), ("n1", 0.0, T0 + timedelta(days=6))])
    assert _dirty_days(store, rid) == {"2026-03-01", "2026-03-06"}
    second = _everything(store, rid, cutoff)
    assert second.traffic["1"].requests == first.traffic["1"].requests + 2
    assert store.evidence(rid).agreement["2"].n == 202
    acc = store.evidence(rid, cutoff).loss["accuracy"]
    assert acc[("1", "VIP", "2026-03-06")] == Moments(1, 1.0, 1.0)  # predicted 1, label 0
    assert _same(second, _rebuilt(store, rid, cutoff))


@pytest.mark.parametrize("hours", [36.0, 49.5, 0.0, 100.0])
def test_partial_day_cut_by_matured_before_matches_numpy(store: OutcomeStore, hours: float) -> None:
    """Days before the cut's day come from the summaries, the cut's day is computed live up to the cut."""
    frame, rid = _shadow_rollout(store, 400)
    store.evidence(rid).loss["log_loss"]  # summaries of every (uncut) day first
    cutoff = T0 + timedelta(hours=hours)
    for metric in ("log_loss", "accuracy"):
        got = store.evidence(rid, cutoff).loss[metric]
        matured = frame[frame.ts < cutoff.timestamp()].assign(
            day=lambda f: pd.to_datetime(f.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d"), loss=lambda f: _loss(metric, f))
        expected = {k: Moments.of(g.loss.to_numpy()) for k, g in matured.groupby(["version", "segment", "day"])}
        assert set(got) == set(expected)
        assert all(_close(got[k], expected[k]) for k in expected)
    conf = store.evidence(rid, cutoff).confusion
    v1 = frame[(frame.version == "1") & (frame.ts < cutoff.timestamp())]
    assert sum(c.tp + c.fp + c.fn + c.tn for (v, _), c in conf.items() if v == "1") == len(v1)
    assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_paired_with_another_champion_is_computed_live(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 200)
    cutoff = T0 + timedelta(hours=40)
    got = store.evidence(rid, cutoff, champion="2").paired["brier"]
    base = frame[frame.ts < cutoff.timestamp()]
    champ = base[base.version == "2"].set_index("request_id")
    chall = base[base.version == "1"].set_index("request_id")
    d = _loss("brier", chall) - _loss("brier", champ)
    day = pd.to_datetime(chall.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d")
    expected = {("1", seg, dd): Moments.of(g.to_numpy()) for (seg, dd), g in d.groupby([chall.segment, day])}
    assert set(got) == set(expected) and all(_close(got[k], expected[k]) for k in expected)
    assert store.evidence(rid, champion="2").agreement["1"].n == 200


def test_a_write_during_a_refresh_leaves_its_hour_dirty(store: OutcomeStore) -> None:
    """A writer marking an hour between a refresh's read and its save: the hour stays dirty, nothing is lost."""
    frame, rid = _shadow_rollout(store, 200)
    store.evidence(rid)  # summaries built
    _log(store, [{"request_id": "x1", "rollout_id": rid, "ts": T0, "version": "1", "served": 1, "prediction": 1.0}])
    refresh = store.summaries.read(rid)
    _log(store, [{"request_id": "x2", "rollout_id": rid, "ts": T0 + timedelta(minutes=5), "version": "1",
                  "served": 1, "prediction": 1.0}])  # another writer commits after the refresh read its rows
    assert store.summaries.save(refresh)
    assert refresh.sums.traffic["1"].requests == 201  # as of the refresh's snapshot
    assert _dirty_hours(store, rid) == {hour_of(T0.timestamp())}  # re-marked by the writer: not cleared
    assert store.evidence(rid).traffic["1"].requests == 202
    assert _dirty_hours(store, rid) == set()
    assert _same(_everything(store, rid, None), _rebuilt(store, rid, None))


def test_bulk_insert_drops_the_summaries_and_the_next_evaluation_rebuilds_them(store: OutcomeStore) -> None:
    frame, rid = _shadow_rollout(store, 100)
    assert store.evidence(rid).traffic["1"].requests == 100
    ts = (T0 + timedelta(days=1)).timestamp()
    store.bulk_insert("predictions", ["request_id", "rollout_id", "ts", "day", "version", "role", "served"],
                      [(f"b{i}", rid, ts, "2026-03-02", "1", "champion", 1) for i in range(5)])
    assert store.evidence(rid).traffic["1"].requests == 105


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
    _log(store, rows)
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
        lambda: _log(store, [  # the early label's prediction, and a late one into an old hour
            _pred(rid, "early", v, T0 + timedelta(hours=5), 1.0, 0.7) for v in ("1", "2")]
            + [_pred(rid, "edge", v, T0 + timedelta(hours=29), 0.0, 0.2) for v in ("1", "2")]),  # on a boundary
        lambda: store.add_labels([("edge", 1.0, later)]),
        lambda: (_log(store, [_pred(rid, "both", v, T0 + timedelta(hours=7), 1.0, 0.9) for v in ("1", "2")]),
                 store.add_labels([("both", 0.0, later), (first.request_id[60], 1.0 - first.label[60], later)])),
    ]
    for step in steps:
        step()
        check()


def test_a_label_change_refreshes_its_rows_only(store: OutcomeStore) -> None:
    """A relabel marks no hour: the next refresh applies (new label) - (old label) to its hour's sums."""
    frame, rid = _shadow_rollout(store, 300)
    cutoff = T0 + timedelta(days=10)
    before = store.evidence(rid, cutoff).loss["log_loss"]
    target = frame[frame.version == "2"].iloc[7]
    store.add_labels([(target.request_id, 1.0 - target.label, T0 + timedelta(days=5))])
    assert _dirty_hours(store, rid) == set()
    assert _changes(store, rid) == [(target.request_id, target.label, 1.0 - target.label)]
    store.add_labels([(target.request_id, 1.0 - target.label, T0 + timedelta(days=6))])  # same value: no change
    assert len(_changes(store, rid)) == 1
    after = store.evidence(rid, cutoff).loss["log_loss"]
    assert _changes(store, rid) == []
    both = frame[frame.request_id == target.request_id]  # the label scores the request's row of each version
    keys = {(v, s, day_of(t)) for v, s, t in zip(both.version, both.segment, both.ts, strict=True)}
    assert {k for k in after if not _close(after[k], before[k])} == keys
    assert all(after[k].n == before[k].n for k in keys)
    assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_a_refresh_stores_nothing_when_another_stored_since_its_snapshot(store: OutcomeStore) -> None:
    """Two evaluations refresh at once: the later save would apply the same deltas twice; it stores nothing."""
    frame, rid = _shadow_rollout(store, 200)
    cutoff = T0 + timedelta(days=10)
    store.evidence(rid)  # built
    target = frame[frame.version == "1"].iloc[3]
    store.add_labels([(target.request_id, 1.0 - target.label, T0 + timedelta(days=5))])
    _log(store, [_pred(rid, "new", v, T0 + timedelta(hours=2), 1.0, 0.8) for v in ("1", "2")])
    other = OutcomeStore(store.url, clock=store.clock)
    try:
        mine = store.summaries.read(rid, cutoff.timestamp())
        theirs = other.evidence(rid, cutoff)  # refreshes and stores first
        assert _changes(store, rid) == [] and _dirty_hours(store, rid) == set()
        assert not store.summaries.save(mine)  # the version moved since its snapshot: it stores nothing
        assert _same(mine.sums, theirs) and _same(store.evidence(rid, cutoff), theirs)
        assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))
    finally:
        other.dispose()


def test_rows_on_hour_and_day_boundaries_count_once_at_every_cut(store: OutcomeStore) -> None:
    """Rows a hair before, on and after hour boundaries: the day Python's day_of gives them, and every cut
    (the cut's hour is computed live, earlier hours come from the summaries) counts each row once."""
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    base = (T0 + timedelta(days=1)).timestamp()  # midnight
    times = [base - 1e-6, base - 2.5e-7, base, base + 1e-6, base + 3600.0 - 1e-6, base + 3600.0]
    _log(store, [_pred(rid, f"b{i}", "1", t, 1.0, 0.9) for i, t in enumerate(times)])
    store.add_labels([(f"b{i}", 1.0, base + 7200) for i in range(len(times))])
    by_day = {key[2]: m.n for key, m in store.evidence(rid).loss["accuracy"].items()}
    assert by_day == {d: sum(day_of(t) == d for t in times) for d in {day_of(t) for t in times}}
    for cutoff in sorted({*times, *(t + 1e-7 for t in times), base - 3600.0, base + 7200.0}):
        n = sum(m.n for m in store.evidence(rid, cutoff).loss["accuracy"].values())
        assert n == sum(t < cutoff for t in times), cutoff
        assert _same(_everything(store, rid, cutoff), _rebuilt(store, rid, cutoff))


def test_logged_day_is_day_of_even_a_hair_before_midnight():
    midnight = 1_770_076_800.0  # 2026-02-03T00:00:00Z
    times = [midnight + d for d in (-86400.0, -1.0, -1e-3, -1e-6, -4e-7, 0.0, 1e-7, 3599.5, 86399.999999)]
    assert [day_of_cached(t) for t in times] == [day_of(t) for t in times]
    assert [day_of_cached(t) for t in times] == [day_of(t) for t in times]  # the second time from the cache


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
    _log(store, rows)
    # v1: units u0-u5 and the anonymous q25; v2: units u6-u9 and the anonymous q26-q29
    assert store.evidence(rid).units == {"1": 6 + 1, "2": 4 + 4}


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
        _log(store, rows)
        with store.engine.connect() as conn:
            expected = {str(v): int(n) for v, n in conn.execute(direct, {"r": rid})}
        assert store.evidence(rid).units == expected
    assert sum(expected.values()) > 200  # anonymous requests count one each


def test_a_store_from_before_unit_counts_rebuilds_its_summaries(store: OutcomeStore) -> None:
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "salt", T0)
    rows = [{"request_id": f"q{i}", "unit_id": f"u{i % 40}", "rollout_id": rid, "version": "12"[i % 40 % 2],
             "role": "champion", "served": 1, "prediction": 1.0, "ts": T0.timestamp() + i * 60} for i in range(200)]
    _log(store, rows)
    assert store.evidence(rid).units == {"1": 20, "2": 20}
    with store.engine.begin() as conn:  # as an older store: summaries built, no rollout_units table
        conn.exec_driver_sql("DROP TABLE rollout_units")
    upgraded = OutcomeStore(str(store.engine.url.render_as_string(hide_password=False)))
    _log(upgraded, [{**rows[0], "request_id": "late", "unit_id": "u-new", "ts": T0.timestamp() + 3 * 86400}])
    assert upgraded.evidence(rid).units == {"1": 21, "2": 20}  # every unit, not only those of later hours
    upgraded.dispose()


@pytest.mark.parametrize("mode,ids", [("shadow", "plain"), ("ab", "plain"), ("bandit", "plain"),
                                      ("shadow", "ulid"), ("ab", "ulid")])
def test_sql_evidence_equals_a_plain_python_pass(store: OutcomeStore, mode: str, ids: str) -> None:
    """The incrementally kept SQL summaries and the in-memory fake's one Python pass give the same sums: rows
    with errors, without scores or predictions, unlabelled, relabelled, anonymous, a third version, at cuts
    before, inside and after the traffic, after each of three rounds of writes. With the service's ULID request
    ids too, which SQLite keeps as 16 bytes: the label joins, the champion's rows and anonymous units by them."""
    from rollout.outcomes.ids import unpack
    from rollout.outcomes.memory import InMemoryStore

    fake = InMemoryStore(clock=lambda: T0)
    rng = np.random.default_rng(17)
    names = [f"q{k}" if ids == "plain" else unpack(rng.bytes(16)) for k in range(500)]
    weights = {} if mode == "shadow" else {"challenger": 0.3}
    rid = store.open_rollout(mode, {"champion": "1", "challenger": "2"}, weights, "salt", T0)
    assert fake.open_rollout(mode, {"champion": "1", "challenger": "2"}, weights, "salt", T0) == rid
    k = 0
    for round_ in range(3):
        rows, labels = [], []
        for _ in range(150):
            k += 1
            ts = T0.timestamp() + rng.uniform(0, 2.5 * 86400)
            unit = None if rng.random() < 0.2 else f"u{rng.integers(40)}"
            versions = ["1", "2"] if mode == "shadow" else [str(rng.choice(["1", "2", "3"], p=[0.6, 0.3, 0.1]))]
            for v in versions:
                score = float(rng.random())
                rows.append(PredictionRow(
                    names[k], v, "champion" if v == "1" else "challenger", ts, unit, rid,
                    served=mode != "shadow" or v == "1", propensity=float(rng.choice([0.3, 0.7])),
                    prediction=None if rng.random() < 0.05 else float(score >= 0.5),
                    score=None if rng.random() < 0.1 else score, latency_ms=float(rng.lognormal(1, 0.5)),
                    error="boom" if rng.random() < 0.05 else None, segment=str(rng.choice(["VIP", "standard"]))))
            if rng.random() < 0.8:
                labels.append((names[k], float(rng.random() < 0.4), ts + 3600))
        if round_ == 2:  # relabel some earlier requests
            labels += [(names[i], 1.0, T0.timestamp() + 4 * 86400) for i in range(1, 40, 3)]
        for target in (store, fake):
            target.log_predictions(rows)
            target.add_labels(labels)
        for cutoff in (None, T0 + timedelta(hours=5), T0 + timedelta(hours=30, minutes=7), T0 + timedelta(days=9)):
            sql, ref = store.evidence(rid, cutoff), fake.evidence(rid, cutoff)
            for name in ("loss", "paired", "confusion", "agreement", "ipw", "traffic", "units"):
                assert _same(getattr(sql, name), getattr(ref, name)), (name, cutoff)
            # PostgreSQL rounds the latency bucket where SQLite (and the fake) truncate: compare quantiles
            for v, p99 in ref.latency_quantile(0.99).items():
                assert abs(sql.latency_quantile(0.99)[v] / p99 - 1) < 0.03


def test_a_store_made_before_gives_back_the_indexes_no_query_needs(store_url: str) -> None:
    """ix_predictions_rollout (21 B a row on SQLite, 32 on PostgreSQL), ix_predictions_ts (18 B, 23) and SQLite's
    covering ix_predictions_eval (83 B) were dropped from the schema, and the time index lost its day (12 B on
    SQLite, 10 on PostgreSQL): reopening an older store drops them and makes the partial ix_predictions_features
    and ix_predictions_time, and the rollout's first and last times still come from the time index."""
    from sqlalchemy import inspect, text

    from rollout.outcomes.partitions import log_source

    s = OutcomeStore(store_url, clock=lambda: T0).create()
    log = log_source(s.engine).name  # the table (PostgreSQL keeps the log in prediction_log, behind the view)
    with s.engine.begin() as conn:  # as a store from before had them
        conn.execute(text(f"CREATE INDEX ix_predictions_rollout ON {log} (rollout_id, version, ts)"))
        conn.execute(text(f"CREATE INDEX ix_predictions_ts ON {log} (ts)"))
        conn.execute(text(f"CREATE INDEX ix_predictions_eval ON {log} (rollout_id, request_id, version, error, "
                          "prediction, score, ts, segment, day, probabilities)"))
        conn.execute(text("DROP INDEX ix_predictions_features"))
        conn.execute(text("DROP INDEX ix_predictions_time"))  # the time index was (rollout_id, day, ts)
        conn.execute(text(f"CREATE INDEX ix_predictions_day ON {log} (rollout_id, day, ts)"))
    rid = s.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    s.log_predictions([PredictionRow(f"r{i}", "1", ts=T0 + timedelta(hours=20 * i), rollout_id=rid)
                       for i in range(5)])
    s.dispose()
    s = OutcomeStore(store_url, clock=lambda: T0).create()
    names = {ix["name"] for ix in inspect(s.engine).get_indexes(log)}
    assert "ix_predictions_features" in names
    assert not names & {"ix_predictions_rollout", "ix_predictions_ts", "ix_predictions_eval"}
    assert "ix_predictions_time" in names and "ix_predictions_day" not in names
    assert s.first_seen(rid) == T0 and s.last_seen(rid) == T0 + timedelta(hours=80)
    assert s.first_seen(rid + 1) is None
    s.dispose()


def test_a_label_that_arrives_before_its_prediction_row_counts_once_the_row_is_written(store: OutcomeStore) -> None:
    """With `rollout serve --workers N` (or a log writer's linger) a label can reach the store before its request's
    row: it is kept as unknown, and counts once the row is written, in a first evaluation and in a later one."""
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s", T0)

    def row(request_id: str, version: str, prediction: float, hours: float) -> dict[str, Any]:
        return {"request_id": request_id, "rollout_id": rid, "ts": T0 + timedelta(hours=hours), "version": version,
                "role": "champion" if version == "1" else "challenger", "served": version == "1",
                "prediction": prediction, "score": 0.8 if prediction else 0.2}

    early = store.add_labels([("a", 1, T0 + timedelta(hours=2))])  # before any row of "a"
    assert early.unknown == 1
    _log(store, [row("a", "1", 1.0, 1), row("a", "2", 0.0, 1)])
    first = store.evidence(rid, T0 + timedelta(days=3))
    assert {v: m.n for (v, *_), m in first.loss["accuracy"].items()} == {"1": 1, "2": 1}

    late = store.add_labels([("b", 0, T0 + timedelta(hours=5))])  # the summaries exist now: the incremental path
    assert late.unknown == 1
    _log(store, [row("b", "1", 1.0, 4), row("b", "2", 0.0, 4)])
    second = store.evidence(rid, T0 + timedelta(days=3))
    accuracy = {v: (m.n, m.total) for (v, *_), m in second.loss["accuracy"].items()}
    assert accuracy == {"1": (2, 1.0), "2": (2, 1.0)}  # each version wrong once (loss 1), right once
    paired = {v: m.n for (v, *_), m in second.paired["accuracy"].items()}
    assert paired == {"2": 2}  # both requests paired with the champion's row
