"""The embedded stores move with their folder: a copied demo folder opens with its models and artifacts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from rollout import registry as reg
from rollout.config import load_policy
from tests.conftest import register_income_model, write_policy


def _register(folder: Path) -> str:
    """One run with a text artifact and a registered @champion, as the CI flow leaves them; the run's id."""
    folder.mkdir()
    return register_income_model(write_policy(folder), "champion", text_artifact=True)[1]


def test_a_copied_demo_folder_opens_with_its_models_and_artifacts(tmp_path: Path) -> None:
    run_id = _register(tmp_path / "first")
    shutil.copytree(tmp_path / "first", tmp_path / "second")
    shutil.rmtree(tmp_path / "first")  # moved, not copied: the recorded paths point nowhere

    policy = load_policy(tmp_path / "second" / "rollout.yaml")
    registry = reg.MlflowRegistry.for_policy(policy)

    model = registry.load(registry.aliases()["champion"])
    assert len(model.predict(pd.DataFrame({"income": [0.0, 3.0]}))) == 2  # its files are read from the new folder
    assert [a.path for a in registry.client.list_artifacts(run_id, "gates")] == ["gates/overfit.md"]
    assert registry.client.get_run(run_id).info.artifact_uri.startswith(policy.artifact_location or "-")
    # and new runs land in the new folder too
    experiment = reg.experiment_id(policy.tracking_uri, policy.registry.experiment, policy.artifact_location)
    assert registry.client.get_experiment(experiment).artifact_location == policy.artifact_location


def test_a_copy_beside_the_original_keeps_both_working(tmp_path: Path) -> None:
    first = _register(tmp_path / "first")
    shutil.copytree(tmp_path / "first", tmp_path / "second")

    for name in ("first", "second"):
        policy = load_policy(tmp_path / name / "rollout.yaml")
        registry = reg.MlflowRegistry.for_policy(policy)
        assert registry.load("1") is not None
        # each folder reads its own files: a copy that still pointed at the original would break once it goes
        assert registry.client.get_run(first).info.artifact_uri.startswith(policy.artifact_location or "-")
