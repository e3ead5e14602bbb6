"""The Run form a person sees in the Prefect UI is the deployment's parameter schema: every parameter described,
overrides as an object (not a None toggle), closed choices as enumerations."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema

from flows.adopt_model import adopt_model
from flows.batch_scoring import batch_scoring
from flows.label_requests import label_requests
from flows.ci_pipeline import ci_pipeline
from flows.continuous_training import continuous_training
from flows.online_evaluation import online_evaluation


def _resolve(schema: dict, prop: dict) -> dict:
    ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("allOf", []) if "$ref" in p), None)
    return schema["definitions"][ref.split("/")[-1]] if ref else prop


def test_every_run_form_describes_its_fields_and_offers_choices():
    for flow in (ci_pipeline, online_evaluation, adopt_model, continuous_training, batch_scoring, label_requests):
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        for name, prop in schema["properties"].items():
            assert prop.get("description"), (flow.name, name)
            assert not any(p.get("type") == "null" for p in prop.get("anyOf", [])), (flow.name, name)
            # nested overrides too: a plain input each, never the "None" type switch the UI draws for anyOf-null
            nested = _resolve(schema, prop).get("properties", {})
            for field, inner in nested.items():
                assert "anyOf" not in inner and (inner.get("type") or "$ref" in inner), (flow.name, name, field, inner)

    ci = parameter_schema(ci_pipeline.fn).model_dump_for_openapi()
    params = _resolve(ci, ci["properties"]["params"])
    estimator = params["properties"]["estimator"]
    choices = estimator["enum"]
    assert {"logistic_regression", "xgboost", "lightgbm", "ridge"} <= set(choices)
    assert all(p.get("description") for p in params["properties"].values())

    evaluation = parameter_schema(online_evaluation.fn).model_dump_for_openapi()
    clock = _resolve(evaluation, evaluation["properties"]["params"])["properties"]["clock"]
    assert clock["enum"] == ["wall", "data"] and clock["default"] == "wall"

    ct = parameter_schema(continuous_training.fn).model_dump_for_openapi()
    ct_params = _resolve(ct, ct["properties"]["params"])["properties"]
    assert ct_params["ci"]["title"] == "ci" and ct_params["training_data"]["enum"] == ["policy", "production", "both"]

    batch = parameter_schema(batch_scoring.fn).model_dump_for_openapi()
    assert batch["required"] == ["params"]
    fields = _resolve(batch, batch["properties"]["params"])
    assert {"input", "query", "database", "output", "output_table"} <= set(fields["properties"])
    assert not fields.get("required")  # a file or a query, a file or a table: the flow checks which was given


def test_a_params_override_is_merged_over_the_policys_and_an_estimator_override_brings_its_own(tmp_path):
    """`rollout ci --params '{"alpha": 0.1}'` changes one parameter of the policy's estimator and keeps the others
    (a team's factory reads several); with `--estimator` the params are the new estimator's alone."""
    from flows.ci_pipeline import CIParameters, apply_overrides
    from rollout.config import parse_policy

    policy = parse_policy({"data": {"source": "x.csv", "target": "y", "task": "regression"},
                           "estimator": {"name": "ridge", "params": {"alpha": 1.0, "fit_intercept": False}},
                           "rollout": {"margin": 1, "min_detectable_effect": 2}}, tmp_path)
    merged = apply_overrides(policy, CIParameters(estimator_params={"alpha": 0.1}))
    assert merged.estimator.name == "ridge" and merged.estimator.params == {"alpha": 0.1, "fit_intercept": False}
    other = apply_overrides(policy, CIParameters(estimator="random_forest_regressor", estimator_params={"max_depth": 2}))
    assert other.estimator.params == {"max_depth": 2}
