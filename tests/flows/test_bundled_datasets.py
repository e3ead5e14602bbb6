"""scikit-learn's bundled tables (binary, multiclass, regression), each from a policy file alone: a weak champion
and a better challenger through CI, then the team's later rows replayed through the service with their own
times and delayed labels (what `rollout simulate --data FILE --ts-column ts` does), and an evaluation at the
data's time that promotes the challenger."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine

from cli.simulate import replay_from, simulate_async
from flows.ci_pipeline import CIParameters, ci_pipeline
from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout.ci.validation import build_suite, write_suite
from rollout.config import load_policy
from rollout.data import infer_schema
from serving.app import create_app

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

CASES = {
    # table, task, CI metric, online metric and its policy, weak champion, better challenger
    "breast_cancer": (load_breast_cancer, "classification", {"metric": "roc_auc", "floor": 0.8},
                      {"primary_metric": "accuracy"},
                      {"name": "decision_tree", "params": {"max_depth": 1}}, ("logistic_regression", {"C": 1.0})),
    "wine": (load_wine, "multiclass", {"metric": "f1_macro", "max_train_val_gap": 0.2, "max_fold_std": 0.2},
             {"primary_metric": "log_loss"},
             {"name": "decision_tree", "params": {"max_depth": 1}}, ("logistic_regression", {"C": 1.0})),
    "diabetes": (load_diabetes, "regression", {"metric": "rmse"},
                 {"primary_metric": "mse", "margin": 30.0, "min_detectable_effect": 300.0},
                 {"name": "ridge", "params": {"alpha": 100.0}}, ("ridge", {"alpha": 0.01})),
}


def _replay_rows(frame: pd.DataFrame, n: int, hours: float, seed: int) -> pd.DataFrame:
    """Production after training: rows drawn again with 2% noise on each feature, one every few minutes."""
    rng = np.random.default_rng(seed)
    rows = frame.iloc[rng.integers(0, len(frame), n)].reset_index(drop=True)
    features = rows.drop(columns=["target"])
    rows[features.columns] = features * rng.normal(1.0, 0.02, features.shape)
    rows["ts"] = pd.date_range("2026-05-01", periods=n, freq=pd.Timedelta(hours=hours) / n).strftime(
        "%Y-%m-%dT%H:%M:%S")
    return rows


@pytest.mark.parametrize("name", list(CASES))
def test_a_bundled_table_from_a_policy_file_to_a_promotion(tmp_path, name):
    load, task, ci, online, champion, (better, params) = CASES[name]
    frame = load(as_frame=True).frame
    frame.to_csv(tmp_path / "train.csv", index=False)
    _replay_rows(frame, 1200, hours=30, seed=3).to_csv(tmp_path / "later.csv", index=False)
    policy = {
        "registry": {"model_name": name},
        "data": {"source": "train.csv", "target": "target", "task": task, "holdout_fraction": 0.3},
        "estimator": champion,
        "ci": {**ci, "cv_folds": 3, "expectations_suite": "suite.json"},
        "rollout": {"mode": "shadow", "min_samples": 300, "min_duration_hours": 24, "label_delay_hours": 3,
                    **online},
        "stores": {"mlflow_tracking_uri": "sqlite:///mlflow.db", "outcome_store_url": "sqlite:///outcomes.db",
                   "mlflow_artifacts": "mlartifacts", "reports_dir": "reports"},
    }
    config = tmp_path / "rollout.yaml"
    config.write_text(yaml.safe_dump(policy))
    loaded = load_policy(config)
    write_suite(build_suite(frame, infer_schema(frame, loaded.data), name), tmp_path / "suite.json")

    first = ci_pipeline(config=str(config))
    second = ci_pipeline(config=str(config), params=CIParameters(estimator=better, estimator_params=params))
    assert (first.aliases, second.aliases) == (["champion"], ["challenger"])

    async def replay() -> object:
        app = create_app(loaded)
        async with app.router.lifespan_context(app):
            return await simulate_async("http://rollout", loaded, token="replay-token", label_delay_hours=1.0,
                                        missing_rate=0.0, transport=httpx.ASGITransport(app=app),
                                        replay=replay_from(str(tmp_path / "later.csv"), loaded, "target", "ts"))

    os.environ[loaded.serving.token_env] = "replay-token"
    try:
        summary = asyncio.run(replay())
    finally:
        os.environ.pop(loaded.serving.token_env, None)
    assert summary.requests == 1200 and summary.errors == 0 and summary.by_version == {first.version: 1200}

    outcome = online_evaluation(config=str(config), params=EvaluationParameters(clock="data"))
    assert (outcome.action, outcome.winner) == ("promote", second.version), outcome.reasons
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=loaded.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("rollout-evaluation").experiment_id])
    assert runs and all(r.data.tags.get("prefect.flow_run_id") for r in runs)  # the evaluation's run links its flow run
    checks = {g["name"] for g in outcome.stats[second.version]["guardrails"]}
    report = Path(outcome.report).read_text()
    if task == "regression":  # equal predictions measure nothing between real-valued models; no classes to count
        assert "agreement" not in checks and "precision" not in report.split("## Metrics per version")[1]
    elif task == "classification":
        assert "agreement" in checks and "| precision | recall |" in report
