"""Hyperparameter search (`estimator.search`): Optuna trials, each scored by an inner k-fold CV of the
training rows only, so the held-out rows the gates score stay unseen by every choice made here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rollout.config import LOWER_IS_BETTER, ConfigError, EstimatorConfig, ParamRange
from rollout.data import Schema
from rollout.ci.training import build_pipeline, fit_model, folds, score

# What a trial may raise for a bad combination of parameters (an estimator refusing them): the trial fails
# and the search goes on. Anything else stops the search.
TRIAL_ERRORS = (ValueError, TypeError, ArithmeticError)


@dataclass(frozen=True)
class Trial:
    """One trial: its parameters, its mean inner-CV score (None when it failed) and how long it took."""

    number: int
    params: dict[str, Any]
    value: float | None
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class SearchResult:
    """The trials run and the best one's parameters (merged over the policy's fixed params)."""

    metric: str
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    rows: int
    trials: list[Trial] = field(default_factory=list)


def suggest(trial: Any, name: str, space: ParamRange) -> Any:
    """One parameter's value for an Optuna trial, from its range or choices."""
    if space.choices is not None:
        return trial.suggest_categorical(name, space.choices)
    assert space.low is not None and space.high is not None  # the config's validator guarantees a range
    if space.integer:
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step or 1), log=space.log)
    return trial.suggest_float(name, float(space.low), float(space.high), step=space.step, log=space.log)


def inner_cv_score(estimator: EstimatorConfig, schema: Schema, x: pd.DataFrame, y: pd.Series, metric: str,
                   n_folds: int, seed: int, time_ordered: bool = False) -> float:
    """Mean validation score of `estimator` over an inner k-fold CV of (x, y), each fit as CI fits (early
    stopping on a share of the fold's own rows for boosters)."""
    from sklearn.base import clone

    pipeline = build_pipeline(schema, estimator, seed)
    scores = []
    for train_idx, val_idx in folds(schema.task, n_folds, seed, time_ordered).split(x, y):
        model = fit_model(clone(pipeline), x.iloc[train_idx], y.iloc[train_idx], schema.task, seed,
                          estimator.early_stopping, time_ordered)
        scores.append(score(metric, model, x.iloc[val_idx], y.iloc[val_idx]))
    return float(np.mean(scores))


def search(estimator: EstimatorConfig, schema: Schema, x: pd.DataFrame, y: pd.Series, metric: str, seed: int,
           on_trial: Callable[[Trial], None] | None = None, time_ordered: bool = False) -> SearchResult:
    """Run the policy's search on the training rows (x, y): seeded, at most `trials` trials and
    `timeout_seconds`; `on_trial` hears each finished trial (progress, MLflow). A ConfigError naming
    estimator.search.space when every trial failed."""
    import optuna

    config = estimator.search
    if config is None:
        raise ValueError("estimator.search is not set")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported through on_trial
    sampler = (optuna.samplers.TPESampler(seed=seed) if config.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(direction="minimize" if metric in LOWER_IS_BETTER else "maximize", sampler=sampler)
    trials: list[Trial] = []

    def objective(trial: Any) -> float:
        params = {name: suggest(trial, name, space) for name, space in config.space.items()}
        started = time.perf_counter()
        try:
            value = inner_cv_score(estimator.model_copy(update={"params": {**estimator.params, **params}}),
                                   schema, x, y, metric, config.folds, seed, time_ordered)
        except TRIAL_ERRORS as exc:
            trials.append(Trial(trial.number, params, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"))
            if on_trial is not None:
                on_trial(trials[-1])
            raise
        trials.append(Trial(trial.number, params, value, time.perf_counter() - started))
        if on_trial is not None:
            on_trial(trials[-1])
        return value

    study.optimize(objective, n_trials=config.trials, timeout=config.timeout_seconds, catch=TRIAL_ERRORS)
    done = [t for t in trials if t.value is not None]
    if not done:
        first = trials[0].error if trials else "no trial ran before the timeout"
        raise ConfigError(f"estimator.search.space: every trial failed, the first with {first}")
    best = study.best_trial
    return SearchResult(metric=metric, best_params={**estimator.params, **best.params},
                        best_value=float(best.value if best.value is not None else np.nan), best_trial=best.number,
                        rows=len(x), trials=trials)
