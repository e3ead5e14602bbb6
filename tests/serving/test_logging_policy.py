"""What the prediction log keeps: serving.log_features (all, none, a fraction, columns) and data.pii_columns
(never in clear: dropped, or a keyed hash that keeps the unit joinable and the routing sticky)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select

from rollout.config import Policy
from rollout.outcomes import OutcomeStore
from rollout.outcomes.features import Decoder
from rollout.outcomes.redaction import ConfigurationError
from rollout.outcomes.schema import predictions
from rollout.registry import InMemoryRegistry
from tests.serving.conftest import app_for

THREADS = {"max_wait_ms": 2.0, "shadow_max_wait_ms": 10.0, "shadow_isolation": "thread",
           "challenger_isolation": "thread", "reload_interval_s": 60.0}


def _policy(serving: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> Policy:
    return Policy.model_validate({"serving": {**THREADS, **(serving or {})}, "data": data or {}})


def _served(policy: Policy, registry: InMemoryRegistry, store: OutcomeStore, n: int = 200) -> list[Any]:
    with TestClient(app_for(policy, registry, store)) as client:
        for i in range(n):
            body = {"record": {"income": float(i % 5), "tier": "gold", "purpose": f"p{i % 3}",
                               "customer_id": f"c{i % 20}"}}
            assert client.post("/predict", json=body).status_code == 200
    with store.engine.connect() as conn:  # the stored features as the object they stand for (rollout.outcomes.features)
        decode = Decoder(conn)
        return [SimpleNamespace(request_id=r.request_id, unit_id=r.unit_id, features=decode.text(r.features),
                                version=r.version)
                for r in conn.execute(select(predictions.c.request_id, predictions.c.unit_id, predictions.c.features,
                                             predictions.c.version).where(predictions.c.served == 1))]


@pytest.mark.parametrize(("setting", "check"), [
    ("all", lambda kept: all(set(f) == {"income", "tier", "purpose"} for f in kept)),
    ("none", lambda kept: kept == []),
    (["income"], lambda kept: all(set(f) == {"income"} for f in kept) and len(kept) == 200),
    (0.25, lambda kept: 25 <= len(kept) <= 75),  # 50 expected of 200; chosen by a hash of the request id
])
def test_log_features_keeps_what_it_says(registry: InMemoryRegistry, store: OutcomeStore, setting: Any,
                                         check: Any) -> None:
    rows = _served(_policy({"log_features": setting}), registry, store)
    assert len(rows) == 200  # every prediction is logged, whatever its features
    kept = [json.loads(r.features) for r in rows if r.features is not None]
    assert check(kept), kept[:3]


def test_pii_columns_are_dropped_or_hashed_never_stored_in_clear(registry: InMemoryRegistry, store: OutcomeStore,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    dropped = _served(_policy(data={"pii_columns": ["purpose"]}), registry, store, n=20)
    assert all("purpose" not in json.loads(r.features) for r in dropped)
    assert {r.unit_id for r in dropped} == {f"c{i}" for i in range(20)}  # not PII here: kept as sent


def test_a_hashed_unit_stays_joinable_and_sticky(registry: InMemoryRegistry, tmp_path: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLOUT_PII_KEY", "k1")
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "salt")
    policy = _policy(data={"pii_columns": ["purpose", "customer_id"], "pii_action": "hash"})
    rows = _served(policy, registry, store)
    units = {r.unit_id for r in rows}
    assert len(units) == 20 and not units & {f"c{i}" for i in range(20)}  # one hash per customer, none in clear
    assert all(len(u) == 32 for u in units)
    purposes = {json.loads(r.features)["purpose"] for r in rows}
    assert len(purposes) == 3 and not purposes & {"p0", "p1", "p2"}
    arms: dict[str, set[str]] = {}
    for r in rows:
        arms.setdefault(r.unit_id, set()).add(r.version)
    assert all(len(v) == 1 for v in arms.values()) and len(set().union(*arms.values())) == 2  # sticky, both arms

    monkeypatch.setenv("ROLLOUT_PII_KEY", "k2")  # another key: other hashes (the key is what keeps them private)
    other = OutcomeStore(f"sqlite:///{tmp_path / 'o2.db'}").create()
    assert not {r.unit_id for r in _served(policy, registry, other, n=20)} & units


def test_hashing_without_a_key_refuses_to_start(registry: InMemoryRegistry, store: OutcomeStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROLLOUT_PII_KEY", raising=False)
    policy = _policy(data={"pii_columns": ["purpose"], "pii_action": "hash"})
    with pytest.raises(ConfigurationError, match="ROLLOUT_PII_KEY"):
        app_for(policy, registry, store)


@pytest.mark.parametrize(("data", "field"), [
    ({"pii_columns": ["tier"]}, "segment column 'tier'"),
    ({"pii_columns": ["customer_id"]}, "data.pii_action"),
])
def test_pii_settings_that_would_break_the_evaluation_are_refused(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        _policy(data=data)


@pytest.mark.parametrize("value", [0, 1.5, "some", -0.1])
def test_a_bad_log_features_value_names_the_field(value: Any) -> None:
    with pytest.raises(ValidationError, match="log_features"):
        _policy({"log_features": value})
