"""A team's own training code on data rollout did not make: examples/team_model on scikit-learn's breast cancer
table, through CI, the registry, the service, labels and the online evaluation."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from cli.main import app
from flows.ci_pipeline import ci_pipeline
from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout.config import ConfigError, load_policy
from rollout.registry import MlflowRegistry, UntrustedModel
from rollout.roles import Role
from tests.conftest import ROOT

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
EXAMPLES = ROOT / "examples"
TOKEN = "own-model-token"


def _example_policy(tmp_path: Path, **changes) -> Path:
    """examples/team_model.yaml in tmp_path (next to the data the `team_code` fixture wrote), stores local to it."""
    policy = yaml.safe_load((EXAMPLES / "team_model.yaml").read_text())
    policy["stores"] = {"mlflow_tracking_uri": "sqlite:///mlflow.db", "outcome_store_url": "sqlite:///outcomes.db",
                        "mlflow_artifacts": "mlartifacts", "reports_dir": "reports"}
    policy["ci"]["stress"] = {"single_requests": 20, "batch_size": 100, "batches": 3,
                              "budget": {"p99_single_ms": 2000, "p99_batch_ms": 5000, "max_ratio_vs_champion": 20}}
    for section, values in changes.items():
        policy[section] = {**policy.get(section, {}), **values}
    path = tmp_path / "team_model.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture
def team_code(monkeypatch, tmp_path):
    """The team's package importable as it would be once installed, and the example's data made by its script."""
    import runpy

    monkeypatch.syspath_prepend(str(EXAMPLES))
    script = tmp_path / "make_breast_cancer.py"
    shutil.copy(EXAMPLES / "make_breast_cancer.py", script)
    shutil.copy(EXAMPLES / "team_model.yaml", tmp_path / "team_model.yaml")
    runpy.run_path(str(script), run_name="__main__")
    made = CliRunner().invoke(app, ["make-suite", "--config", str(tmp_path / "team_model.yaml"),
                                    "--output", str(tmp_path / "breast_cancer_suite.json")])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "breast_cancer.csv").exists() and (tmp_path / "breast_cancer_suite.json").exists()
    return tmp_path


def test_a_factory_whose_package_is_not_trusted_is_refused_before_any_code_runs(team_code, monkeypatch):
    path = _example_policy(team_code, registry={"model_name": "breast-cancer", "trusted_modules": []})
    monkeypatch.delitem(__import__("sys").modules, "team_model", raising=False)
    with pytest.raises(ConfigError, match=r"estimator.*team_model:build.*registry\.trusted_modules"):
        load_policy(path)
    assert "team_model" not in __import__("sys").modules  # refused before its module was imported


def test_a_teams_own_model_goes_through_ci_serving_labels_and_evaluation(team_code, monkeypatch):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    path = _example_policy(team_code)
    first = ci_pipeline(config=str(path))
    assert first.aliases == ["champion"], first.gates
    policy = load_policy(path)
    registry = MlflowRegistry.for_policy(policy)
    tags = registry.get_tags(first.version)
    assert tags["estimator"] == "team_model:build" and float(tags["holdout_roc_auc"]) > 0.95

    # The version's file names the team's class; a registry that does not trust its package will not load it.
    with pytest.raises(UntrustedModel, match="team_model.QuantileClipper"):
        MlflowRegistry(policy.tracking_uri, policy.registry.model_name).load(first.version)
    frame = load_breast_cancer(as_frame=True).frame
    records = frame.drop(columns=["target"])
    loaded = np.asarray(registry.load(first.version).predict(records))
    assert loaded.shape == (len(frame), 2) and np.mean((loaded[:, 1] >= 0.5) == frame["target"]) > 0.9

    # A second version of the team's code (other params) goes in as the challenger, in shadow.
    second_path = _example_policy(team_code, estimator={"factory": "team_model:build", "params": {"C": 0.05}})
    second = ci_pipeline(config=str(second_path))
    assert second.aliases == ["challenger"], second.gates
    assert registry.aliases() == {Role.CHAMPION: first.version, Role.CHALLENGER: second.version}

    monkeypatch.setenv(policy.serving.token_env, TOKEN)
    with TestClient(create_app(policy)) as client:
        answer = client.post("/predict", json={"records": records.iloc[:200].to_dict(orient="records")})
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert {p["version"] for p in predictions} == {first.version}
        assert all(0.0 <= p["score"] <= 1.0 for p in predictions)
        hits = np.mean([p["prediction"] == y for p, y in zip(predictions, frame["target"].iloc[:200])])
        assert hits > 0.9  # the team's model, not a constant
        labels = [{"request_id": p["request_id"], "label": int(y)} for p, y in zip(predictions, frame["target"])]
        stored = client.post("/labels", json={"labels": labels}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert stored.status_code == 200, stored.text

    outcome = online_evaluation(config=str(path), params=EvaluationParameters(
        now=datetime.now(UTC) + timedelta(hours=1)))
    assert outcome.action == "continue"  # 200 paired outcomes in an hour: too few to decide, nothing moved
    stats = json.loads(Path(outcome.report).with_suffix(".json").read_text())["stats"][second.version]
    assert stats["n"] == 200 and stats["method"] == "paired differences"  # every served, labelled request
    assert registry.aliases()[Role.CHAMPION] == first.version
