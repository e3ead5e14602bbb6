"""Flow `adopt-model`: a model trained elsewhere, already in MLflow, through every CI gate that needs no
training, then registered as @challenger with its rollout opened (or @champion when it is the first)."""

from __future__ import annotations


from prefect import flow
from pydantic import BaseModel, Field

from flows import forms
from flows.ci_pipeline import (
    CIOutcome,
    CIParameters,
    apply_overrides,
    checked_data,
    publisher,
    reports_folder,
    stepwise,
)
from tasks import ci
from tasks.common import load_policy_task


class AdoptParameters(BaseModel):
    """The Run form of `adopt-model` in the Prefect UI."""

    model_uri: str = Field(
        description="The model to adopt: models:/name/7, models:/name@alias, runs:/<run id>/model or a logged "
        "model's models:/m-<id>, in the policy's MLflow (skops-saved scikit-learn, allow-listed types).",
        min_length=3, max_length=500, pattern=r"^(models|runs):/\S+$")
    data_source: forms.Text = Field(None, description="Override data.source: the labelled rows it is judged on.")
    rollout_start: forms.Time = Field(None, description="When the opened rollout starts (UTC); empty = now.")


@flow(name="adopt-model", log_prints=True)
def adopt_model(params: AdoptParameters, config: str = "rollout.yaml") -> CIOutcome:
    """Judge a model trained elsewhere as CI judges its own candidates (data validation, floor, baseline and
    champion on the same held-out rows, robustness, stress) and, when every gate passes, register it.

    Args:
        params: The model to adopt and the rows it is judged on.
        config: Path of the policy file (rollout.yaml) on the worker, relative to its working directory.
    """
    outcome = CIOutcome()
    return stepwise(outcome, lambda: _adopt(params, config, outcome))


def _adopt(params: AdoptParameters, config: str, outcome: CIOutcome) -> CIOutcome:
    outcome.stage = "loading the policy"
    policy = apply_overrides(load_policy_task(config), CIParameters(data_source=params.data_source))
    outcome.policy, outcome.kind = policy, "adopt"
    reports = reports_folder(policy, "adopt")
    outcome.reports_dir = str(reports)
    gate = publisher(outcome, reports, policy.registry.model_name)

    outcome.stage = "loading data"
    frame, schema = checked_data(policy, gate, reports)
    data = ci.split_data(policy, frame, schema)  # the held-out rows CI scores its own candidates on

    outcome.stage = "loading the model"
    trusted, candidate = ci.load_adopted(policy, params.model_uri)
    gate(trusted)
    outcome.stage = "loading the champion"
    champion_version, champion = ci.load_champion(policy)
    outcome.stage = "scoring the held-out rows"
    held = ci.score_held_out(policy, schema, data, candidate, champion, champion_version)
    for result in ci.quality_results(policy, held):
        gate(result)
    outcome.stage = "robustness cases"
    gate(ci.robustness_cases(policy, schema, candidate, data.x_holdout))
    outcome.stage = "stress test"
    gate(ci.stress_test(policy, candidate, champion, data.rows_holdout))

    outcome.stage = "registering the version"
    logged = ci.register_adopted(policy, params.model_uri, schema, frame, held, outcome.gates)
    outcome.stage = "moving aliases"
    assigned = ci.assign_aliases(policy, str(logged.version), params.rollout_start, actor="adopt-model")
    outcome.version, outcome.aliases, outcome.run_id = assigned.version, assigned.aliases, logged.run_id
    outcome.rollout_id = assigned.rollout_id
    outcome.stage = "done"
    print(f"adopted {params.model_uri} as {policy.registry.model_name} v{assigned.version}: "
          + ", ".join("@" + a for a in assigned.aliases))
    return outcome
