"""A hung or crashing challenger in ab, abn or bandit mode never hangs, fails or kills its callers."""

from __future__ import annotations

import asyncio
import time

import pytest

from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from tests.serving.conftest import DyingModel, FakeModel, SleepingModel, app_for, make_policy, record, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # challengers in child processes

MODES = {"ab": {"challenger": 0.5}, "abn": {"challenger": 0.3, "challenger-2": 0.3}, "bandit": {}}


def _world(tmp_path, mode: str, challenger: FakeModel) -> tuple[InMemoryRegistry, OutcomeStore]:
    registry = InMemoryRegistry()
    registry.set_alias("champion", registry.add(FakeModel(0.0)))
    registry.set_alias("challenger", registry.add(challenger))
    versions = {"champion": "1", "challenger": "2"}
    if mode == "abn":
        registry.set_alias("challenger-2", registry.add(type(challenger)(*_args(challenger))))
        versions["challenger-2"] = "3"
    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    store.open_rollout(mode, versions, MODES[mode], "salt")
    return registry, store


def _args(model: FakeModel) -> tuple:
    return (model.seconds,) if isinstance(model, SleepingModel) else ()


async def _traffic(client, n: int, poison: set[int] = frozenset()) -> tuple[list, list[float]]:
    async def one(i: int) -> tuple:
        body = {"record": {**record(i), "income": 500.0} if i in poison else record(i), "unit_id": f"u{i}"}
        t0 = time.perf_counter()
        response = await client.post("/predict", json=body)
        return response, time.perf_counter() - t0

    out = await asyncio.gather(*(one(i) for i in range(n)))
    return [r for r, _ in out], [t for _, t in out]


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_a_hung_challenger_costs_callers_its_deadline_and_no_more(tmp_path, mode: str) -> None:
    registry, store = _world(tmp_path, mode, SleepingModel(60.0))
    policy = make_policy(challenger_timeout_ms=300.0, challenger_isolation="process")
    async with serve(app_for(policy, registry, store)) as client:  # starts once the children hold their models
        responses, latencies = await _traffic(client, 40)
        health = (await client.get("/healthz")).json()
    assert [r.status_code for r in responses] == [200] * 40  # 0 caller errors
    assert {r.json()["version"] for r in responses} == {"1"}  # the champion answered every request
    # the deadline (0.3 s) plus the champion's own time; a caller waiting on the hang would take 60 s
    assert max(latencies) < 0.3 + 2.0
    assert health["status"] == "degraded" and any("missed its deadline" in r for r in health["reasons"])


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_a_challenger_that_kills_its_process_harms_no_caller(tmp_path, mode: str) -> None:
    registry, store = _world(tmp_path, mode, DyingModel())
    policy = make_policy(challenger_timeout_ms=2000.0, challenger_isolation="process")
    async with serve(app_for(policy, registry, store)) as client:  # starts once the children hold their models
        poisoned, _ = await _traffic(client, 30, poison=set(range(0, 30, 3)))
        after: list = []
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:  # a new child starts; the champion answers the challengers' arms meanwhile
            answered, _ = await _traffic(client, 10)
            after += answered
            if any(r.json()["version"] != "1" for r in answered):
                break
            await asyncio.sleep(0.5)
    assert {r.status_code for r in poisoned + after} == {200}  # the service lived through the crashes
    assert any(r.json()["version"] != "1" for r in after)  # a new child answers its arm again
