"""Flow `continuous-training`: start ci-pipeline when recent production inputs say the training data is stale."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow
from pydantic import BaseModel, Field

from flows.ci_pipeline import CIParameters, ci_pipeline
from tasks.common import load_policy_task
from tasks.training_data import production_drift


class ContinuousTrainingParameters(BaseModel):
    """What a person can set from the Prefect UI's Run form."""

    window: int = Field(5000, ge=100, description="How many recent served requests form the production sample.")
    force: bool = Field(False, description="Retrain even when no drift is found.")
    ci: CIParameters = Field(default_factory=CIParameters, title="ci",
                             description="Overrides passed on to ci-pipeline (empty fields keep the policy's values).")


@dataclass
class ContinuousTrainingOutcome:
    """Whether drift was found, on which features, and the ci-pipeline result when one ran."""

    retrained: bool
    drifted: list[str] = field(default_factory=list)
    reason: str = ""
    version: str | None = None


@flow(name="continuous-training", log_prints=True)
def continuous_training(config: str = "rollout.yaml",
                        params: ContinuousTrainingParameters = ContinuousTrainingParameters()  # noqa: B008
                        ) -> ContinuousTrainingOutcome:
    """Compare recent production inputs with the training data; retrain when they drifted.

    Args:
        config: Path of the policy file (rollout.yaml) on the worker, relative to its working directory.
        params: How many recent requests to compare, whether to retrain anyway, and the CI run's overrides.
    """
    params = params or ContinuousTrainingParameters()
    policy = load_policy_task(config)
    check = production_drift(policy, params.window)
    if not (check.drifted or params.force):
        print(check.reason)
        return ContinuousTrainingOutcome(retrained=False, reason=check.reason)
    print(f"{check.reason} Starting ci-pipeline.")
    outcome = ci_pipeline(config=config, params=params.ci)
    return ContinuousTrainingOutcome(retrained=True, drifted=check.drifted, reason=check.reason,
                                     version=outcome.version)
