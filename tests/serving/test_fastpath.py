"""POST /predict answers alike on the direct ASGI path and through FastAPI's routed endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from serving.fastpath import App
from tests.serving.conftest import AUTH, app_for, make_policy, record

LIMIT = 5 * 4096 + 65536  # max_request_rows=5: serving.http.body_limits
TS = "2026-02-03T04:05:06+00:00"

CASES: list[tuple[str, dict[str, Any]]] = [
    ("single", {"json": {"record": record(1), "unit_id": "u1", "request_id": "r1"}}),
    ("batch", {"json": {"records": [record(0), record(2)], "request_ids": ["a", "b"]}}),
    ("bare list", {"json": [{**record(3), "customer_id": "c3"}]}),  # the unit column makes the arm sticky
    ("bad JSON", {"content": b'{"record": ', "headers": {"content-type": "application/json"}}),
    ("oversized", {"json": {"record": {**record(0), "tier": "x" * LIMIT}}}),
    ("oversized, chunked", {"content": iter([b" " * 65536] * 2)}),
    ("missing field", {"json": {"record": {"tier": "VIP"}}}),
    ("wrong type", {"json": {"records": [record(0), {**record(1), "income": "high"}]}}),
    ("ts without token", {"json": {"record": record(0), "request_id": "t1", "ts": TS}}),
    ("ts with wrong token", {"json": {"record": record(0), "ts": TS}, "headers": {"Authorization": "Bearer no"}}),
    ("ts with token", {"json": {"record": record(0), "request_id": "t2", "ts": TS}, "headers": AUTH}),
    ("bad ts", {"json": {"record": record(0), "ts": "yesterday"}, "headers": AUTH}),
    ("empty records", {"json": {"records": []}}),
    ("too many records", {"json": {"records": [record(i) for i in range(6)]}}),
    ("no records", {"json": {"inputs": [1, 2]}}),
]


@pytest.fixture
def client(registry: InMemoryRegistry, store: OutcomeStore) -> Iterator[TestClient]:
    store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "salt")
    with TestClient(app_for(make_policy(max_request_rows=5), registry, store)) as c:
        yield c


def _counts(client: TestClient) -> dict[str, float]:
    lines = client.get("/metrics").text.splitlines()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in lines)
            if k.startswith("rollout_http_responses_total{")}


@pytest.mark.parametrize(("name", "request_kwargs"), CASES, ids=[c[0] for c in CASES])
def test_direct_and_routed_predict_answer_alike(client: TestClient, name: str, request_kwargs: dict[str, Any]) -> None:
    app = client.app
    assert isinstance(app, App) and app.fast_predict is not None
    fast = app.fast_predict
    answers = []
    for direct in (True, False):
        app.fast_predict = fast if direct else None
        before = _counts(client)
        kwargs = dict(request_kwargs)
        if "content" in kwargs and not isinstance(kwargs["content"], bytes):
            kwargs["content"] = iter([b" " * 65536] * 2)  # a fresh stream for each path
        response = client.post("/predict", **kwargs)
        after = _counts(client)
        counted = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
        body = response.json()
        for answer in body.get("predictions", []) if isinstance(body, dict) else []:
            answer["request_id"] = len(answer["request_id"])  # a new UUIDv7 on each path
        answers.append((response.status_code, body, counted))
    app.fast_predict = fast
    assert answers[0] == answers[1]
    status, body, counted = answers[0]
    assert counted == {f'rollout_http_responses_total{{path="/predict",status="{status}"}}': 1.0}
    if status != 200:
        assert set(body) <= {"detail", "errors"}
