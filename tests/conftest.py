"""Shared fixtures: a small policy in a temporary directory, and Prefect's test harness."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# A command run by a test without PREFECT_API_URL gets a Prefect server of its own, stopped when it ends, not one
# kept 10 minutes for the next command in the test's throwaway PREFECT_HOME (flows.local_server). The kept
# server is the default for users; tests/flows/test_cli_process.py covers it.
os.environ.setdefault("ROLLOUT_PREFECT_IDLE_SECONDS", "0")
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


@contextmanager
def fresh_pg_database(prefix: str = "rollout_test") -> Iterator[str]:
    """A uniquely named PostgreSQL database, dropped afterwards (the test is skipped without a server)."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432 as user postgres ({type(exc).__name__}: {exc})")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A uniquely named PostgreSQL database for this session, dropped at the end (skipped without a server)."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty outcome store's URL on each backend: a SQLite file, and the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outcomes.db'}"
    url: str = request.getfixturevalue("pg_url")
    empty_pg_store(url)
    return url


def empty_pg_store(url: str) -> None:
    """Drop every table of the outcome store at `url` (PostgreSQL), for a test that starts from nothing."""
    from rollout.outcomes import OutcomeStore, partitions
    from rollout.outcomes.schema import metadata

    store = OutcomeStore(url)
    with store.engine.begin() as conn:  # the log's view first: the metadata knows `predictions` as a table
        conn.exec_driver_sql("DROP VIEW IF EXISTS predictions CASCADE")
        conn.exec_driver_sql("DROP TABLE IF EXISTS prediction_log CASCADE")
    metadata.drop_all(store.engine)
    partitions._PARTITIONED.pop(url, None)  # this process's note of the dropped log's layout
    store.dispose()


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API (SQLite) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.runners import embedded_run

    # The harness stands in for the embedded server: no heartbeats (each would add up to 1 s per flow run).
    with prefect_test_harness(server_startup_timeout=120), embedded_run(force=True):
        yield


def write_policy(directory: Path, **sections) -> Path:
    """A policy file tuned for fast tests; sections override (deep-merged one level)."""
    policy = {
        "data": {"example": {"rows": 2000, "seed": 11}},
        "ci": {
            "cv_folds": 3,
            "expectations_suite": str(ROOT / "expectations" / "loan_training.json"),
            # Timing is not what most flow tests check, and CI machines are shared: a generous budget.
            "stress": {"single_requests": 30, "batch_size": 200, "batches": 4,
                       "budget": {"p99_single_ms": 2000, "p99_batch_ms": 5000, "max_ratio_vs_champion": 20}},
        },
        "stores": {"mlflow_tracking_uri": "sqlite:///mlflow.db", "outcome_store_url": "sqlite:///outcomes.db",
                   "mlflow_artifacts": "mlartifacts", "reports_dir": "reports"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    path = directory / "rollout.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def cancer_policy(directory: Path, **sections) -> Path:
    """scikit-learn's breast cancer table as a team's CSV, its suite, and a policy for it (no unit, segment or
    time column); sections override."""
    from sklearn.datasets import load_breast_cancer

    from rollout.ci.validation import build_suite, write_suite
    from rollout.config import DataConfig
    from rollout.data import infer_schema

    frame = load_breast_cancer(as_frame=True).frame
    frame.to_csv(directory / "cancer.csv", index=False)
    cfg = DataConfig(source="cancer.csv", target="target", task="classification", timestamp_column=None,
                     segment_column=None, unit_column=None)
    write_suite(build_suite(frame, infer_schema(frame, cfg), "cancer"), directory / "cancer.json")
    defaults = {"registry": {"model_name": "cancer"},
                "data": cfg.model_dump(mode="json", exclude={"example", "features", "drop_columns",
                                                             "production_sample"}),
                "ci": {"expectations_suite": "cancer.json", "floor": 0.9},
                "rollout": {"mode": "shadow", "primary_metric": "accuracy", "segment_guardrails": []}}
    return write_policy(directory, **{k: {**defaults.get(k, {}), **sections.get(k, {})}
                                      for k in {*defaults, *sections}})


def wine_policy(directory: Path, **sections) -> Path:
    """scikit-learn's wine table (178 rows, 13 numeric columns, classes 0, 1, 2) as a team's CSV, its suite,
    and a multiclass policy for it; sections override."""
    from sklearn.datasets import load_wine

    from rollout.ci.validation import build_suite, write_suite
    from rollout.config import DataConfig
    from rollout.data import infer_schema

    frame = load_wine(as_frame=True).frame
    frame.to_csv(directory / "wine.csv", index=False)
    cfg = DataConfig(source="wine.csv", target="target", task="multiclass")
    write_suite(build_suite(frame, infer_schema(frame, cfg), "wine"), directory / "wine.json")
    defaults = {"registry": {"model_name": "wine"},
                "data": {"source": "wine.csv", "target": "target", "task": "multiclass", "holdout_fraction": 0.3},
                "ci": {"expectations_suite": "wine.json", "metric": "f1_macro", "floor": 0.85},
                "rollout": {"mode": "shadow", "primary_metric": "log_loss"}}
    return write_policy(directory, **{k: {**defaults.get(k, {}), **sections.get(k, {})}
                                      for k in {*defaults, *sections}})


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return write_policy(tmp_path)


def serve_and_label(policy, features: pd.DataFrame, labels: pd.Series, token: str, batch: int = 1000) -> list[dict]:
    """Send the rows through the real service (in process) as a client would, in batches, then post each
    answer's label with the admin token; the service's shutdown flushes its log. The answers, in order."""
    import os

    from fastapi.testclient import TestClient

    from rollout.data import records_of
    from serving.app import create_app

    answers: list[dict] = []
    previous = os.environ.get(policy.serving.token_env)
    os.environ[policy.serving.token_env] = token
    try:
        with TestClient(create_app(policy)) as client:
            for start in range(0, len(features), batch):
                response = client.post("/predict", json={"records": records_of(features.iloc[start:start + batch])})
                assert response.status_code == 200, response.text
                got = response.json()["predictions"]
                posted = [{"request_id": p["request_id"], "label": int(y)}
                          for p, y in zip(got, labels.iloc[start:start + batch], strict=True)]
                stored = client.post("/labels", json={"labels": posted}, headers={"Authorization": f"Bearer {token}"})
                assert stored.status_code == 200, stored.text
                answers += got
    finally:
        if previous is None:
            os.environ.pop(policy.serving.token_env, None)
        else:
            os.environ[policy.serving.token_env] = previous
    return answers


def register_income_model(policy_path: Path, alias: str, text_artifact: bool = False) -> tuple[str, str]:
    """A small logistic regression on `income` alone, logged and registered in the policy's MLflow store as
    its next version with `alias` (the service answers `{"record": {"income": 2.5}}`); (version, run id)."""
    import mlflow
    from sklearn.linear_model import LogisticRegression

    from rollout import registry as reg
    from rollout.config import load_policy

    policy = load_policy(policy_path)
    x = pd.DataFrame({"income": [0.0, 1.0, 2.0, 3.0]})
    model = LogisticRegression().fit(x, [0, 0, 1, 1])
    experiment = reg.experiment_id(policy.tracking_uri, policy.registry.experiment, policy.artifact_location)
    with mlflow.start_run(experiment_id=experiment) as run:
        if text_artifact:
            mlflow.log_text("gate overfit: PASS", "gates/overfit.md")
        version = str(reg.log_model(model, x, "classification", policy.registry.model_name)
                      .registered_model_version)
    reg.MlflowRegistry.for_policy(policy).set_alias(alias, version)
    return version, str(run.info.run_id)
