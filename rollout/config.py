"""The policy file (`rollout.yaml`): pydantic models, defaults that serve the example, clear errors.

Every field is documented here; `rollout config-reference` prints them.  A wrong field gets a
`ConfigError` naming the field (dotted path) and, where the set is closed, the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Task = Literal["classification", "multiclass", "regression"]
# Tasks whose target is a class: binary (0/1, the score is P(1)) and multiclass (0..K-1, with class probabilities).
CLASSIFICATION_TASKS = frozenset({"classification", "multiclass"})
EstimatorName = Literal[
    "logistic_regression",
    "random_forest",
    "gradient_boosting",
    "hist_gradient_boosting",
    "decision_tree",
    "ridge",
    "linear_regression",
    "random_forest_regressor",
    "gradient_boosting_regressor",
    "hist_gradient_boosting_regressor",
    "xgboost",
    "xgboost_regressor",
    "lightgbm",
    "lightgbm_regressor",
]
CLASSIFIERS = {
    "logistic_regression",
    "random_forest",
    "gradient_boosting",
    "hist_gradient_boosting",
    "decision_tree",
    "xgboost",
    "lightgbm",
}
CIMetric = Literal["roc_auc", "accuracy", "f1", "precision", "recall", "log_loss", "f1_macro", "roc_auc_ovr",
                   "r2", "rmse", "mae"]
CI_METRICS_BY_TASK: dict[str, set[str]] = {
    "classification": {"roc_auc", "accuracy", "f1", "precision", "recall", "log_loss"},
    "multiclass": {"accuracy", "f1_macro", "log_loss", "roc_auc_ovr"},
    "regression": {"r2", "rmse", "mae"},
}
# Metrics where smaller is better; gates flip their comparisons for these.
LOWER_IS_BETTER = {"log_loss", "rmse", "mae", "mse", "brier", "error_rate"}
# CI metrics in the target's own units (or nats), with no fixed scale: their gate limits default to shares of
# the naive baseline's value, and no floor is assumed.
SCALE_METRICS = {"rmse", "mae", "log_loss"}
def on_unit_scale(metric: str) -> bool:
    """A metric on a 0-1 scale (its limits default to absolute numbers): the built-ins but rmse, mae and log_loss,
    and scikit-learn's scores that are not negated losses; your own functions have a scale of their own."""
    return metric not in SCALE_METRICS and not metric.startswith("neg_") and ":" not in metric


# Defaults of the CI limits: absolute for metrics on a 0-1 scale, a share of the naive baseline's value else.
ABSOLUTE_LIMITS = {"max_train_val_gap": 0.05, "max_fold_std": 0.03, "min_margin_over_baseline": 0.05,
                   "max_regression_vs_champion": 0.01}
RELATIVE_LIMITS = {"max_train_val_gap": "15%", "max_fold_std": "5%", "min_margin_over_baseline": "5%",
                   "max_regression_vs_champion": "1%"}
# Online losses in the target's own units: their margin and planned effect have no default that could fit.
TARGET_UNIT_METRICS = {"mse", "mae"}
# (CI metric, online metric) a policy gets for its task unless it names them.
DEFAULT_METRICS = {"classification": ("roc_auc", "accuracy"), "multiclass": ("roc_auc_ovr", "accuracy"),
                   "regression": ("r2", "mse")}
# An AUC of 0.5 is a coin; the fixed floor a policy gets unless it says otherwise.
DEFAULT_FLOORS = {"roc_auc": 0.70, "roc_auc_ovr": 0.70}
OnlineMetric = Literal["accuracy", "log_loss", "brier", "mse", "mae"]
ONLINE_METRICS_BY_TASK: dict[str, set[str]] = {
    "classification": {"accuracy", "log_loss", "brier"},
    "multiclass": {"accuracy", "log_loss"},
    "regression": {"mse", "mae"},
}
Mode = Literal["shadow", "ab", "abn", "bandit"]


class ConfigError(ValueError):
    """A policy file that cannot be used; the message names every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What the generated loan data's columns are; set by default only when data.source is 'example'.
EXAMPLE_ROLES = {"target": "approved", "timestamp_column": "applied_at", "segment_column": "tier",
                 "unit_column": "customer_id"}


EXAMPLE_GUARDRAIL = {"segment": "VIP", "metric": "precision", "min": 0.6}


class ExampleData(_Strict):
    """Knobs of the generated loan-approval dataset (used when `data.source` is `example`)."""

    rows: int = Field(6000, gt=0, description="Number of applications to generate.")
    seed: int = Field(7, description="Seed of the generator; same seed, same data.")
    drift: float = Field(0.0, ge=0.0, le=3.0, description="Shift of income/debt distributions (0 = none).")
    new_levels: bool = Field(False, description="Introduce categorical levels unseen in the base data.")
    label_noise: float = Field(0.0, ge=0.0, le=0.5, description="Fraction of labels flipped at random.")


class DataConfig(_Strict):
    """Where the training data comes from and what its columns mean."""

    source: str = Field("example", description="'example' (generated), a path to a .csv or .parquet file, or a "
                        "SQLAlchemy database URL (with data.query); ${VAR} in a URL is read from the environment, so "
                        "a password need not sit in the file.")
    query: str | None = Field(None, description="The SQL that selects the training rows when data.source is a "
                              "database URL.")
    target: str = Field(min_length=1, description="Target column: required for your own data (the example's: "
                        "approved).")
    task: Task = Field("classification", description="classification (binary: a 0/1 target, the score is P(1)), "
                       "multiclass (a target of classes 0, 1, ..., K-1; answers carry every class's probability) "
                       "or regression.")
    timestamp_column: str | None = Field(None, description="Time column, excluded from features (the example's: "
                                         "applied_at).")
    segment_column: str | None = Field(None, description="Segment column used for guardrails, kept as a feature (the "
                                       "example's: tier).")
    unit_column: str | None = Field(None, description="Unit id column (sticky A/B routing), excluded from features "
                                    "(the example's: customer_id).")
    features: dict[str, Literal["numeric", "categorical", "text"]] = Field(
        default_factory=dict, description="Feature types; inferred from the data when empty (text is never "
        "inferred: name it here or in text_columns)."
    )
    text_columns: list[str] = Field(
        default_factory=list, description="Free-text feature columns, vectorised with TF-IDF (words and word pairs) "
        "by the default preprocessing.")
    text_max_features: int = Field(5000, ge=10, le=1_000_000, description="Vocabulary size of each text column's "
                                   "TF-IDF (the most frequent words and pairs of the training rows).")
    drop_columns: list[str] = Field(default_factory=list, description="Columns never used as features.")
    pii_columns: list[str] = Field(
        default_factory=list, description="Columns that identify a person: never stored in clear in the outcome "
        "store's logged features (see pii_action). The model still receives them.")
    pii_action: Literal["drop", "hash"] = Field(
        "drop", description="What the log keeps of a PII column: nothing (drop), or a keyed hash (HMAC-SHA256 with "
        "the key in the environment variable pii_key_env) that stays joinable, e.g. for the unit column.")
    pii_key_env: str = Field("ROLLOUT_PII_KEY", description="Environment variable holding the key of pii_action: "
                             "hash (the service refuses to start without it).")
    holdout_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="Share of rows held out and scored once.")
    seed: int = Field(42, description="Seed for splits and CV shuffling.")
    production_sample: str | None = Field(
        None, description="Path to a recent production sample (csv/parquet) for the drift gate; none = skip."
    )
    example: ExampleData = Field(default_factory=ExampleData)

    @model_validator(mode="before")
    @classmethod
    def _example_roles(cls, raw: Any) -> Any:
        """The generated example's column roles, for the example only: your own data names its own."""
        if isinstance(raw, dict) and raw.get("source", "example") == "example":
            return {**EXAMPLE_ROLES, **raw}
        return raw


class EarlyStoppingConfig(_Strict):
    """XGBoost and LightGBM stop adding trees when a validation split of their training rows stops improving."""

    rounds: int = Field(20, ge=1, description="Stop after this many rounds without a better validation loss.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of each fit's training rows (each CV fold's, the final fit's) held "
        "back to decide when to stop; never the held-out rows the gates use.")


class ParamRange(_Strict):
    """The values one parameter may take in a search: `choices`, or a range from `low` to `high` (integers
    when both bounds are integers and `step` is unset or whole)."""

    low: int | float | None = Field(None, description="Smallest value of a range.")
    high: int | float | None = Field(None, description="Largest value of a range.")
    log: bool = Field(False, description="Sample the range on a log scale (both bounds above 0).")
    step: int | float | None = Field(None, gt=0, description="Spacing of the values of a range; none = continuous.")
    choices: list[Any] | None = Field(None, min_length=1, description="The values to pick from, instead of a range.")

    @property
    def integer(self) -> bool:
        """A range of whole numbers: both bounds (and the step, if any) written as integers."""
        return all(isinstance(v, int) for v in (self.low, self.high)) and isinstance(self.step or 1, int)

    @model_validator(mode="after")
    def _range_or_choices(self) -> "ParamRange":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices")
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low above 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log: true and step cannot go together")
        return self


class SearchConfig(_Strict):
    """Hyperparameter search with Optuna on the training rows only: each trial is scored by an inner k-fold CV
    of the training split (never the held-out rows the gates use); the best trial's params are then trained,
    cross-validated and gated as if the policy had named them."""

    space: dict[str, ParamRange] = Field(
        ..., min_length=1, description="Parameter name -> its range or choices (keyword arguments of the estimator, "
        "or of the factory).")
    trials: int = Field(20, ge=1, le=10000, description="Trials to run, at most.")
    timeout_seconds: float | None = Field(None, gt=0, description="Stop starting trials after this long; none = "
                                          "run every trial.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler, seeded with data.seed.")
    folds: int = Field(3, ge=2, le=10, description="Inner CV folds scoring each trial.")


class EstimatorConfig(_Strict):
    """The model: an estimator from the list behind rollout's own preprocessing, or your own training code."""

    name: EstimatorName = Field("logistic_regression", description="Estimator from the allowed list.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the estimator (or of "
                                   "the factory).")
    factory: str | None = Field(
        None, description="Your own training code, 'package.module:function': called as function(schema, **params), "
        "it returns an unfitted scikit-learn estimator or Pipeline with its own preprocessing. Its package must be "
        "in registry.trusted_modules. Replaces `name`.")

    early_stopping: EarlyStoppingConfig | None = Field(
        default_factory=EarlyStoppingConfig, description="For xgboost and lightgbm (named, or the last step of "
        "your factory's pipeline); null trains every n_estimators tree.")

    search: SearchConfig | None = Field(None, description="Tune `params` by hyperparameter search first; none = "
                                        "train with `params` as given.")

    @field_validator("factory")
    @classmethod
    def _module_colon_function(cls, value: str | None) -> str | None:
        if value is not None:
            module, _, function = value.partition(":")
            if not (module and function and all(p.isidentifier() for p in (*module.split("."), function))):
                raise ValueError(f"{value!r}: expected 'package.module:function'")
        return value

    @property
    def label(self) -> str:
        """How runs and versions name it: the factory, or the estimator's name."""
        return self.factory or self.name


class DriftConfig(_Strict):
    """Training-vs-production drift limits (sample-size aware: tests and PSI must both flag)."""

    psi_max: float = Field(0.2, gt=0, description="PSI above this on a feature is drift.")
    p_value: float = Field(0.001, gt=0, lt=1, description="KS / chi-square p-value below this is drift.")
    js_max: float = Field(0.1, gt=0, le=1, description="Jensen-Shannon distance above this (categoricals) is drift.")
    bins: int = Field(10, ge=2, le=100, description="Quantile bins for PSI on numerics.")


class LatencyBudget(_Strict):
    """Absolute latency budget for the candidate (milliseconds)."""

    p99_single_ms: float = Field(100.0, gt=0, description="p99 of a single-row prediction.")
    p99_batch_ms: float = Field(500.0, gt=0, description="p99 of a batch prediction (stress.batch_size rows).")
    max_ratio_vs_champion: float = Field(3.0, gt=0, description="How many times slower than the champion the "
                                         "candidate may be (per interleaved round: median single-row call, and batch "
                                         "call; decided on a 90% interval, inconclusive while it straddles this).")


class StressConfig(_Strict):
    """How hard the stress test pushes the candidate."""

    single_requests: int = Field(
        100, ge=10, description="Single-row calls per model, at most: a clear pass (within half of every limit) stops "
        "after 30.")
    batch_size: int = Field(1000, ge=1, description="Rows per batch call.")
    batches: int = Field(20, ge=3, description="Batch calls per model, at most (one per round of single-row calls).")
    budget: LatencyBudget = Field(default_factory=LatencyBudget)


class InvarianceConfig(_Strict):
    """The robustness gate's behavioural check: small noise on real rows must leave answers alone."""

    perturbation: float = Field(0.01, gt=0, le=0.5, description="Noise on each numeric feature, as a share of its "
                                "training range (standard deviation).")
    max_changed: float = Field(0.15, ge=0, le=1, description="Share of rows whose class (or, regression, prediction "
                               "by more than 25% of the predictions' spread) may change, at most: rows next to a "
                               "decision boundary flip under any noise; a model that jumps flips about half.")


class TrainingDataConfig(_Strict):
    """Where ci-pipeline's rows come from: the policy's data source, what production served and labelled, or both."""

    source: Literal["policy", "production", "both"] = Field(
        "policy", description="'policy': data.source. 'production': the outcome store's served predictions of the "
        "last `days` days with their current labels (the champion's rows, one per request, features as logged). "
        "'both': the policy's rows, then production's. With production rows the hold-out and the champion gate "
        "use the latest rows by served time (a time split), so a model trained on stale data cannot win on stale "
        "rows.")
    days: float = Field(30.0, gt=0, description="Production rows served in the last this many days (before the "
                        "latest labelled one).")
    max_rows: int = Field(500_000, ge=100, description="At most this many production rows (the most recent).")
    min_rows: int = Field(500, ge=10, description="Fewer labelled production rows stop the run with a clear reason.")
    challenger_rows: bool = Field(False, description="Also the rows an A/B challenger answered (they were shaped by "
                                  "that model's decisions, so they are left out by default).")


class CIConfig(_Strict):
    """Offline gates of the ci-pipeline flow."""

    training_data: TrainingDataConfig = Field(default_factory=lambda: TrainingDataConfig())

    cv_folds: int = Field(5, ge=2, le=20, description="Stratified k-fold CV folds.")
    split: Literal["random", "time"] = Field(
        "random", description="'random': a stratified held-out share and shuffled k-fold CV. 'time': rows ordered by "
        "data.timestamp_column; the held-out rows are the latest holdout_fraction and CV folds chain forward "
        "(each validates on rows later than all it trained on), so nothing is learned from the future.")
    metric: str = Field("roc_auc", description="Metric of every CI gate: a built-in (roc_auc, accuracy, f1, precision, "
                        "recall, log_loss; multiclass f1_macro, roc_auc_ovr; regression r2, rmse, mae), any scikit-learn "
                        "scorer name (balanced_accuracy, average_precision, neg_brier_score, ...), or your own "
                        "'package.module:function' called as function(y_true, prediction, score) and returning a number "
                        "where greater is better (its package in registry.trusted_modules). Unset: roc_auc "
                        "(classification), roc_auc_ovr (multiclass), r2 (regression).")
    floor: float | None = Field(None, description="Floor of the metric on held-out data (a ceiling for rmse, mae, "
                                "log_loss); null = none. Unset: 0.70 for roc_auc and roc_auc_ovr, none for the rest "
                                "(no number suits every scale: set yours).")
    floor_source: Literal["fixed", "champion_live"] = Field(
        "fixed", description="'fixed' uses `floor`; 'champion_live' uses the champion's live metric when known."
    )
    max_train_val_gap: float | str | None = Field(
        None, description="Mean train minus validation score, at most: a number in the metric's units, or 'N%' of "
        "the naive baseline's score on the training rows. Unset: 0.05 for 0-1 metrics, '15%' for rmse, mae, log_loss.")
    max_fold_std: float | str | None = Field(
        None, description="Std of validation scores across folds, at most (number or 'N%', as max_train_val_gap). "
        "Unset: 0.03 for 0-1 metrics, '5%' for rmse, mae, log_loss.")
    min_margin_over_baseline: float | str | None = Field(
        None, description="Beat the naive baseline on held-out rows by at least this (number or 'N%' of the "
        "baseline's held-out score). Unset: 0.05 for 0-1 metrics, '5%' for rmse, mae, log_loss.")
    max_regression_vs_champion: float | str | None = Field(
        None, description="Held-out metric may trail the champion by this (number or 'N%' of the baseline's "
        "held-out score). Unset: 0.01 for 0-1 metrics, '1%' for rmse, mae, log_loss.")

    @field_validator("max_train_val_gap", "max_fold_std", "min_margin_over_baseline", "max_regression_vs_champion")
    @classmethod
    def _number_or_share(cls, value: float | str | None) -> float | str | None:
        import re

        if isinstance(value, str) and not re.fullmatch(r"\d+(\.\d+)?%", value.strip()):
            raise ValueError(f"{value!r}: a number in the metric's units, or a share such as '10%'")
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"{value}: must be 0 or more")
        return value.strip() if isinstance(value, str) else value

    @property
    def floor_value(self) -> float | None:
        """The floor in force: the policy's, else the metric's default (none for most)."""
        return self.floor if "floor" in self.model_fields_set else DEFAULT_FLOORS.get(self.metric)

    def limit(self, name: str, scale: float) -> tuple[float, str]:
        """A limit in the metric's units and how a message names it: a share resolves against `scale` (the naive
        baseline's score)."""
        raw = getattr(self, name)
        if raw is None:
            raw = (ABSOLUTE_LIMITS if on_unit_scale(self.metric) else RELATIVE_LIMITS)[name]
        if isinstance(raw, str):
            value = float(raw[:-1]) / 100.0 * abs(scale)
            return value, f"{value:.4g}: {raw} of the naive baseline's {abs(scale):.4g}, ci.{name}"
        return float(raw), f"{float(raw):g}, ci.{name}"
    fit_threads: int | None = Field(
        None, ge=1, description="BLAS/OpenMP threads per fit (CV folds, loss curve, final fit); null = the libraries' "
        "default (every core; fits then run one at a time). With a cap, cores // fit_threads fits run side by side. "
        "One is faster for small fits on few cores (benchmarks/pipeline.py)."
    )
    expectations_suite: str = Field(
        "expectations/loan_training.json", description="Great Expectations suite (JSON), relative to the policy file."
    )
    drift: DriftConfig = Field(default_factory=DriftConfig)
    stress: StressConfig = Field(default_factory=StressConfig)
    invariance: InvarianceConfig = Field(default_factory=lambda: InvarianceConfig())
    robustness_samples: str | None = Field(
        None, description="Path to saved problem inputs (csv/json records) replayed by the robustness gate."
    )
    first_model_becomes_champion: bool = Field(
        True, description="On a registry with no champion, the first passing model becomes @champion."
    )


class SegmentGuardrail(_Strict):
    """A floor on one segment's metric, checked with a confidence bound."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    segment: str | None = Field(description="Value of data.segment_column, e.g. VIP; null = every row (with "
                                "`class`, a floor on one class's recall or precision over all traffic).")
    metric: Literal["precision", "recall", "accuracy"] = Field("precision", description="Segment metric.")
    min: float = Field(ge=0, le=1, description="The challenger's metric on the segment must be at least this.")
    class_: int | None = Field(None, alias="class", ge=0, description="The class whose precision or recall is "
                               "floored (multiclass); binary: class 1, always.")

    @property
    def key(self) -> str:
        """What the guardrail's counts are filed under in the evidence: its segment, with its class if any."""
        return (self.segment or "") + ("" if self.class_ is None else f"#class={self.class_}")

    @property
    def name(self) -> str:
        """How reports name it: 'VIP precision', 'class 2 recall', 'VIP class 2 recall'."""
        parts = [self.segment or "", "" if self.class_ is None else f"class {self.class_}", self.metric]
        return " ".join(p for p in parts if p)


class BanditConfig(_Strict):
    """Thompson-sampling allocation when mode is bandit."""

    # The floor is what keeps a bandit's rollout decidable: the promotion test compares the arms'
    # propensity-weighted means, and an arm starved to 1% has almost no evidence. By simulation (0/1 loss,
    # challenger 1 point better, 100 labelled requests an hour, hourly looks for 14 days): promoted in 41% of
    # runs at a floor of 0.01, 64% at 0.05, 75% at 0.1, 90% at 0.2 (benchmarks/statistics.py).
    floor: float = Field(0.2, ge=0, lt=0.5, description="Minimum share of traffic per arm (at most 1/arms). Lower "
                         "loses less to the worse arm but leaves the promotion test little evidence on it.")
    burn_in: int = Field(100, ge=0, description="Labelled outcomes per arm before weights adapt.")


class LabelRequestConfig(_Strict):
    """Active evaluation: when labels cost money, label what the service proposes (GET /label-requests)."""

    enabled: bool = Field(False, description="The promotion test reads only the labels of requested rows, each "
                          "weighted by 1 / its inclusion probability (unbiased however the rows were favoured); "
                          "label coverage is counted over the requested rows. Binary classification and regression, "
                          "in shadow, ab and abn.")
    floor: float = Field(0.1, gt=0, le=10, description="Every row's chance of being requested gets this share of "
                         "the mean row's informativeness added, so a row the models agree on can still be drawn.")


class ProxyConfig(_Strict):
    """Label-free proxies: always reported; gate promotion only when `gate` is true."""

    gate: bool = Field(False, description="Block promotion when a proxy is out of bounds.")
    min_agreement: float = Field(0.8, ge=0, le=1, description="Share of requests where both versions agree.")
    psi_max: float = Field(0.25, gt=0, description="PSI of production inputs vs training data, at most.")


class RolloutPolicy(_Strict):
    """How the online evaluation decides."""

    mode: Mode = Field("shadow", description="shadow, ab, abn (several challengers) or bandit.")
    exposure: float = Field(0.1, gt=0, lt=1, description="Share of units sent to each challenger in ab/abn.")
    primary_metric: str = Field("accuracy", description="Per-row loss of the promotion test: accuracy (0/1 error), "
                                "log_loss, brier (classifiers), mse, mae (regression), or your own "
                                "'package.module:function' called as function(y_true, prediction) -> a loss per row "
                                "(lower is better; e.g. a cost matrix), its package in registry.trusted_modules "
                                "(shadow, ab, abn). Unset: accuracy (classification, multiclass), mse (regression).")
    margin: float = Field(0.01, ge=0, description="Non-inferiority margin M (0 = superiority).")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="One-sided error rate of false promotion.")
    power: float = Field(0.8, gt=0.5, lt=1, description="Planned power at the minimum detectable effect.")
    min_detectable_effect: float = Field(
        0.0, ge=0, description="Planned true difference (better-is-positive) the test is tuned for."
    )
    # The mixture stays the default, by the figures (benchmarks/statistics.py, hourly looks, shadow, 0/1 loss):
    # group_sequential with its maximum planned at the first look decides at the planned effect after 0.76x the
    # fixed-horizon sample against the mixture's 1.01x, but its early looks spend almost no alpha, so an effect
    # far beyond the plan (a margin of 0.01 on log loss, a model clearly better) waits for a large share of a
    # maximum planned for a small one: a 30-hour replay of scikit-learn's wine data that the mixture promotes
    # stays undecided under it (tests/flows/test_bundled_datasets.py). Take it when the planned effect is
    # what you expect.
    design: Literal["mixture", "group_sequential"] = Field(
        "mixture", description="Anytime-valid mixture confidence sequence (no maximum), or O'Brien-Fleming alpha "
        "spending by information fraction up to a maximum sample size (decides sooner at the planned effect).")
    max_samples: int | None = Field(None, gt=0, description="Maximum sample size of the group_sequential design. "
                                    "Unset: planned at the first look with min_samples outcomes, from their standard "
                                    "deviation, for `power` at `min_detectable_effect`, and kept for the rollout.")
    min_samples: int = Field(500, ge=0, description="Matured outcomes per version before any decision.")
    min_duration_hours: float = Field(24.0, ge=0, description="Rollout age before promotion.")
    max_duration_days: float = Field(14.0, gt=0, description="Horizon: undecided by then = inconclusive.")
    label_delay_hours: float = Field(0.0, ge=0, description="Requests younger than this are not yet matured.")
    segment_guardrails: list[SegmentGuardrail] = Field(
        default_factory=list, description="Floors on segments of data.segment_column (or, multiclass, on one "
        "class's precision or recall); a breach with confidence rejects. None by default (the example data's "
        "default: VIP precision at least 0.6).")
    guardrail_alpha: float = Field(
        0.05, gt=0, lt=0.5, description="Chance that any guardrail rejects a challenger that is at every limit, over "
        "every hourly look of the rollout: split among the guardrails, apart from the promotion test's alpha.")
    guardrail_min_trials: int = Field(
        30, ge=0, description="Observations a proportion guardrail (segment floor, error rate) needs before it can "
        "reject; until then an unclear one holds the decision.")
    min_label_coverage: float = Field(
        0.0, ge=0, le=1, description="Share of matured predictions that must have a label before promotion (0 = any).")
    max_label_coverage_gap: float = Field(
        0.05, ge=0, le=1, description="A/B: label coverage of the two arms may differ by this much (and by noise); a "
        "larger gap holds the decision: labels that depend on the arm bias the comparison.")
    max_stability_ratio: float = Field(
        2.0, gt=0, description="Day-to-day swing of the challenger's daily metric (net of sampling, complete days) "
        "over the champion's, at most.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Challenger error rate, at most (upper bound).")
    max_latency_p99_ms: float = Field(
        500.0, gt=0, description="Challenger p99 model-call latency (ms), at most (a confidence bound must clear it).")
    max_latency_ratio: float = Field(
        1.5, gt=0, description="Challenger p99 over the champion's p99 in the same rollout, at most."
    )
    srm_p_value: float = Field(
        0.001, gt=0, lt=1, description="Sample-ratio mismatch below this anytime-valid p blocks decisions.")
    multiplicity: Literal["bonferroni", "holm"] = Field(
        "bonferroni", description="Across several challengers. holm needs design: mixture (its anytime-valid p-values).")
    proxies: ProxyConfig = Field(default_factory=ProxyConfig)
    bandit: BanditConfig = Field(default_factory=BanditConfig)
    label_requests: LabelRequestConfig = Field(default_factory=LabelRequestConfig)

    @model_validator(mode="after")
    def _holm_needs_mixture(self) -> RolloutPolicy:
        if self.multiplicity == "holm" and self.design != "mixture":
            raise ValueError("multiplicity 'holm' steps down on the mixture design's anytime-valid p-values: set "
                             "design: mixture with it, or keep multiplicity: bonferroni")
        return self


class ServingConfig(_Strict):
    """The prediction service."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8080, ge=0, le=65535, description="Port (0 = any free port).")
    max_batch_size: int = Field(64, ge=1, description="Most requests scored in one call on the response path.")
    max_wait_ms: float = Field(2.0, ge=0, description="Longest a request waits for others to batch with.")
    shadow_max_batch_size: int = Field(
        512, ge=1, description="Shadow batches are larger: nobody waits on them, and a row costs less in a larger one "
        "(its child's CPU comes in bursts of a batch: at 2,048 rows the callers' p99 at concurrency 32 was 1.4-1.7x "
        "that of 512-row batches, for 0.92-1.19x their throughput)."
    )
    shadow_max_wait_ms: float = Field(
        500.0, ge=0, description="Longest a shadow request waits to batch (larger batches: shadow costs less CPU)."
    )
    shadow_timeout_s: float = Field(5.0, gt=0, description="A shadow call taking longer is logged as an error.")
    shadow_isolation: Literal["process", "thread"] = Field(
        "process", description="Where shadow models score: a child process per version (off the service's GIL; "
        "a crash or hang kills only the child) or a thread of the service."
    )
    challenger_timeout_ms: float = Field(
        500.0, gt=0, description="Deadline of a challenger's answer on the response path (ab, abn, bandit): after "
        "it the caller gets the champion's answer and the challenger a timeout error row.")
    champion_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of the champion's answer: after it the caller gets a 504, never a hang.")
    challenger_isolation: Literal["process", "thread"] = Field(
        "process", description="Where ab/abn/bandit challengers score: a child process per version (a crash or "
        "hang kills only the child; the champion answers) or a thread of the service. A model whose call is "
        "rollout's own numpy code (a compiled pipeline ending in a plain linear model) scores small batches (640 "
        "values, rows x columns) in the service either way: no model code runs.")
    reload_interval_s: float = Field(10.0, gt=0, description="How often aliases are polled for moves.")
    model_cache_dir: str = Field(".rollout/model-cache", description="Where the service keeps the versions it "
                                 "loaded and the last aliases, so a restart during a registry outage serves the "
                                 "cached champion (relative to the policy file).")
    log_queue_size: int = Field(100_000, ge=1, description="Bound of the prediction-log queue. A shadow lane queues "
                                "at most a quarter of it (or eight of its batches, if more) before it refuses rows "
                                "as 'challenger cannot keep up': its queued requests' rows count against this.")
    on_log_overflow: Literal["reject", "drop"] = Field(
        "reject", description="When the log queue is full: answer 503 with Retry-After before scoring (an unlogged "
        "prediction is invisible to the evaluation), or serve and drop the log rows (counted in /metrics).")
    log_batch_size: int = Field(500, ge=1, description="Rows per insert of the log writer.")
    max_request_rows: int = Field(1000, ge=1, description="Rows per /predict request, at most (else 413).")
    token_env: str = Field("ROLLOUT_TOKEN", description="Environment variable holding the admin/label bearer token.")
    log_features: Literal["all", "none"] | Annotated[float, Field(gt=0, le=1)] | list[str] = Field(
        "all", description="The input features kept with each served prediction (drift checks and continuous "
        "training read them): all, none, a fraction of requests (0.1: one in ten, chosen by request id), or a "
        "list of columns. data.pii_columns are never kept in clear whatever this says.")


class StoresConfig(_Strict):
    """Where runs, models and outcomes live. Relative SQLite paths resolve against the policy file."""

    mlflow_tracking_uri: str = Field("sqlite:///.rollout/mlflow.db", description="MLflow tracking/registry URI.")
    mlflow_artifacts: str = Field(".rollout/mlartifacts", description="Artifact root for new MLflow experiments.")
    outcome_store_url: str = Field("sqlite:///.rollout/outcomes.db", description="SQLAlchemy URL of the outcome store.")
    reports_dir: str = Field(".rollout/reports", description="Where gate and evaluation reports are written.")
    retention_days: int | None = Field(
        35, ge=1, description="Days raw prediction and label rows are kept; older ones are removed by the hourly "
        "evaluation's retention step, except rows of an open rollout. Summaries and the audit log are kept for "
        "good. null keeps everything.")


class RegistryConfig(_Strict):
    """Model registry conventions."""

    model_name: str = Field("loan-approval", min_length=1, description="Registered model name.")
    experiment: str = Field("rollout-ci", description="MLflow experiment of CI runs.")
    mirror_stages: bool = Field(True, description="Mirror aliases to deprecated stages (Production/Staging/Archived).")
    trusted_modules: list[str] = Field(
        default_factory=list,
        description="Your own packages (installed where models load) whose classes a model file may name, "
                    "e.g. [my_package]; nothing else outside scikit-learn's needs is trusted.")

    @field_validator("trusted_modules")
    @classmethod
    def _own_modules_only(cls, value: list[str]) -> list[str]:
        import sys

        for name in value:
            top = name.split(".")[0]
            if not name or not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"{name!r} is not a module name")
            if top in sys.stdlib_module_names or top in {"numpy", "scipy", "pandas", "sklearn", "mlflow"}:
                raise ValueError(f"{name!r}: only your own package's modules can be trusted, not a library "
                                 "whose functions can run code")
        return value


class Policy(_Strict):
    """The whole policy file."""

    data: DataConfig = Field(default_factory=lambda: DataConfig.model_validate({}))
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    ci: CIConfig = Field(default_factory=CIConfig)
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    stores: StoresConfig = Field(default_factory=StoresConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    base_dir: Path = Field(Path("."), exclude=True, description="Directory of the policy file (set on load).")

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_data(cls, raw: Any) -> Any:
        """Defaults that depend on the data: the metrics of its task, and the example's VIP guardrail for the
        example data only."""
        if not isinstance(raw, dict):
            return raw
        data = raw.get("data") or {}
        rollout = raw.get("rollout") or {}
        ci = raw.get("ci") or {}
        if not (isinstance(data, dict) and isinstance(rollout, dict) and isinstance(ci, dict)):
            return raw  # reported by the field validation
        task = data.get("task", "classification")
        ci_metric, online_metric = DEFAULT_METRICS.get(task, DEFAULT_METRICS["classification"])
        rollout = {"primary_metric": online_metric, **rollout}
        if data.get("source", "example") == "example" and "segment_guardrails" not in rollout:
            rollout["segment_guardrails"] = [EXAMPLE_GUARDRAIL]
        return {**raw, "ci": {"metric": ci_metric, **ci}, "rollout": rollout}

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        task = self.data.task
        metric = self.ci.metric
        builtin = set().union(*CI_METRICS_BY_TASK.values())
        if ":" in metric:
            self._trusted_function("ci.metric", metric)
        elif metric in builtin and metric not in CI_METRICS_BY_TASK[task]:
            raise ValueError(f"ci.metric {metric!r} does not apply to {task}; allowed: "
                             f"{', '.join(sorted(CI_METRICS_BY_TASK[task]))}, a scikit-learn scorer name or "
                             "'package.module:function'")
        elif metric not in builtin:
            from sklearn.metrics import get_scorer_names

            if metric not in get_scorer_names():
                import difflib

                close = difflib.get_close_matches(metric, [*builtin, *get_scorer_names()], n=1)
                raise ValueError(f"ci.metric {metric!r}: neither a built-in ({', '.join(sorted(CI_METRICS_BY_TASK[task]))}"
                                 f"), a scikit-learn scorer name{f' (did you mean {close[0]!r}?)' if close else ''} "
                                 "nor 'package.module:function'")
        online = self.rollout.primary_metric
        if ":" in online:
            self._trusted_function("rollout.primary_metric", online)
            if self.rollout.mode == "bandit":
                raise ValueError(f"rollout.primary_metric {online!r}: your own loss works in shadow, ab and abn; "
                                 "bandit mode weighs the built-in losses")
        elif online not in ONLINE_METRICS_BY_TASK[task]:
            raise ValueError(
                f"rollout.primary_metric {self.rollout.primary_metric!r} does not apply to {task}; allowed: "
                f"{', '.join(sorted(ONLINE_METRICS_BY_TASK[task]))}"
            )
        unset = [f"rollout.{name}" for name in ("margin", "min_detectable_effect")
                 if name not in self.rollout.model_fields_set]
        if (self.rollout.primary_metric in TARGET_UNIT_METRICS or ":" in self.rollout.primary_metric) and unset:
            units = "your own loss's" if ":" in self.rollout.primary_metric else "the target's"
            raise ValueError(f"{' and '.join(unset)}: rollout.primary_metric {self.rollout.primary_metric!r} is in "
                             f"{units} units, so no default fits: set margin (the largest loss increase you accept, "
                             "e.g. 1% of the champion's) and min_detectable_effect (the improvement worth finding "
                             "fast, e.g. 5%), both in those units")
        if self.rollout.label_requests.enabled and (task == "multiclass" or self.rollout.mode == "bandit"):
            raise ValueError("rollout.label_requests.enabled: label requests weigh binary classification and "
                             f"regression losses in shadow, ab and abn; not {task if task == 'multiclass' else 'bandit'}")
        for i, guard in enumerate(self.rollout.segment_guardrails):
            where = f"rollout.segment_guardrails.{i}"
            if guard.class_ is not None and task != "multiclass":
                raise ValueError(f"{where}.class: only a multiclass task has classes to choose (binary: class 1)")
            if guard.class_ is not None and guard.metric == "accuracy":
                raise ValueError(f"{where}.class: accuracy is of every class; a class goes with precision or recall")
            if task == "multiclass" and guard.class_ is None and guard.metric != "accuracy":
                raise ValueError(f"{where}.class: a multiclass {guard.metric} is of one class: name it")
            if guard.segment is None and guard.class_ is None:
                raise ValueError(f"{where}.segment: name the segment (or, multiclass, a class)")
        pii = set(self.data.pii_columns)
        if self.data.segment_column in pii:
            raise ValueError(f"data.pii_columns: the segment column {self.data.segment_column!r} is logged as a "
                             "group name for the guardrails, so it cannot be a PII column")
        if self.data.unit_column in pii and self.data.pii_action == "drop":
            raise ValueError(f"data.pii_action: the unit column {self.data.unit_column!r} is a PII column and must "
                             "stay joinable (unit-level statistics, sticky routing): set pii_action: hash")
        if self.ci.training_data.source != "policy" and not self.data.timestamp_column:
            raise ValueError(f"ci.training_data.source {self.ci.training_data.source!r}: production rows carry their "
                             "served time in data.timestamp_column (the hold-out is the latest rows), which is not set")
        if self.ci.training_data.source != "policy" and self.serving.log_features == "none":
            raise ValueError(f"ci.training_data.source {self.ci.training_data.source!r}: production rows are the "
                             "logged features, and serving.log_features is none")
        if self.ci.split == "time" and not self.data.timestamp_column:
            raise ValueError("ci.split 'time' orders rows by data.timestamp_column, which is not set")
        if self.estimator.factory is not None:
            self._trusted_function("estimator.factory", self.estimator.factory, " or its classes load")
            return self
        is_classifier = self.estimator.name in CLASSIFIERS
        if is_classifier != (task in CLASSIFICATION_TASKS):
            raise ValueError(f"estimator.name {self.estimator.name!r} does not fit task {task!r}")
        return self

    def _trusted_function(self, setting: str, value: str, also: str = "") -> None:
        """'package.module:function' whose package the policy trusts by name, or a ValueError naming the setting."""
        module, _, function = value.partition(":")
        if not (module and function and all(p.isidentifier() for p in (*module.split("."), function))):
            raise ValueError(f"{setting} {value!r}: expected 'package.module:function'")
        if not any(module == m or module.startswith(f"{m}.") for m in self.registry.trusted_modules):
            raise ValueError(f"{setting} {value!r}: its package must be trusted by name in registry.trusted_modules "
                             f"(now {self.registry.trusted_modules}) before its code runs{also}")

    def path(self, value: str) -> Path:
        """Resolve a path from the policy file relative to the file's directory."""
        p = Path(value)
        return p if p.is_absolute() else (self.base_dir / p)

    def url(self, value: str) -> str:
        """Resolve a relative `sqlite:///` URL against the policy file's directory."""
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value.startswith(prefix + "/") and value != prefix + ":memory:":
            return prefix + str(self.path(value[len(prefix) :]).resolve())
        return value

    @property
    def local_mlflow(self) -> bool:
        """True when MLflow runs embedded (a SQLite or file store), not behind a tracking server."""
        return not self.tracking_uri.startswith(("http://", "https://", "databricks"))

    @property
    def tracking_uri(self) -> str:
        return self.url(expand_env(self.stores.mlflow_tracking_uri, "stores.mlflow_tracking_uri"))

    @property
    def artifact_location(self) -> str | None:
        """Where new MLflow experiments keep artifacts: the policy's folder when embedded, else the server's choice."""
        return self.path(self.stores.mlflow_artifacts).resolve().as_uri() if self.local_mlflow else None

    @property
    def outcome_url(self) -> str:
        return self.url(expand_env(self.stores.outcome_store_url, "stores.outcome_store_url"))


def expand_env(value: str, field: str) -> str:
    """`${NAME}` in a store URL replaced by that environment variable (credentials stay out of the policy file);
    a ConfigError naming the field when one is not set. A bare `$` is left as it is (a password may hold one)."""
    import os
    import re

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{field}: environment variable {name} is not set (the URL says ${{{name}}})")
        return os.environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value_of, value)


def _describe(error: Any, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "<root>"
    if error["type"] == "extra_forbidden":
        parent = _model_at(model, error["loc"][:-1])
        allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
        return f"{loc}: unknown field; allowed fields here: {allowed}"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{loc}: {msg}{got_text}"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        current = found
    return current


def parse_policy(raw: dict[str, Any] | None, base_dir: Path | str = ".") -> Policy:
    """Validate a policy mapping; raise ConfigError listing every bad field."""
    try:
        return Policy.model_validate({**(raw or {}), "base_dir": Path(base_dir)})
    except ValidationError as exc:
        lines = [_describe(e, Policy) for e in exc.errors()]
        raise ConfigError("invalid policy:\n  " + "\n  ".join(lines)) from None


ENV_PREFIX = "ROLLOUT_"


def store_overrides(environ: dict[str, str]) -> dict[str, str]:
    """`stores.*` fields set by environment (ROLLOUT_MLFLOW_TRACKING_URI, ROLLOUT_OUTCOME_STORE_URL, ...),
    so one committed policy file runs against the servers of whoever runs it (a worker, CI)."""
    return {name: environ[ENV_PREFIX + name.upper()] for name in StoresConfig.model_fields
            if ENV_PREFIX + name.upper() in environ}


def load_policy(path: Path | str, environ: dict[str, str] | None = None) -> Policy:
    """Read and validate a policy file; `stores` fields may be overridden by ROLLOUT_* variables."""
    import os

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"policy file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    overrides = store_overrides(dict(os.environ) if environ is None else environ)
    if overrides:
        raw["stores"] = {**(raw.get("stores") or {}), **overrides}
    try:
        return parse_policy(raw, path.parent.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
