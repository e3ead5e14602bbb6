"""GET /label-requests: the service proposes which predictions to label, each with its inclusion probability."""

from __future__ import annotations

import asyncio

import pytest

from rollout.config import Policy
from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from tests.serving.conftest import AUTH, app_for, make_policy, record, serve


def _policy(enabled: bool = True) -> Policy:
    base = make_policy().model_dump(exclude={"base_dir"})
    return Policy.model_validate({**base, "rollout": {**base["rollout"], "label_requests": {"enabled": enabled}}})


async def _traffic(client, n: int, start: int = 0) -> None:
    for i in range(start, start + n, 50):
        body = {"records": [record(j) for j in range(i, min(i + 50, start + n))],
                "request_ids": [f"r{j}" for j in range(i, min(i + 50, start + n))]}
        response = await client.post("/predict", json=body)
        assert response.status_code == 200, response.text


async def _shadow_rows(store: OutcomeStore, n: int) -> None:
    for _ in range(400):
        if store.count_predictions() >= 2 * n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the shadow rows never reached the store")


@pytest.mark.anyio
async def test_label_requests_favour_disagreements_and_offer_each_request_once(registry: InMemoryRegistry,
                                                                              store: OutcomeStore) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    async with serve(app_for(_policy(), registry, store)) as client:
        await _traffic(client, 350)
        await _shadow_rows(store, 350)
        answer = (await client.get("/label-requests", params={"budget": 60}, headers=AUTH)).json()
        assert answer["considered"] == 350 and abs(answer["requested"] - 60) <= 1
        # The champion (shift 0) and challenger (shift 1) disagree only at income 1 (i % 7 == 4): 50 requests,
        # which the 0/1 loss makes the only informative ones: they are all drawn, with probability 1.
        drawn = {int(r["request_id"][1:]): r for r in answer["requests"]}
        disagree = {i for i in range(350) if i % 7 == 4}
        assert disagree <= set(drawn)
        assert all(drawn[i]["probability"] == 1.0 for i in disagree)
        assert all(r["probability"] < 0.1 for i, r in drawn.items() if i not in disagree)
        assert drawn[4]["features"] == record(4)

        again = (await client.get("/label-requests", params={"budget": 60}, headers=AUTH)).json()
        assert again["considered"] == 0 and again["requests"] == []  # nothing new was logged

        labels = [{"request_id": r["request_id"], "label": 1} for r in answer["requests"]]
        assert (await client.post("/labels", json={"labels": labels}, headers=AUTH)).status_code == 200
    rows = store.requested_rows(answer["rollout_id"])
    assert set(rows["request_id"]) == {r["request_id"] for r in answer["requests"]}
    assert rows["label"].notna().all()


@pytest.mark.anyio
async def test_label_requests_refuse_what_they_cannot_weigh(registry: InMemoryRegistry, store: OutcomeStore) -> None:
    async with serve(app_for(_policy(), registry, store)) as client:
        assert (await client.get("/label-requests", params={"budget": 5})).status_code == 401
        bad = await client.get("/label-requests", params={"budget": 0}, headers=AUTH)
        assert bad.status_code == 422 and "budget" in bad.json()["detail"]
        none_open = await client.get("/label-requests", params={"budget": 5}, headers=AUTH)
        assert none_open.status_code == 409 and "no rollout is open" in none_open.json()["detail"]
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    async with serve(app_for(_policy(enabled=False), registry, store)) as client:
        off = await client.get("/label-requests", params={"budget": 5}, headers=AUTH)
        assert off.status_code == 409 and "rollout.label_requests.enabled" in off.json()["detail"]
