"""Edge cases synthesised from the schema, replay of saved problem inputs, and their outcomes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rollout.data import Schema
from rollout.scoring import BadOutput, call_model, outputs


@dataclass(frozen=True)
class CaseResult:
    """What one edge case did: a well-formed prediction, a clean validation error, or a crash."""

    name: str
    outcome: str  # "prediction" | "validation_error" | "crash"
    detail: str = ""


def synthesize_cases(schema: Schema, sample: pd.DataFrame, large_rows: int = 5000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Edge-case inputs derived from the schema and a few real rows (features only)."""
    rng = np.random.default_rng(seed)
    base = sample[list(schema.features)].head(8).reset_index(drop=True)
    cases: dict[str, pd.DataFrame] = {"single_row": base.head(1), "empty_batch": base.head(0)}
    for col in schema.nullable or schema.features:
        frame = base.copy()
        frame[col] = None if col in schema.categorical else np.nan
        cases[f"null_{col}"] = frame
    all_null = base.copy()
    for col in schema.nullable:
        all_null[col] = None if col in schema.categorical else np.nan
    cases["null_every_nullable"] = all_null
    for col in schema.categorical:
        frame = base.copy()
        frame[col] = "__never_seen_level__"
        cases[f"unseen_{col}"] = frame
        frame = base.copy()
        frame[col] = ""
        cases[f"empty_string_{col}"] = frame
    for col in schema.numeric:
        lo, hi = schema.ranges.get(col, (0.0, 1.0))
        span = max(abs(hi - lo), 1.0)
        for label, value in (("huge", hi + 1e6 * span), ("negative_huge", lo - 1e6 * span), ("zero", 0.0)):
            frame = base.copy()
            frame[col] = float(value)
            cases[f"{label}_{col}"] = frame
    idx = rng.integers(0, len(sample), size=large_rows)
    cases["large_batch"] = sample[list(schema.features)].iloc[idx].reset_index(drop=True)
    cases["columns_reordered"] = base[list(reversed(base.columns))]
    return cases


def load_saved_inputs(path: Path) -> dict[str, pd.DataFrame]:
    """Saved problem inputs (CSV, or JSON records) replayed one row per case."""
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        frame = pd.DataFrame(json.loads(path.read_text()))
    return {f"saved_{i}": frame.iloc[[i]].reset_index(drop=True) for i in range(len(frame))}


def run_case(
    name: str,
    predict: Callable[[pd.DataFrame], Any],
    frame: pd.DataFrame,
    task: str,
    is_validation_error: Callable[[BaseException], bool],
) -> CaseResult:
    """Call the model on one case and classify what happened."""
    try:
        raw = call_model(predict, frame)
    except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
        if is_validation_error(exc):
            return CaseResult(name, "validation_error", _short(exc))
        return CaseResult(name, "crash", f"{type(exc).__name__}: {_short(exc)}")
    try:
        outputs(raw, task, len(frame))
    except BadOutput as exc:
        return CaseResult(name, "crash", f"malformed output: {exc}")
    return CaseResult(name, "prediction")


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mlflow_validation_error(exc: BaseException) -> bool:
    """An MLflow schema-enforcement error is a clean refusal, not a crash."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and "schema" in str(exc).lower() or (
        isinstance(exc, MlflowException) and "input" in str(exc).lower()
    )


def run_cases(
    predict: Callable[[pd.DataFrame], Any],
    cases: dict[str, pd.DataFrame],
    task: str,
    is_validation_error: Callable[[BaseException], bool] = mlflow_validation_error,
) -> list[CaseResult]:
    return [run_case(name, predict, frame, task, is_validation_error) for name, frame in cases.items()]
