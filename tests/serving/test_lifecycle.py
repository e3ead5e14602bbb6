"""Hot reload on alias moves, serving through a registry outage, and a graceful shutdown that loses nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from rollout.registry import InMemoryRegistry
from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.ids import unpack
from tests.serving.conftest import FakeModel, SleepingModel, app_for, make_policy, record, serve


@pytest.mark.anyio
async def test_alias_move_reloads_without_dropped_requests(store: OutcomeStore) -> None:
    reg = InMemoryRegistry()
    reg.set_alias("champion", reg.add(FakeModel(0.0)))
    new = reg.add(FakeModel(5.0))
    app = app_for(make_policy(reload_interval_s=0.05), reg, store)
    statuses: list[int] = []
    versions: list[str] = []
    async with serve(app) as client:

        async def hammer(stop: float) -> None:
            i = 0
            while time.perf_counter() < stop:
                response = await client.post("/predict", json={"record": record(i)})
                statuses.append(response.status_code)
                versions.append(response.json().get("version"))
                i += 1

        stop = time.perf_counter() + 0.6
        workers = [asyncio.create_task(hammer(stop)) for _ in range(4)]
        await asyncio.sleep(0.15)
        reg.set_alias("champion", new)  # the poller notices within reload_interval_s
        await asyncio.gather(*workers)
        health = (await client.get("/healthz")).json()
    assert set(statuses) == {200}
    assert versions[0] == "1" and versions[-1] == new and health["champion"] == new
    switched = versions.index(new)
    assert set(versions[switched + 8 :]) == {new}  # once swapped, the old version is gone (a few in flight finish)


@pytest.mark.anyio
async def test_registry_outage_keeps_loaded_models_serving(store: OutcomeStore, registry: InMemoryRegistry) -> None:
    app = app_for(make_policy(reload_interval_s=0.02), registry, store)
    async with serve(app) as client:
        registry.unreachable = True
        await asyncio.sleep(0.1)
        response = await client.post("/predict", json={"record": record(1)})
        health = await client.get("/healthz")
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200 and response.json()["version"] == "1"
    assert health.status_code == 200 and health.json()["registry_reachable"] is False
    assert "rollout_reload_errors_total 0" not in metrics


class SlowStore:
    """Wraps the store; each insert takes a while, so rows pile up in the log queue."""

    def __init__(self, store: OutcomeStore, delay: float) -> None:
        self.store = store
        self.delay = delay

    def log_predictions(self, rows: list[PredictionRow]) -> int:
        time.sleep(self.delay)
        return self.store.log_predictions(rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.mark.anyio
async def test_graceful_shutdown_drains_the_log_queue(store: OutcomeStore, registry: InMemoryRegistry) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    app = app_for(make_policy(log_batch_size=20), registry, SlowStore(store, 0.02))
    async with serve(app) as client:
        for start in range(0, 200, 50):
            await asyncio.gather(*(client.post("/predict", json={"record": record(i)}) for i in range(start, start + 50)))
        depth = app.state.service.writer.pending  # queued, or held by a shadow job that logs them with its own
    assert depth > 0  # rows were still to be written when shutdown began
    assert store.count_predictions() == 400  # 200 served + 200 shadow, nothing lost


@pytest.mark.anyio
async def test_a_full_log_queue_answers_503_so_no_answered_prediction_goes_unlogged(
        store: OutcomeStore, registry: InMemoryRegistry) -> None:
    app = app_for(make_policy(log_queue_size=10, log_batch_size=5), registry, SlowStore(store, 0.2))
    async with serve(app) as client:
        responses = await asyncio.gather(*(client.post("/predict", json={"record": record(i)}) for i in range(60)))
    answered = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(answered) + len(refused) == 60 and refused and answered
    assert all(r.headers["retry-after"] == "1" and "log queue full" in r.json()["detail"] for r in refused)
    assert store.count_predictions() == len(answered)  # every answer is in the log


class GatedStore:
    """Wraps the store; inserts wait until the gate opens, so the log queue stays as full as it got."""

    def __init__(self, store: OutcomeStore) -> None:
        import threading

        self.store = store
        self.gate = threading.Event()

    def log_predictions(self, rows: list[PredictionRow]) -> int:
        self.gate.wait(30)
        return self.store.log_predictions(rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.mark.anyio
async def test_once_the_log_queue_is_full_requests_are_refused_unparsed_until_it_is_half_empty(
        store: OutcomeStore, registry: InMemoryRegistry) -> None:
    gated = GatedStore(store)
    app = app_for(make_policy(log_queue_size=20, log_batch_size=5), registry, gated)
    async with serve(app) as client:
        try:
            first = []
            while len(first) < 100 and (not first or first[-1].status_code == 200):  # until the queue is full
                first.append(await client.post("/predict", json={"record": record(len(first))}))
            # Shedding: refused before the body is read as JSON (a broken body gets the 503, not its 400), and a
            # request that would fit is refused too while the queue is over half full (the writer holds at most
            # one batch of 5 at the gate, so at least 15 rows stay queued).
            broken = await client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
            one = await client.post("/predict", json={"record": record(100)})
            health = (await client.get("/healthz")).json()  # operators see it
            metrics = (await client.get("/metrics")).text
        finally:
            gated.gate.set()  # the writer catches up
        answered = [r for r in first if r.status_code == 200]
        assert 20 <= len(answered) <= 25 and first[-1].status_code == 503, [r.status_code for r in first]
        assert broken.status_code == 503 and broken.headers["retry-after"] == "1", broken.text
        assert "log queue full" in broken.json()["detail"] and one.status_code == 503
        assert health["status"] == "degraded" and any(r.startswith("shedding load") for r in health["reasons"]), health
        assert "rollout_shedding_load 1" in metrics
        deadline = time.monotonic() + 10
        while app.state.service.writer.depth > 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert (await client.get("/healthz")).json()["status"] == "ready"  # drained: nothing to report
        after = await client.post("/predict", json={"record": record(99)})
        broken = await client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert "rollout_shedding_load 0" in (await client.get("/metrics")).text
    assert after.status_code == 200, after.text
    assert broken.status_code == 400  # parsed again
    assert store.count_predictions() == len(answered) + 1  # every answered request logged


@pytest.mark.anyio
async def test_shadow_rows_never_take_the_room_an_answered_request_was_admitted_with(store: OutcomeStore) -> None:
    # The shadow lane queues its rows without a reservation (here in a thread; a shadow child's refused or failed
    # batches the same way): they may be dropped when the queue is full, an answered request's rows never.
    reg = InMemoryRegistry()
    reg.set_alias("champion", reg.add(SleepingModel(0.05)))  # the shadow's rows come in while it scores
    reg.set_alias("challenger", reg.add(FakeModel(1.0)))
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    app = app_for(make_policy(log_queue_size=10, log_batch_size=5, shadow_max_wait_ms=0.0), reg,
                  SlowStore(store, 0.1))
    async with serve(app) as client:
        responses = []
        for start in range(0, 120, 30):
            responses += await asyncio.gather(*(client.post("/predict", json={"record": record(i)})
                                                for i in range(start, start + 30)))
    answered = [r.json()["request_id"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    with store.engine.connect() as conn:
        served = {unpack(row[0]) for row in conn.exec_driver_sql(  # (SQLite keeps the service's ids as bytes)
            f"SELECT request_id FROM predictions WHERE served = 1 AND rollout_id = {rid}")}
    assert answered and refused  # the queue was full at times
    assert set(answered) <= served, f"{len(set(answered) - served)} answered requests have no served row"


@pytest.mark.anyio
async def test_with_drop_a_full_log_queue_serves_and_counts_what_it_drops(store: OutcomeStore,
                                                                          registry: InMemoryRegistry) -> None:
    app = app_for(make_policy(log_queue_size=10, log_batch_size=5, on_log_overflow="drop"), registry,
                  SlowStore(store, 0.2))
    async with serve(app) as client:
        responses = await asyncio.gather(*(client.post("/predict", json={"record": record(i)}) for i in range(60)))
        metrics = (await client.get("/metrics")).text
    assert {r.status_code for r in responses} == {200}
    dropped = int(next(line for line in metrics.splitlines() if line.startswith("rollout_log_dropped_total")).split()[1])
    assert dropped > 0 and store.count_predictions() == 60 - dropped


class ForgetfulRegistry(InMemoryRegistry):
    """A registry that answers no aliases at all (the model deleted by mistake) must not unload the champion."""

    def aliases(self) -> dict[str, str]:
        return {} if self.unreachable else super().aliases()


@pytest.mark.anyio
async def test_empty_alias_answer_keeps_the_champion(store: OutcomeStore) -> None:
    reg = ForgetfulRegistry()
    reg.set_alias("champion", reg.add(FakeModel()))
    async with serve(app_for(make_policy(reload_interval_s=0.02), reg, store)) as client:
        reg.unreachable = True
        await asyncio.sleep(0.1)
        response = await client.post("/predict", json={"record": record(1)})
    assert response.status_code == 200 and response.json()["version"] == "1"
