"""The continuous-training flow: retrain when served inputs drifted from the training data, and only then."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.ci_pipeline import CIParameters
from flows.continuous_training import ContinuousTrainingParameters, continuous_training
from rollout.config import load_policy
from rollout.data import example_dataset, records_of
from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.registry import MlflowRegistry
from tests.conftest import write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _serve(path: Path, rows: int, drift: float) -> None:
    """Log `rows` served requests whose inputs come from the example generator with `drift`."""
    policy = load_policy(path)
    frame = example_dataset(rows=rows, seed=21, drift=drift).drop(columns=[policy.data.target])
    OutcomeStore(policy.outcome_url).log_predictions(
        PredictionRow(f"r{i}", "1", features=record, prediction=1.0) for i, record in enumerate(records_of(frame)))


def _versions(path: Path) -> dict[str, str]:
    policy = load_policy(path)
    return MlflowRegistry(policy.tracking_uri, policy.registry.model_name).aliases()


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
    assert _versions(path) == {}


def test_drifted_inputs_start_ci_pipeline_which_registers_a_version(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    _serve(path, 1500, drift=1.5)
    outcome = continuous_training(config=str(path), params=ContinuousTrainingParameters(
        window=1000, ci=CIParameters(example_seed=5)))
    assert outcome.retrained and "income" in outcome.drifted
    assert outcome.version == "1" and _versions(path) == {"champion": "1"}
