"""A policy against its data, every problem at once: columns that are not there, a target the task cannot learn,
estimator parameters the estimator does not take, guardrail segments the data never has, columns that should
be a timestamp or dropped, and a feature that alone gives the target away. `rollout check-config --data` prints
them; `rollout ci` stops on the errors before validating or training."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rollout.config import ConfigError, Policy

ERROR, WARNING, INFO = "error", "warning", "info"
# A categorical with more levels than this, and most of them rare, reads like an id or free text.
MAX_LEVELS = 1000


@dataclass(frozen=True)
class Problem:
    """One thing to change: the policy field (or column) it concerns, what was found, and how bad it is."""

    field: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_data(policy: Policy, frame: pd.DataFrame) -> list[Problem]:
    """Every problem of the policy against `frame`, errors first."""
    cfg = policy.data
    problems = _missing_columns(policy, frame)
    if cfg.target in frame.columns:
        problems += _target(policy, frame[cfg.target])
    problems += _estimator_params(policy)
    if not any(p.field.startswith(("estimator", "data.target")) for p in problems):
        problems += _factory_product(policy, frame)
    problems += _segments(policy, frame)
    problems += _example_names(policy)
    if cfg.target in frame.columns and not any(p.field.startswith("data.target") for p in problems):
        problems += _columns(policy, frame)
    return sorted(problems, key=lambda p: (ERROR, WARNING, INFO).index(p.severity))


def _example_names(policy: Policy) -> list[Problem]:
    """The example's model name on a team's data: on a shared MLflow server every such policy is one registered
    model, and one team's CI would move another's @challenger and open rollouts against its champion."""
    default = type(policy.registry).model_fields["model_name"].default
    if policy.data.source == "example" or policy.registry.model_name != default:
        return []
    return [Problem("registry.model_name", f"still the example's {default!r}: give your model its own name, or it "
                    "shares its registered model (aliases, rollouts) with every policy that kept the default",
                    WARNING)]


def errors_of(problems: list[Problem]) -> ConfigError | None:
    """One ConfigError listing every error, or None when there are only warnings."""
    errors = [p for p in problems if p.severity == ERROR]
    if not errors:
        return None
    told = errors + [p for p in problems if p.severity == INFO]
    return ConfigError("the policy does not fit its data:\n" + "\n".join(f"  {p}" for p in told))


def _missing_columns(policy: Policy, frame: pd.DataFrame) -> list[Problem]:
    cfg = policy.data
    named: list[tuple[str, str | None]] = [("data.target", cfg.target), ("data.timestamp_column", cfg.timestamp_column),
                                           ("data.segment_column", cfg.segment_column),
                                           ("data.unit_column", cfg.unit_column)]
    named += [("data.features", c) for c in cfg.features] + [("data.text_columns", c) for c in cfg.text_columns]
    named += [("data.drop_columns", c) for c in cfg.drop_columns]
    import difflib

    columns = [str(c) for c in frame.columns]
    problems = []
    for field, column in named:
        if column is not None and column not in frame.columns:
            close = difflib.get_close_matches(column, columns, n=1)
            problems.append(Problem(field, f"{column!r} is not a column of the data"
                                    + (f"; did you mean {close[0]!r}?" if close else "")))
    if problems:  # the columns once, not with each problem
        shown = ", ".join(columns[:40]) + (f", ... ({len(columns)} in all)" if len(columns) > 40 else "")
        problems.append(Problem("data.source", f"its columns are: {shown}", INFO))
    return problems


def _target(policy: Policy, y: pd.Series) -> list[Problem]:
    from rollout.data import check_target

    try:
        check_target(y, policy.data.target, policy.data.task)
    except ConfigError as exc:  # "data.target 'y' (data.task 'classification'): found ..."
        where, _, found = str(exc).partition("): ")
        return [Problem(where + ")", found)]
    return []


def accepted_params(policy: Policy) -> set[str] | None:
    """The keyword arguments the estimator (or the factory) takes; None when it takes any (**kwargs)."""
    est = policy.estimator
    if est.factory is not None:
        from rollout.ci.training import factory_function

        parameters = inspect.signature(factory_function(est.factory)).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return {p.name for p in parameters} - {"schema"}
    from rollout.ci.training import estimator_class

    cls = estimator_class(est.name)
    names = set(cls().get_params(deep=False))
    if est.name.startswith(("xgboost", "lightgbm")):  # their wrappers pass unknown keywords to the booster
        return None
    return names


def _estimator_params(policy: Policy) -> list[Problem]:
    import difflib

    try:
        accepted = accepted_params(policy)
    except ConfigError as exc:
        return [Problem("estimator.factory", str(exc).split(": ", 1)[-1])]
    if accepted is None:
        return []
    problems = []
    search = policy.estimator.search
    given = [("estimator.params", k) for k in policy.estimator.params]
    given += [("estimator.search.space", k) for k in (search.space if search else {})]
    for field, name in given:
        if name not in accepted:
            close = [a for a in sorted(accepted) if a.lower() == name.lower()] or \
                difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(sorted(accepted))}"
            problems.append(Problem(f"{field}.{name}", f"{policy.estimator.label} takes no parameter {name!r}; {hint}"))
    if not problems and policy.estimator.factory is None:
        problems += _param_values(policy)
    return problems


def _factory_product(policy: Policy, frame: pd.DataFrame) -> list[Problem]:
    """A team's factory called as CI calls it (trusted by the policy, which names its package): what it returns must
    be an estimator, not a class or anything else, before CI spends a run finding out in fit."""
    from rollout.ci.training import from_factory
    from rollout.data import infer_schema

    if policy.estimator.factory is None:
        return []
    try:
        schema = infer_schema(frame, policy.data)
    except (ConfigError, ValueError):  # the data's own problem, which the other checks and CI name
        return []
    params = dict(policy.estimator.params)
    search = policy.estimator.search
    for name, space in (search.space if search else {}).items():  # a searched parameter: one value of its space
        params.setdefault(name, space.choices[0] if space.choices else space.low)
    try:
        from_factory(policy.estimator.factory, schema, params)
    except ConfigError as exc:
        return [Problem("estimator.factory", str(exc).removeprefix("estimator.factory "))]
    except Exception as exc:  # noqa: BLE001 - the team's code failing on these params: what CI would hit
        return [Problem("estimator.factory", f"calling it with the data's schema and estimator.params failed: "
                        f"{type(exc).__name__}: {exc}"[:500])]
    return []


def _param_values(policy: Policy) -> list[Problem]:
    """Parameter values the estimator refuses (scikit-learn's own validation, without fitting): C: -1, a
    penalty it does not know, a string where a number goes."""
    from rollout.ci.training import estimator_class

    try:
        model = estimator_class(policy.estimator.name)(**policy.estimator.params)
        validate = getattr(model, "_validate_params", None)
        if validate is not None:
            validate()
    except Exception as exc:  # noqa: BLE001 - whatever the estimator says about its parameters
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [Problem("estimator.params", f"{policy.estimator.name}: {message}")]
    return []


def _segments(policy: Policy, frame: pd.DataFrame) -> list[Problem]:
    guardrails = [(i, g) for i, g in enumerate(policy.rollout.segment_guardrails) if g.segment is not None]
    column = policy.data.segment_column
    problems = []
    if policy.data.task == "multiclass" and policy.data.target in frame.columns:
        classes = set(pd.unique(frame[policy.data.target]).tolist())
        problems += [Problem(f"rollout.segment_guardrails[{i}].class", f"class {g.class_} never occurs in the "
                             f"target (classes: {', '.join(map(str, sorted(classes, key=str)))})")
                     for i, g in enumerate(policy.rollout.segment_guardrails)
                     if g.class_ is not None and g.class_ not in classes]
    if not guardrails:
        return problems
    if column is None:
        return [*problems, Problem("rollout.segment_guardrails", "guardrails on segments need data.segment_column, "
                                   "which is not set (or set segment_guardrails: [])")]
    if column not in frame.columns:
        return problems  # reported as a missing column
    present = {str(v) for v in frame[column].dropna().unique()}
    shown = ", ".join(sorted(present)[:20])
    return [*problems, *(Problem(f"rollout.segment_guardrails[{i}].segment",
                                 f"{g.segment!r} never occurs in {column!r} (values: {shown}); its guardrail would "
                                 "wait for observations forever")
                         for i, g in guardrails if g.segment not in present)]


def _columns(policy: Policy, frame: pd.DataFrame) -> list[Problem]:
    """Columns inferred as features that look like a timestamp, an id or free text, and features that alone
    give the target away."""
    from rollout.data import infer_schema

    try:
        schema = infer_schema(frame, policy.data)
    except ConfigError as exc:
        text = str(exc)
        if text.startswith("column '"):  # a date column would become a category; the message says what to set
            field, _, rest = text.partition(" holds")
            return [Problem(field, "holds" + rest)]
        return []  # a missing column or a bad target, reported above
    problems = []
    for col in schema.categorical:
        levels = frame[col].nunique(dropna=True)
        if levels > MAX_LEVELS and levels > 0.5 * frame[col].notna().sum():
            problems.append(Problem(f"column {col!r}", f"{levels} distinct values in {len(frame)} rows: an id or free "
                                    "text, not a category; set data.unit_column, data.text_columns or "
                                    "data.drop_columns", WARNING))
    y = frame[schema.target]
    for col in schema.numeric:
        x = pd.to_numeric(frame[col], errors="coerce")
        known = x.notna() & y.notna()
        if known.sum() < 20 or x[known].nunique() < 2:
            continue
        strength, what = _alone(x[known].to_numpy(dtype=float), y[known], policy.data.task)
        if strength >= 0.999:
            problems.append(Problem(f"column {col!r}", f"alone it predicts the target almost perfectly ({what}): a "
                                    "leaked target (known only after the outcome)? If so, list it in "
                                    "data.drop_columns", WARNING))
    return problems


def _alone(x: np.ndarray[Any, Any], y: pd.Series, task: str) -> tuple[float, str]:
    """How well one numeric column predicts the target on its own: ROC AUC folded to >= 0.5 for a 0/1
    target, |Pearson r| for a regression."""
    if task == "classification" and set(pd.unique(y)) <= {0, 1} and y.nunique() == 2:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(y.to_numpy(dtype=int), x))
        auc = max(auc, 1.0 - auc)
        return auc, f"ROC AUC {auc:.4f}"
    if task == "regression":
        r = abs(float(np.corrcoef(x, y.to_numpy(dtype=float))[0, 1]))
        return r, f"|correlation| {r:.4f}"
    return 0.0, ""
