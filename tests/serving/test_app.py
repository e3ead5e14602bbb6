"""The HTTP contract: predictions, input checks, size bounds, tokens, labels, routing, health, metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from rollout.registry import InMemoryRegistry
from rollout.outcomes import OutcomeStore
from rollout.outcomes.schema import labels, predictions
from tests.serving.conftest import AUTH, FakeModel, app_for, make_policy, record


@pytest.fixture
def client(registry: InMemoryRegistry, store: OutcomeStore):
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt")
    with TestClient(app_for(make_policy(max_request_rows=5), registry, store)) as c:
        yield c


def test_single_and_batch_predictions_name_request_and_version(client: TestClient) -> None:
    one = client.post("/predict", json={"record": {"income": 2.0, "tier": "VIP", "purpose": None}, "unit_id": "c1"})
    assert one.status_code == 200
    body = one.json()
    assert body["prediction"] == 1 and body["version"] == "1" and body["role"] == "champion" and len(body["request_id"]) == 26
    assert body["score"] == pytest.approx(0.8808, abs=1e-4)
    batch = client.post("/predict", json={"records": [record(0), {**record(1), "customer_id": "c9"}], "request_ids": ["a", "b"]})
    assert batch.status_code == 200
    assert [p["request_id"] for p in batch.json()["predictions"]] == ["a", "b"]
    assert [p["version"] for p in batch.json()["predictions"]] == ["1", "1"]


def test_generated_request_ids_are_ulids_in_time_order(client: TestClient) -> None:
    import time

    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    ids = []
    for i in range(3):
        ids.append(client.post("/predict", json={"record": record(i)}).json()["request_id"])
        time.sleep(0.003)  # ids of different milliseconds
    assert all(len(i) == 26 and set(i) <= set(crockford) and i[0] <= "7" for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 3  # later requests sort later: the store's indexes append
    value = 0
    for ch in ids[-1]:
        value = value * 32 + crockford.index(ch)
    now_ms = time.time_ns() // 1_000_000
    assert 0 <= now_ms - (value >> 80) < 60_000  # the leading 48 bits are the Unix time in ms


def test_a_batch_requests_ids_are_consecutive_ulids_each_its_own(registry: InMemoryRegistry,
                                                                 store: OutcomeStore) -> None:
    """A request's ids are made at once (a prefix shared by up to 1,024 of them): each a ULID of its own,
    consecutive in value and so in order, after the previous request's, whatever the low bits carry."""
    import base64

    from rollout.outcomes.ids import TO_CROCKFORD, pack, unpack

    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt")
    ids = []
    with TestClient(app_for(make_policy(max_request_rows=1000), registry, store)) as client:
        before = client.post("/predict", json={"record": record(0)}).json()["request_id"]
        for _ in range(3):  # 3,000 ids: the shared prefix moves on at least twice
            body = {"records": [record(i) for i in range(1000)]}
            ids += [a["request_id"] for a in client.post("/predict", json=body).json()["predictions"]]
    values = []
    for rid in ids:
        value = 0
        for ch in rid:
            value = value * 32 + crockford.index(ch)
        values.append(value)
        # the same characters as base32 of the whole 128-bit value
        assert rid == base64.b32encode(value.to_bytes(20, "big")).translate(TO_CROCKFORD)[6:].decode()
        assert pack(rid) == value.to_bytes(16, "big") and unpack(pack(rid)) == rid  # as SQLite keeps it
    assert all(b == a + 1 for a, b in zip(values[:1000], values[1:1000], strict=False))  # within a request
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    assert len(set(ids)) == 3000 and ids == sorted(ids) and before < ids[0]
    assert len({v >> 10 for v in values}) >= 3  # the shared prefix moved on at least twice


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        ({"record": {"tier": "VIP"}}, "income", 422),  # missing column
        ({"record": {"income": 1.0, "tier": "VIP", "colour": "red"}}, "colour", 422),  # unknown column
        ({"record": {"income": "high", "tier": "VIP"}}, "income", 422),  # wrong type
        ({"record": {"income": 1.0, "tier": 3}}, "tier", 422),  # wrong type
        ({"record": {"income": None, "tier": "VIP"}}, "income", 422),  # null where not nullable
        ({"records": [record(0), {"income": True, "tier": "VIP"}]}, "records[1].income", 422),
        ({"records": []}, "records", 422),
        ({"record": [1, 2, 3]}, "record:", 422),  # the field as the caller wrote it, not records[0]
        ({"inputs": [1, 2]}, "inputs[0]", 422),
        ({"inputs": [[1, 2]]}, "inputs[0]", 422),  # a row of the wrong width
        ({"dataframe_split": {"columns": ["income"], "data": [[1.0, 2.0]]}}, "dataframe_split.data[0]", 422),
        ({"instances": [{"income": 1.0}], "inputs": [{"income": 1.0}]}, "body", 422),
        ({"records": [record(i) for i in range(6)]}, "records", 413),  # max_request_rows = 5
    ],
)
def test_bad_requests_get_4xx_naming_the_field(client: TestClient, body: dict, field: str, status: int) -> None:
    response = client.post("/predict", json=body)
    assert response.status_code == status
    assert response.json()["detail"].startswith(field)


def test_nullable_column_accepts_null_and_absence(client: TestClient) -> None:
    assert client.post("/predict", json={"record": {"income": 1.0, "tier": "gold", "purpose": None}}).status_code == 200
    assert client.post("/predict", json={"record": {"income": 1.0, "tier": "unseen-tier"}}).status_code == 200


def test_oversized_body_is_413(client: TestClient) -> None:
    big = {"record": {"income": 1.0, "tier": "x" * 200_000}}
    assert client.post("/predict", json=big).status_code == 413


def test_label_endpoint_needs_the_token(client: TestClient) -> None:
    labels = {"labels": [{"request_id": "r1", "label": 1}]}
    assert client.post("/labels", json=labels).status_code == 401
    assert client.post("/labels", json=labels, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.put("/routing", json={"mode": "ab"}).status_code == 401


def test_explicit_timestamp_is_recorded_and_needs_the_token(client: TestClient, store: OutcomeStore) -> None:
    body = {"record": record(0), "ts": "2026-02-03T04:05:06+00:00"}
    assert client.post("/predict", json=body).status_code == 403
    rid = client.post("/predict", json=body, headers=AUTH).json()["request_id"]
    client.portal.call(client.app.state.service.stop)  # drains the shadow lane and the log queue
    p = predictions
    with store.engine.connect() as conn:  # (by the column: SQLite keeps the service's ids as 16 bytes)
        rows = conn.execute(select(p.c.role, p.c.ts, p.c.day).where(p.c.request_id == rid).order_by(p.c.role)).all()
    assert rows == [("challenger", 1770091506.0, "2026-02-03"), ("champion", 1770091506.0, "2026-02-03")]


def test_labels_twice_later_wins_and_unknown_kept(client: TestClient, store: OutcomeStore) -> None:
    rid = client.post("/predict", json={"record": record(3)}).json()["request_id"]
    first = client.post("/labels", json={"labels": [{"request_id": rid, "label": 0, "ts": 1_800_000_000}]}, headers=AUTH)
    assert first.json() == {"stored": 1, "replaced": 0, "unknown": 0, "unknown_ids": []}
    second = client.post(
        "/labels",
        json={"labels": [{"request_id": rid, "label": 1, "ts": 1_800_000_100}, {"request_id": "nobody", "label": 1}]},
        headers=AUTH,
    )
    assert second.status_code == 200
    assert second.json() == {"stored": 2, "replaced": 1, "unknown": 1, "unknown_ids": ["nobody"]}
    with store.engine.connect() as conn:
        rows = conn.execute(select(labels.c.label, labels.c.current).where(labels.c.request_id == rid)
                            .order_by(labels.c.id)).all()
    assert rows == [(0.0, 0), (1.0, 1)]
    bad = client.post("/labels", json={"labels": [{"request_id": rid, "label": "yes"}]}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("labels[0].label")


def test_routing_get_and_put(client: TestClient, store: OutcomeStore) -> None:
    view = client.get("/routing").json()
    assert view["mode"] == "shadow" and view["shadows"] == [{"role": "challenger", "version": "2"}]
    moved = client.put("/routing", json={"mode": "ab", "weights": {"challenger": 0.2}}, headers=AUTH)
    assert moved.status_code == 200
    assert [(a["version"], a["weight"]) for a in moved.json()["arms"]] == [("1", pytest.approx(0.8)), ("2", 0.2)]
    rollout = store.current_rollout()
    assert rollout is not None and rollout.mode == "ab"
    reweighted = client.put("/routing", json={"weights": {"challenger": 0.4}}, headers=AUTH).json()
    assert reweighted["rollout_id"] == rollout.rollout_id and reweighted["arms"][1]["weight"] == 0.4
    assert client.put("/routing", json={"mode": "canary"}, headers=AUTH).json()["detail"].startswith("mode")
    assert client.put("/routing", json={"weights": {"challenger": 1.5}}, headers=AUTH).status_code == 422
    ended = client.put("/routing", json={"end": True, "reason": "manual stop"}, headers=AUTH).json()
    assert ended["mode"] == "champion-only" and store.current_rollout() is None


def test_healthz_is_503_until_a_champion_loads(store: OutcomeStore) -> None:
    registry = InMemoryRegistry()
    app = app_for(make_policy(), registry, store)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 503
        assert c.post("/predict", json={"record": record(0)}).status_code == 503
        registry.set_alias("champion", registry.add(FakeModel()))
        c.portal.call(app.state.service.refresh)
        assert c.get("/healthz").json()["champion"] == "1"


def test_metrics_show_requests_errors_latency_and_queue(client: TestClient) -> None:
    for i in range(3):
        client.post("/predict", json={"record": record(i)})
    text = client.get("/metrics").text
    assert 'rollout_requests_total{version="1",role="champion"} 3' in text
    assert 'rollout_errors_total{version="1",role="champion"} 0' in text
    assert 'rollout_latency_seconds_count{version="1",role="champion"} 3' in text
    assert "rollout_log_queue_depth" in text and "rollout_log_dropped_total 0" in text
    assert 'rollout_model_info{role="challenger",version="2",mode="shadow"} 1' in text
