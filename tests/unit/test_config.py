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
        ({"ci": {"metric": "auc_pr"}}, ["ci.metric", "'roc_auc'"]),
        ({"rollout": {"segment_guardrails": [{"segment": "VIP", "min": 1.5}]}},
         ["rollout.segment_guardrails.0.min", "less than or equal to 1"]),
        ({"estimator": {"name": "ridge"}}, ["estimator.name", "ridge", "classification"]),
        ({"rollout": {"design": "group_sequential"}}, ["max_samples"]),
        ({"bogus": 1}, ["bogus", "unknown field", "rollout"]),
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
