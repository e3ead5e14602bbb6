"""POST /predict answers alike on the direct ASGI path and through FastAPI's routed endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from serving.fastpath import App
from serving.http import path_label
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
    ("mlflow split frame", {"json": {"dataframe_split": {"columns": ["income", "tier"], "data": [[1.0, "gold"]]},
                                    "request_ids": ["m1"]}}),
]
INFER = "/v2/models/loan-approval/infer"
_COLUMNS = [{"name": "income", "shape": [2], "datatype": "FP64", "data": [1.0, -2.0]},
            {"name": "tier", "shape": [2, 1], "datatype": "BYTES", "data": [["gold"], ["VIP"]]}]
# The other protocols' predict paths take the same direct path: (path, case name, request).
PROTOCOL_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("/invocations", "split frame", {"json": {"dataframe_split": {"columns": ["income", "tier"],
                                                                   "data": [[1.0, "gold"], [2.0, "VIP"]]}},
                                     "headers": {"x-request-id": "inv-1"}}),
    ("/invocations", "csv", {"content": b"income,tier\n1.5,gold\n", "headers": {"content-type": "text/csv",
                                                                                 "x-request-id": "inv-2"}}),
    ("/invocations", "no content type", {"content": b"{}"}),
    ("/invocations", "wrong type", {"json": {"dataframe_records": [{"income": "high", "tier": "VIP"}]}}),
    ("/invocations", "oversized", {"json": {"dataframe_records": [{**record(0), "tier": "x" * LIMIT}]}}),
    (INFER, "columns", {"json": {"id": "oip-1", "inputs": _COLUMNS}}),
    (INFER, "bad shape", {"json": {"inputs": [dict(_COLUMNS[0], shape=[3])]}}),
    ("/v2/models/another/infer", "unknown model", {"json": {"inputs": _COLUMNS}}),
    ("/v2/models/loan-approval/versions/1/infer", "pinned, no token", {"json": {"inputs": _COLUMNS}}),
    ("/v2/models/loan-approval/versions/1/infer", "pinned", {"json": {"id": "p", "inputs": _COLUMNS},
                                                             "headers": AUTH}),
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


ALL_CASES = [("/predict", name, kwargs) for name, kwargs in CASES] + PROTOCOL_CASES


@pytest.mark.parametrize(("path", "name", "request_kwargs"), ALL_CASES, ids=[f"{c[0]} {c[1]}" for c in ALL_CASES])
def test_direct_and_routed_predict_answer_alike(client: TestClient, path: str, name: str,
                                                request_kwargs: dict[str, Any]) -> None:
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
        response = client.post(path, **kwargs)
        after = _counts(client)
        counted = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
        body = response.json()
        for answer in body.get("predictions", []) if isinstance(body, dict) else []:
            if isinstance(answer, dict):
                answer["request_id"] = len(answer["request_id"])  # a new UUIDv7 on each path
        if isinstance(body, dict) and "outputs" in body and not request_kwargs.get("json", {}).get("id"):
            body["id"] = len(body["id"])
        headers = {k: v for k, v in response.headers.items() if k.startswith("x-") or k == "retry-after"}
        answers.append((response.status_code, body, counted, headers))
    app.fast_predict = fast
    assert answers[0] == answers[1]
    status, body, counted, headers = answers[0]
    label = path_label(path)
    assert counted == {f'rollout_http_responses_total{{path="{label}",status="{status}"}}': 1.0}
    if status != 200:  # each protocol's own error shape
        shape = {"/predict": {"detail", "errors"}, "/invocations": {"error_code", "message", "errors"}}
        assert set(body) <= shape.get(path, {"error", "errors"}), body
    elif path != "/predict":  # the request's id comes back in a header, and it names the rows it logged
        assert headers["x-request-id"] and headers["x-model-version"]
