"""Hyperparameter search: it finds the parameter that matters, never sees the held-out rows, is seeded, and
says which parameter is wrong."""

import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes

from rollout.ci import search, training
from rollout.config import ConfigError, parse_policy
from rollout.data import infer_schema


def _policy(task: str, estimator: dict):
    return parse_policy({"data": {"source": "x.csv", "target": "target", "task": task, "timestamp_column": None,
                                  "unit_column": None, "segment_column": None},
                         "ci": {"metric": "r2" if task == "regression" else "roc_auc"},
                         "rollout": {"primary_metric": "mse" if task == "regression" else "accuracy",
                                     "margin": 30.0, "min_detectable_effect": 150.0, "segment_guardrails": []},
                         "estimator": estimator})


def _data(task: str, policy):
    frame = (load_diabetes if task == "regression" else load_breast_cancer)(as_frame=True).frame
    schema = infer_schema(frame, policy.data)
    return schema, training.split(frame, schema, 0.2, 0)


def test_search_finds_the_regularisation_that_matters_on_training_rows_only():
    """Logistic regression on breast cancer with C from 1e-6 (predicts the prior: ROC AUC of a near-constant
    score) to 100: the search keeps a C where the model learns, scored on the training split alone."""
    policy = _policy("classification", {"name": "logistic_regression", "search": {
        "trials": 8, "sampler": "random", "space": {"C": {"low": 1e-6, "high": 100.0, "log": True}}}})
    schema, data = _data("classification", policy)
    heard = []
    result = search.search(policy.estimator, schema, data.x_train, data.y_train, "roc_auc", 0, heard.append)
    assert [t.number for t in heard] == list(range(8)) and len(result.trials) == 8
    assert result.rows == len(data.x_train)  # the held-out rows were never given to it
    values = {t.params["C"]: t.value for t in result.trials}
    assert result.best_params["C"] == max(values, key=lambda c: values[c])
    assert result.best_params["C"] > 1e-3 and result.best_value > 0.98


def test_search_is_seeded_and_keeps_integer_ranges_whole():
    policy = _policy("regression", {"name": "random_forest_regressor", "params": {"n_estimators": 20}, "search": {
        "trials": 4, "space": {"max_depth": {"low": 2, "high": 6}, "max_features": {"choices": [0.5, 1.0]}}}})
    schema, data = _data("regression", policy)
    first = search.search(policy.estimator, schema, data.x_train, data.y_train, "r2", 3)
    again = search.search(policy.estimator, schema, data.x_train, data.y_train, "r2", 3)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert all(isinstance(t.params["max_depth"], int) and 2 <= t.params["max_depth"] <= 6 for t in first.trials)
    assert first.best_params["n_estimators"] == 20


def test_failed_trials_are_kept_apart_and_all_failing_names_the_field():
    """A parameter the estimator refuses fails its trial; when every trial fails, the error names the field."""
    policy = _policy("classification", {"name": "decision_tree", "search": {
        "trials": 3, "space": {"max_depth": {"choices": ["deep"]}}}})
    schema, data = _data("classification", policy)
    with pytest.raises(ConfigError, match=r"estimator.search.space: every trial failed.*max_depth"):
        search.search(policy.estimator, schema, data.x_train, data.y_train, "roc_auc", 0)


@pytest.mark.parametrize("space, said", [
    ({"C": {"low": 5, "high": 1}}, "estimator.search.space.C: low 5 must be below high 1"),
    ({"C": {"low": 0, "high": 1, "log": True}}, "log: true needs low above 0"),
    ({"C": {"high": 1}}, "give low and high (a range) or choices"),
    ({}, "estimator.search.space"),
])
def test_a_bad_search_space_names_the_parameter(space, said):
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
        _policy("classification", {"name": "logistic_regression", "search": {"space": space}})
