"""Estimator factory (an unfitted sklearn Pipeline), cross-validation, held-out scoring, loss curves."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.model_selection import KFold, StratifiedKFold, TimeSeriesSplit, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from rollout.config import CLASSIFICATION_TASKS, LOWER_IS_BETTER, ConfigError, EarlyStoppingConfig, EstimatorConfig
from rollout.data import Schema
from rollout.models import ModelError, Predictor, evaluate

ESTIMATORS: dict[str, type] = {
    "logistic_regression": LogisticRegression,
    "random_forest": RandomForestClassifier,
    "gradient_boosting": GradientBoostingClassifier,
    "hist_gradient_boosting": HistGradientBoostingClassifier,
    "decision_tree": DecisionTreeClassifier,
    "ridge": Ridge,
    "linear_regression": LinearRegression,
    "random_forest_regressor": RandomForestRegressor,
    "gradient_boosting_regressor": GradientBoostingRegressor,
    "hist_gradient_boosting_regressor": HistGradientBoostingRegressor,
}
# XGBoost and LightGBM through their scikit-learn APIs, imported when named (module, class).
BOOSTERS: dict[str, tuple[str, str]] = {
    "xgboost": ("xgboost", "XGBClassifier"),
    "xgboost_regressor": ("xgboost", "XGBRegressor"),
    "lightgbm": ("lightgbm", "LGBMClassifier"),
    "lightgbm_regressor": ("lightgbm", "LGBMRegressor"),
}
# Many small, shallow, subsampled steps; early stopping picks how many. Regularised for the tables CI sees
# (thousands of rows): deeper trees widened the train-validation gap past the overfit gate on the example.
_BOOSTING = {"n_estimators": 500, "learning_rate": 0.05, "subsample": 0.8, "colsample_bytree": 0.8}
_XGBOOST = {**_BOOSTING, "max_depth": 3, "min_child_weight": 5}
_LIGHTGBM = {**_BOOSTING, "num_leaves": 7, "min_child_samples": 20, "subsample_freq": 1, "verbose": -1}
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "logistic_regression": {"max_iter": 1000},
    "xgboost": _XGBOOST, "xgboost_regressor": _XGBOOST, "lightgbm": _LIGHTGBM, "lightgbm_regressor": _LIGHTGBM,
}
# sklearn scorer names; "neg_" scorers are flipped back so every reported number reads naturally.
SCORERS = {
    "roc_auc": "roc_auc",
    "accuracy": "accuracy",
    "f1": "f1",
    "precision": "precision",
    "recall": "recall",
    "log_loss": "neg_log_loss",
    "f1_macro": "f1_macro",
    "roc_auc_ovr": "roc_auc_ovr",
    "r2": "r2",
    "rmse": "neg_root_mean_squared_error",
    "mae": "neg_mean_absolute_error",
}


def build_pipeline(schema: Schema, estimator: EstimatorConfig, seed: int = 0) -> Any:
    """An unfitted model: the team's own factory's, or impute + scale numerics, impute + one-hot categoricals,
    then the named estimator."""
    if estimator.factory is not None:
        return from_factory(estimator.factory, schema, estimator.params)
    cls = estimator_class(estimator.name)
    params = {**DEFAULT_PARAMS.get(estimator.name, {}), **estimator.params}
    if "random_state" in cls().get_params() and "random_state" not in params:
        params["random_state"] = seed
    try:
        model = cls(**params)
    except TypeError as exc:
        raise ValueError(f"estimator.params: {exc}") from None
    numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    categorical = Pipeline([*missing_as("__missing__"), ("onehot", OneHotEncoder(handle_unknown="ignore",
                                                                                  sparse_output=False))])
    # Each text column: null -> "", then TF-IDF over words and word pairs (sparse; kept sparse for the
    # estimators that take it, which is all but histogram gradient boosting).
    texts = [(f"text_{c}", text_pipeline(schema.text_max_features), [c]) for c in schema.text]
    prep = ColumnTransformer(
        [("num", numeric, list(schema.numeric)), ("cat", categorical, list(schema.categorical)), *texts],
        remainder="drop", sparse_threshold=0.0 if estimator.name.startswith("hist_") else 0.3,
    )
    return Pipeline([("prep", prep), ("model", model)])


def missing_as(value: str) -> list[tuple[str, SimpleImputer]]:
    """Steps filling a missing string with `value`, whether it is NaN (how pandas reads a blank cell in training)
    or None (how a JSON null arrives in the service): one SimpleImputer sees only one of them."""
    return [("impute", SimpleImputer(strategy="constant", fill_value=value)),
            ("impute_none", SimpleImputer(strategy="constant", fill_value=value, missing_values=None))]


def text_pipeline(max_features: int) -> Pipeline:
    """One free-text column to TF-IDF features: a missing text is an empty one; the 2-D column is flattened
    (numpy.ravel, the one function the saved model names) for the vectoriser."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import FunctionTransformer

    return Pipeline([
        *missing_as(""),
        ("flatten", FunctionTransformer(np.ravel)),
        ("tfidf", TfidfVectorizer(max_features=max_features, ngram_range=(1, 2), sublinear_tf=True, dtype=np.float64)),
    ])


def estimator_class(name: str) -> type:
    """The class behind an estimator name (XGBoost and LightGBM are imported only when named)."""
    if name in BOOSTERS:
        import importlib

        module, cls = BOOSTERS[name]
        return cast(type, getattr(importlib.import_module(module), cls))
    return ESTIMATORS[name]


def _booster_library(model: Any) -> str | None:
    """'xgboost' or 'lightgbm' when the model's last step is one of theirs (named, or a factory's)."""
    final = model[-1] if isinstance(model, Pipeline) else model
    library = type(final).__module__.split(".")[0]
    return library if library in ("xgboost", "lightgbm") else None


def fit_model(model: Any, x: pd.DataFrame, y: pd.Series, task: str, seed: int,
              stopping: EarlyStoppingConfig | None = None, time_ordered: bool = False) -> Any:
    """Fit an unfitted model on (x, y). An XGBoost or LightGBM last step, with `stopping`, stops adding trees
    when a validation share of these rows (seeded, stratified for classifiers) stops improving: the
    preprocessing is fitted on the rest, the booster is given both as its evaluation sets (their losses
    per round stay on it, the loss curve) and keeps its best iteration."""
    library = _booster_library(model)
    if stopping is None or library is None:
        return model.fit(x, y)
    x_fit, x_val, y_fit, y_val = inner_split(x, y, stopping.validation_fraction, task, seed, time_ordered)
    _fit_booster(*_prepared(model, x_fit, y_fit, x_val), y_fit, y_val, stopping.rounds)
    return model


def inner_split(x: pd.DataFrame, y: pd.Series, fraction: float, task: str, seed: int,
                time_ordered: bool) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series, pd.Series]:
    """A validation share of training rows: the latest ones for time-ordered rows, else a seeded random share
    (stratified for classifiers)."""
    if time_ordered:
        return cast(tuple[pd.DataFrame, pd.DataFrame, pd.Series, pd.Series],
                    tuple(train_test_split(x, y, test_size=fraction, shuffle=False)))
    return cast(tuple[pd.DataFrame, pd.DataFrame, pd.Series, pd.Series],
                tuple(train_test_split(x, y, test_size=fraction, random_state=seed,
                                       stratify=y if task in CLASSIFICATION_TASKS else None)))


def _prepared(model: Any, x_fit: pd.DataFrame, y_fit: pd.Series, x_val: pd.DataFrame) -> tuple[Any, Any, Any]:
    """The model's last step, and both row sets through its preprocessing fitted on x_fit (a booster needs
    its validation rows transformed as its training rows are)."""
    if isinstance(model, Pipeline) and len(model) > 1:
        prep = model[:-1]
        return model[-1], prep.fit_transform(x_fit, y_fit), prep.transform(x_val)
    return (model[-1] if isinstance(model, Pipeline) else model), x_fit, x_val


def _fit_booster(booster: Any, z_fit: Any, z_val: Any, y_fit: Any, y_val: Any, rounds: int | None) -> None:
    """Fit an XGBoost or LightGBM estimator recording its loss per round on (z_fit, y_fit) and (z_val, y_val),
    stopping after `rounds` rounds without a better validation loss (None: every tree)."""
    if type(booster).__module__.startswith("xgboost"):  # the last evaluation set decides when to stop
        booster.set_params(early_stopping_rounds=rounds)
        booster.fit(z_fit, y_fit, eval_set=[(z_fit, y_fit), (z_val, y_val)], verbose=False)
        return
    import lightgbm  # it skips the training set (the same objects) when deciding

    callbacks = [] if rounds is None else [lightgbm.early_stopping(rounds, first_metric_only=True, verbose=False)]
    booster.fit(z_fit, y_fit, eval_X=(z_fit, z_val), eval_y=(y_fit, y_val), callbacks=callbacks)


def booster_curve(model: Any) -> LossCurve | None:
    """Train and validation loss per round of a fitted XGBoost or LightGBM last step, up to the round it
    kept (the model as it predicts), or None."""
    library = _booster_library(model)
    if library is None:
        return None
    final = model[-1] if isinstance(model, Pipeline) else model
    results = final.evals_result() if library == "xgboost" else getattr(final, "evals_result_", None)
    if not results or len(results) < 2:
        return None
    train, validation = (next(iter(v.values())) for v in list(results.values())[:2])
    best = getattr(final, "best_iteration", None) if library == "xgboost" else getattr(final, "best_iteration_", None)
    keep = len(validation) if not best else int(best) + (1 if library == "xgboost" else 0)
    return LossCurve(train=[float(v) for v in train[:keep]], validation=[float(v) for v in validation[:keep]])


def factory_function(factory: str) -> Callable[..., Any]:
    """Import the team's factory ('package.module:function'); a ConfigError naming the field when it cannot.
    Only for a policy that trusts its package (the policy checks that before anything imports it)."""
    import importlib

    module_name, _, function = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"estimator.factory {factory!r}: cannot import it ({exc}); install the package (or put it "
                          "on PYTHONPATH) where CI and the service run") from exc
    if not callable(fn):
        raise ConfigError(f"estimator.factory {factory!r}: {type(fn).__name__} is not callable")
    return cast(Callable[..., Any], fn)


def from_factory(factory: str, schema: Schema, params: dict[str, Any]) -> Any:
    """Call the team's factory with the schema and the policy's params; it must give an unfitted estimator
    (fit and predict)."""
    model = factory_function(factory)(schema, **params)
    if isinstance(model, type):  # a class has fit and predict too, unbound: CI would fail in fit, far from here
        raise ConfigError(f"estimator.factory {factory!r} returned the class {model.__name__}, not an estimator: "
                          f"return an instance ({model.__name__}(...))")
    if not (hasattr(model, "fit") and hasattr(model, "predict")):
        raise ConfigError(f"estimator.factory {factory!r} returned {type(model).__name__}, not an estimator "
                          "(it needs fit and predict)")
    return model


class _FitShare:
    """The fits running in this process, which share its cores (one instance, `_FITS`)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = 0
        self.blas: Any = None  # the process-wide BLAS limit, held while any capped fit runs
        self.cap: int | None = None  # the threads per fit of the fits running now


_FITS = _FitShare()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _threadpools() -> Any:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries; building it scans every loaded library
    (~5 ms with MLflow, Prefect and GX imported), so it is built once, at the first fit: the estimators'
    libraries are loaded by then (this module imports them)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def fit_threads(threads: int | None) -> Iterator[None]:
    """A share of the cores for one fit: at most `threads` BLAS/OpenMP threads inside, and at most
    usable_cores() // threads fits at once in this process; None (every core per fit) runs fits one at a time."""
    # Uncapped fits side by side oversubscribe the cores (docs/architecture.md has the figures). The BLAS
    # limit is process-wide: set by the first capped fit, restored by the last one out; the OpenMP limit
    # belongs to the calling thread, so each fit sets its own.
    slots = 1 if threads is None else max(1, usable_cores() // threads)
    share = _FITS
    with share.cond:
        # Fits with another cap (or none) wait for the running ones to end: a BLAS limit must not change
        # under a running fit.
        share.cond.wait_for(lambda: share.running == 0 or (share.cap == threads and share.running < slots))
        share.running += 1
        share.cap = threads
    try:
        if threads is not None:
            with share.cond:
                if share.blas is None:
                    with _blas_unowned():
                        share.blas = _threadpools().select(user_api="blas").limit(limits=threads)
            with _threadpools().select(user_api="openmp").limit(limits=threads):
                yield
        else:
            yield
    finally:
        with share.cond:
            share.running -= 1
            try:
                if share.running == 0 and share.blas is not None:
                    with _blas_unowned():
                        share.blas.restore_original_limits()
            finally:
                if share.running == 0:
                    share.blas = None
                share.cond.notify_all()


@contextmanager
def _blas_unowned() -> Iterator[None]:
    """Change OpenBLAS's limit from whichever thread is first in or last out.

    threadpoolctl (3.8) lets one "controlling" thread change OpenBLAS's process-wide pool and silently
    ignores the others until that thread leaves a `with` block; the share sets the limit from one thread
    and may restore it from another, under its own lock, so it hands the control back around each change.
    """
    import threadpoolctl

    release = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if release is not None:
        release(force=True)
    try:
        yield
    finally:
        if release is not None:
            release(force=True)


def baseline_estimator(task: str) -> Any:
    """The naive baseline every candidate must beat."""
    return DummyClassifier(strategy="prior") if task in CLASSIFICATION_TASKS else DummyRegressor(strategy="mean")


@dataclass(frozen=True)
class Split:
    """Training rows (for CV and the final fit) and held-out rows (scored once)."""

    x_train: pd.DataFrame
    y_train: pd.Series
    x_holdout: pd.DataFrame
    y_holdout: pd.Series
    # The held-out rows with every column of the data but the target: another version (the champion) reads
    # its own columns from them, which need not be this candidate's features.
    rows_holdout: pd.DataFrame
    # Training rows in time order, held-out rows the latest (ci.split: time): folds and inner validation
    # splits then chain forward instead of shuffling.
    time_ordered: bool = False


def split(frame: pd.DataFrame, schema: Schema, holdout_fraction: float, seed: int,
          time_column: str | None = None) -> Split:
    """Hold out a share of rows: a stratified random share, or with `time_column` the latest rows (training
    rows then sorted by time)."""
    y = frame[schema.target]
    x = frame[list(schema.features)]
    if time_column is not None:
        when = pd.to_datetime(frame[time_column], errors="coerce")
        if when.isna().any():
            raise ConfigError(f"data.timestamp_column {time_column!r}: {int(when.isna().sum())} of {len(frame)} rows "
                              "have no readable time; ci.split 'time' needs one on every row")
        order = when.sort_values(kind="stable").index
        n_holdout = max(1, int(np.ceil(holdout_fraction * len(frame))))
        train_index, holdout_index = order[:-n_holdout], order[-n_holdout:]
        return Split(x.loc[train_index], y.loc[train_index], x.loc[holdout_index], y.loc[holdout_index],
                     frame.drop(columns=[schema.target]).loc[holdout_index], time_ordered=True)
    stratify = y if schema.task in CLASSIFICATION_TASKS else None
    train_index, holdout_index = train_test_split(frame.index, test_size=holdout_fraction, random_state=seed,
                                                  stratify=stratify)
    return Split(x.loc[train_index], y.loc[train_index], x.loc[holdout_index], y.loc[holdout_index],
                 frame.drop(columns=[schema.target]).loc[holdout_index])


def example_rows(x: pd.DataFrame, schema: Schema, n: int = 50) -> pd.DataFrame:
    """Rows for the model's signature: the first `n`, and for each nullable feature with no null among them, a
    row where it is null, so the signature lets callers send null where the training data had nulls (MLflow
    marks a column optional only when its example has a null)."""
    rows = x.head(n)
    extra = [x.index[x[c].isna()][0] for c in schema.nullable if c in x.columns and not rows[c].isna().any()
             and x[c].isna().any()]
    return pd.concat([rows, x.loc[list(dict.fromkeys(extra))]]) if extra else rows


@dataclass(frozen=True)
class LossCurve:
    """Training and validation loss over boosting iterations (iterative estimators only)."""

    train: list[float]
    validation: list[float]


@dataclass(frozen=True)
class CVResult:
    """Per-fold train and validation scores of one metric, and timing."""

    metric: str
    train_scores: list[float]
    val_scores: list[float]
    fit_seconds: list[float]
    curve: LossCurve | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def train_mean(self) -> float:
        return float(np.mean(self.train_scores))

    @property
    def val_mean(self) -> float:
        return float(np.mean(self.val_scores))

    @property
    def val_std(self) -> float:
        return float(np.std(self.val_scores, ddof=1)) if len(self.val_scores) > 1 else 0.0

    @property
    def gap(self) -> float:
        """How much better the model does on its training folds than on validation folds."""
        sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
        return sign * (self.train_mean - self.val_mean)


def _natural(metric: str, value: float) -> float:
    return -value if SCORERS[metric].startswith("neg_") else value


def score(metric: str, model: Any, x: pd.DataFrame, y: pd.Series) -> float:
    """A fitted model's metric on rows, in the metric's natural direction: a built-in through scikit-learn's own
    scorer; a scikit-learn scorer name or your 'module:function' from the model's outputs (rollout.models)."""
    from sklearn.metrics import get_scorer

    if metric in SCORERS:
        return _natural(metric, float(get_scorer(SCORERS[metric])(model, x, y)))
    return evaluate(model, x, y, metric)


def folds(task: str, n_folds: int, seed: int, time_ordered: bool = False) -> KFold | StratifiedKFold | TimeSeriesSplit:
    """CV folds: forward-chaining over time-ordered rows (each fold validates on rows after all it trains on),
    else shuffled, stratified for classifiers."""
    if time_ordered:
        return TimeSeriesSplit(n_splits=n_folds)
    if task in CLASSIFICATION_TASKS:
        return StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return KFold(n_splits=n_folds, shuffle=True, random_state=seed)


@dataclass(frozen=True)
class FoldScore:
    """Train and validation score of one CV fold, and how long its fit took."""

    train: float
    validation: float
    fit_seconds: float


def cv_fold(pipeline: Pipeline, data: Split, task: str, metric: str, n_folds: int, seed: int, fold: int,
            stopping: EarlyStoppingConfig | None = None) -> FoldScore:
    """Fit a clone on the training part of fold `fold` and score it on both parts (one unit of
    work, so folds can run in parallel threads or on Dask workers)."""
    import time

    from sklearn.base import clone

    train_idx, val_idx = list(folds(task, n_folds, seed, data.time_ordered).split(data.x_train, data.y_train))[fold]
    x, y = data.x_train, data.y_train
    t0 = time.perf_counter()
    model = fit_model(clone(pipeline), x.iloc[train_idx], y.iloc[train_idx], task, seed, stopping, data.time_ordered)
    fit_seconds = time.perf_counter() - t0
    return FoldScore(
        train=score(metric, model, x.iloc[train_idx], y.iloc[train_idx]),
        validation=score(metric, model, x.iloc[val_idx], y.iloc[val_idx]),
        fit_seconds=fit_seconds,
    )


def combine_folds(metric: str, scores: list[FoldScore], curve: LossCurve | None) -> CVResult:
    return CVResult(
        metric=metric,
        train_scores=[f.train for f in scores],
        val_scores=[f.validation for f in scores],
        fit_seconds=[f.fit_seconds for f in scores],
        curve=curve,
    )


def cross_validate_pipeline(pipeline: Pipeline, data: Split, task: str, metric: str, n_folds: int, seed: int,
                            stopping: EarlyStoppingConfig | None = None) -> CVResult:
    """Stratified k-fold CV recording train and validation scores per fold (sequentially)."""
    scores = [cv_fold(pipeline, data, task, metric, n_folds, seed, i, stopping) for i in range(n_folds)]
    return combine_folds(metric, scores, loss_curve(pipeline, data, task, seed, stopping))


def loss_curve(pipeline: Pipeline, data: Split, task: str, seed: int,
               stopping: EarlyStoppingConfig | None = None) -> LossCurve | None:
    """For boosting estimators: train and validation loss after each stage, on one inner split (XGBoost and
    LightGBM: the losses they record on their own evaluation sets, early stopping's when it is on)."""
    from sklearn.base import clone

    if _booster_library(pipeline) is not None:
        x_tr, x_va, y_tr, y_va = inner_split(data.x_train, data.y_train, 0.25, task, seed, data.time_ordered)
        model = clone(pipeline)
        _fit_booster(*_prepared(model, x_tr, y_tr, x_va), y_tr, y_va, None if stopping is None else stopping.rounds)
        return booster_curve(model)
    final = pipeline[-1] if isinstance(pipeline, Pipeline) else pipeline
    if not isinstance(pipeline, Pipeline) or len(pipeline) < 2 or not hasattr(final, "staged_predict"):
        return None
    x_tr, x_va, y_tr, y_va = inner_split(data.x_train, data.y_train, 0.25, task, seed, data.time_ordered)
    fitted = clone(pipeline).fit(x_tr, y_tr)
    prep, model = fitted[:-1], fitted[-1]
    z_tr, z_va = prep.transform(x_tr), prep.transform(x_va)
    if task in CLASSIFICATION_TASKS:
        train = [log_loss(y_tr, p) for p in model.staged_predict_proba(z_tr)]
        val = [log_loss(y_va, p) for p in model.staged_predict_proba(z_va)]
    else:
        train = [float(np.mean((y_tr - p) ** 2)) for p in model.staged_predict(z_tr)]
        val = [float(np.mean((y_va - p) ** 2)) for p in model.staged_predict(z_va)]
    return LossCurve(train=[float(v) for v in train], validation=[float(v) for v in val])


def fit(pipeline: Pipeline, data: Split, task: str = "classification", seed: int = 0,
        stopping: EarlyStoppingConfig | None = None) -> Any:
    """Fit on all training rows (the held-out rows stay unseen)."""
    return fit_model(pipeline, data.x_train, data.y_train, task, seed, stopping, data.time_ordered)



def baseline_score(data: Split, task: str, metric: str) -> float:
    """The naive baseline's metric on the training rows it was fitted on: the metric's scale for this target
    (a regression's rmse is then the target's spread), against which limits given as shares resolve."""
    baseline = baseline_estimator(task).fit(data.x_train, data.y_train)
    return evaluate(baseline, data.x_train, data.y_train, metric)


@dataclass(frozen=True)
class HeldOut:
    """Held-out metric of the candidate, the naive baseline and the champion (None when there is none yet)."""

    candidate: float
    baseline: float
    champion: float | None
    champion_version: str | None
    champion_error: str | None = None  # the champion could not be scored on these rows (a column it reads is gone)


def held_out(data: Split, task: str, metric: str, model: Predictor, champion: Predictor | None, champion_version: str | None) -> HeldOut:
    """Score the candidate, the naive baseline and the champion once, on the same held-out rows, each model on
    its own columns of them."""
    baseline = baseline_estimator(task).fit(data.x_train, data.y_train)
    champion_value, champion_error = None, None
    if champion is not None:
        try:
            champion_value = evaluate(champion, data.rows_holdout, data.y_holdout, metric)
        except ModelError as exc:
            champion_error = str(exc)
    return HeldOut(
        candidate=evaluate(model, data.rows_holdout, data.y_holdout, metric),
        baseline=evaluate(baseline, data.x_holdout, data.y_holdout, metric),
        champion=champion_value, champion_version=champion_version, champion_error=champion_error,
    )
