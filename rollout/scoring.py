"""One meaning for a model's output everywhere: (prediction, score) per row.

Classifiers are logged with `predict_proba` as their pyfunc method, so serving, stress and the
gates all see probabilities; this turns whatever a model returns into labels and class-1 scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm


class BadOutput(ValueError):
    """A model returned something that is not one finite prediction per row."""


def outputs(raw: Any, task: str, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(prediction, score) arrays of length `rows`; score is P(class 1) for classifiers, None otherwise."""
    arr = raw.to_numpy() if isinstance(raw, (pd.DataFrame, pd.Series)) else np.asarray(raw)
    try:
        arr = arr.astype(float)
    except (TypeError, ValueError):
        raise BadOutput(f"model output is not numeric (dtype {arr.dtype})") from None
    if arr.size == 0 and rows == 0:
        return np.empty(0), (np.empty(0) if task == "classification" else None)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape[0] != rows:
        raise BadOutput(f"model returned {arr.shape[0]} outputs for {rows} rows")
    if not np.all(np.isfinite(arr)):
        raise BadOutput("model output has NaN or infinite values")
    if task == "classification":
        if arr.ndim == 2:
            if arr.shape[1] != 2:
                raise BadOutput(f"expected 2 class probabilities per row, got {arr.shape[1]}")
            score = arr[:, 1]
        else:
            score = arr
        if np.any((score < 0) | (score > 1)):
            raise BadOutput("class probabilities outside [0, 1]")
        return (score >= 0.5).astype(float), score
    if arr.ndim != 1:
        raise BadOutput(f"expected one prediction per row, got shape {arr.shape}")
    return arr, None


def model_outputs(model: Any, x: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Score a fitted sklearn estimator or an MLflow pyfunc the same way."""
    if task == "classification" and hasattr(model, "predict_proba"):
        return outputs(model.predict_proba(x), task, len(x))
    return outputs(model.predict(x), task, len(x))


def metric_value(metric: str, y_true: Any, prediction: np.ndarray, score: np.ndarray | None) -> float:
    """A CI metric from labels and model outputs, in its natural direction (see LOWER_IS_BETTER)."""
    y = np.asarray(y_true, dtype=float)
    if metric == "roc_auc":
        return float(skm.roc_auc_score(y, score))
    if metric == "log_loss":
        assert score is not None, "log_loss needs scores (probabilities)"
        return float(skm.log_loss(y, np.clip(score, 1e-15, 1 - 1e-15), labels=[0, 1]))
    if metric == "accuracy":
        return float(skm.accuracy_score(y, prediction))
    if metric in ("f1", "precision", "recall"):
        fn = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[metric]
        return float(fn(y, prediction, zero_division=0))
    if metric == "r2":
        return float(skm.r2_score(y, prediction))
    if metric == "rmse":
        return float(np.sqrt(np.mean((y - prediction) ** 2)))
    if metric == "mae":
        return float(np.mean(np.abs(y - prediction)))
    raise ValueError(f"unknown metric {metric!r}")


def call_model(predict: Any, frame: pd.DataFrame) -> Any:
    """Call a model's predict the way the service does: an empty batch never reaches the model
    (scikit-learn refuses zero rows), it gets an empty answer."""
    if len(frame) == 0:
        return np.empty((0,))
    return predict(frame)
