"""Multiclass end to end on scikit-learn's wine table (classes 0, 1, 2), from a policy file alone: CI with
macro F1, answers with every class's probability, labels checked against the classes, an online log loss
test that promotes the better model, and a per-class recall guardrail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine
from typer.testing import CliRunner

from cli.main import app
from flows.ci_pipeline import ci_pipeline
from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout.config import load_policy
from rollout.registry import MlflowRegistry
from rollout.roles import Role
from tests.conftest import serve_and_label, wine_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
ROLLOUT = {"mode": "shadow", "primary_metric": "log_loss", "min_samples": 300, "min_duration_hours": 24,
           "segment_guardrails": [{"segment": None, "metric": "recall", "class": 1, "min": 0.5}]}


def _traffic(n: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    """Wine rows drawn again with a little noise on each measurement: production looks like the table."""
    frame = load_wine(as_frame=True).frame
    rng = np.random.default_rng(seed)
    rows = frame.iloc[rng.integers(0, len(frame), n)].reset_index(drop=True)
    features = rows.drop(columns=["target"])
    features = features * rng.normal(1.0, 0.02, features.shape)
    return features, rows["target"]


def test_a_multiclass_model_goes_through_ci_serving_and_promotion(tmp_path):
    def policy(estimator: dict) -> str:
        return str(wine_policy(tmp_path, estimator=estimator, ci={"floor": 0.4, "max_train_val_gap": 0.2,
                                                                  "max_fold_std": 0.2}, rollout=ROLLOUT))

    first = ci_pipeline(config=policy({"name": "decision_tree", "params": {"max_depth": 1}}))  # tells two apart
    path = policy({"name": "logistic_regression", "params": {"C": 1.0}})
    second = ci_pipeline(config=path)
    assert (first.aliases, second.aliases) == (["champion"], ["challenger"])
    floor = next(g for g in second.gates if g.gate == "floor")
    assert floor.numbers["metric"] == "f1_macro" and floor.numbers["holdout"] > 0.9

    features, labels = _traffic(900, seed=5)
    answers = serve_and_label(load_policy(path), features, labels, "wine-token")
    assert {a["version"] for a in answers} == {first.version}
    assert all(len(a["probabilities"]) == 3 and sum(a["probabilities"]) == pytest.approx(1.0) for a in answers)
    assert all(a["prediction"] in (0, 1, 2) and a["score"] == max(a["probabilities"]) for a in answers)
    assert {a["prediction"] for a in answers} <= {0, 1, 2} and len({a["prediction"] for a in answers}) == 2

    outcome = online_evaluation(config=path, params=EvaluationParameters(now=datetime.now(UTC) + timedelta(hours=25)))
    assert (outcome.action, outcome.winner) == ("promote", second.version), outcome.reasons
    registry = MlflowRegistry.for_policy(load_policy(path))
    assert registry.aliases()[Role.CHAMPION] == second.version
    report = open(outcome.report).read()
    row = next(line for line in report.splitlines() if "| class 1 recall |" in line)
    assert row.startswith(f"| {second.version} |") and "| pass |" in row, row


def test_labels_must_name_a_class_and_a_multiclass_target_is_told_apart(tmp_path):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    path = wine_policy(tmp_path, rollout={"segment_guardrails": []})
    assert ci_pipeline(config=str(path)).aliases == ["champion"]
    policy = load_policy(path)
    features, _ = _traffic(3, seed=1)
    import os

    os.environ[policy.serving.token_env] = "t"
    try:
        with TestClient(create_app(policy)) as client:
            got = client.post("/predict", json={"records": features.to_dict("records")}).json()["predictions"]
            auth = {"Authorization": "Bearer t"}
            bad = client.post("/labels", json={"labels": [{"request_id": got[0]["request_id"], "label": 3}]},
                              headers=auth)
            assert bad.status_code == 422 and "labels[0].label" in bad.text and "one of 0..2" in bad.text
            ok = client.post("/labels", json={"labels": [{"request_id": got[0]["request_id"], "label": 2}]},
                             headers=auth)
            assert ok.status_code == 200 and ok.json()["stored"] == 1
    finally:
        os.environ.pop(policy.serving.token_env, None)

    # The same table under the binary task: refused before any training, saying what to set.
    binary = wine_policy(tmp_path, data={"task": "classification"}, ci={"metric": "roc_auc"},
                         rollout={"primary_metric": "accuracy", "segment_guardrails": []})
    result = CliRunner().invoke(app, ["check-config", "--config", str(binary), "--data"], terminal_width=200)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "3 classes (0, 1, 2); set data.task: multiclass" in said, said
