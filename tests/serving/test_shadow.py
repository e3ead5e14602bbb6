"""A challenger that raises, hangs or returns garbage never changes a caller's answer or latency."""

from __future__ import annotations

import asyncio
import time

import pytest

from rollout.registry import InMemoryRegistry
from rollout.outcomes import OutcomeStore
from tests.serving.conftest import (AUTH, DyingModel, FakeModel, GarbageModel, RaisingModel, SleepingModel, app_for,
                                    make_policy, record, serve)


def _registry(challenger: FakeModel) -> InMemoryRegistry:
    reg = InMemoryRegistry()
    reg.set_alias("champion", reg.add(FakeModel(0.0)))
    reg.set_alias("challenger", reg.add(challenger))
    return reg


async def _traffic(client, n: int) -> tuple[list[dict], list[float]]:
    async def one(i: int) -> tuple[dict, float]:
        t0 = time.perf_counter()
        response = await client.post("/predict", json={"record": record(i), "unit_id": f"u{i}", "request_id": f"r{i}"})
        assert response.status_code == 200, response.text
        return response.json(), time.perf_counter() - t0

    out = await asyncio.gather(*(one(i) for i in range(n)))
    return [o[0] for o in out], [o[1] for o in out]


async def _until(condition, timeout_s: float = 20.0) -> None:
    """Wait for the shadow lane to catch up (its child process takes a second or two to start)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for shadow rows"
        await asyncio.sleep(0.05)


def _rows(store: OutcomeStore, sql: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql(sql).all()


@pytest.mark.anyio
@pytest.mark.slow  # child processes
@pytest.mark.parametrize(("challenger", "logged_as"), [
    (RaisingModel(), "RuntimeError: challenger exploded"),
    (SleepingModel(30.0), "timeout: no answer within 6 s"),
    (GarbageModel(), "predict_proba returned shape (29, 2) for 30 rows"),
], ids=["raises", "hangs", "garbage"])
async def test_shadow_challenger_failures_are_invisible_to_callers(challenger: FakeModel, logged_as: str,
                                                                   tmp_path) -> None:
    baseline_store = OutcomeStore(f"sqlite:///{tmp_path / 'baseline.db'}").create()
    async with serve(app_for(make_policy(), _registry(FakeModel(1.0)), baseline_store)) as client:
        expected, _ = await _traffic(client, 30)

    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    # One shadow batch of all 30 requests: it waits for them, longer than any of them takes.
    policy = make_policy(shadow_timeout_s=6.0, shadow_max_wait_ms=4000.0, shadow_max_batch_size=30,
                         shadow_isolation="process")
    async with serve(app_for(policy, _registry(challenger), store)) as client:
        got, latencies = await _traffic(client, 30)
    strip = [{k: v for k, v in r.items() if k != "request_id"} for r in got]
    assert strip == [{k: v for k, v in r.items() if k != "request_id"} for r in expected]
    # Had a caller waited on the challenger it would have waited for its batch (4 s) or its timeout (6 s).
    assert max(latencies) < 2.0

    served = _rows(store, "SELECT count(*) FROM predictions WHERE served = 1 AND error IS NULL AND version = '1'")
    shadow = _rows(store, "SELECT error, count(*) FROM predictions WHERE served = 0 AND version = '2' GROUP BY error")
    assert served == [(30,)]
    assert shadow == [(logged_as, 30)]  # every shadow row is logged, as the challenger's error


@pytest.mark.anyio
@pytest.mark.slow  # child processes
async def test_a_challenger_that_kills_its_process_harms_nobody_and_is_restarted(tmp_path) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    policy = make_policy(shadow_max_wait_ms=1.0, shadow_timeout_s=30.0, shadow_isolation="process")
    poison = {**record(0), "income": 500.0}
    async with serve(app_for(policy, _registry(DyingModel()), store)) as client:
        before, _ = await _traffic(client, 10)
        await _until(lambda: _rows(store, "SELECT count(*) FROM predictions WHERE served = 0") == [(10,)])
        crash = await client.post("/predict", json={"record": poison, "request_id": "poison"})
        await _until(lambda: _rows(store, "SELECT count(*) FROM predictions WHERE served = 0") == [(11,)])
        after = [await client.post("/predict", json={"record": record(i), "request_id": f"late{i}"}) for i in range(5)]
    assert crash.status_code == 200 and crash.json()["version"] == "1"  # the champion answered the poison too
    assert all(r["version"] == "1" for r in before) and all(r.status_code == 200 for r in after)
    rows = dict(_rows(store, "SELECT request_id, coalesce(error, 'ok') FROM predictions WHERE served = 0"))
    assert "abruptly" in rows["poison"] or "BrokenProcessPool" in rows["poison"]  # logged, as the challenger's error
    assert all(rows[f"r{i}"] == "ok" for i in range(10))
    assert all(rows[f"late{i}"] == "ok" for i in range(5))  # a new child scored what came after the crash


@pytest.mark.anyio
async def test_ab_failing_challenger_falls_back_to_champion(store: OutcomeStore) -> None:
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "s")
    async with serve(app_for(make_policy(), _registry(RaisingModel()), store)) as client:
        got, _ = await _traffic(client, 40)
    assert {r["version"] for r in got} == {"1"}
    errors = _rows(store, f"SELECT count(*) FROM predictions WHERE rollout_id = {rid} AND version = '2' AND error LIKE '%exploded%'")
    served = _rows(store, f"SELECT count(*) FROM predictions WHERE rollout_id = {rid} AND version = '1' AND served = 1")
    assert 5 < errors[0][0] < 35 and served == [(40,)]
    assert store.evidence(rid).traffic["2"].errors == errors[0][0]


@pytest.mark.anyio
async def test_micro_batching_scores_concurrent_requests_in_one_call(store: OutcomeStore) -> None:
    champion = FakeModel(0.0)
    reg = InMemoryRegistry()
    reg.set_alias("champion", reg.add(champion))
    async with serve(app_for(make_policy(max_wait_ms=20.0, max_batch_size=64), reg, store)) as client:
        await _traffic(client, 40)
    assert sum(champion.calls) == 40 and len(champion.calls) < 10


@pytest.mark.anyio
@pytest.mark.slow  # child processes
@pytest.mark.postgres
@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_a_shadow_request_is_logged_as_one_paired_row_and_its_labels_find_it_at_once(isolation: str) -> None:
    """The served rows of a shadow request go with its shadow's job and are logged in one call with the shadow's
    rows (by its child, or by the service's sink when it scores in a thread): PostgreSQL stores each request as one
    row, and labels posted right after the answers find every request (the label endpoint waits for held rows)."""
    from tests.conftest import fresh_pg_database

    with fresh_pg_database("rollout_shadow_pairs") as url:
        store = OutcomeStore(url).create()
        rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
        policy = make_policy(shadow_isolation=isolation, shadow_max_wait_ms=200.0)
        async with serve(app_for(policy, _registry(FakeModel(1.0)), store)) as client:
            await _traffic(client, 40)
            labels = [{"request_id": f"r{i}", "label": i % 2} for i in range(40)]
            response = await client.post("/labels", json={"labels": labels}, headers=AUTH)
            assert response.status_code == 200, response.text
            assert response.json()["unknown"] == 0, response.json()
        assert _rows(store, "SELECT count(*), count(shadow_version) FROM prediction_log") == [(40, 40)]
        assert _rows(store, "SELECT version, served, count(*) FROM predictions GROUP BY 1, 2 ORDER BY 1") == \
            [("1", 1, 40), ("2", 0, 40)]
        evidence = store.evidence(rid)
        assert sum(m.n for m in evidence.paired["accuracy"].values()) == 40
        store.dispose()


@pytest.mark.anyio
async def test_a_burst_of_large_requests_is_shadow_scored_while_the_lane_has_a_quarter_of_the_log_queue(
        tmp_path) -> None:
    """A shadow lane holds a quarter of the log queue (here 1,000 rows) however small its batches (eight 20-row
    batches were its whole queue): a burst of large requests is scored by the challenger, not refused as "cannot
    keep up"; past that bound rows are refused, logged unscored, and the champion still answers every request."""
    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    policy = make_policy(log_queue_size=4000, shadow_max_batch_size=20, shadow_max_wait_ms=1.0, shadow_timeout_s=5.0)

    async def burst(client, tag: str, requests: int) -> None:
        async def one(k: int) -> None:
            ids = [f"{tag}{k}-{i}" for i in range(100)]
            body = {"records": [record(i) for i in range(100)], "unit_ids": ids}
            response = await client.post("/predict", json=body)
            assert response.status_code == 200, response.text
        await asyncio.gather(*(one(k) for k in range(requests)))

    async with serve(app_for(policy, _registry(SleepingModel(0.1)), store)) as client:
        await burst(client, "a", 8)  # 800 rows at once, the challenger scoring 100 rows a 0.1 s call
    refused = "SELECT count(*) FROM predictions WHERE served = 0 AND error LIKE 'queue full%'"
    assert _rows(store, refused) == [(0,)]
    assert _rows(store, "SELECT count(*) FROM predictions WHERE served = 0 AND error IS NULL") == [(800,)]

    async with serve(app_for(policy, _registry(SleepingModel(0.1)), store)) as client:
        await burst(client, "b", 16)  # 1,600 rows: more than the lane holds
    assert _rows(store, refused)[0][0] >= 500
    assert _rows(store, "SELECT count(*) FROM predictions WHERE served = 1") == [(2400,)]
    assert _rows(store, "SELECT count(*) FROM predictions WHERE served = 0") == [(2400,)]
