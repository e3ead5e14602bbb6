"""The one model adapter: the label rule, per-row errors, whole-call failures, and the input contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from rollout.models import LoadedModel, ModelError, check_records, evaluate


class _Proba:
    """A binary classifier whose probabilities are given per row."""

    classes_ = np.array([0, 1])

    def __init__(self, p1: list[float]) -> None:
        self.p1 = np.asarray(p1, dtype=float)

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return np.column_stack([1 - self.p1[: len(frame)], self.p1[: len(frame)]])

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return self.predict_proba(frame).argmax(axis=1)


def test_the_label_is_what_scikit_learn_predicts_even_at_one_half() -> None:
    x = pd.DataFrame({"a": np.linspace(-3, 3, 41)})
    y = (x.a + np.random.default_rng(0).normal(0, 1, 41) > 0).astype(int)
    model = LogisticRegression().fit(x, y)
    out = LoadedModel(model).predict(x)
    assert out.predictions == model.predict(x).astype(float).tolist()
    assert out.scores == pytest.approx(model.predict_proba(x)[:, 1].tolist())
    tie = LoadedModel(_Proba([0.5, 0.5000001, 0.4999999])).predict(pd.DataFrame({"a": [0, 1, 2]}))
    assert tie.predictions == [0.0, 1.0, 0.0]  # a tie is classes_[0], as argmax and sklearn's predict


def test_bad_rows_are_errors_of_their_own_rows() -> None:
    out = LoadedModel(_Proba([0.2, np.nan, 0.9, 1.5])).predict(pd.DataFrame({"a": range(4)}))
    assert out.errors == [None, "score is NaN or infinite", None, "score outside [0, 1]"]
    with pytest.raises(ModelError, match="row 1: score is NaN"):
        out.checked()


@pytest.mark.parametrize("classes", [[0, 1], [False, True], [3, -7], ["0", "1"], [0.5, 2.0**60]])
def test_a_binary_classifier_s_unchecked_outputs_are_what_the_checks_give(classes: list[object]) -> None:
    # Two finite classes: a batch whose scores are all in [0, 1] skips the per-row checks (the service's event
    # loop scores small batches); any batch must come out as the full checks make it, flags and all.
    rng = np.random.default_rng(5)
    edge = [0.0, 1.0, 0.5, 0.5000001, np.nextafter(0.0, -1.0), np.nextafter(1.0, 2.0), np.nan, np.inf, -np.inf, 1.5]
    for size in (1, 2, 7, 40):
        for value in [None, *edge]:
            p1 = rng.uniform(0, 1, size)
            if value is not None:
                p1[rng.integers(size)] = value
            model = _Proba(p1.tolist())
            model.classes_ = np.asarray(classes)
            fast = LoadedModel(model)
            assert fast._binary_values is not None
            checked = LoadedModel(model)
            checked._binary_values = None  # the full checks only
            frame = pd.DataFrame({"a": range(size)})
            assert repr(fast.predict(frame)) == repr(checked.predict(frame))  # repr: NaN reads as NaN
    assert LoadedModel(_Proba([0.1])).predict(pd.DataFrame({"a": [0]})).predictions == [0.0]


def test_a_failed_or_misshapen_call_fails_the_whole_batch_as_a_model_error() -> None:
    class Raises:
        def predict(self, frame: pd.DataFrame) -> np.ndarray:
            raise ValueError("boom")

    class Short:
        def predict(self, frame: pd.DataFrame) -> np.ndarray:
            return np.zeros(len(frame) - 1)

    with pytest.raises(ModelError, match="ValueError: boom"):
        LoadedModel(Raises()).score([{"a": 1}])
    with pytest.raises(ModelError, match="shape"):
        LoadedModel(Short()).score([{"a": 1}, {"a": 2}])
    assert LoadedModel(Raises()).score([]).predictions == []  # an empty batch never reaches the model


def test_ci_metrics_and_the_service_score_the_same_outputs() -> None:
    x = pd.DataFrame({"a": np.linspace(-2, 2, 30)})
    y = (x.a > 0.3).astype(int)
    model = LogisticRegression().fit(x, y)
    served = LoadedModel(model).score(x.to_dict("records"))
    accuracy = float(np.mean(np.asarray(served.predictions) == y))
    assert evaluate(model, x, y, "accuracy") == pytest.approx(accuracy)


def test_the_input_contract_names_row_and_field_and_bounds_what_it_echoes() -> None:
    model = LoadedModel(type("M", (), {"input_schema": {"income": "double", "tier": "string"}, "nullable": ["tier"],
                                       "predict": lambda self, f: np.zeros(len(f))})())
    problems = check_records([{"income": 1.0}, {"income": [[1] * 10_000], "tier": None, "x": 1}], model.columns,
                             {"income", "tier"})
    assert [(p["row"], p["field"]) for p in problems] == [(1, "income"), (1, "x")]
    assert len(problems[0]["error"]) < 120  # a huge value is not echoed back whole


def test_checking_a_frame_by_the_column_finds_what_checking_its_records_finds() -> None:
    """The batch path checks a chunk by the column; every row must get the problems the service would name."""
    from rollout.data import records_of
    from rollout.models import BOOLEAN, INTEGER, NUMBER, STRING, ColumnSpec, check_frame

    rng = np.random.default_rng(3)
    n = 400
    frame = pd.DataFrame({
        "income": rng.normal(size=n),  # float: fits a number by its dtype
        "age": rng.integers(18, 90, n).astype(float),  # whole floats: fit an integer
        "count": pd.array(rng.integers(0, 5, n), dtype="Int64"),
        "tier": pd.array(rng.choice(["a", "b"], n), dtype="string"),
        "flag": rng.random(n) < 0.5,
        "mixed": pd.Series([1.5 if i % 9 else "oops" for i in range(n)], dtype=object),  # text in a number column
        "notes": pd.Series(["x" if i % 13 else 7 for i in range(n)], dtype=object),  # a number in a text column
    })
    frame.loc[frame.index[::17], "income"] = np.nan
    frame.loc[frame.index[::19], "age"] = 30.5  # not whole
    frame.loc[frame.index[::23], "count"] = pd.NA
    frame.loc[frame.index[::29], "tier"] = pd.NA
    columns = (ColumnSpec("income", NUMBER, nullable=False), ColumnSpec("age", INTEGER),
               ColumnSpec("count", INTEGER, nullable=True), ColumnSpec("tier", STRING, nullable=False),
               ColumnSpec("flag", BOOLEAN), ColumnSpec("mixed", NUMBER), ColumnSpec("notes", STRING),
               ColumnSpec("absent", NUMBER, required=False))
    records = records_of(frame)
    by_frame = check_frame(frame, columns)
    by_records = [p for i in range(n) for p in check_records([records[i]], columns, None)]
    assert [(p["field"], p["error"]) for p in by_frame] == [(p["field"], p["error"]) for p in by_records]
    assert [p["row"] for p in by_frame] == [i for i in range(n) for _ in check_records([records[i]], columns, None)]
    assert {p["field"] for p in by_frame} == {"income", "age", "tier", "mixed", "notes"}
