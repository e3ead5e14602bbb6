"""Flow `ci-pipeline`: validate -> train with CV -> gates -> robustness -> stress -> register @challenger."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

import pandas as pd
from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows import forms
from rollout.config import ConfigError, Policy, parse_policy
from rollout.data import Schema
from rollout.ci import registration
from rollout.ci.gates import GateFailed, GateResult, step_failed
from rollout.ci.training import example_rows, factory_function, usable_cores
from tasks import ci
from tasks.common import load_policy_task, prefect_origin, publish_gate, publish_summary


class CIParameters(BaseModel):
    """What a person can change from the Prefect UI's Run form without editing the policy file."""

    data_source: forms.Text = Field(None, description="Override data.source: 'example' or a CSV/Parquet path.")
    example_drift: forms.Drift = Field(None, ge=0, le=3, description="Override data.example.drift (demo: a new regime).")
    example_seed: forms.Integer = Field(None, description="Override data.example.seed.")
    estimator: forms.Estimator = Field(None, description="Override estimator.name: one of the built-in estimators "
                                            "(a factory stays in the policy file).")
    estimator_params: forms.Mapping = Field(None, description="Override estimator.params: merged over the policy's "
                                            "(with an estimator override, that estimator's params).")
    rollout_start: forms.Time = Field(
        None, description="When the opened rollout starts (UTC); empty = now. The demo runs on simulated time."
    )
    training_data: forms.TrainingData = Field(
        None, description="Override ci.training_data.source: the policy's data, production's served and labelled "
        "rows of the last ci.training_data.days days, or both (the hold-out is then the latest production rows).")


@dataclass
class CIOutcome:
    """What the CI phase produced: the verdict of every gate and the registered version."""

    gates: list[GateResult] = field(default_factory=list)
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None
    rollout_id: int | None = None
    superseded: str = ""  # a note when the rollout that was open ended undecided (rollout.cd.rollouts.assign)
    reports_dir: str = ""
    stage: str = "starting"  # what the run was doing last: a StepFailed names it
    model: str = ""  # the registered model's name, once the policy is read
    policy: Policy | None = None  # the run's policy (overrides applied), once read
    kind: str = "ci"


def publisher(outcome: CIOutcome, reports: Path, model: str = "") -> Callable[[GateResult], None]:
    """Record and publish each verdict; a failed one raises GateFailed carrying every verdict so far."""
    outcome.model = model

    def gate(result: GateResult) -> None:
        outcome.gates.append(result)
        try:
            publish_gate(result, reports, model)
        except GateFailed as exc:
            exc.outcome = outcome  # the caller sees every verdict so far, not only the failing one
            raise

    return gate


def reports_folder(policy: Policy, kind: str) -> Path:
    """This run's report folder: <reports_dir>/<kind>-<UTC time>."""
    return policy.path(policy.stores.reports_dir) / f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}"


def checked_data(policy: Policy, gate: Callable[[GateResult], None], reports: Path) -> tuple[pd.DataFrame, Schema]:
    """The policy's data, its target checked, through the suite and the drift check, with its schema."""
    frame = ci.load_data(policy)
    gate(ci.validate_data(policy, frame, reports))
    schema = ci.schema_of(policy, frame)
    gate(ci.check_drift(policy, frame, schema))
    return frame, schema


def apply_overrides(policy: Policy, params: CIParameters) -> Policy:
    """A new policy with the run's overrides, validated like the file itself."""
    raw = policy.model_dump(mode="json", exclude={"base_dir"})
    if params.data_source is not None:
        raw["data"]["source"] = params.data_source
    if params.example_drift is not None:
        raw["data"]["example"]["drift"] = params.example_drift
    if params.example_seed is not None:
        raw["data"]["example"]["seed"] = params.example_seed
    if params.training_data is not None:
        raw["ci"]["training_data"]["source"] = params.training_data
    if params.estimator is not None:
        raw["estimator"] = {"name": params.estimator, "params": params.estimator_params or {}}
    elif params.estimator_params is not None:  # the same estimator: these params over the policy's
        raw["estimator"]["params"] = {**raw["estimator"]["params"], **params.estimator_params}
    return parse_policy(raw, policy.base_dir)


# As many task threads as cores. Fits take a share of the cores each (`training.fit_threads`): with
# `ci.fit_threads` set, folds and the final fit run side by side, one per `fit_threads` cores; without
# it, every fit may use every core, so they run one at a time (several such fits in threads
# oversubscribe the cores: measured 8x slower each on 2 cores). The Dask runner (flows/runners.py)
# spreads folds over more machines or processes.
# (The ignore: Prefect 3.9 types ThreadPoolTaskRunner() as ThreadPoolTaskRunner[Never], which its own
# decorator's annotation refuses.)
@flow(name="ci-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=usable_cores()))  # type: ignore[arg-type]
def ci_pipeline(config: str = "rollout.yaml", params: CIParameters = CIParameters()) -> CIOutcome:  # noqa: B008
    """Turn a dataset and a policy file into a fully checked, registered @challenger (or a clear refusal).

    Args:
        config: Path of the policy file (rollout.yaml) on the worker, relative to its working directory.
        params: Overrides of the policy for this run only; empty fields keep the policy's values.
    """
    outcome = CIOutcome()
    return stepwise(outcome, lambda: _ci(config, params or CIParameters(), outcome))


def record_failure(outcome: CIOutcome, failure: str) -> None:
    """Log a stopped run to MLflow (FAILED, with its verdicts and the failure); a registry that cannot take it
    is warned about, never allowed to hide the failure itself."""
    if outcome.policy is None:
        return
    try:
        run_id = registration.log_failed(outcome.policy, outcome.gates, failure, outcome.kind, prefect_origin())
        outcome.run_id = run_id
    except Exception as exc:  # noqa: BLE001 - the run already failed; this record is a courtesy
        get_run_logger().warning("could not record the failed run in MLflow: %s: %s", type(exc).__name__, exc)


def stepwise(outcome: CIOutcome, body: Callable[[], CIOutcome]) -> CIOutcome:
    """Run a flow's body: a failed gate or a bad policy as they are, any other failure as a StepFailed naming the
    stage it stopped in, with every verdict so far."""
    try:
        done = body()
    except ConfigError:
        raise
    except GateFailed as exc:
        publish_summary(outcome.model, outcome.gates)
        record_failure(outcome, str(exc))
        # A gate that did its job ends the run Failed with its reason as the state's message, and no traceback
        # in the logs; a caller in this process still gets the GateFailed (with every verdict) raised.
        return cast(CIOutcome, Failed(message=str(exc), data=exc))
    except Exception as exc:  # noqa: BLE001 - any other failure: say where, in one line, with the verdicts so far
        failed = step_failed(outcome.stage, exc, outcome)
        if outcome.model:
            publish_summary(outcome.model, outcome.gates, str(failed))
        record_failure(outcome, str(failed))
        raise failed from exc
    publish_summary(outcome.model, outcome.gates)
    return done


def _ci(config: str, params: CIParameters, outcome: CIOutcome) -> CIOutcome:
    outcome.stage = "loading the policy"
    policy = apply_overrides(load_policy_task(config), params)
    outcome.policy = policy
    if policy.estimator.factory is not None:  # the team's code is importable here, or nothing starts
        factory_function(policy.estimator.factory)
    reports = reports_folder(policy, "ci")
    outcome.reports_dir = str(reports)
    gate = publisher(outcome, reports, policy.registry.model_name)
    outcome.stage = "loading data"
    frame, schema = checked_data(policy, gate, reports)
    data = ci.split_data(policy, frame, schema)
    searched = None
    if policy.estimator.search is not None:  # tuned on the training rows; what follows judges the chosen params
        outcome.stage = "training (hyperparameter search)"
        searched = ci.search_params(policy, schema, data)
        policy = apply_overrides(policy, CIParameters(estimator_params=searched.result.best_params))
    # The final fit, the champion's download, the folds and the loss curve are independent tasks: side
    # by side in threads as the cores allow (the longest, the final fit, first), spread over a Dask
    # cluster when the flow is given the Dask runner.
    outcome.stage = "training (fit, CV folds, loss curve)"
    fitted = ci.fit_candidate.submit(policy, schema, data)
    champion_loaded = ci.load_champion.submit(policy)
    folds = [ci.cv_fold.submit(policy, schema, data, i) for i in range(policy.ci.cv_folds)]
    curve = ci.loss_curve.submit(policy, schema, data)
    cv = ci.combine_cv(policy, [f.result() for f in folds], curve.result())
    gate(ci.overfit_result(policy, cv, data, schema.task))
    model = fitted.result()

    outcome.stage = "loading the champion"
    champion_version, champion = champion_loaded.result()
    outcome.stage = "scoring the held-out rows"
    held = ci.score_held_out(policy, schema, data, model, champion, champion_version)
    for result in ci.quality_results(policy, held):
        gate(result)

    example = example_rows(data.x_train, schema)
    work = ci.workdir()
    try:
        outcome.stage = "packaging the candidate"
        candidate = ci.package_candidate(policy, model, example, schema.task, work)
        outcome.stage = "robustness cases"
        gate(ci.robustness_cases(policy, schema, candidate, data.x_holdout))
        outcome.stage = "stress test"
        gate(ci.stress_test(policy, candidate, champion, data.rows_holdout))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    outcome.stage = "registering the version"
    logged = ci.register_candidate(policy, model, schema, frame, cv, held, outcome.gates, example, searched)
    outcome.stage = "moving aliases"
    assigned = ci.assign_aliases(policy, str(logged.version), params.rollout_start)
    outcome.version, outcome.aliases, outcome.run_id = assigned.version, assigned.aliases, logged.run_id
    outcome.rollout_id = assigned.rollout_id
    outcome.superseded = assigned.superseded_note() if assigned.superseded is not None else ""
    outcome.stage = "done"
    print(f"registered {policy.registry.model_name} v{assigned.version} as " + ", ".join("@" + a for a in assigned.aliases))
    if outcome.superseded:
        print(outcome.superseded)
    return outcome
