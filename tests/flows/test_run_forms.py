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
