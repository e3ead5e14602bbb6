"""The admin bodies (labels, routing): declared in the OpenAPI document, refused naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from tests.serving.conftest import AUTH, app_for, make_policy


@pytest.fixture
def client(registry: InMemoryRegistry, store: OutcomeStore) -> Iterator[TestClient]:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt")
    with TestClient(app_for(make_policy(max_request_rows=2), registry, store)) as c:
        yield c


def test_openapi_declares_every_request_body(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def body(path: str, method: str) -> dict[str, Any]:
        schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    shapes = body("/predict", "post")["oneOf"]
    assert [s.get("required") for s in shapes] == [["record"], ["records"], ["dataframe_records"], None,
                                                   ["dataframe_split"]]
    assert shapes[3]["type"] == "array"
    # the other servers' protocols: MLflow's four JSON bodies, CSV and Parquet; the v2 inference request
    invocations = doc["paths"]["/invocations"]["post"]["requestBody"]["content"]
    assert [s["required"] for s in invocations["application/json"]["schema"]["oneOf"]] == [
        ["dataframe_split"], ["dataframe_records"], ["instances"], ["inputs"]]
    assert {"text/csv", "application/vnd.apache.parquet"} <= set(invocations)
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["required"] == ["inputs"]
    assert "error" in infer["responses"]["4XX"]["content"]["application/json"]["schema"]["properties"]
    labels = body("/labels", "post")["anyOf"]
    assert labels[0]["required"] == ["labels"] and labels[1]["type"] == "array"  # the bare list too
    assert schemas["LabelItem"]["required"] == ["request_id", "label"]
    routing = body("/routing", "put")
    assert routing["additionalProperties"] is False
    assert set(routing["properties"]) == {"mode", "versions", "weights", "salt", "end", "reason"}
    assert doc["paths"]["/labels"]["post"]["responses"]["4XX"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"}


@pytest.mark.parametrize(("payload", "field"), [
    ({"labels": [{"request_id": "r1", "label": "yes"}]}, "labels[0].label"),
    ([{"request_id": "r1", "label": 1}, {"request_id": "", "label": 1}], "labels[1].request_id"),  # the bare list
    ({"labels": [{"request_id": "r1", "label": 1, "ts": "last week"}]}, "labels[0].ts"),
    ({"labels": [{"label": 1}]}, "labels[0].request_id"),
    ({"labels": "r1"}, "labels"),
    ({}, "labels"),
])
def test_bad_label_bodies_are_422_naming_the_field(client: TestClient, payload: Any, field: str) -> None:
    response = client.post("/labels", json=payload, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}: ")


@pytest.mark.parametrize(("payload", "field"), [
    ({"mode": "canary"}, "mode"),
    ({"weights": {"challenger": 1.5}}, "weights.challenger"),
    ({"weights": {"challenger": "0.5"}}, "weights.challenger"),
    ({"weights": {"challenger": True}}, "weights.challenger"),
    ({"weights": {"champion": 0.6, "challenger": 0.6}}, "weights"),
    ({"versions": {"challenger": "2"}}, "versions"),
    ({"salt": 7}, "salt"),
    ({"colour": "red"}, "colour"),
    (["mode", "ab"], "body"),
])
def test_bad_routing_bodies_are_422_naming_the_field(client: TestClient, payload: Any, field: str) -> None:
    response = client.put("/routing", json=payload, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}: ")
    assert 'rollout_http_responses_total{path="/routing",status="422"}' in client.get("/metrics").text


def test_admin_bodies_keep_their_other_statuses(client: TestClient) -> None:
    bad_json = client.post("/labels", content=b"[{", headers={**AUTH, "content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["detail"].startswith("body: invalid JSON")
    many = [{"request_id": f"r{i}", "label": 1} for i in range(21)]  # 10 x max_request_rows = 20
    assert client.post("/labels", json=many, headers=AUTH).status_code == 413
    assert client.put("/routing", json={"salt": "x" * 70_000}, headers=AUTH).status_code == 413
    assert client.put("/routing", json={"mode": "ab"}, headers={"Authorization": "Bearer wrong"}).status_code == 403
    ended = client.put("/routing", json={"end": True}, headers=AUTH)
    assert ended.status_code == 200 and ended.json()["mode"] == "champion-only"
    again = client.put("/routing", json={"end": True}, headers=AUTH)
    assert again.status_code == 409 and again.json()["detail"].startswith("end")
