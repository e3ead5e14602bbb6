"""Hyperparameter search in the CI flow, as a user runs it: `rollout ci` with `estimator.search` on scikit-learn's
breast cancer table; every trial is a child run in MLflow, progress shows in Prefect, and the registered version
carries the chosen params, which CV, the gates and the registered model then use."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cli.main import app
from rollout.config import load_policy
from rollout.registry import MlflowRegistry
from rollout.roles import Role
from tests.conftest import cancer_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _progress_artifacts() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    async def read():  # filtered by the server: the session's server holds more artifacts than one page
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))

    return asyncio.run(read())


def test_search_tunes_on_training_rows_logs_each_trial_and_registers_the_chosen_params(tmp_path: Path):
    path = cancer_policy(tmp_path, estimator={"name": "random_forest", "params": {"n_estimators": 40},
                                              "search": {"trials": 4, "folds": 3, "space": {
                                                  "max_depth": {"low": 2, "high": 8},
                                                  "min_samples_leaf": {"choices": [3, 10, 30]}}}})
    before = len(_progress_artifacts())
    result = CliRunner().invoke(app, ["ci", "--config", str(path)], terminal_width=300)
    assert result.exit_code == 0, result.output

    policy = load_policy(path)
    registry = MlflowRegistry.for_policy(policy)
    version = registry.aliases()[Role.CHAMPION]
    tags = registry.get_tags(version)
    chosen = json.loads(tags["search_best_params"])
    assert set(chosen) == {"n_estimators", "max_depth", "min_samples_leaf"} and chosen["n_estimators"] == 40

    client = MlflowClient(policy.tracking_uri)
    experiment = client.get_experiment_by_name(policy.registry.experiment).experiment_id
    search_run = client.get_run(tags["search_run_id"])
    assert search_run.info.status == "FINISHED" and search_run.data.params["rows"] == str(int(569 * 0.8))
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{search_run.info.run_id}'")
    assert len(trials) == 4 and all("cv_score" in t.data.metrics for t in trials)
    best = max(trials, key=lambda t: t.data.metrics["cv_score"])
    assert int(best.data.params["max_depth"]) == chosen["max_depth"]
    assert search_run.data.metrics["best_roc_auc"] == pytest.approx(best.data.metrics["cv_score"])

    # The candidate's run trained what the search chose, and the registered model is that model.
    candidate = client.get_run(client.get_model_version(policy.registry.model_name, version).run_id)
    assert int(candidate.data.params["param.max_depth"]) == chosen["max_depth"]
    assert int(candidate.data.params["param.min_samples_leaf"]) == chosen["min_samples_leaf"]

    progress = _progress_artifacts()  # the search task's progress bar in the Prefect UI, filled
    assert len(progress) == before + 1 and float(progress[-1].data) == 100.0
