"""The compiled preprocessing (rollout.compiled): the service's outputs are scikit-learn's to the bit, on the
example's pipeline and on the bundled datasets' tables, for ordinary and odd records alike; a pipeline or an
input it cannot reproduce goes through scikit-learn."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

import rollout.compiled
from rollout.ci.training import build_pipeline
from rollout.config import DataConfig, EstimatorConfig
from rollout.data import example_dataset, infer_schema
from rollout.models import LoadedModel, ModelError, Outputs


def _fitted(frame: pd.DataFrame, target: str, task: str, estimator: str, **params: Any) -> tuple[Any, list[str]]:
    cfg = DataConfig(source="x.csv", target=target, task=task, timestamp_column=None, segment_column=None,
                     unit_column=None)
    schema = infer_schema(frame, cfg)
    model = build_pipeline(schema, EstimatorConfig(name=estimator, params=params))
    x = frame[list(schema.features)]
    model.fit(x, frame[target])
    return model, list(schema.features)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as a JSON body brings them: a missing value is null."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


def _odd(records: list[dict[str, Any]], numeric: list[str], categorical: list[str], rng: random.Random) -> None:
    """Make some values what callers send when they err or omit: nulls, absent keys, unknown levels, ints,
    booleans, numbers as strings, infinities, numbers in a categorical column."""
    for record in records:
        if numeric and rng.random() < 0.5:
            name = rng.choice(numeric)
            record[name] = rng.choice([None, 0, 7, True, "3.5", float("inf"), -1e300, 2**70])
        if categorical and rng.random() < 0.5:
            name = rng.choice(categorical)
            record[name] = rng.choice([None, "never seen", "", 3, 1.5, float("nan")])
        if rng.random() < 0.2:
            record.pop(rng.choice(numeric + categorical), None)


def _theirs(model: LoadedModel, batch: list[dict[str, Any]]) -> Outputs | str:
    try:
        return model.predict(model.frame(batch))
    except ModelError as exc:
        return str(exc)


def _mine(model: LoadedModel, batch: list[dict[str, Any]]) -> Outputs | str:
    try:
        return model.score(batch)
    except ModelError as exc:
        return str(exc)


def _same(a: Outputs | str, b: Outputs | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return (np.array_equal(np.asarray(a.predictions, dtype=float), np.asarray(b.predictions, dtype=float), equal_nan=True)
            and (a.scores is None) == (b.scores is None)
            and (a.scores is None or np.array_equal(np.asarray(a.scores, dtype=float), np.asarray(b.scores, dtype=float),
                                                    equal_nan=True))
            and a.errors == b.errors)


def _check_bit_identical(model: Any, names: list[str], frame: pd.DataFrame, numeric: list[str],
                         categorical: list[str], seed: int) -> int:
    """Batches of 1-40 records, ordinary and odd: the served outputs equal scikit-learn's to the bit. Returns how
    many batches the compiled path took itself."""
    loaded = LoadedModel(model)
    assert loaded.compiled is not None, "the pipeline should compile"
    linear = type(model.steps[-1][1]).__name__ in ("LogisticRegression", "Ridge", "LinearRegression")
    assert isinstance(loaded.compiled.final, rollout.compiled.Linear) == linear, "plain linear models skip validation"
    rng = random.Random(seed)
    rows = _records(frame[names])
    compiled = pured = 0
    for i in range(60):
        batch = [dict(r) for r in rng.sample(rows, rng.randint(1, 40))]
        if i % 2:
            _odd(batch, numeric, categorical, rng)
        else:
            try:
                loaded.compiled.matrix(batch)
                compiled += 1
            except rollout.compiled.Unsupported:
                pass
        mine, theirs = _mine(loaded, batch), _theirs(loaded, batch)
        assert _same(mine, theirs), (batch, mine, theirs)
        pure = loaded.score_pure(batch)  # what the service may score on its event loop, without model code
        if pure is not None:
            assert _same(pure, theirs), (batch, pure, theirs)
            pured += 1
    assert loaded.pure == linear
    if linear:  # ordinary batches, and odd ones the compiled path takes, are scored without the model's code
        assert pured >= compiled > 0
    else:
        assert pured == 0
    return compiled


def test_the_example_pipeline_serves_scikit_learns_outputs_to_the_bit() -> None:
    frame = example_dataset(2000, seed=3)
    model, names = _fitted(frame.drop(columns=["applied_at", "customer_id"], errors="ignore"), "approved",
                           "classification", "logistic_regression")
    schema_cols = model[0].transformers_
    numeric = list(schema_cols[0][2])
    categorical = list(schema_cols[1][2])
    assert categorical, "the example has categorical columns"
    # ordinary batches (nulls as the data has them) take the compiled path, not the fallback
    assert _check_bit_identical(model, names, frame, numeric, categorical, seed=1) >= 25


@pytest.mark.parametrize("estimator", ["logistic_regression", "hist_gradient_boosting", "random_forest"])
def test_a_bundled_multiclass_table_serves_the_same_outputs(estimator: str) -> None:
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    params = {"n_estimators": 20} if estimator == "random_forest" else {}
    model, names = _fitted(frame, "target", "multiclass", estimator, **params)
    assert _check_bit_identical(model, names, frame, names, [], seed=2) >= 25


def test_a_regression_serves_the_same_outputs() -> None:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame
    frame["sex"] = np.where(frame["sex"] > 0, "f", "m")  # one categorical column, as a team's table has
    model, names = _fitted(frame, "target", "regression", "ridge")
    numeric = [c for c in names if c != "sex"]
    assert _check_bit_identical(model, names, frame, numeric, ["sex"], seed=3) >= 25


def test_a_teams_own_pipeline_of_handled_steps_compiles_and_others_do_not() -> None:
    frame = example_dataset(800, seed=5)
    num, cat = ["income", "credit_score"], ["tier", "region"]
    x, y = frame[num + cat], frame["approved"]

    def pipe(**options: Any) -> Pipeline:
        prep = ColumnTransformer([
            ("num", SimpleImputer(strategy="mean"), num),
            ("cat", Pipeline([("fill", SimpleImputer(strategy="most_frequent")),
                              ("onehot", OneHotEncoder(handle_unknown=options.get("unknown", "ignore"),
                                                       sparse_output=False))]), cat),
        ], remainder="drop")
        return Pipeline([("prep", prep), ("scale", StandardScaler()), ("model", LogisticRegression())]).fit(x, y)

    # mean imputing, most-frequent levels, a scaler after the ColumnTransformer: compiled and identical
    _check_bit_identical(pipe(), num + cat, frame, num, cat, seed=4)
    # an encoder that refuses unknown levels: compiled, and a batch with one fails as scikit-learn fails
    strict = LoadedModel(pipe(unknown="error"))
    assert strict.compiled is not None
    batch = [{"income": 1.0, "credit_score": 700, "tier": "platinum", "region": "north"}]
    assert isinstance(_mine(strict, batch), str) and _mine(strict, batch) == _theirs(strict, batch)

    pandas_out = pipe()
    pandas_out.set_output(transform="pandas")
    assert LoadedModel(pandas_out.fit(x, y)).compiled is None  # its estimator was fitted on a frame
    indicator = Pipeline([("prep", ColumnTransformer([("num", SimpleImputer(add_indicator=True), num)])),
                          ("model", LogisticRegression())]).fit(x, y)
    assert LoadedModel(indicator).compiled is None
    assert LoadedModel(LogisticRegression().fit(x[num].fillna(0), y)).compiled is None  # no pipeline


def test_text_columns_are_not_compiled_and_still_serve() -> None:
    frame = pd.DataFrame({"text": ["good service", "bad", None, "slow and bad", "great"] * 20,
                          "amount": np.arange(100.0), "label": [1, 0, 0, 0, 1] * 20})
    cfg = DataConfig(source="x.csv", target="label", task="classification", timestamp_column=None,
                     segment_column=None, unit_column=None, text_columns=["text"])
    schema = infer_schema(frame, cfg)
    model = build_pipeline(schema, EstimatorConfig()).fit(frame[list(schema.features)], frame["label"])
    loaded = LoadedModel(model)
    assert loaded.compiled is None
    assert loaded.score([{"text": "bad", "amount": 3.0}]).errors == [None]


def test_a_compiled_path_that_differs_in_one_bit_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = example_dataset(800, seed=6)
    model, _ = _fitted(frame.drop(columns=["applied_at", "customer_id"], errors="ignore"), "approved",
                       "classification", "logistic_regression")
    assert LoadedModel(model).compiled is not None
    numeric = rollout.compiled._Block.numeric
    monkeypatch.setattr(rollout.compiled._Block, "numeric", lambda self, records: numeric(self, records) * (1 + 1e-15))
    assert LoadedModel(model).compiled is None


@pytest.mark.parametrize("columns", [2, 30])
def test_an_all_numeric_binary_table_serves_the_same_outputs(columns: int) -> None:
    # a linear model's one coefficient vector: numpy's matrix-vector product adds in an order that depends on the
    # matrix's layout, so the compiled matrix must be laid out as scikit-learn's is (column-major), not only equal
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame[[*frame.columns[:columns], "target"]]
    model, names = _fitted(frame, "target", "classification", "logistic_regression")
    assert _check_bit_identical(model, names, frame, names, [], seed=7) >= 25


def test_a_compiled_matrix_in_another_layout_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame[[*frame.columns[:2], "target"]]  # values alone round alike in either order: the probes must see it
    model, _ = _fitted(frame, "target", "classification", "logistic_regression")
    assert LoadedModel(model).compiled is not None
    numeric = rollout.compiled._Block.numeric
    monkeypatch.setattr(rollout.compiled._Block, "numeric",
                        lambda self, records: np.ascontiguousarray(numeric(self, records)))
    assert LoadedModel(model).compiled is None


def test_a_pipeline_without_an_estimator_is_not_compiled() -> None:
    frame = example_dataset(300, seed=8)
    num = ["income", "credit_score"]
    prep = Pipeline([("prep", ColumnTransformer([("num", SimpleImputer(), num)])),
                     ("scale", StandardScaler()), ("model", "passthrough")]).fit(frame[num])
    loaded = LoadedModel(prep)
    assert loaded.compiled is None
    with pytest.raises(ModelError, match="Pipeline"):  # scikit-learn's own words, not the compiled path's
        loaded.score([{"income": 1.0, "credit_score": 700}])


def test_a_batch_past_max_cells_is_scored_by_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = example_dataset(400, seed=9)
    model, names = _fitted(frame.drop(columns=["applied_at", "customer_id"], errors="ignore"), "approved",
                           "classification", "logistic_regression")
    loaded = LoadedModel(model)
    assert loaded.compiled is not None
    batch = _records(frame[names].head(30))
    monkeypatch.setattr(rollout.compiled, "MAX_CELLS", 20 * len(names))
    loaded.compiled.matrix(batch[:20])  # at the bound: compiled
    with pytest.raises(rollout.compiled.Unsupported):
        loaded.compiled.matrix(batch)
    calls: list[int] = []
    frame_of = loaded.frame
    monkeypatch.setattr(loaded, "frame", lambda records: calls.append(len(records)) or frame_of(records))
    assert _same(loaded.score(batch), _theirs(loaded, batch)) and calls[0] == 30  # through scikit-learn


def test_a_linear_models_fast_path_leaves_what_it_cannot_reproduce_to_the_model() -> None:
    """A matrix scikit-learn's validation would refuse goes to the model's own method (its error, not a silent
    NaN); a subclass that scores its own way keeps its own method."""
    frame = example_dataset(500, seed=4)
    model, _ = _fitted(frame.drop(columns=["applied_at", "customer_id"], errors="ignore"), "approved",
                       "classification", "logistic_regression")
    estimator = model.steps[-1][1]
    fast = rollout.compiled.Linear.of(estimator)
    assert fast is not None
    x = np.ones((3, estimator.coef_.shape[1]))
    assert np.array_equal(fast.predict_proba(x), estimator.predict_proba(x))
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fast.predict_proba(x)
    with pytest.raises(ValueError, match="features"):
        fast.predict_proba(np.ones((2, estimator.coef_.shape[1] + 1)))

    class Calibrated(LogisticRegression):
        def predict_proba(self, X: Any) -> Any:
            return super().predict_proba(X) * 0.5 + 0.25

    assert rollout.compiled.Linear.of(Calibrated().fit(np.eye(4), [0, 1, 0, 1])) is None


def test_a_linear_model_with_odd_coefficient_arrays_is_left_to_its_own_methods() -> None:
    # the service scores a Linear model on its event loop: arithmetic on an ndarray subclass or on Python objects
    # would run code of the model's own there
    class Marked(np.ndarray):
        pass

    for odd in (lambda c: c.astype(object), lambda c: c.view(Marked)):
        estimator = LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
        assert rollout.compiled.Linear.of(estimator) is not None
        estimator.coef_ = odd(estimator.coef_)
        assert rollout.compiled.Linear.of(estimator) is None
    estimator = LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
    estimator.intercept_ = estimator.intercept_.view(Marked)
    assert rollout.compiled.Linear.of(estimator) is None
