"""Flow `continuous-training`: start ci-pipeline when recent production inputs say the training data is stale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from flows.ci_pipeline import CIParameters, ci_pipeline
from rollout.ci.gates import GateResult
from tasks.common import load_policy_task
from tasks.training_data import production_drift, retrain_trigger


class ContinuousTrainingParameters(BaseModel):
    """What a person can set from the Prefect UI's Run form."""

    window: int = Field(5000, ge=100, description="How many recent served requests form the production sample.")
    persist: int = Field(2, ge=1, description="Consecutive checks that must find drift before retraining (a blip "
                         "of one check does not retrain).")
    training_data: Literal["policy", "production", "both"] = Field(
        "production", description="What the retrained model learns from: production's served and labelled rows "
        "(ci.training_data.days), the policy's data source (the data that may have gone stale), or both.")
    force: bool = Field(False, description="Retrain even when no drift is found (never while a rollout is open).")
    ci: CIParameters = Field(default_factory=CIParameters, title="ci",
                             description="Overrides passed on to ci-pipeline (empty fields keep the policy's values).")


@dataclass
class ContinuousTrainingOutcome:
    """Whether drift was found, on which features, and the ci-pipeline result when one ran."""

    retrained: bool
    drifted: list[str] = field(default_factory=list)
    reason: str = ""
    version: str | None = None
    gates: list[GateResult] = field(default_factory=list)  # the ci-pipeline run's verdicts, when one ran


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
    trigger = retrain_trigger(policy, check, params.persist, params.force)
    print(trigger.reason)
    if not trigger.fire:
        return ContinuousTrainingOutcome(retrained=False, drifted=check.drifted, reason=trigger.reason)
    ci = params.ci.model_copy(update={"training_data": params.ci.training_data or params.training_data})
    outcome = ci_pipeline(config=config, params=ci)
    return ContinuousTrainingOutcome(retrained=True, drifted=check.drifted, reason=trigger.reason,
                                     version=outcome.version, gates=outcome.gates)
