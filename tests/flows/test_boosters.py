"""XGBoost and LightGBM as first-class estimators: early stopping inside each fit, their loss curve in the
overfit gate, saved with exact skops types, served by the same path, promoted over a scikit-learn champion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flows.ci_pipeline import ci_pipeline
from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout.config import load_policy
from rollout.data import example_dataset
from rollout.registry import MlflowRegistry
from rollout.roles import Role
from tests.conftest import serve_and_label, write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
ROLLOUT = {"mode": "shadow", "primary_metric": "accuracy", "min_samples": 300, "min_duration_hours": 24,
           "segment_guardrails": []}


@pytest.mark.parametrize("booster", ["xgboost", "lightgbm"])
def test_a_boosted_challenger_is_promoted_over_a_scikit_learn_champion(tmp_path, booster):
    def policy(estimator: dict) -> str:
        return str(write_policy(tmp_path, data={"example": {"rows": 3000, "seed": 11}}, estimator=estimator,
                                # boosting on this noisy table: train AUC ~0.07 above validation, by design
                                ci={"floor": 0.6, "max_train_val_gap": 0.12}, rollout=ROLLOUT))

    first = ci_pipeline(config=policy({"name": "decision_tree", "params": {"max_depth": 1}}))  # a stump
    path = policy({"name": booster, "early_stopping": {"rounds": 15, "validation_fraction": 0.15}})
    second = ci_pipeline(config=path)
    assert (first.aliases, second.aliases) == (["champion"], ["challenger"])

    overfit = next(g for g in second.gates if g.gate == "overfit")
    kept = overfit.numbers["curve_iterations"]  # the loss curve of its own evaluation sets, to the kept round
    assert 1 < kept < 500 and overfit.numbers["validation_loss_rise"] == pytest.approx(0, abs=1e-9)
    registry = MlflowRegistry.for_policy(load_policy(path))
    tags = registry.get_tags(second.version)
    assert tags["estimator"] == booster
    version = registry.client.get_model_version(registry.model_name, second.version)
    model_file = registry.client.download_artifacts(version.run_id, "model/MLmodel")
    text = open(model_file).read()
    assert "skops" in text and ("xgboost.sklearn.XGBClassifier" in text or "lightgbm.sklearn.LGBMClassifier" in text)

    traffic = example_dataset(rows=3000, seed=99)
    answers = serve_and_label(load_policy(path), traffic.drop(columns=["approved", "applied_at"]),
                              traffic["approved"], "booster-token")
    assert {a["version"] for a in answers} == {first.version}  # the champion answers; the booster shadows

    outcome = online_evaluation(config=path, params=EvaluationParameters(now=datetime.now(UTC) + timedelta(hours=25)))
    assert (outcome.action, outcome.winner) == ("promote", second.version), outcome.reasons
    assert registry.aliases()[Role.CHAMPION] == second.version
