"""Data checks before training: a Great Expectations suite, and training-vs-production drift.

`validate` runs a committed GX 1.x suite on a dataframe in a throw-away (ephemeral) context and
says in words what failed. `build_suite` derives a starter suite from a reference table.
`drift_report` compares production inputs with the training data feature by feature; a feature
drifts only when the shift is both statistically significant and large enough to matter, so
big production samples do not flag trivial shifts and small ones do not flag noise.
Great Expectations is imported inside the functions that need it: importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from rollout.config import CLASSIFICATION_TASKS, DataConfig, DriftConfig
from rollout.data import Schema

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.data_context import AbstractDataContext

# dtype names GX compares a pandas column's dtype against (`expect_column_values_to_be_in_type_list`).
NUMERIC_TYPES = ("int64", "int32", "float64", "float32", "Int64Dtype", "Float64Dtype")
DATETIME_TYPES = ("datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]", "DatetimeTZDtype")

# Domain knowledge of the example loan data that no reference sample shows reliably: a FICO
# score is 300-850, debt-to-income is capped at 1.5 by the lender, money amounts are positive.
LOAN_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "income": (0.0, 5_000_000.0),
    "loan_amount": (0.0, 5_000_000.0),
    "credit_score": (300.0, 850.0),
    "debt_to_income": (0.0, 1.5),
    "employment_years": (0.0, 60.0),
    "open_accounts": (0.0, 100.0),
}
LOAN_POSITIVE = ("income", "loan_amount")
LOAN_MIN_ROWS = 100


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def build_suite(
    frame: pd.DataFrame,
    schema: Schema,
    name: str,
    *,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,  # inclusive ranges; None = open
    positive: Sequence[str] = (),  # columns that must be > 0
    min_rows: int = 100,
    tolerance: float = 0.5,  # other ranges: the observed span widened by this share (>= 0 stays >= 0)
    balance: tuple[float, float] = (0.2, 0.8),  # a 0/1 target's mean stays here (widened to the reference's)
) -> ExpectationSuite:
    """A starter suite from a reference table: columns, types, nulls, ranges, levels, target balance.

    A nullable column may hold twice its reference null rate plus two points; other columns no nulls."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    bounds = dict(bounds or {})
    missing = [c for c in (*schema.features, schema.target) if c not in frame.columns]
    if missing:
        raise ValueError(f"schema names columns the frame lacks: {', '.join(missing)}")
    numeric = set(schema.numeric)
    categorical = set(schema.categorical)
    if schema.task == "regression":
        numeric.add(schema.target)
    expectations: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[str(c) for c in frame.columns], exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=int(min_rows)),
    ]
    for col in map(str, frame.columns):
        series = frame[col]
        expectations.append(_type_expectation(gxe, col, series))
        null_rate = float(series.isna().mean())
        if null_rate == 0.0:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
        else:
            mostly = max(0.0, round(1.0 - (2 * null_rate + 0.02), 2))
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=col, mostly=mostly))
        if col in numeric:
            low, high = bounds.get(col) or _widened_range(series, tolerance)
            kwargs: dict[str, Any] = {"column": col}
            if low is not None:
                kwargs["min_value"] = float(low)
            if high is not None:
                kwargs["max_value"] = float(high)
            if col in positive:
                kwargs["strict_min"] = True
            if len(kwargs) > 1:
                expectations.append(gxe.ExpectColumnValuesToBeBetween(**kwargs))
        elif col in categorical:
            levels = schema.categories.get(col) or tuple(sorted(str(v) for v in series.dropna().unique()))
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=list(levels)))
    if schema.task in CLASSIFICATION_TASKS:
        target = frame[schema.target].dropna()
        values = sorted(target.unique().tolist())
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column=schema.target, value_set=values))
        if set(values) <= {0, 1} and len(target):
            mean = float(target.mean())
            low_b, high_b = min(balance[0], round(mean / 2, 2)), max(balance[1], round((1 + mean) / 2, 2))
            expectations.append(
                gxe.ExpectColumnMeanToBeBetween(column=schema.target, min_value=low_b, max_value=high_b)
            )
    meta = {"rollout": {"generated_by": "rollout.ci.validation.build_suite", "reference_rows": int(len(frame))}}
    return gx.ExpectationSuite(name=name, expectations=expectations, meta=meta)


def example_suite(rows: int = 6000, seed: int = 7) -> ExpectationSuite:
    """The suite committed as expectations/loan_training.json, rebuilt from the example data."""
    from rollout.data import example_dataset, infer_schema

    frame = example_dataset(rows=rows, seed=seed)
    schema = infer_schema(frame, DataConfig.model_validate({}))
    return build_suite(
        frame, schema, "loan_training", bounds=LOAN_BOUNDS, positive=LOAN_POSITIVE, min_rows=LOAN_MIN_ROWS
    )


def write_suite(suite: ExpectationSuite, path: str | Path) -> Path:
    """Write a suite as GX serialises it (indented JSON), for committing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(suite.to_json_dict(), indent=2) + "\n")
    return path


class MissingSuite(FileNotFoundError):
    """No suite at the policy's ci.expectations_suite (rollout.ci.gates names the field and `rollout make-suite`)."""


def load_suite(path: str | Path) -> ExpectationSuite:
    """Read a suite from JSON; an invalid expectation is an error, not silently dropped as GX does."""
    path = Path(path)
    if not path.exists():  # said before importing GX (~5 s): `rollout check-config --data` before `make-suite`
        raise MissingSuite(f"expectation suite not found: {path}")
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ValueError(f"{path}: not an expectation suite (needs a 'name' and 'expectations')")
    built = []
    for i, item in enumerate(raw.get("expectations") or []):
        try:
            built.append(ExpectationConfiguration(**item).to_domain_obj())
        except Exception as exc:  # GX raises several unrelated types for one bad entry
            kind = item.get("type", "?") if isinstance(item, dict) else "?"
            raise ValueError(f"{path}: expectation #{i} ({kind}) is not valid: {exc}") from None
    return gx.ExpectationSuite(
        name=raw["name"],
        expectations=built,
        suite_parameters=raw.get("suite_parameters"),
        meta=raw.get("meta"),
        notes=raw.get("notes"),
    )


def _type_expectation(gxe: Any, col: str, series: pd.Series) -> Any:
    if pd.api.types.is_bool_dtype(series):
        return gxe.ExpectColumnValuesToBeOfType(column=col, type_="bool")
    if pd.api.types.is_numeric_dtype(series):
        return gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=list(NUMERIC_TYPES))
    if pd.api.types.is_datetime64_any_dtype(series):
        return gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=list(DATETIME_TYPES))
    # "str" matches pandas' string dtype, and value by value on object columns of strings.
    return gxe.ExpectColumnValuesToBeOfType(column=col, type_="str")


def _widened_range(series: pd.Series, tolerance: float) -> tuple[float | None, float | None]:
    values = pd.to_numeric(series, errors="coerce").dropna()
    if values.empty:
        return None, None
    low, high = float(values.min()), float(values.max())
    pad = tolerance * (high - low)
    return (0.0 if low >= 0 else low - pad), high + pad


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


COLUMN_MISSING = "the column is missing"  # a failure's `observed` when the table lacks its column


@dataclass(frozen=True)
class FailedExpectation:
    """One failed expectation, with what was expected and what was seen, in words."""

    expectation_type: str
    column: str | None
    kwargs: str
    expected: str
    observed: str

    @property
    def column_missing(self) -> bool:
        """Failed because the table has no such column (a suite made for another table, a renamed column)."""
        return self.observed == COLUMN_MISSING

    @property
    def sentence(self) -> str:
        where = f"`{self.column}`" if self.column else "table"
        return f"{where}: expected {self.expected}; {self.observed} ({self.expectation_type})"


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of running a suite on a table: success, GX statistics and every failure."""

    suite: str
    success: bool
    statistics: dict[str, float | int]
    failed: tuple[FailedExpectation, ...]
    rows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "success": self.success,
            "statistics": dict(self.statistics),
            "failed": [asdict(f) for f in self.failed],
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
        }

    def to_markdown(self) -> str:
        evaluated = int(self.statistics.get("evaluated_expectations", 0))
        verdict = "passed" if self.success else "FAILED"
        lines = [
            f"### Data validation `{self.suite}`: {verdict}",
            "",
            f"{evaluated - len(self.failed)} of {evaluated} expectations met on {self.rows:,} rows.",
        ]
        if self.failed:
            lines += ["", "Failed expectations:", ""]
            lines += [f"- {f.sentence}" for f in self.failed]
        return "\n".join(lines) + "\n"


def validate(frame: pd.DataFrame, suite_path: str | Path) -> ValidationReport:
    """Run the GX suite at `suite_path` on `frame` in an ephemeral, quiet, offline context."""
    start = time.perf_counter()
    suite = load_suite(suite_path)
    with _ephemeral_context() as context:
        batch_definition = (
            context.data_sources.add_pandas("rollout")
            .add_dataframe_asset("frame")
            .add_batch_definition_whole_dataframe("whole")
        )
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format="BASIC")
    # GX returns results grouped by metric, not in suite order; report them as the suite lists them.
    order = {_config_key(e.configuration.to_json_dict()): i for i, e in enumerate(suite.expectations)}
    failures = [r for r in result.results if not r.success]
    failures.sort(key=lambda r: order.get(_config_key(_config(r).to_json_dict()), len(order)))
    stats = {str(k): (float(v) if isinstance(v, float) else int(v)) for k, v in dict(result.statistics).items()}
    return ValidationReport(
        suite=suite.name,
        success=bool(result.success),
        statistics=stats,
        failed=tuple(_describe_failure(r, set(map(str, frame.columns))) for r in failures),
        rows=int(len(frame)),
        seconds=time.perf_counter() - start,
    )


@contextmanager
def _ephemeral_context() -> Iterator[AbstractDataContext]:
    """A fresh in-memory GX context: no files, no docs site, no analytics, no progress bars.

    `gx.get_context` also makes the new context GX's "current" one; the previous one is put
    back afterwards so a caller's own GX context is left as it was.
    """
    import great_expectations as gx
    from great_expectations.data_context.data_context.context_factory import project_manager
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.exceptions.exceptions import DataContextRequiredError

    try:
        previous = project_manager.get_current_project()
    except DataContextRequiredError:
        previous = None
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    try:
        yield gx.get_context(project_config=config, mode="ephemeral")
    finally:
        project_manager.set_project(previous)


def _config_key(config: dict[str, Any]) -> str:
    config = {"type": config.get("type"), "kwargs": dict(config.get("kwargs") or {})}
    config["kwargs"] = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    return json.dumps(config, sort_keys=True, default=str)


def _config(result: ExpectationValidationResult) -> Any:
    """The expectation a result is about (GX types it optional; a suite run always sets it)."""
    config = result.expectation_config
    assert config is not None, "a validation result without its expectation"
    return config


def _describe_failure(result: ExpectationValidationResult, columns: set[str]) -> FailedExpectation:
    config = _config(result)
    kind = config.type
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format")}
    column = kwargs.get("column")
    summary = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items() if k != "column")
    return FailedExpectation(
        expectation_type=kind,
        column=column,
        kwargs=summary,
        expected=_expected_words(kind, kwargs),
        observed=COLUMN_MISSING if column and column not in columns else _observed_words(result),
    )


def _expected_words(kind: str, kw: dict[str, Any]) -> str:
    mostly = kw.get("mostly")
    share = f" in at least {mostly:.0%} of rows" if mostly is not None and mostly < 1 else ""
    if kind == "expect_table_columns_to_match_set":
        return f"exactly the suite's {len(kw.get('column_set') or [])} columns"
    if kind in ("expect_table_row_count_to_be_between", "expect_column_mean_to_be_between"):
        what = "a row count" if kind.startswith("expect_table") else "a mean"
        return f"{what} {_interval(kw)}"
    if kind == "expect_column_values_to_not_be_null":
        return f"no nulls{share}" if share else "no nulls"
    if kind == "expect_column_values_to_be_between":
        return f"values {_interval(kw)}{share}"
    if kind == "expect_column_values_to_be_in_set":
        return f"values in {_short(kw.get('value_set'))}{share}"
    if kind == "expect_column_values_to_be_of_type":
        return f"type {kw.get('type_')}"
    if kind == "expect_column_values_to_be_in_type_list":
        return f"one of the types {', '.join(map(str, kw.get('type_list') or []))}"
    return kind.removeprefix("expect_").replace("_", " ") + (f" ({_short(kw)})" if kw else "")


def _interval(kw: dict[str, Any]) -> str:
    low, high = kw.get("min_value"), kw.get("max_value")
    lo_op = ">" if kw.get("strict_min") else ">="
    hi_op = "<" if kw.get("strict_max") else "<="
    if low is not None and high is not None:
        return f"{lo_op} {_num(low)} and {hi_op} {_num(high)}"
    if low is not None:
        return f"{lo_op} {_num(low)}"
    return f"{hi_op} {_num(high)}"


def _observed_words(result: ExpectationValidationResult) -> str:
    info = result.exception_info or {}
    messages = _exception_messages(info)
    if messages:
        return "could not be checked: " + "; ".join(dict.fromkeys(messages))
    res = result.result or {}
    details = (res.get("details") or {}).get("mismatched")
    if details:
        parts = []
        if details.get("missing"):
            parts.append(f"missing {', '.join(map(str, details['missing']))}")
        if details.get("unexpected"):
            parts.append(f"unexpected {', '.join(map(str, details['unexpected']))}")
        return "found " + " and ".join(parts)
    if "unexpected_count" in res:
        count, total = int(res.get("unexpected_count") or 0), int(res.get("element_count") or 0)
        pct = 100.0 * count / total if total else 0.0
        examples = [v for v in (res.get("partial_unexpected_list") or []) if not _is_nan(v)]
        shown = ", ".join(dict.fromkeys(_short(v) for v in examples[:20]))
        kind = _config(result).type
        what = "null" if kind == "expect_column_values_to_not_be_null" else "unexpected"
        text = f"{count:,} of {total:,} rows ({pct:.1f}%) {what}"
        return text + (f", e.g. {shown}" if shown and what != "null" else "")
    if "observed_value" in res:
        return f"observed {_short(res['observed_value'])}"
    return "failed"


def _exception_messages(info: Mapping[str, Any]) -> list[str]:
    if info.get("raised_exception"):
        return [str(info.get("exception_message") or "error").splitlines()[0]]
    out: list[str] = []
    for value in info.values():
        if isinstance(value, Mapping) and value.get("raised_exception"):
            out.append(str(value.get("exception_message") or "error").splitlines()[0])
    return out


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value: Any) -> str:
    return f"{value:,.10g}" if isinstance(value, (int, float)) else str(value)


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple, set)):
        text = "{" + ", ".join(_short(v, limit) for v in value) + "}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------------


class KSResult(NamedTuple):
    statistic: float
    p_value: float


def psi(expected: Any, actual: Any, bins: int = 10) -> float:
    """Population stability index of `actual` against `expected` (the reference).

    Numeric data: bins at the reference's quantiles (ties merged). Anything else: one bin per
    level. Missing values form their own bin. Each bin gets half a pseudo-count so an empty bin
    gives a finite PSI.
    """
    e_counts, a_counts = _binned_counts(pd.Series(expected), pd.Series(actual), bins)
    return _psi_from_counts(e_counts, a_counts)


def ks(expected: Any, actual: Any) -> KSResult:
    """Two-sample Kolmogorov-Smirnov test on the non-missing values; NaNs when a side is empty."""
    from scipy.stats import ks_2samp

    e = _numeric(pd.Series(expected)).dropna().to_numpy()
    a = _numeric(pd.Series(actual)).dropna().to_numpy()
    if len(e) == 0 or len(a) == 0:
        return KSResult(math.nan, math.nan)
    out = ks_2samp(e, a)
    return KSResult(float(out.statistic), float(out.pvalue))


@dataclass(frozen=True)
class FeatureDrift:
    """Drift of one feature: a significance test and an effect size, both against limits."""

    feature: str
    kind: str  # numeric | categorical
    test: str  # ks | chi2
    statistic: float
    p_value: float
    effect: str  # psi | js
    effect_size: float
    effect_max: float
    p_max: float
    drifted: bool
    n_train: int
    n_production: int
    unseen_levels: tuple[str, ...] = ()

    @property
    def sentence(self) -> str:
        verdict = "drifted" if self.drifted else "stable"
        cmp_e = ">" if self.effect_size > self.effect_max else "<="
        cmp_p = "<" if self.p_value < self.p_max else ">="
        text = (
            f"`{self.feature}` {verdict}: "
            f"{self.effect.upper()} {_fmt(self.effect_size)} {cmp_e} {_fmt(self.effect_max)}, "
            f"{self.test} p {_p_equals(self.p_value)} {cmp_p} {_fmt_p(self.p_max)} "
            f"(statistic {_fmt(self.statistic)}; n = {self.n_train:,} train vs {self.n_production:,} production)"
        )
        if self.unseen_levels:
            text += f"; unseen levels: {', '.join(self.unseen_levels)}"
        return text


@dataclass(frozen=True)
class DriftReport:
    """Per-feature drift of production inputs against the training data."""

    features: tuple[FeatureDrift, ...]
    config: DriftConfig = field(default_factory=DriftConfig)

    @property
    def drifted(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    @property
    def passed(self) -> bool:
        return not self.drifted

    def __getitem__(self, feature: str) -> FeatureDrift:
        for f in self.features:
            if f.feature == feature:
                return f
        raise KeyError(feature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "drifted": self.drifted,
            "limits": self.config.model_dump(),
            "features": [{**asdict(f), "unseen_levels": list(f.unseen_levels)} for f in self.features],
        }

    def to_markdown(self) -> str:
        c = self.config
        head = "no feature drifted" if self.passed else f"{len(self.drifted)} drifted: {', '.join(self.drifted)}"
        lines = [
            f"### Training vs production drift: {head}",
            "",
            f"A feature drifts when its test gives p < {_fmt_p(c.p_value)} and its effect is material "
            f"(PSI > {_fmt(c.psi_max)} for numerics, Jensen-Shannon distance > {_fmt(c.js_max)} for categoricals).",
        ]
        lines += ["", *[f"- {f.sentence}" for f in self.features if f.drifted]] if self.drifted else []
        lines += [
            "",
            "| feature | kind | test | statistic | p | effect | value | drifted |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {f.feature} | {f.kind} | {f.test} | {_fmt(f.statistic)} | {_fmt_p(f.p_value)} | {f.effect} | "
            f"{_fmt(f.effect_size)} | {'**yes**' if f.drifted else 'no'} |"
            for f in self.features
        ]
        return "\n".join(lines) + "\n"


def drift_report(
    train: pd.DataFrame, production: pd.DataFrame, schema: Schema, cfg: DriftConfig | None = None
) -> DriftReport:
    """Compare each feature of `production` with `train`: KS + PSI for numerics, chi2 + JS otherwise."""
    cfg = cfg or DriftConfig()
    missing = [c for c in schema.features if c not in production.columns]
    if missing:
        raise ValueError(f"production sample lacks features: {', '.join(missing)}")
    results = [_numeric_drift(c, train[c], production[c], cfg) for c in schema.numeric]
    results += [_categorical_drift(c, train[c], production[c], cfg) for c in schema.categorical]
    return DriftReport(features=tuple(results), config=cfg)


def _numeric_drift(name: str, train: pd.Series, prod: pd.Series, cfg: DriftConfig) -> FeatureDrift:
    x, y = _numeric(train), _numeric(prod)
    test = ks(x, y)
    value = psi(x, y, cfg.bins)
    p_value, test_name = test.p_value, "ks"
    if x.isna().any() or y.isna().any():
        # KS sees only present values; a feature going missing (or arriving as text) is drift
        # too, so the share of missing values gets its own test, Bonferroni-combined with KS.
        p_null = _missing_share_p(x, y)
        p_value = min(1.0, 2 * min(p_null, test.p_value if not math.isnan(test.p_value) else 1.0))
        test_name = "ks+missing"
    return FeatureDrift(
        feature=name,
        kind="numeric",
        test=test_name,
        statistic=test.statistic,
        p_value=p_value,
        effect="psi",
        effect_size=value,
        effect_max=cfg.psi_max,
        p_max=cfg.p_value,
        drifted=bool(p_value < cfg.p_value and value > cfg.psi_max),
        n_train=int(len(train)),
        n_production=int(len(prod)),
    )


def _categorical_drift(name: str, train: pd.Series, prod: pd.Series, cfg: DriftConfig) -> FeatureDrift:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chi2_contingency

    known = set(_levels(train).dropna().unique())
    unseen = tuple(sorted(str(v) for v in set(_levels(prod).dropna().unique()) - known))
    # Unseen levels are pooled into one category: many rare new levels would otherwise make
    # cells too small for the chi-square approximation.
    e_counts, a_counts = _level_counts(train, prod, known)
    keep = (e_counts + a_counts) > 0
    e_counts, a_counts = e_counts[keep], a_counts[keep]
    if len(e_counts) < 2 or e_counts.sum() == 0 or a_counts.sum() == 0:
        stat, p_value, js = 0.0, 1.0, 0.0
    else:
        out = chi2_contingency(np.vstack([e_counts, a_counts]))
        stat, p_value = float(out.statistic), float(out.pvalue)
        js = float(jensenshannon(e_counts / e_counts.sum(), a_counts / a_counts.sum(), base=2))
    return FeatureDrift(
        feature=name,
        kind="categorical",
        test="chi2",
        statistic=stat,
        p_value=p_value,
        effect="js",
        effect_size=js,
        effect_max=cfg.js_max,
        p_max=cfg.p_value,
        drifted=bool(p_value < cfg.p_value and js > cfg.js_max),
        n_train=int(len(train)),
        n_production=int(len(prod)),
        unseen_levels=unseen,
    )


def _missing_share_p(x: pd.Series, y: pd.Series) -> float:
    from scipy.stats import chi2_contingency

    table = np.array([[x.isna().sum(), x.notna().sum()], [y.isna().sum(), y.notna().sum()]], dtype=float)
    if (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(chi2_contingency(table).pvalue)


_MISSING = "\x00missing"
_UNSEEN = "\x00unseen"


def _levels(series: pd.Series) -> pd.Series:
    return series.astype("object").where(series.notna(), None).map(lambda v: v if v is None else str(v))


def _level_counts(train: pd.Series, prod: pd.Series, known: set[Any]) -> tuple[np.ndarray, np.ndarray]:
    e = _levels(train).fillna(_MISSING)
    a = _levels(prod).fillna(_MISSING)
    a = a.where(a.isin(known) | (a == _MISSING), _UNSEEN)
    order = sorted(known) + [_MISSING, _UNSEEN]
    e_counts = e.value_counts().reindex(order, fill_value=0).to_numpy(dtype=float)
    a_counts = a.value_counts().reindex(order, fill_value=0).to_numpy(dtype=float)
    return e_counts, a_counts


def _numeric(series: pd.Series) -> pd.Series:
    # A numeric feature that arrives as text (a type bug upstream) becomes missing values,
    # which the PSI's missing bin then shows as drift.
    return pd.to_numeric(series, errors="coerce").astype(float)


def _binned_counts(expected: pd.Series, actual: pd.Series, bins: int) -> tuple[np.ndarray, np.ndarray]:
    if pd.api.types.is_numeric_dtype(expected) and not pd.api.types.is_bool_dtype(expected):
        e = _numeric(expected)
        a = _numeric(actual)
        e_ok = e.dropna().to_numpy()
        if len(e_ok) == 0:
            edges = np.array([])
        else:
            edges = np.unique(np.quantile(e_ok, np.linspace(0, 1, bins + 1)[1:-1]))
        n_bins = len(edges) + 1
        e_counts = np.bincount(np.searchsorted(edges, e_ok, side="right"), minlength=n_bins).astype(float)
        a_ok = a.dropna().to_numpy()
        a_counts = np.bincount(np.searchsorted(edges, a_ok, side="right"), minlength=n_bins).astype(float)
        e_counts = np.append(e_counts, float(e.isna().sum()))
        a_counts = np.append(a_counts, float(a.isna().sum()))
    else:
        known = set(_levels(expected).dropna().unique())
        e_counts, a_counts = _level_counts(expected, actual, known)
    keep = (e_counts + a_counts) > 0
    return e_counts[keep], a_counts[keep]


def _psi_from_counts(e_counts: np.ndarray, a_counts: np.ndarray) -> float:
    if e_counts.sum() == 0 or a_counts.sum() == 0:
        return math.nan
    e = (e_counts + 0.5) / (e_counts.sum() + 0.5 * len(e_counts))
    a = (a_counts + 0.5) / (a_counts.sum() + 0.5 * len(a_counts))
    return float(np.sum((a - e) * np.log(a / e)))


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _p_equals(p: float) -> str:
    text = _fmt_p(p)
    return text if text.startswith("<") else f"= {text}"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    if p == 0:
        return "< 1e-300"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"
