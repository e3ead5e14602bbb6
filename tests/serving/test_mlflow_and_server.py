"""Integration: a real sklearn model logged to MLflow (skops) served by alias; one real uvicorn server over HTTP."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sklearn.compose import make_column_transformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from cli.demo import free_port
from rollout.data import example_dataset
from rollout.registry import MlflowRegistry
from rollout.outcomes import OutcomeStore
from tests.serving.conftest import AUTH, app_for, make_policy, mlflow_globals_restored

NUMERIC = ["income", "loan_amount", "credit_score", "debt_to_income", "employment_years", "open_accounts"]
CATEGORICAL = ["tier", "purpose", "home_ownership", "region"]


def _pipeline() -> Any:
    return make_pipeline(
        make_column_transformer(
            (make_pipeline(SimpleImputer(), StandardScaler()), NUMERIC),
            (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")), CATEGORICAL),
        ),
        LogisticRegression(max_iter=300),
    )


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowRegistry, Any]]:
    """A temporary MLflow sqlite store with one registered skops model at @champion; global URIs restored after."""
    with mlflow_globals_restored():
        yield _log_model(tmp_path_factory)


def _log_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowRegistry, Any]:
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    frame = example_dataset(rows=600, seed=1)
    X, y = frame[NUMERIC + CATEGORICAL], frame["approved"]
    model = _pipeline().fit(X, y)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("serving-test", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name="loan-approval",
            serialization_format="skops",
            signature=infer_signature(X, model.predict(X)),
            skops_trusted_types=["numpy.dtype"],
        )
    registry = MlflowRegistry(uri, "loan-approval", mirror_stages=False)
    registry.set_alias("champion", "1")
    return registry, frame


@pytest.mark.slow
def test_real_sklearn_model_from_mlflow_by_alias(mlflow_registry: tuple[MlflowRegistry, Any], tmp_path: Any) -> None:
    registry, frame = mlflow_registry
    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}")
    rows = frame[NUMERIC + CATEGORICAL].head(5)
    records = rows.astype(object).where(rows.notna(), None).to_dict("records")
    with TestClient(app_for(make_policy(), registry, store)) as client:
        assert client.get("/healthz").json()["champion"] == "1"
        response = client.post("/predict", json={"records": records, "unit_ids": ["a", "b", "c", "d", "e"]})
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        assert {a["version"] for a in answers} == {"1"} and all(0 <= a["score"] <= 1 for a in answers)
        assert all(a["prediction"] in (0, 1) for a in answers)
        # The signature is the contract: a string where MLflow recorded a double is refused, naming the field.
        bad = client.post("/predict", json={"record": {**records[0], "income": "a lot"}})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("income")
        missing = client.post("/predict", json={"record": {k: v for k, v in records[0].items() if k != "region"}})
        assert missing.status_code == 422 and missing.json()["detail"] == "region: missing column"
        # credit_score had gaps in training, so MLflow marked it optional: null is the model's job.
        assert client.post("/predict", json={"record": {**records[0], "credit_score": None}}).status_code == 200


@pytest.mark.slow
def test_real_uvicorn_server_over_http(registry: Any, store: OutcomeStore) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    port = free_port()
    config = uvicorn.Config(app_for(make_policy(), registry, store), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 15
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        assert server.started
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/healthz").status_code == 200
            ids = [
                client.post("/predict", json={"record": {"income": float(i), "tier": "gold"}, "unit_id": f"u{i}"}).json()["request_id"]
                for i in range(20)
            ]
            labels = client.post("/labels", json={"labels": [{"request_id": r, "label": 1} for r in ids]}, headers=AUTH)
            assert labels.status_code == 200 and labels.json()["unknown"] == 0
            assert "rollout_requests_total" in client.get("/metrics").text
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert store.count_predictions() == 40  # shutdown drained served and shadow rows
    assert os.environ["ROLLOUT_TOKEN"]
