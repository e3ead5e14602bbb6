"""`rollout check-config --data`: a policy against data it does not fit, every problem at once, each naming the
field to change; and the warnings a new user needs (an id as a category, a leaked target)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from cli.main import app
from rollout.checks import ERROR, WARNING, check_data
from rollout.config import parse_policy
from tests.conftest import write_policy


def _cancer() -> pd.DataFrame:
    return load_breast_cancer(as_frame=True).frame


def test_every_problem_of_a_policy_that_does_not_fit_its_data_at_once():
    """The loan example's defaults left in a policy for another table, a typo in a parameter, and a guardrail
    segment the data never has: all reported, each naming its field."""
    frame = _cancer().assign(tier=np.where(np.arange(569) % 2 == 0, "gold", "standard"))
    policy = parse_policy({"data": {"target": "target", "unit_column": "customer_id", "timestamp_column": "applied_at",
                                    "segment_column": "tier", "drop_columns": ["ssn"]},
                           "estimator": {"name": "random_forest", "params": {"n_estimator": 50, "max_depth": 4},
                                         "search": {"space": {"min_sample_leaf": {"low": 1, "high": 5}}}}})
    problems = check_data(policy, frame)
    said = {p.field: p.message for p in problems}
    assert [p.severity for p in problems].count(ERROR) == 6 and said["data.source"].startswith("its columns are")
    assert "'customer_id' is not a column of the data" in said["data.unit_column"]
    assert "'applied_at' is not a column" in said["data.timestamp_column"]
    assert "'ssn' is not a column" in said["data.drop_columns"]
    assert said["estimator.params.n_estimator"].endswith("did you mean 'n_estimators'?")
    assert "max_depth" not in " ".join(said)  # a parameter it takes is fine
    assert said["estimator.search.space.min_sample_leaf"].endswith("did you mean 'min_samples_leaf'?")
    assert "'VIP' never occurs in 'tier' (values: gold, standard)" in said["rollout.segment_guardrails[0].segment"]


def test_a_target_the_task_cannot_learn_and_warnings_for_ids_and_leaks():
    frame = _cancer()
    problems = check_data(parse_policy({"data": {"target": "mean radius", "timestamp_column": None,
                                                 "unit_column": None, "segment_column": None},
                                        "rollout": {"segment_guardrails": []}}), frame)
    assert [p.field for p in problems] == ["data.target 'mean radius' (data.task 'classification')"]
    assert "a continuous target" in problems[0].message

    frame = frame.assign(ticket=[f"T-{i:06d}" for i in range(569)] * 1, leak=frame["target"] * 3.0 + 1.0)
    frame = pd.concat([frame] * 2, ignore_index=True).assign(ticket=[f"T-{i:06d}" for i in range(1138)])
    policy = parse_policy({"data": {"target": "target", "timestamp_column": None, "unit_column": None,
                                    "segment_column": None}, "rollout": {"segment_guardrails": []}})
    problems = check_data(policy, frame)
    said = {p.field: p for p in problems}
    assert all(p.severity == WARNING for p in problems)
    assert "1138 distinct values" in said["column 'ticket'"].message
    assert "ROC AUC 1.0000" in said["column 'leak'"].message and "data.drop_columns" in said["column 'leak'"].message
    assert "column 'mean radius'" not in said  # a strong feature (ROC AUC 0.94) is not a leak


def test_check_config_data_prints_every_problem_and_exits_2(tmp_path):
    frame = _cancer()
    frame.to_csv(tmp_path / "cancer.csv", index=False)
    # The example's policy copied for another table: its column roles left in, a parameter mistyped.
    path = write_policy(tmp_path, data={"source": "cancer.csv", "target": "target", "timestamp_column": "applied_at",
                                        "segment_column": "tier", "unit_column": "customer_id"},
                        estimator={"name": "logistic_regression", "params": {"c": 0.5}})
    result = CliRunner().invoke(app, ["check-config", "--config", str(path), "--data"], terminal_width=200)
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    for field in ("data.timestamp_column", "data.segment_column", "data.unit_column", "estimator.params.c"):
        assert f"error {field}" in said, said
    assert "did you mean 'C'?" in said and "6 error(s): the policy does not fit its data (569 rows)" in said
    assert said.count("its columns are: mean radius") == 1
    # The example's suite is still ci.expectations_suite: what `rollout ci` would fail on, in one line.
    assert ("error data validation (loan_training): 13 column(s) of the suite are not in the data: customer_id, applied_at,"
            in said and "a suite for another table? `rollout make-suite --force` writes one from this data" in said)

    suite = str(tmp_path / "cancer_suite.json")
    fixed = write_policy(tmp_path, data={"source": "cancer.csv", "target": "target"},  # nothing of the example...
                         ci={"expectations_suite": suite})
    result = CliRunner().invoke(app, ["check-config", "--config", str(fixed), "--data"], terminal_width=200)
    said = " ".join(result.output.split())  # ...but its model name: on a shared MLflow server, one model for all
    assert result.exit_code == 0 and "warning registry.model_name: still the example's 'loan-approval'" in said
    assert f"ci.expectations_suite: no suite at {suite} yet (`rollout make-suite` writes a starter one" in said
    assert "the policy fits its data (569 rows, 31 columns; 1 warning(s))" in said
    named = write_policy(tmp_path, data={"source": "cancer.csv", "target": "target"}, registry={"model_name": "cancer"},
                         ci={"expectations_suite": suite})
    assert CliRunner().invoke(app, ["make-suite", "--config", str(named)]).exit_code == 0
    result = CliRunner().invoke(app, ["check-config", "--config", str(named), "--data"], terminal_width=200)
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "the policy fits its data (569 rows, 31 columns)" in said
    met = re.search(r"data validation \(cancer_suite\): (\d+) of (\d+) expectations met on 569 rows", said)
    assert met and met[1] == met[2] and int(met[2]) > 60, said  # every column's type, nulls and range

    # Later data the suite refuses: each failed expectation named, as `rollout ci` would stop on it.
    bad = frame.copy()
    bad.loc[:9, "mean radius"] = -1.0
    bad.loc[:, "worst area"] = None
    bad.to_csv(tmp_path / "cancer.csv", index=False)
    result = CliRunner().invoke(app, ["check-config", "--config", str(named), "--data"], terminal_width=200)
    said = " ".join(result.output.split())
    assert result.exit_code == 2, said
    assert "error data validation (cancer_suite): `mean radius`: expected values >= 0 and <= " in said
    assert "error data validation (cancer_suite): `worst area`: expected no nulls" in said
    assert "2 error(s): the policy does not fit its data (569 rows)" in said


def test_parameter_values_the_estimator_refuses_are_found_before_training():
    policy = parse_policy({"data": {"source": "c.csv", "target": "target"}, "registry": {"model_name": "cancer"},
                           "estimator": {"name": "logistic_regression", "params": {"C": -1}}})
    problems = check_data(policy, _cancer())
    assert [(p.field, p.severity) for p in problems] == [("estimator.params", ERROR)]
    assert "The 'C' parameter of LogisticRegression must be a float in the range (0.0, inf]" in problems[0].message


def test_a_factory_that_returns_a_class_is_found_by_check_config_not_by_a_ci_run(tmp_path, monkeypatch):
    """A team's factory returning `Ridge` instead of `Ridge()`: check-config --data calls it as CI would and names
    estimator.factory; a factory returning an instance fits."""
    package = tmp_path / "team_factories"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from sklearn.linear_model import LogisticRegression\n\n"
        "def as_class(schema, **params):\n    return LogisticRegression\n\n"
        "def as_instance(schema, **params):\n    return LogisticRegression(max_iter=500, **params)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def problems_of(factory: str) -> dict[str, str]:
        policy = parse_policy({"data": {"source": "c.csv", "target": "target"}, "registry": {
            "model_name": "cancer", "trusted_modules": ["team_factories"]},
            "estimator": {"factory": f"team_factories:{factory}", "params": {"C": 0.5}}})
        return {p.field: p.message for p in check_data(policy, _cancer())}

    said = problems_of("as_class")
    assert "returned the class LogisticRegression, not an estimator" in said["estimator.factory"]
    assert "estimator.factory" not in problems_of("as_instance")
    # a parameter given only by a search space: called with one value of it, as a trial would be
    (package / "searched.py").write_text(
        "from sklearn.linear_model import LogisticRegression\n\n"
        "def make(schema, C, max_iter=500):\n    return LogisticRegression(C=C, max_iter=max_iter)\n")
    policy = parse_policy({"data": {"source": "c.csv", "target": "target"}, "registry": {
        "model_name": "cancer", "trusted_modules": ["team_factories"]}, "estimator": {
        "factory": "team_factories.searched:make", "search": {"space": {"C": {"low": 0.01, "high": 10, "log": True}}}}})
    assert not [p for p in check_data(policy, _cancer()) if p.field.startswith("estimator")]
