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
    assert {c for c in cases if c.startswith("null_") and c != "null_every_nullable"} == {
        f"null_{col}" for col in schema.nullable}  # nulls only where training had them
    for col in schema.numeric:
        lo, hi = schema.ranges[col]
        assert cases[f"min_{col}"][col].iloc[0] == lo and cases[f"max_{col}"][col].iloc[0] == hi
        assert cases[f"below_min_{col}"][col].iloc[0] == lo - (hi - lo)
        assert cases[f"above_max_{col}"][col].iloc[0] == hi + (hi - lo)
    assert len(cases["empty_batch"]) == 0 and len(cases["single_row"]) == 1 and len(cases["large_batch"]) == 100
    assert list(cases["columns_reordered"].columns) == list(reversed(schema.features))


def test_the_real_pipeline_survives_every_case():
    schema, frame = _schema_and_sample()
    model = training.build_pipeline(schema, EstimatorConfig()).fit(frame[list(schema.features)], frame["approved"])
    cases = robustness.synthesize_cases(schema, frame, large_rows=200)
    result = gates.robustness_gate(robustness.run_cases(LoadedModel(model), cases))
    assert result.passed, result.reason


def test_a_null_category_from_json_is_scored_as_a_missing_one_was_in_training():
    """Training reads a blank cell as NaN, the service gets JSON null as None: both are the "missing" level."""
    schema, frame = _schema_and_sample()
    model = training.build_pipeline(schema, EstimatorConfig()).fit(frame[list(schema.features)], frame["approved"])
    row = frame[list(schema.features)].dropna().head(1).copy()
    row["home_ownership"] = np.nan
    record = {k: (None if k == "home_ownership" else v) for k, v in row.iloc[0].items()}
    served = LoadedModel(model).score([record]).scores[0]
    assert served == model.predict_proba(row)[0, 1]
    assert served != model.predict_proba(row.assign(home_ownership="__never_seen__"))[0, 1]


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


def _tickets():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from make_tickets import tickets

    frame = tickets(rows=800, seed=2)
    policy = parse_policy({"data": {"source": "t.csv", "target": "escalated", "timestamp_column": None,
                                    "unit_column": None, "segment_column": None, "text_columns": ["message"]}})
    return frame, infer_schema(frame, policy.data), policy


def test_text_columns_are_learned_and_every_text_case_passes_through_the_saved_model(tmp_path):
    """TF-IDF in the default pipeline learns the urgent words; saved with skops (allow-listed types only) and
    loaded as the service loads it, the model takes empty, blank, 100k-character, non-ASCII and unseen text."""
    from rollout.registry import check_trusted, save_local

    frame, schema, policy = _tickets()
    assert schema.text == ("message",) and "message" in schema.nullable and "message" not in schema.categorical
    data = training.split(frame, schema, 0.25, 0)
    blind = infer_schema(frame, policy.data.model_copy(update={"text_columns": [], "drop_columns": ["message"]}))
    for name in ("logistic_regression", "hist_gradient_boosting"):  # sparse, and densified for the histogram booster
        without = training.fit(training.build_pipeline(blind, EstimatorConfig(name=name)), data)
        model = training.fit(training.build_pipeline(schema, EstimatorConfig(name=name)), data)
        # The escalation depends mostly on urgent phrases: reading the message lifts ROC AUC by 0.15-0.19 here.
        assert (training.evaluate(model, data.x_holdout, data.y_holdout, "roc_auc")
                > training.evaluate(without, data.x_holdout, data.y_holdout, "roc_auc") + 0.1)
    saved = save_local(model, tmp_path / "m", training.example_rows(data.x_train, schema), "classification")
    check_trusted(tmp_path / "m")  # numpy.ravel is the one function it names, and it is on the allow-list
    loaded = LoadedModel(saved)
    cases = robustness.synthesize_cases(schema, frame, large_rows=50)
    for label in robustness.TEXT_CASES:
        assert f"{label}_message" in cases
    assert len(cases["long_text_message"]["message"].iloc[0]) == 100_000
    results = robustness.run_cases(loaded, cases)
    assert {r.name for r in results} >= {f"{label}_message" for label in robustness.TEXT_CASES}
    result = gates.robustness_gate(results)
    assert result.passed, result.reason
    # A row with a null message is a valid request (training had missing messages), scored like an empty one.
    scores = loaded.score([{"message": None, "account_age_days": 10.0, "channel": "chat"},
                           {"message": "", "account_age_days": 10.0, "channel": "chat"}]).scores
    assert scores[0] == scores[1]


class _SplitsWords:
    """A hand-rolled text model that breaks on a message with no words."""

    def predict(self, frame: pd.DataFrame):
        first = [str(m).split()[0] for m in frame["message"].fillna("x")]
        return np.column_stack([np.full(len(first), 0.5), np.full(len(first), 0.5)])


def test_a_text_model_that_breaks_on_blank_text_fails_naming_the_case():
    frame, schema, _ = _tickets()
    cases = robustness.synthesize_cases(schema, frame, large_rows=20)
    result = gates.robustness_gate(robustness.run_cases(LoadedModel(_SplitsWords()), cases))
    assert not result.passed
    assert "empty_text_message" in result.reason and "whitespace_text_message" in result.reason
    assert "long_text_message" not in result.reason


class _Jumpy:
    """A classifier whose class depends on the second decimal of income: any noise flips it."""

    classes_ = np.array([0, 1])
    feature_names_in_ = None

    def predict_proba(self, frame: pd.DataFrame):
        p = ((frame["income"].fillna(0).to_numpy() * 100).astype(int) % 2).astype(float) * 0.8 + 0.1
        return np.c_[1 - p, p]


def test_answers_that_jump_under_small_noise_fail_the_gate_and_steady_ones_pass():
    schema, frame = _schema_and_sample()
    model = training.build_pipeline(schema, EstimatorConfig()).fit(frame[list(schema.features)], frame["approved"])
    steady = robustness.invariance(LoadedModel(model), schema, frame, seed=0)
    assert steady.outcome == "prediction" and "of 300 rows changed class" in steady.detail
    jumpy = robustness.invariance(LoadedModel(_Jumpy()), schema, frame, seed=0)
    assert jumpy.outcome == "unstable" and "(at most 15%, ci.invariance)" in jumpy.detail
    result = gates.robustness_gate([jumpy])
    assert not result.passed and result.reason.startswith("answers are not stable under small noise: ")
