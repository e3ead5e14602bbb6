"""A challenger whose features differ from the champion's: through CI, shadow and promotion.

The champion (v1) was trained without `credit_score`; the challenger (v2) reads it but drops `region` and
`home_ownership`, which the champion reads. Each model is scored on its own columns of the same rows, in
CI and in the service, which accepts the union of the live models' columns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flows.ci_pipeline import ci_pipeline
from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout.ci.gates import GateFailed
from rollout.config import EXAMPLE_ROLES, load_policy
from rollout.data import example_dataset
from rollout.registry import MlflowRegistry
from rollout.roles import Role
from tests.conftest import serve_and_label, write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
TOKEN = "feature-sets-token"
ROLLOUT = {"mode": "shadow", "primary_metric": "accuracy", "min_samples": 300, "min_duration_hours": 24,
           "segment_guardrails": []}


def _policy(tmp_path, drop: list[str]):
    return write_policy(tmp_path, data={"example": {"rows": 3000, "seed": 11}, "drop_columns": drop},
                        ci={"floor": 0.6}, rollout=ROLLOUT)  # without credit_score, ROC AUC is about 0.68


def test_a_challenger_with_other_columns_goes_through_ci_shadow_and_promotion(tmp_path):
    first = ci_pipeline(config=str(_policy(tmp_path, ["credit_score"])))
    assert first.aliases == ["champion"]
    path = _policy(tmp_path, ["region", "home_ownership"])
    second = ci_pipeline(config=str(path))  # once: "Model is missing inputs ['region', 'home_ownership']"
    assert second.aliases == ["challenger"]
    champion_gate = next(g for g in second.gates if g.gate == "champion")
    assert champion_gate.numbers["champion"] is not None  # v1 scored on its own columns of the same rows
    assert champion_gate.numbers["holdout"] > champion_gate.numbers["champion"]  # credit_score carries signal

    policy = load_policy(path)
    registry = MlflowRegistry.for_policy(policy)
    assert "credit_score" not in registry.load(first.version).metadata.get_input_schema().input_names()
    assert "region" not in registry.load(second.version).metadata.get_input_schema().input_names()

    traffic = example_dataset(rows=6000, seed=99)
    serve_and_label(policy, traffic.drop(columns=["approved", "applied_at"]), traffic["approved"], TOKEN)

    outcome = online_evaluation(config=str(path), params=EvaluationParameters(
        now=datetime.now(UTC) + timedelta(hours=25)))
    assert (outcome.action, outcome.winner) == ("promote", second.version), outcome.reasons
    assert registry.aliases()[Role.CHAMPION] == second.version


def test_a_champion_whose_columns_the_data_no_longer_has_fails_the_champion_gate_by_name(tmp_path):
    from rollout.ci.validation import build_suite, write_suite
    from rollout.data import infer_schema

    ci_pipeline(config=str(_policy(tmp_path, [])))
    frame = example_dataset(rows=3000, seed=12).drop(columns=["region"])  # the source lost a column v1 reads
    frame.to_csv(tmp_path / "loans.csv", index=False)
    path = write_policy(tmp_path, data={"source": "loans.csv", **EXAMPLE_ROLES}, ci={"expectations_suite": "loans.json"},
                        rollout=ROLLOUT)
    write_suite(build_suite(frame, infer_schema(frame, load_policy(path).data), "loans"), tmp_path / "loans.json")
    with pytest.raises(GateFailed) as err:
        ci_pipeline(config=str(path))
    assert err.value.result.gate == "champion"
    assert "missing inputs ['region']" in err.value.result.reason and "data.drop_columns" in err.value.result.reason
    assert len(MlflowRegistry.for_policy(load_policy(path)).client.search_model_versions("name='loan-approval'")) == 1
