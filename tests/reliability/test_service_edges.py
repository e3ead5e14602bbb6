"""Values bound for the store are checked where they enter: a 422 naming the field, never a lost log batch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from tests.serving.conftest import AUTH, app_for, make_policy, record


@pytest.fixture
def client(registry: InMemoryRegistry, store: OutcomeStore) -> Iterator[TestClient]:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt")
    with TestClient(app_for(make_policy(), registry, store)) as c:
        yield c


@pytest.mark.parametrize(("body", "auth", "field"), [
    ({"record": record(0), "request_id": "x" * 65}, False, "request_id"),
    ({"records": [record(0), record(1)], "request_ids": ["a", "b\x00"]}, False, "request_ids[1]"),
    ({"record": record(0), "unit_id": "u" * 129}, False, "unit_id"),
    ({"record": {**record(0), "customer_id": "c\x00"}}, False, "records[0].customer_id"),
    ({"record": record(0), "ts": 1e300}, True, "ts"),
    ({"record": record(0), "ts": "1969-12-31T00:00:00Z"}, True, "ts"),
])
def test_ids_and_times_the_store_cannot_keep_are_a_422_naming_the_field(client: TestClient, body: dict, auth: bool,
                                                                         field: str) -> None:
    response = client.post("/predict", json=body, headers=AUTH if auth else {})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(field)


@pytest.mark.parametrize(("labels", "field"), [
    ([{"request_id": "r", "label": 7}], "labels[0].label"),  # a binary classifier's label is 0 or 1
    ([{"request_id": "r", "label": 1}, {"request_id": "x" * 65, "label": 1}], "labels[1].request_id"),
    ([{"request_id": "r", "label": 1, "ts": 1e300}], "labels[0].ts"),
])
def test_labels_the_evaluation_could_not_score_are_refused(client: TestClient, labels: list, field: str) -> None:
    response = client.post("/labels", json={"labels": labels}, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"].startswith(field), response.text


def test_routing_to_a_version_that_does_not_exist_or_starving_a_bandit_arm_is_refused(client: TestClient,
                                                                                     store: OutcomeStore) -> None:
    before = store.current_rollout()
    missing = client.put("/routing", json={"versions": {"champion": "1", "challenger": "999"}}, headers=AUTH)
    assert missing.status_code == 422 and missing.json()["detail"].startswith("versions.challenger")
    zeros = client.put("/routing", json={"mode": "bandit", "weights": {"champion": 0.0, "challenger": 0.0}},
                       headers=AUTH)
    assert zeros.status_code == 422 and zeros.json()["detail"].startswith("weights.")
    assert store.current_rollout() == before  # nothing changed


@pytest.mark.parametrize("body", [{"mode": "ab", "salt": "s\x00"}, {"end": True, "reason": "r\x00"},
                                  {"versions": {"champion": "1", "challenger": "2\x00"}}])
def test_routing_text_with_a_nul_byte_is_a_422_not_a_500(client: TestClient, body: dict) -> None:
    """Found by the fuzz run on PostgreSQL, which refuses NUL in any text column."""
    response = client.put("/routing", json=body, headers=AUTH)
    assert response.status_code == 422, response.text


def test_dead_lettered_rows_show_in_metrics(client: TestClient, store: OutcomeStore) -> None:
    from rollout.outcomes import PredictionRow

    store.log_predictions([PredictionRow("ok", "1"), PredictionRow("bad", "1", ts="not a time")])
    client.portal.call(client.app.state.service.refresh)
    assert "rollout_log_dead_letters 1" in client.get("/metrics").text


def test_a_deeply_nested_value_is_a_bounded_4xx_not_a_500(client: TestClient) -> None:
    nested: object = 1.0
    for _ in range(500):
        nested = [nested]
    response = client.post("/predict", json={"record": {"income": nested, "tier": "gold"}})
    assert response.status_code == 422 and response.json()["detail"].startswith("income")
    assert len(response.text) < 2000  # the value is not echoed back whole
    deeper = "[" * 100_000 + "]" * 100_000
    response = client.post("/predict", content=f'{{"record": {{"income": {deeper}}}}}',
                           headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    # the same by the other protocols, with a NaN so that the stdlib parser is tried too
    for path, body in (("/invocations", f'{{"instances": {deeper}, "x": NaN}}'),
                       ("/v2/models/loan-approval/infer",
                        f'{{"inputs": [{{"name": "income", "shape": [1], "datatype": "FP64", "data": {deeper}}}], '
                        '"x": NaN}')):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (path, response.text[:200])
    shallow = "[" * 900 + "1.0" + "]" * 900  # within the parser's depth: flattened, one value
    response = client.post("/v2/models/loan-approval/infer", json=None, content=(
        f'{{"inputs": [{{"name": "income", "shape": [1], "datatype": "FP64", "data": {shallow}}}, '
        '{"name": "tier", "shape": [1], "datatype": "BYTES", "data": ["gold"]}]}'),
        headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
