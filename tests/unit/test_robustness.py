"""Edge cases come from the schema; a crash fails the gate naming the case, a clean refusal does not."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rollout import gates, robustness, training
from rollout.config import EstimatorConfig, parse_policy
from rollout.data import example_dataset, infer_schema


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
    result = gates.robustness_gate(robustness.run_cases(model.predict_proba, cases, "classification"))
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
    result = gates.robustness_gate(robustness.run_cases(_CrashesOnNulls().predict, cases, "classification"))
    assert not result.passed
    assert "null_credit_score (ValueError: Input contains NaN)" in result.reason
    assert "single_row" not in result.reason


def test_garbage_output_is_a_crash_and_a_clean_refusal_is_not():
    def nan_model(frame):
        return np.full((len(frame), 2), np.nan)

    out = robustness.run_case("x", nan_model, pd.DataFrame({"a": [1.0]}), "classification", lambda e: False)
    assert out.outcome == "crash" and "NaN" in out.detail

    def refusing(frame):
        raise KeyError("column 'a' is missing")

    out = robustness.run_case("y", refusing, pd.DataFrame({"a": [1.0]}), "classification", lambda e: isinstance(e, KeyError))
    assert out.outcome == "validation_error"
