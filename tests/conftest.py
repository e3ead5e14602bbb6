"""Shared fixtures: a small policy in a temporary directory, and Prefect's test harness."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return write_policy(tmp_path)
