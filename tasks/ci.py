"""Prefect tasks of the CI phase: each wraps one call into `rollout/` with names, retries and artifacts."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from rollout import registry
from rollout.roles import Role
from rollout.ci import gates, robustness, stress, training
from rollout.config import Policy
from rollout.data import Schema, data_hash, infer_schema, load_dataset, read_table, records_of
from rollout.models import LoadedModel, evaluate
from rollout.ci.validation import drift_report, validate
from tasks.common import mlflow_experiment


@task(name="load-data", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def load_data(policy: Policy) -> pd.DataFrame:
    """Load (or generate) the training table named by the policy."""
    return load_dataset(policy)


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(policy: Policy, frame: pd.DataFrame, reports_dir: Path) -> gates.GateResult:
    """Run the committed Great Expectations suite on the training data; save the report."""
    report = validate(frame, policy.path(policy.ci.expectations_suite))
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "data_validation.md").write_text(report.to_markdown())
    failed = [f.sentence for f in report.failed]
    return gates.validation_gate(report.success, failed, report.statistics)


@task(name="check-drift", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def check_drift(policy: Policy, frame: pd.DataFrame, schema: Schema) -> gates.GateResult:
    """Training data vs a recent production sample, feature by feature (skipped when there is none)."""
    if not policy.data.production_sample:
        return gates.skipped("drift", "no production sample is configured (data.production_sample).")
    production = read_table(policy.path(policy.data.production_sample))
    report = drift_report(frame, production, schema, policy.ci.drift)
    create_markdown_artifact(report.to_markdown(), key="drift-report", description="Training vs production drift")
    return gates.drift_gate(report.drifted, len(report.features), [f.sentence for f in report.features if f.drifted])


@task(name="infer-schema", cache_policy=NO_CACHE)
def schema_of(policy: Policy, frame: pd.DataFrame) -> Schema:
    """Feature kinds, ranges and levels from the policy and the data."""
    return infer_schema(frame, policy.data)


@task(name="split", cache_policy=NO_CACHE)
def split_data(policy: Policy, frame: pd.DataFrame, schema: Schema) -> training.Split:
    """Hold out a share of rows, scored once at the end."""
    return training.split(frame, schema, policy.data.holdout_fraction, policy.data.seed)


@task(name="cv-fold", cache_policy=NO_CACHE)
def cv_fold(policy: Policy, schema: Schema, data: training.Split, fold: int) -> training.FoldScore:
    """Fit and score one fold (folds run concurrently: threads by default, Dask workers when asked)."""
    pipeline = training.build_pipeline(schema, policy.estimator, policy.data.seed)
    with training.fit_threads(policy.ci.fit_threads):
        return training.cv_fold(pipeline, data, schema.task, policy.ci.metric, policy.ci.cv_folds, policy.data.seed,
                                fold)


@task(name="loss-curve", cache_policy=NO_CACHE)
def loss_curve(policy: Policy, schema: Schema, data: training.Split) -> training.LossCurve | None:
    """Training and validation loss over iterations, for boosting estimators."""
    pipeline = training.build_pipeline(schema, policy.estimator, policy.data.seed)
    with training.fit_threads(policy.ci.fit_threads):
        return training.loss_curve(pipeline, data, schema.task, policy.data.seed)


@task(name="cross-validate", cache_policy=NO_CACHE)
def combine_cv(policy: Policy, scores: list[training.FoldScore], curve: training.LossCurve | None) -> training.CVResult:
    """Stratified k-fold CV: the per-fold train and validation scores, as a table artifact."""
    result = training.combine_folds(policy.ci.metric, scores, curve)
    rows = [
        {"fold": i + 1, "train": round(t, 4), "validation": round(v, 4), "fit_s": round(s, 3)}
        for i, (t, v, s) in enumerate(zip(result.train_scores, result.val_scores, result.fit_seconds, strict=True))
    ]
    create_table_artifact(rows, key="cv-folds", description=f"CV {policy.ci.metric} per fold")
    return result


def overfit_result(policy: Policy, cv: training.CVResult) -> gates.GateResult:
    curve = (cv.curve.train, cv.curve.validation) if cv.curve else None
    return gates.overfit_gate(
        cv.metric, cv.train_scores, cv.val_scores, policy.ci.max_train_val_gap, policy.ci.max_fold_std, curve
    )


@task(name="fit", cache_policy=NO_CACHE)
def fit_candidate(policy: Policy, schema: Schema, data: training.Split) -> Any:
    """Fit the pipeline on every training row."""
    with training.fit_threads(policy.ci.fit_threads):
        return training.fit(training.build_pipeline(schema, policy.estimator, policy.data.seed), data)


@dataclass(frozen=True)
class HeldOut:
    """Held-out metric of the candidate, the naive baseline and the champion (None when there is none)."""

    candidate: float
    baseline: float
    champion: float | None
    champion_version: str | None


@task(name="score-held-out", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def score_held_out(policy: Policy, schema: Schema, data: training.Split, model: Any, champion: Any,
                   champion_version: str | None) -> HeldOut:
    """Score candidate, baseline and champion once, on the same held-out rows."""
    metric, task_kind = policy.ci.metric, schema.task
    baseline = training.baseline_estimator(task_kind).fit(data.x_train, data.y_train)
    champ = None if champion is None else evaluate(champion, data.x_holdout, data.y_holdout, metric)
    return HeldOut(
        candidate=evaluate(model, data.x_holdout, data.y_holdout, metric),
        baseline=evaluate(baseline, data.x_holdout, data.y_holdout, metric),
        champion=champ,
        champion_version=champion_version,
    )


def quality_results(policy: Policy, held: HeldOut) -> list[gates.GateResult]:
    metric = policy.ci.metric
    return [
        gates.floor_gate(metric, held.candidate, policy.ci.floor, policy.ci.floor_source),
        gates.baseline_gate(metric, held.candidate, held.baseline, policy.ci.min_margin_over_baseline),
        gates.champion_gate(metric, held.candidate, held.champion, policy.ci.max_regression_vs_champion,
                            held.champion_version),
    ]


@task(name="load-champion", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def load_champion(policy: Policy) -> tuple[str | None, Any]:
    """The current @champion as a pyfunc, or (None, None) when the registry has none yet."""
    reg = registry.MlflowRegistry(policy.tracking_uri, policy.registry.model_name, policy.registry.mirror_stages)
    version = reg.version_for_alias(Role.CHAMPION)
    return (version, reg.load(version)) if version else (None, None)


@task(name="package-candidate", cache_policy=NO_CACHE)
def package_candidate(model: Any, x_example: pd.DataFrame, task_kind: str, workdir: Path) -> Any:
    """Save the candidate as MLflow will log it and load it back the way serving loads it."""
    return registry.save_local(model, workdir / "candidate", x_example, task_kind)


@task(name="robustness", cache_policy=NO_CACHE)
def robustness_cases(policy: Policy, schema: Schema, candidate: Any, sample: pd.DataFrame) -> gates.GateResult:
    """Edge cases from the schema plus saved problem inputs, through the pyfunc."""
    cases = robustness.synthesize_cases(schema, sample, seed=policy.data.seed)
    if policy.ci.robustness_samples:
        cases.update(robustness.load_saved_inputs(policy.path(policy.ci.robustness_samples)))
    return gates.robustness_gate(robustness.run_cases(LoadedModel(candidate), cases))


@task(name="stress", cache_policy=NO_CACHE)
def stress_test(policy: Policy, candidate: Any, champion: Any, sample: pd.DataFrame) -> gates.GateResult:
    """Latency of candidate and champion, called as the service calls them, interleaved on the same
    records, against the budget."""
    cfg = policy.ci.stress
    models: dict[str, stress.Predict] = {"candidate": LoadedModel(candidate, "candidate").score}
    if champion is not None:
        models["champion"] = LoadedModel(champion, "champion").score
    budget = cfg.budget

    def clear(so_far: stress.Figures) -> bool:
        return gates.stress_clear(so_far["candidate"], so_far.get("champion"), budget.p99_single_ms,
                                  budget.p99_batch_ms, budget.max_ratio_vs_champion)

    pool = records_of(stress.pool(sample, cfg.batch_size, policy.data.seed))
    figures = stress.measure(models, pool, cfg.single_requests, cfg.batch_size, cfg.batches,
                             np.random.default_rng(policy.data.seed), settled=clear)
    create_table_artifact([{"model": k, **{m: round(v, 3) for m, v in f.items()}} for k, f in figures.items()],
                          key="stress-latency", description="Latency (ms) and throughput, interleaved")
    return gates.stress_gate(figures["candidate"], figures.get("champion"), budget.p99_single_ms,
                             budget.p99_batch_ms, budget.max_ratio_vs_champion)


def git_sha(where: Path) -> str:
    """The commit the model was built from (CI's GITHUB_SHA when set)."""
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def cv_figure(cv: training.CVResult) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if cv.curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0][0]
    folds = np.arange(1, len(cv.val_scores) + 1)
    ax.plot(folds, cv.train_scores, "o-", label="train")
    ax.plot(folds, cv.val_scores, "s-", label="validation")
    ax.set(xlabel="fold", ylabel=cv.metric, title=f"Cross-validation {cv.metric}")
    ax.legend()
    if cv.curve:
        ax = axes[0][1]
        ax.plot(cv.curve.train, label="train loss")
        ax.plot(cv.curve.validation, label="validation loss")
        ax.set(xlabel="iteration", ylabel="loss", title="Loss over iterations")
        ax.legend()
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Registered:
    """Where the candidate landed in the registry."""

    version: str
    run_id: str
    aliases: list[str]
    rollout_id: int | None = None


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def register_candidate(policy: Policy, model: Any, schema: Schema, frame: pd.DataFrame, cv: training.CVResult,
                       held: HeldOut, results: list[gates.GateResult], x_example: pd.DataFrame) -> Registered:
    """Log model, params, metrics and every gate report; register a version with its tags."""
    import json

    import mlflow

    experiment_id = mlflow_experiment(policy, policy.registry.experiment)
    sha, digest = git_sha(policy.base_dir), data_hash(frame)
    tags = {"data_hash": digest, "git_sha": sha, "estimator": policy.estimator.name,
            f"holdout_{cv.metric}": f"{held.candidate:.6f}",
            "gates": json.dumps({r.gate: r.verdict for r in results}),
            **{f"gate.{r.gate}": r.verdict for r in results}}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ci-{policy.estimator.name}") as run:
        mlflow.log_params({"estimator": policy.estimator.name, **{f"param.{k}": v for k, v in policy.estimator.params.items()},
                           "cv_folds": policy.ci.cv_folds, "rows": len(frame), "data_hash": digest})
        mlflow.log_metrics({f"cv_train_{cv.metric}": cv.train_mean, f"cv_val_{cv.metric}": cv.val_mean,
                            f"cv_val_{cv.metric}_std": cv.val_std, f"holdout_{cv.metric}": held.candidate,
                            f"baseline_{cv.metric}": held.baseline,
                            **({f"champion_{cv.metric}": held.champion} if held.champion is not None else {})})
        for result in results:
            mlflow.log_text(result.to_markdown(), f"gates/{result.gate}.md")
            mlflow.log_dict(result.to_dict(), f"gates/{result.gate}.json")
        mlflow.log_figure(cv_figure(cv), "plots/cv.png")
        mlflow.log_dict({"numeric": schema.numeric, "categorical": schema.categorical, "nullable": schema.nullable,
                         "categories": schema.categories, "ranges": schema.ranges, "target": schema.target,
                         "task": schema.task}, "schema.json")
        info = registry.log_model(model, x_example, schema.task, policy.registry.model_name, tags)
    version = str(info.registered_model_version)
    return Registered(version=version, run_id=run.info.run_id, aliases=[])


@task(name="assign-aliases", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def assign_aliases(policy: Policy, registered: Registered, rollout_start: Any = None) -> Registered:
    """First model: @champion when the policy allows. Otherwise @challenger (or the next
    `challenger-N` in abn mode) and a rollout opened in the policy's mode."""
    from rollout.cd.rollouts import plan_rollout
    from rollout.outcomes import OutcomeStore

    reg = registry.MlflowRegistry(policy.tracking_uri, policy.registry.model_name, policy.registry.mirror_stages)
    aliases = reg.aliases()
    if Role.CHAMPION not in aliases:
        if not policy.ci.first_model_becomes_champion:
            reg.set_alias(Role.CHALLENGER, registered.version)
            return Registered(registered.version, registered.run_id, [Role.CHALLENGER])
        # The first model has no champion to be judged against online; the policy lets it serve directly.
        reg.set_alias(Role.CHAMPION, registered.version, expected=None)
        message = f"Version **{registered.version}** is the first model: set as `@champion`."
        create_markdown_artifact(message, key="registered-version", description="Registration")
        return Registered(registered.version, registered.run_id, [Role.CHAMPION])
    store = OutcomeStore(policy.outcome_url)
    plan = plan_rollout(policy.rollout, aliases, registered.version)
    for alias in plan.retired_aliases:
        reg.remove_alias(alias)
    for alias, version in plan.versions.items():
        if alias != Role.CHAMPION and aliases.get(alias) != version:
            reg.set_alias(alias, version)
    rollout_id = store.open_rollout(plan.mode, plan.versions, plan.weights, started_at=rollout_start)
    mine = [a for a, v in plan.versions.items() if v == registered.version]
    create_markdown_artifact(
        f"Registered version **{registered.version}** as " + ", ".join(f"`@{a}`" for a in mine)
        + f"; opened rollout **{rollout_id}** in `{plan.mode}` mode: "
        + ", ".join(f"`{a}` = v{v}" for a, v in plan.versions.items())
        + (f"; weights {plan.weights}" if plan.weights else ""),
        key="registered-version", description="Registration and rollout",
    )
    return Registered(registered.version, registered.run_id, mine, rollout_id)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="rollout-ci-"))
