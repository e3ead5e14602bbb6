"""A registry outage is reported as one, and a service restarted during it serves its cached champion."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sklearn.linear_model import LogisticRegression

from rollout import registry as reg
from rollout.outcomes import OutcomeStore
from serving.app import create_app
from tests.serving.conftest import make_policy


@pytest.fixture
def registered(tmp_path: Path) -> str:
    """A real MLflow registry (SQLite) whose @champion is a small logistic regression."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    x = pd.DataFrame({"income": [0.0, 1.0, 2.0, 3.0], "tier": ["a", "b", "a", "b"], "purpose": ["c"] * 4})
    model = LogisticRegression().fit(x[["income"]], [0, 0, 1, 1])
    experiment = reg.experiment_id(uri, "outage", (tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        reg.log_model(model, x[["income"]], "classification", "loan-approval")
    reg.MlflowRegistry(uri, "loan-approval").set_alias("champion", "1")
    return uri


def test_an_unreachable_registry_is_an_outage_not_an_empty_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = reg.MlflowRegistry("http://127.0.0.1:9", "loan-approval")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises, it is not {}
        down.aliases()
    assert time.monotonic() - started < 30


def test_a_service_restarted_during_an_outage_serves_the_cached_champion(registered: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cache = reg.ModelCache(tmp_path / "cache", "loan-approval")
    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    policy = make_policy()
    body = {"record": {"income": 2.5}}
    up = reg.MlflowRegistry(registered, "loan-approval", cache=cache)
    with TestClient(create_app(policy, registry=up, store=store)) as client:
        assert client.post("/predict", json=body).json()["version"] == "1"
    down = reg.MlflowRegistry("http://127.0.0.1:9", "loan-approval", cache=cache)
    started = time.monotonic()
    with TestClient(create_app(policy, registry=down, store=store)) as client:
        ready = time.monotonic() - started
        answer = client.post("/predict", json=body)
        health = client.get("/healthz").json()
        metrics = client.get("/metrics").text
    assert answer.status_code == 200 and answer.json()["version"] == "1"
    assert ready < 30  # start-up does not wait out MLflow's retries
    assert health["status"] == "degraded" and health["registry_reachable"] is False
    assert "rollout_registry_reachable 0" in metrics


def test_a_tampered_cache_entry_is_not_loaded(registered: str, tmp_path: Path) -> None:
    cache = reg.ModelCache(tmp_path / "cache", "loan-approval")
    reg.MlflowRegistry(registered, "loan-approval", cache=cache).load("1")
    (folder,) = cache.root.glob("1-*")
    (folder / "MLmodel").write_text((folder / "MLmodel").read_text() + "\n# edited\n")
    assert cache.get("1") is None
