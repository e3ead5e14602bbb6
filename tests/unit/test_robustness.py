"""Edge cases come from the schema; a crash fails the gate naming the case, a clean refusal does not."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rollout.ci import gates, robustness, training
from rollout.config import EstimatorConfig, parse_policy
from rollout.data import example_dataset, infer_schema
from rollout.models import LoadedModel


def _schema_and_sample():
    frame = example_dataset(rows=600, seed=1)
    schema = infer_schema(frame, parse_policy({}).data)
    return schema, frame


def test_cases_cover_the_schema():
    schema, frame = _schema_and_sample()
    cases = robustness.synthesize_cases(schema, frame, large_rows=100)
    for col in schema.nullable:
        assert cases[f"null_{col}"][col].isna().all()
    for col in schema.categorical:
        assert f"unseen_{col}" in cases and f"empty_string_{col}" in cases
    for col in schema.numeric:
        assert cases[f"huge_{col}"][col].iloc[0] > schema.ranges[col][1]
    assert len(cases["empty_batch"]) == 0 and len(cases["single_row"]) == 1 and len(cases["large_batch"]) == 100
    assert list(cases["columns_reordered"].columns) == list(reversed(schema.features))


def test_the_real_pipeline_survives_every_case():
    schema, frame = _schema_and_sample()
    model = training.build_pipeline(schema, EstimatorConfig()).fit(frame[list(schema.features)], frame["approved"])
    cases = robustness.synthesize_cases(schema, frame, large_rows=200)
    result = gates.robustness_gate(robustness.run_cases(LoadedModel(model), cases))
    assert result.passed, result.reason


class _CrashesOnNulls:
    def predict(self, frame: pd.DataFrame):
        if frame.isna().any().any():
            raise ValueError("Input contains NaN")
        return np.full((len(frame), 2), 0.5)


def test_a_model_crashing_on_nulls_fails_naming_the_case():
    schema, frame = _schema_and_sample()
    clean = frame.dropna()
    cases = robustness.synthesize_cases(schema, clean, large_rows=50)
    result = gates.robustness_gate(robustness.run_cases(LoadedModel(_CrashesOnNulls()), cases))
    assert not result.passed
    assert "null_credit_score (ValueError: Input contains NaN)" in result.reason
    assert "single_row" not in result.reason


class _Fake:
    """Declares an input contract (a, not nullable); returns what it is told to."""

    input_schema = {"a": "double"}

    def __init__(self, answer) -> None:
        self.answer = answer

    def predict(self, frame: pd.DataFrame):
        return self.answer(frame)


def test_garbage_output_is_a_crash_and_a_clean_refusal_is_not():
    nan_model = LoadedModel(_Fake(lambda frame: np.full((len(frame), 2), np.nan)))
    out = robustness.run_case("x", nan_model, pd.DataFrame({"a": [1.0]}))
    assert out.outcome == "crash" and "NaN" in out.detail
    short = LoadedModel(_Fake(lambda frame: np.zeros(len(frame) + 1)))
    out = robustness.run_case("y", short, pd.DataFrame({"a": [1.0]}))
    assert out.outcome == "crash" and "shape" in out.detail
    # a null where the contract allows none is refused before the model is called, as the service's 422
    out = robustness.run_case("z", nan_model, pd.DataFrame({"a": [None]}))
    assert out.outcome == "validation_error" and out.detail.startswith("a: null not allowed")
