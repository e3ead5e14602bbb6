"""A model trained elsewhere, logged to MLflow by a team's own job, adopted: every gate that needs no training,
then @challenger with a shadow rollout, served, labelled and evaluated. A pickled model is refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
from mlflow.models import infer_signature
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from cli.main import app
from flows.ci_pipeline import ci_pipeline
from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout.config import load_policy
from rollout.registry import MlflowRegistry
from rollout.roles import Role
from tests.conftest import cancer_policy, serve_and_label

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


@pytest.fixture
def world(tmp_path: Path):
    """Breast cancer rows, a policy for them, and a first model of rollout's own CI as @champion."""
    # A boosted pipeline from elsewhere against a logistic-regression champion: its latency ratio (about 20x
    # here) is not what these tests check, so the ratio limit is out of the way.
    path = cancer_policy(tmp_path, ci={"stress": {"single_requests": 30, "batch_size": 200, "batches": 4, "budget": {
        "p99_single_ms": 2000, "p99_batch_ms": 5000, "max_ratio_vs_champion": 1000}}})
    first = ci_pipeline(config=str(path))
    assert first.aliases == ["champion"]
    return path, load_policy(path), load_breast_cancer(as_frame=True).frame, first.version


def _train_elsewhere(policy, frame, **log_options) -> str:
    """A team's own training job: its own pipeline, logged with MLflow's scikit-learn flavour; its run's URI."""
    x, y = frame.drop(columns=["target"]), frame["target"]
    model = make_pipeline(StandardScaler(), HistGradientBoostingClassifier(max_iter=60, random_state=0)).fit(x, y)
    mlflow.set_tracking_uri(policy.tracking_uri)
    mlflow.set_experiment("team-training")
    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(model, name="model", signature=infer_signature(x.head(20), model.predict_proba(x.head(20))),
                                 pyfunc_predict_fn="predict_proba", **log_options)
    return f"runs:/{run.info.run_id}/model"


def test_a_model_trained_elsewhere_is_gated_registered_served_and_evaluated(world):
    path, policy, frame, champion = world
    uri = _train_elsewhere(policy, frame, serialization_format="skops",
                           skops_trusted_types=["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"])
    result = CliRunner().invoke(app, ["adopt", "--config", str(path), "--model-uri", uri], terminal_width=300)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    for gate in ("data_validation", "trust", "floor", "baseline", "champion", "robustness", "stress"):
        assert f"{gate} │ pass" in said, said
    assert "overfit" not in said  # nothing was trained here

    registry = MlflowRegistry.for_policy(policy)
    aliases = registry.aliases()
    assert aliases[Role.CHAMPION] == champion and aliases[Role.CHALLENGER] != champion
    adopted = aliases[Role.CHALLENGER]
    tags = registry.get_tags(adopted)
    assert tags["adopted_from"] == uri and tags["gate.trust"] == "pass"
    assert float(tags["holdout_roc_auc"]) > 0.95 and tags["prefect.flow_run_id"]
    described = registry.client.get_model_version("cancer", adopted).description
    assert described.startswith(f"Adopted from {uri}, judged on 569 rows") and "trust pass" in described

    served = serve_and_label(policy, frame.drop(columns=["target"]), frame["target"], "adopt-token")
    assert {a["version"] for a in served} == {champion}
    outcome = online_evaluation(config=str(path), params=EvaluationParameters(
        now=datetime.now(UTC) + timedelta(hours=1)))
    stats = json.loads(Path(outcome.report).with_suffix(".json").read_text())["stats"][adopted]
    assert outcome.action == "continue" and stats["n"] == len(frame)  # every served row, paired, labelled


def test_a_pickled_model_from_elsewhere_is_refused_and_nothing_is_registered(world):
    path, policy, frame, champion = world
    uri = _train_elsewhere(policy, frame, serialization_format="cloudpickle")
    result = CliRunner().invoke(app, ["adopt", "--config", str(path), "--model-uri", uri], terminal_width=300)
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "trust │ FAIL" in said and "skops" in said and "Nothing was registered" in said, said
    registry = MlflowRegistry.for_policy(policy)
    assert registry.aliases() == {Role.CHAMPION: champion}
    assert len(registry.client.search_model_versions("name='cancer'")) == 1


def test_a_model_uri_that_does_not_exist_is_a_clear_error(world):
    path, *_ = world
    result = CliRunner().invoke(app, ["adopt", "--config", str(path), "--model-uri", "runs:/0123abcd/model"],
                                terminal_width=300)
    assert result.exit_code == 2 and "model URI 'runs:/0123abcd/model': not found" in " ".join(result.output.split())


def test_an_xgboost_model_in_its_own_mlflow_flavour_is_adopted_and_shadows(world):
    """A team that logs XGBoost with mlflow.xgboost.log_model: loaded from the booster's own format (no code),
    gated, registered and scored in shadow on every served row; a bare Booster (it cannot score rows) is
    refused by name."""
    import xgboost

    path, policy, frame, champion = world
    x, y = frame.drop(columns=["target"]), frame["target"]
    model = xgboost.XGBClassifier(n_estimators=60, max_depth=3, learning_rate=0.1).fit(x, y)
    mlflow.set_tracking_uri(policy.tracking_uri)
    mlflow.set_experiment("team-training")
    with mlflow.start_run() as run:
        mlflow.xgboost.log_model(model, name="model", signature=infer_signature(x.head(20), model.predict_proba(x.head(20))))
        mlflow.xgboost.log_model(model.get_booster(), name="booster")
    uri = f"runs:/{run.info.run_id}/model"
    result = CliRunner().invoke(app, ["adopt", "--config", str(path), "--model-uri", uri], terminal_width=300)
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "trust │ pass" in said, said
    registry = MlflowRegistry.for_policy(policy)
    adopted = registry.aliases()[Role.CHALLENGER]
    assert float(registry.get_tags(adopted)["holdout_roc_auc"]) > 0.95

    serve_and_label(policy, x, y, "xgb-token")
    outcome = online_evaluation(config=str(path), params=EvaluationParameters(now=datetime.now(UTC) + timedelta(hours=1)))
    stats = json.loads(Path(outcome.report).with_suffix(".json").read_text())["stats"][adopted]
    assert stats["n"] == len(frame)  # the xgboost flavour scored every served row in its shadow lane

    bare = CliRunner().invoke(app, ["adopt", "--config", str(path), "--model-uri",
                                    f"runs:/{run.info.run_id}/booster"], terminal_width=300)
    said = " ".join(bare.output.split())
    assert bare.exit_code == 1 and "class 'xgboost.core.Booster'" in said and "trust │ FAIL" in said, said
