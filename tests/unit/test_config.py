"""The policy file: defaults serve the example; a wrong field is named with its allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout.config import ConfigError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]


def test_example_policy_loads_and_resolves_paths_against_its_directory():
    policy = load_policy(ROOT / "rollout.yaml")
    assert policy.registry.model_name == "loan-approval"
    assert policy.tracking_uri == f"sqlite:///{ROOT / '.rollout' / 'mlflow.db'}"
    assert policy.path(policy.ci.expectations_suite) == ROOT / "expectations" / "loan_training.json"


def test_empty_policy_gets_defaults_that_serve_the_example():
    policy = parse_policy({})
    assert policy.rollout.mode == "shadow" and policy.ci.metric == "roc_auc"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"rollout": {"mode": "canary"}}, ["rollout.mode", "'shadow'", "'bandit'", "canary"]),
        ({"ci": {"metrc": "roc_auc"}}, ["ci.metrc", "unknown field", "metric"]),
        ({"ci": {"cv_folds": "five"}}, ["ci.cv_folds", "integer"]),
        ({"ci": {"metric": "rmse"}}, ["ci.metric", "classification", "roc_auc"]),
        ({"ci": {"metric": "auc_pr"}}, ["ci.metric 'auc_pr'", "roc_auc", "a scikit-learn scorer name"]),
        ({"rollout": {"segment_guardrails": [{"segment": "VIP", "min": 1.5}]}},
         ["rollout.segment_guardrails.0.min", "less than or equal to 1"]),
        ({"estimator": {"name": "ridge"}}, ["estimator.name", "ridge", "classification"]),
        ({"bogus": 1}, ["bogus", "unknown field", "rollout"]),
        ({"rollout": {"multiplicity": "holm", "design": "group_sequential"}}, ["rollout", "design: mixture"]),
        ({"estimator": {"factory": "team_model.build"}}, ["estimator.factory", "'package.module:function'"]),
        ({"estimator": {"factory": "team_model:build"}}, ["estimator.factory", "registry.trusted_modules"]),
        ({"estimator": {"factory": "team_modelx:build"}, "registry": {"trusted_modules": ["team_model"]}},
         ["estimator.factory", "registry.trusted_modules"]),
    ],
)
def test_bad_field_is_named_with_allowed_values(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_policy(raw)
    for fragment in expected:
        assert fragment in str(err.value)


def test_every_error_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        parse_policy({"ci": {"cv_folds": 1}, "serving": {"port": -1}})
    assert "ci.cv_folds" in str(err.value) and "serving.port" in str(err.value)


def test_bad_yaml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ci: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(bad)


def test_a_factory_in_a_trusted_package_or_its_subpackage_is_accepted():
    policy = parse_policy({"estimator": {"factory": "team_model.models:build", "params": {"C": 0.5}},
                           "registry": {"trusted_modules": ["team_model"]}})
    assert policy.estimator.label == "team_model.models:build" and policy.estimator.params == {"C": 0.5}


def test_gate_limits_fit_the_metric_scale():
    """AUC-sized numbers are not applied to RMSE: unset limits of an error metric are shares of the naive
    baseline's score, a share can be written as 'N%', and no fixed floor is assumed for it."""
    from rollout.ci import gates

    with pytest.raises(ConfigError, match=r"rollout.margin and rollout.min_detectable_effect: rollout.primary_metric "
                                          r"'mse' is in the target's units, so no default fits"):
        parse_policy({"data": {"source": "t.csv", "target": "temp", "task": "regression"}, "estimator": {"name": "ridge"}})
    online = {"margin": 0.2, "min_detectable_effect": 1.0}
    regression = parse_policy({"data": {"source": "t.csv", "target": "temp", "task": "regression"},
                               "estimator": {"name": "ridge"}, "ci": {"metric": "rmse"}, "rollout": online})
    assert regression.ci.floor_value is None
    value, said = regression.ci.limit("max_train_val_gap", scale=8.0)  # the target's spread: 8 degrees
    assert value == pytest.approx(1.2) and said == "1.2: 15% of the naive baseline's 8, ci.max_train_val_gap"
    result = gates.overfit_gate("rmse", [2.0, 2.1], [3.9, 4.0], regression.ci.limit("max_train_val_gap", 8.0),
                                regression.ci.limit("max_fold_std", 8.0))
    assert not result.passed and "(limit 1.2: 15% of the naive baseline's 8, ci.max_train_val_gap)" in result.reason
    skipped = gates.floor_gate("rmse", 3.9, regression.ci.floor_value)
    assert skipped.headline == "SKIPPED" and "no fixed ceiling for rmse (set ci.floor" in skipped.reason

    own = parse_policy({"data": {"source": "t.csv", "target": "temp", "task": "regression"},
                        "estimator": {"name": "ridge"}, "rollout": online,
                        "ci": {"metric": "rmse", "floor": 4.5, "max_train_val_gap": 2.5, "max_fold_std": "10%"}})
    assert own.ci.floor_value == 4.5 and own.ci.limit("max_train_val_gap", 8.0)[0] == 2.5
    assert own.ci.limit("max_fold_std", 8.0)[0] == pytest.approx(0.8)
    assert parse_policy({}).ci.floor_value == 0.70 and parse_policy({}).ci.limit("max_fold_std", 0.5)[0] == 0.03
    with pytest.raises(ConfigError, match=r"ci.max_fold_std: '10 percent': a number in the metric's units"):
        parse_policy({"ci": {"max_fold_std": "10 percent"}})


def test_your_metric_any_scikit_learn_scorer_or_your_function():
    """ci.metric takes any scikit-learn scorer name or a trusted 'module:function'; both are computed from the
    outputs the service would give, and agree with scikit-learn on the same rows."""
    import sys
    import types

    import numpy as np
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, brier_score_loss

    from rollout.models import metric_value

    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    score = np.array([0.2, 0.9, 0.6, 0.4, 0.3, 0.1, 0.8, 0.7])
    prediction = (score >= 0.5).astype(float)
    assert metric_value("balanced_accuracy", y, prediction, score) == pytest.approx(balanced_accuracy_score(y, prediction))
    assert metric_value("average_precision", y, prediction, score) == pytest.approx(average_precision_score(y, score))
    assert metric_value("neg_brier_score", y, prediction, score) == pytest.approx(-brier_score_loss(y, score))

    module = types.ModuleType("team_metrics")
    module.cost = lambda y_true, pred, s: -float(np.mean(5.0 * ((pred == 1) & (y_true == 0)) + 1.0 * ((pred == 0) & (y_true == 1))))
    sys.modules["team_metrics"] = module
    try:
        assert metric_value("team_metrics:cost", y, prediction, score) == pytest.approx(-1.0 / 8)
        policy = parse_policy({"ci": {"metric": "team_metrics:cost"}, "registry": {"trusted_modules": ["team_metrics"]}})
        assert policy.ci.limit("max_train_val_gap", 0.5)[1].endswith("15% of the naive baseline's 0.5, ci.max_train_val_gap")
    finally:
        del sys.modules["team_metrics"]
    with pytest.raises(ConfigError, match=r"did you mean 'balanced_accuracy'"):
        parse_policy({"ci": {"metric": "balanced_acuracy"}})
    with pytest.raises(ConfigError, match=r"its package must be trusted by name in registry.trusted_modules"):
        parse_policy({"ci": {"metric": "team_metrics:cost"}})


def test_store_urls_take_credentials_from_the_environment_and_name_a_missing_variable(tmp_path, monkeypatch):
    """`${NAME}` in stores.outcome_store_url / mlflow_tracking_uri comes from the environment, so credentials stay out
    of the policy file; one that is not set is a ConfigError naming the field; a bare `$` (a password) is kept."""
    policy = parse_policy({"stores": {"outcome_store_url": "postgresql+psycopg://${PG_USER}:pa$$@db:5432/outcomes",
                                      "mlflow_tracking_uri": "http://${MLFLOW_HOST}:5000"}}, tmp_path)
    monkeypatch.setenv("PG_USER", "rollout")
    assert policy.outcome_url == "postgresql+psycopg://rollout:pa$$@db:5432/outcomes"
    monkeypatch.delenv("MLFLOW_HOST", raising=False)
    with pytest.raises(ConfigError, match=r"stores.mlflow_tracking_uri: environment variable MLFLOW_HOST is not set"):
        _ = policy.tracking_uri


def test_the_policy_a_run_records_in_mlflow_shows_no_password(tmp_path, monkeypatch):
    """CI and adopt runs keep the policy they were judged by (`policy.yaml`): a store URL from the environment with
    its password in it (ROLLOUT_OUTCOME_STORE_URL) or a database data.source is recorded with *** instead."""
    from rollout.ci.registration import policy_text

    monkeypatch.setenv("ROLLOUT_OUTCOME_STORE_URL", "postgresql+psycopg://rollout:s3cr@t@db:5432/outcomes")
    (tmp_path / "rollout.yaml").write_text(
        "data: {source: 'postgresql://reader:hunter2@warehouse/analytics', target: y, query: 'SELECT 1'}\n")
    text = policy_text(load_policy(tmp_path / "rollout.yaml"))
    assert "s3cr" not in text and "hunter2" not in text
    assert "postgresql+psycopg://rollout:***@db:5432/outcomes" in text and "postgresql://reader:***@warehouse" in text
    from rollout.ci.registration import masked_url

    assert masked_url("postgresql://myuser@myserver:s3cret@host/db") == "postgresql://myuser@myserver:***@host/db"
    assert masked_url("postgresql://u@h/db?sslmode=require&password=x1") == "postgresql://u@h/db?sslmode=require&password=***"
    for kept in ("postgresql://host:5432/db?application_name=a@b", "sqlite:///./mlflow.db", "^https?://[^:]+:\\d+@"):
        assert masked_url(kept) == kept  # no password, or not a URL: as it was
