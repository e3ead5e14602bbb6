"""The continuous-training flow: retrain when served inputs drifted from the training data for long enough, on
what production served and labelled, judged on production's latest rows; never on a blip or mid-rollout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.ci_pipeline import CIParameters, ci_pipeline
from flows.continuous_training import ContinuousTrainingParameters, continuous_training
from rollout.config import load_policy
from rollout.data import example_dataset, records_of
from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.registry import MlflowRegistry
from tests.conftest import write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _serve(path: Path, rows: int, drift: float, seed: int = 21, labelled: bool = True) -> None:
    """Log `rows` served requests as the service logs them (inputs without the time and unit columns, the unit
    as the row's unit id), inputs from the example generator with `drift`, and their labels when `labelled`."""
    policy = load_policy(path)
    data = policy.data
    frame = example_dataset(rows=rows, seed=seed, drift=drift)
    inputs = frame.drop(columns=[data.target, data.timestamp_column, data.unit_column])
    tag = f"{seed}-{drift}-{time.monotonic_ns()}"
    store = OutcomeStore(policy.outcome_url)
    store.log_predictions(
        PredictionRow(f"r{tag}-{i}", "1", unit_id=str(unit), features=record, prediction=1.0)
        for i, (record, unit) in enumerate(zip(records_of(inputs), frame[data.unit_column], strict=True)))
    if labelled:
        store.add_labels((f"r{tag}-{i}", int(y)) for i, y in enumerate(frame[data.target]))


def _versions(path: Path) -> dict[str, str]:
    policy = load_policy(path)
    return MlflowRegistry(policy.tracking_uri, policy.registry.model_name).aliases()


def _audit(path: Path) -> list[str]:
    return [e.decision for e in OutcomeStore(load_policy(path).outcome_url).audit_log()]


def test_too_few_served_rows_say_so_and_train_nothing(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    _serve(path, 40, drift=2.0)
    outcome = continuous_training(config=str(path))
    assert not outcome.retrained and "Only 40 production rows" in outcome.reason
    assert _versions(path) == {}


def test_inputs_like_the_training_data_train_nothing(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    _serve(path, 1500, drift=0.0)
    outcome = continuous_training(config=str(path), params=ContinuousTrainingParameters(window=1000))
    assert not outcome.retrained and outcome.drifted == [] and "No drift" in outcome.reason
    assert _versions(path) == {} and _audit(path) == ["drift-check"]


def test_a_one_check_blip_does_not_retrain(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    params = ContinuousTrainingParameters(window=1000)
    _serve(path, 1000, drift=1.5)  # drifted for one check
    first = continuous_training(config=str(path), params=params)
    assert not first.retrained and "income" in first.drifted and "1 consecutive check(s) of the 2" in first.reason
    _serve(path, 1000, drift=0.0, seed=22)  # back to normal: the newest 1,000 rows look like training
    second = continuous_training(config=str(path), params=params)
    assert not second.retrained and second.drifted == []
    _serve(path, 1000, drift=1.5, seed=23)  # drifted again: the count starts over
    third = continuous_training(config=str(path), params=params)
    assert not third.retrained and "1 consecutive check(s)" in third.reason
    assert _versions(path) == {} and _audit(path) == ["drift-check"] * 3


def test_persistent_drift_retrains_on_production_rows_judged_on_the_latest(tmp_path: Path) -> None:
    path = write_policy(tmp_path, rollout={"mode": "shadow"})
    champion = ci_pipeline(config=str(path))  # trained on the policy's (pre-drift) data
    assert champion.version == "1" and _versions(path) == {"champion": "1"}
    params = ContinuousTrainingParameters(window=1000, ci=CIParameters(rollout_start=None))
    _serve(path, 1500, drift=1.0, seed=31)  # approvals fall to 26%: within the suite
    assert not continuous_training(config=str(path), params=params).retrained  # 1 of 2 checks
    _serve(path, 1500, drift=1.0, seed=32)
    outcome = continuous_training(config=str(path), params=params)
    assert outcome.retrained and outcome.version == "2", outcome.reason
    assert _audit(path) == ["drift-check", "retrain"]
    policy = load_policy(path)
    registry = MlflowRegistry(policy.tracking_uri, policy.registry.model_name)
    assert _versions(path)["challenger"] == "2"
    assert OutcomeStore(policy.outcome_url).current_rollout().mode == "shadow"  # it goes to shadow
    client = MlflowClient(policy.tracking_uri, policy.tracking_uri)
    run = client.get_run(registry.run_id("2"))
    params_logged = run.data.params
    assert params_logged["training_data.source"] == "production"
    assert params_logged["training_data.production_rows"] == "3000"  # the served, labelled rows of the window
    assert params_logged["split"] == "time" and "training_data.served_from" in params_logged
    # judged on production's latest rows: the candidate is at least as good as the stale champion there
    metrics = run.data.metrics
    assert metrics["holdout_roc_auc"] >= metrics["champion_roc_auc"] - 0.01, metrics

    # while that rollout is open, drift does not retrain, even when forced
    _serve(path, 1000, drift=2.0, seed=33)
    held = continuous_training(config=str(path), params=ContinuousTrainingParameters(window=1000, force=True))
    assert not held.retrained and "is open: retraining waits" in held.reason
    assert _versions(path)["challenger"] == "2"


def test_production_rows_without_labels_stop_with_a_clear_reason(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    _serve(path, 1200, drift=1.5, labelled=False)
    params = ContinuousTrainingParameters(window=1000, force=True)
    with pytest.raises(Exception, match="only 0 labelled production rows"):
        continuous_training(config=str(path), params=params)
    assert _versions(path) == {}
