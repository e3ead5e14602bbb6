"""Prefect tasks of the CI phase: each wraps one call into `rollout/` with names, retries and artifacts."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import pandas as pd
from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from rollout import checks, registry
from rollout.cd import rollouts
from rollout.ci import gates, registration, robustness, search, stress, training
from rollout.ci.validation import drift_report, validate
from rollout.config import LOWER_IS_BETTER, ConfigError, Policy
from rollout.data import Schema, infer_schema, load_dataset, read_table
from rollout.ci.production_data import training_frame
from rollout.outcomes import OutcomeStore
from rollout.roles import Role
from tasks.common import artifact_key, open_registry, prefect_origin, transient


@task(name="load-data", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def load_data(policy: Policy) -> pd.DataFrame:
    """Load (or generate) the training table named by the policy and check the policy against it: every error at
    once (missing columns, a target its task cannot learn, unknown estimator params, absent segments) stops the
    run here, before validation and training; warnings (a leaked target?) go to the log."""
    frame = load_dataset(policy)
    if policy.ci.training_data.source != "policy":  # production's served and labelled rows (continuous training)
        data = training_frame(policy, frame, OutcomeStore(policy.outcome_url))
        get_run_logger().info("%s", data.sentence())
        create_markdown_artifact(f"## Training data\n\n{data.sentence()}\n",
                                 key=artifact_key(f"{policy.registry.model_name}-training-data"),
                                 description="Which rows trained the model and which judged it")
        frame = data.frame
        frame.attrs["training_data"] = data.params()
    problems = checks.check_data(policy, frame)
    for problem in problems:
        if problem.severity == checks.WARNING:
            get_run_logger().warning("%s", problem)
    error = checks.errors_of(problems)
    if error is not None:
        raise error
    return frame


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(policy: Policy, frame: pd.DataFrame, reports_dir: Path) -> gates.GateResult:
    """Run the committed Great Expectations suite on the training data; save the report."""
    report = validate(frame, policy.path(policy.ci.expectations_suite))
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "data_validation.md").write_text(report.to_markdown())
    failed = [f.sentence for f in report.failed]
    return gates.validation_gate(report.success, failed, report.statistics)


@task(name="check-drift", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def check_drift(policy: Policy, frame: pd.DataFrame, schema: Schema) -> gates.GateResult:
    """Training data vs a recent production sample, feature by feature (skipped when there is none)."""
    if not policy.data.production_sample:
        return gates.skipped("drift", "no production sample is configured (data.production_sample).")
    production = read_table(policy.path(policy.data.production_sample))
    report = drift_report(frame, production, schema, policy.ci.drift)
    create_markdown_artifact(report.to_markdown(), key=artifact_key(f"{policy.registry.model_name}-drift-report"), description="Training vs production drift")
    return gates.drift_gate(report.drifted, len(report.features), [f.sentence for f in report.features if f.drifted])


@task(name="infer-schema", cache_policy=NO_CACHE)
def schema_of(policy: Policy, frame: pd.DataFrame) -> Schema:
    """Feature kinds, ranges and levels from the policy and the data."""
    return infer_schema(frame, policy.data)


@task(name="split", cache_policy=NO_CACHE)
def split_data(policy: Policy, frame: pd.DataFrame, schema: Schema) -> training.Split:
    """Hold out a share of rows, scored once at the end."""
    by_time = policy.ci.split == "time" or policy.ci.training_data.source != "policy"  # production: judged on its latest
    return training.split(frame, schema, policy.data.holdout_fraction, policy.data.seed,
                          policy.data.timestamp_column if by_time else None)


@dataclass(frozen=True)
class Searched:
    """A finished search and its MLflow run."""

    result: search.SearchResult
    run_id: str


@task(name="search", cache_policy=NO_CACHE)
def search_params(policy: Policy, schema: Schema, data: training.Split) -> Searched:
    """Tune the estimator's params on the training rows (inner CV; the held-out rows stay unseen): each trial
    logged as it ends, to this task's log, a progress artifact and a child MLflow run."""
    config = policy.estimator.search
    assert config is not None
    logger = get_run_logger()
    progress = cast(UUID, create_progress_artifact(0.0, description=f"hyperparameter search, {config.trials} trials "
                                                   "at most"))  # a UUID when called from sync code
    log = registration.SearchLog(policy, len(data.x_train))
    best: list[float] = []
    lower = policy.ci.metric in LOWER_IS_BETTER

    def on_trial(trial: search.Trial) -> None:
        log.trial(trial)
        if trial.value is not None:
            best.append(trial.value if not best else (min if lower else max)(best[-1], trial.value))
        update_progress_artifact(progress, 100.0 * (trial.number + 1) / config.trials)
        said = f"{trial.value:.4f}" if trial.value is not None else f"failed ({trial.error})"
        logger.info("trial %d/%d %s: %s %s; best %s", trial.number + 1, config.trials, trial.params,
                    policy.ci.metric, said, f"{best[-1]:.4f}" if best else "-")

    result = None
    try:
        with training.fit_threads(policy.ci.fit_threads):
            result = search.search(policy.estimator, schema, data.x_train, data.y_train, policy.ci.metric,
                                   policy.data.seed, on_trial, data.time_ordered)
    finally:
        log.finish(result)
    update_progress_artifact(progress, 100.0)
    logger.info("search chose trial %d: %s (inner CV %s %.4f over %d training rows)", result.best_trial,
                result.best_params, policy.ci.metric, result.best_value, result.rows)
    return Searched(result, log.run_id)


@task(name="cv-fold", cache_policy=NO_CACHE)
def cv_fold(policy: Policy, schema: Schema, data: training.Split, fold: int) -> training.FoldScore:
    """Fit and score one fold (folds run concurrently: threads by default, Dask workers when asked)."""
    pipeline = training.build_pipeline(schema, policy.estimator, policy.data.seed)
    with training.fit_threads(policy.ci.fit_threads):
        return training.cv_fold(pipeline, data, schema.task, policy.ci.metric, policy.ci.cv_folds, policy.data.seed,
                                fold, policy.estimator.early_stopping)


@task(name="loss-curve", cache_policy=NO_CACHE)
def loss_curve(policy: Policy, schema: Schema, data: training.Split) -> training.LossCurve | None:
    """Training and validation loss over iterations, for boosting estimators."""
    pipeline = training.build_pipeline(schema, policy.estimator, policy.data.seed)
    with training.fit_threads(policy.ci.fit_threads):
        return training.loss_curve(pipeline, data, schema.task, policy.data.seed, policy.estimator.early_stopping)


@task(name="cross-validate", cache_policy=NO_CACHE)
def combine_cv(policy: Policy, scores: list[training.FoldScore], curve: training.LossCurve | None) -> training.CVResult:
    """Stratified k-fold CV: the per-fold train and validation scores, as a table artifact."""
    result = training.combine_folds(policy.ci.metric, scores, curve)
    rows = [
        {"fold": i + 1, "train": round(t, 4), "validation": round(v, 4), "fit_s": round(s, 3)}
        for i, (t, v, s) in enumerate(zip(result.train_scores, result.val_scores, result.fit_seconds, strict=True))
    ]
    create_table_artifact(rows, key=artifact_key(f"{policy.registry.model_name}-cv-folds"), description=f"CV {policy.ci.metric} per fold")
    return result


def overfit_result(policy: Policy, cv: training.CVResult, data: training.Split, task_kind: str) -> gates.GateResult:
    """The overfit gate; limits given as shares resolve against the naive baseline's score on the training rows."""
    curve = (cv.curve.train, cv.curve.validation) if cv.curve else None
    scale = training.baseline_score(data, task_kind, cv.metric)
    return gates.overfit_gate(cv.metric, cv.train_scores, cv.val_scores, policy.ci.limit("max_train_val_gap", scale),
                              policy.ci.limit("max_fold_std", scale), curve)


@task(name="fit", cache_policy=NO_CACHE)
def fit_candidate(policy: Policy, schema: Schema, data: training.Split) -> Any:
    """Fit the pipeline on every training row."""
    with training.fit_threads(policy.ci.fit_threads):
        return training.fit(training.build_pipeline(schema, policy.estimator, policy.data.seed), data, schema.task,
                            policy.data.seed, policy.estimator.early_stopping)


@task(name="score-held-out", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def score_held_out(policy: Policy, schema: Schema, data: training.Split, model: Any, champion: Any,
                   champion_version: str | None) -> training.HeldOut:
    """Score candidate, naive baseline and champion once, on the same held-out rows."""
    return training.held_out(data, schema.task, policy.ci.metric, model, champion, champion_version)


def quality_results(policy: Policy, held: training.HeldOut) -> list[gates.GateResult]:
    metric = policy.ci.metric
    return [
        gates.floor_gate(metric, held.candidate, policy.ci.floor_value, policy.ci.floor_source),
        gates.baseline_gate(metric, held.candidate, held.baseline,
                            policy.ci.limit("min_margin_over_baseline", held.baseline)),
        gates.champion_gate(metric, held.candidate, held.champion,
                            policy.ci.limit("max_regression_vs_champion", held.baseline),
                            held.champion_version, held.champion_error),
    ]


@task(name="load-champion", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def load_champion(policy: Policy) -> tuple[str | None, Any]:
    """The current @champion as a pyfunc, or (None, None) when the registry has none yet."""
    reg = open_registry(policy)
    version = reg.version_for_alias(Role.CHAMPION)
    return (version, reg.load(version)) if version else (None, None)


@task(name="package-candidate", cache_policy=NO_CACHE)
def package_candidate(policy: Policy, model: Any, x_example: pd.DataFrame, task_kind: str, workdir: Path) -> Any:
    """Save the candidate as MLflow will log it and load it back the way serving loads it."""
    return registry.save_local(model, workdir / "candidate", x_example, task_kind, policy.registry.trusted_modules)


@task(name="robustness", cache_policy=NO_CACHE)
def robustness_cases(policy: Policy, schema: Schema, candidate: Any, sample: pd.DataFrame) -> gates.GateResult:
    """Edge cases from the schema plus saved problem inputs, sent as the service would send them."""
    saved = policy.path(policy.ci.robustness_samples) if policy.ci.robustness_samples else None
    noise = policy.ci.invariance
    return gates.robustness_gate(robustness.check(candidate, schema, sample, saved, policy.data.seed,
                                                  noise.perturbation, noise.max_changed))


@task(name="stress", cache_policy=NO_CACHE)
def stress_test(policy: Policy, candidate: Any, champion: Any, sample: pd.DataFrame) -> gates.GateResult:
    """Latency of candidate and champion, called as the service calls them, interleaved, against the budget."""
    figures = stress.run(candidate, champion, sample, policy.ci.stress, policy.data.seed)
    create_table_artifact([{"model": k, **{m: round(v, 3) for m, v in f.items()}} for k, f in figures.items()],
                          key=artifact_key(f"{policy.registry.model_name}-stress-latency"), description="Latency (ms) and throughput, interleaved")
    budget = policy.ci.stress.budget
    return gates.stress_gate(figures["candidate"], figures.get("champion"), budget.p99_single_ms,
                             budget.p99_batch_ms, budget.max_ratio_vs_champion)


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=transient)
def register_candidate(policy: Policy, model: Any, schema: Schema, frame: pd.DataFrame, cv: training.CVResult,
                       held: training.HeldOut, results: list[gates.GateResult],
                       x_example: pd.DataFrame, searched: Searched | None = None) -> registry.Logged:
    """Log model, params, metrics and every gate report; register a version with its tags and a description,
    linked both ways with this flow run (tags in MLflow; a link artifact in Prefect when MLflow has a UI)."""
    logged = registration.register(policy, model, schema, frame, cv, held, results, x_example,
                                   searched.result if searched else None, searched.run_id if searched else None,
                                   prefect_origin())
    url = open_registry(policy).run_url(logged.run_id)
    if url is not None:
        create_link_artifact(url, link_text=f"MLflow run of {policy.registry.model_name} v{logged.version}",
                             description=f"{policy.registry.model_name} v{logged.version} in MLflow")
    return logged


@task(name="load-adopted", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def load_adopted(policy: Policy, model_uri: str) -> tuple[gates.GateResult, Any]:
    """A model trained elsewhere, loaded as the service loads a version (or refused, with the reason)."""
    try:
        return gates.trust_gate(model_uri, None), open_registry(policy).load_uri(model_uri)
    except registry.UntrustedModel as exc:
        return gates.trust_gate(model_uri, str(exc)), None
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


@task(name="register-adopted", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=transient)
def register_adopted(policy: Policy, model_uri: str, schema: Schema, frame: pd.DataFrame, held: training.HeldOut,
                     results: list[gates.GateResult]) -> registry.Logged:
    """Its gate reports in a run of their own; the model a new version of the policy's model, tagged."""
    return registration.adopt(policy, model_uri, schema, frame, held, results, prefect_origin())


@task(name="assign-aliases", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5, retry_condition_fn=transient)
def assign_aliases(policy: Policy, version: str, rollout_start: datetime | None = None,
                   actor: str = "ci-pipeline") -> rollouts.Assignment:
    """@champion for a first model (when the policy allows); else @challenger and a rollout in the policy's mode."""
    from prefect.runtime import task_run

    # The task run's id names this step across its retries: a retry finds the rollout an earlier attempt opened
    assignment = rollouts.assign(policy, open_registry(policy), OutcomeStore(policy.outcome_url), version,
                                 rollout_start, actor, attempt=str(task_run.id) if task_run.id else None)
    create_markdown_artifact(assignment.summary(), key=artifact_key(f"{policy.registry.model_name}-registered-version"), description="Registration and rollout")
    return assignment


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="rollout-ci-"))
