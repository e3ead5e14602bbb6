"""The scale path: ci-pipeline's folds and stress run on a local Dask cluster (prefect-dask)."""

from __future__ import annotations

import pytest

from flows.ci_pipeline import ci_pipeline
from flows.runners import dask_runner
from rollout.registry import MlflowRegistry
from rollout.config import load_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_ci_pipeline_on_a_local_dask_cluster_registers_the_same_way(policy_file):
    pytest.importorskip("prefect_dask")
    outcome = ci_pipeline.with_options(task_runner=dask_runner(workers=2))(config=str(policy_file))
    assert outcome.aliases == ["champion"]
    overfit = next(g for g in outcome.gates if g.gate == "overfit")
    assert overfit.passed and overfit.numbers["validation_mean"] > 0.7
    policy = load_policy(policy_file)
    assert MlflowRegistry(policy.tracking_uri, policy.registry.model_name).aliases() == {"champion": "1"}
