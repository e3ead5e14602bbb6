"""Loaded model versions: the input contract they expose, and one scoring call per batch.

A model is anything with `.predict(DataFrame)`: an MLflow pyfunc (its signature gives the input
schema), a scikit-learn estimator (`feature_names_in_`) or a test fake (`input_schema` mapping
name -> type, or a `columns` list). When the underlying estimator has `predict_proba`, one call
gives both the class (argmax) and the score (probability of class 1).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# Kinds of a column value as JSON carries it.
NUMBER, INTEGER, STRING, BOOLEAN, ANY = "number", "integer", "string", "boolean", "any"
_MLFLOW_KINDS = {
    "double": NUMBER,
    "float": NUMBER,
    "long": INTEGER,
    "integer": INTEGER,
    "string": STRING,
    "boolean": BOOLEAN,
}


class GarbageOutput(RuntimeError):
    """The model returned something unusable (wrong length, wrong shape)."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str = ANY
    required: bool = True  # must be present in the record
    nullable: bool = False  # may be null


def input_columns(model: Any) -> tuple[ColumnSpec, ...] | None:
    """The model's input contract, or None when it declares none (then nothing is checked)."""
    schema = _mlflow_schema(model)
    if schema is not None:
        return schema
    declared = getattr(model, "input_schema", None)
    nullable = set(getattr(model, "nullable", ()) or ())
    if isinstance(declared, dict):
        return tuple(
            ColumnSpec(name, _MLFLOW_KINDS.get(str(kind), str(kind)), name not in nullable, name in nullable)
            for name, kind in declared.items()
        )
    names = declared if isinstance(declared, list | tuple) else getattr(model, "columns", None)
    if names is None:
        names = getattr(model, "feature_names_in_", None)
    if names is None:
        return None
    return tuple(ColumnSpec(str(name), ANY, True, True) for name in names)


def _mlflow_schema(model: Any) -> tuple[ColumnSpec, ...] | None:
    metadata = getattr(model, "metadata", None)
    if metadata is None or not hasattr(metadata, "get_input_schema"):
        return None
    schema = metadata.get_input_schema()
    if schema is None or not getattr(schema, "has_input_names", lambda: False)():
        return None
    specs = []
    for col in schema.inputs:
        type_name = getattr(getattr(col, "type", None), "name", str(getattr(col, "type", "")))
        # MLflow marks columns that had missing values in the training sample as optional.
        required = bool(getattr(col, "required", True))
        specs.append(ColumnSpec(col.name, _MLFLOW_KINDS.get(type_name, ANY), required, not required))
    return tuple(specs)


def _estimator(model: Any) -> Any:
    """The object to call: the raw estimator behind an MLflow pyfunc when there is one."""
    getter = getattr(model, "get_raw_model", None)
    if getter is not None:
        try:
            raw = getter()
        except Exception:  # noqa: BLE001 - not every flavor has a raw model
            return model
        if hasattr(raw, "predict"):
            return raw
    return model


class LoadedModel:
    """One registry version ready to score batches of records (thread-safe if the model is)."""

    def __init__(self, version: str, model: Any) -> None:
        self.version = str(version)
        self.model = model
        self.columns = input_columns(model)
        self.names = tuple(c.name for c in self.columns) if self.columns else None
        self._call = _estimator(model)
        classes = getattr(self._call, "classes_", None)
        self._proba = hasattr(self._call, "predict_proba") and classes is not None and len(classes) == 2
        self._classes = np.asarray(classes) if self._proba else None

    def __repr__(self) -> str:
        return f"LoadedModel(version={self.version!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Sent to a shadow child process (serving/isolation.py): scoring needs the estimator, not the
        # MLflow wrapper, whose unpickling would import MLflow there for nothing.
        state = dict(self.__dict__)
        if state.get("_call") is not state.get("model"):
            state["model"] = None
        return state

    def frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        """One DataFrame for the whole batch, columns in the model's order (absent optional = null)."""
        if self.names is not None:
            return pd.DataFrame.from_records(rows, columns=list(self.names))
        return pd.DataFrame.from_records(rows)

    def score(self, rows: list[dict[str, Any]]) -> tuple[list[float | None], list[float | None] | None, list[str | None]]:
        """Predictions, scores (P(class 1) or None) and per-row errors for a batch of records."""
        n = len(rows)
        frame = self.frame(rows)
        scores: np.ndarray | None = None
        if self._proba:
            proba = np.asarray(self._call.predict_proba(frame), dtype=float)
            if proba.ndim != 2 or proba.shape[0] != n:
                raise GarbageOutput(f"predict_proba returned shape {proba.shape} for {n} rows")
            scores = proba[:, 1]
            preds = self._classes[np.argmax(proba, axis=1)]  # type: ignore[index]
        else:
            preds = np.asarray(self._call.predict(frame))
            if preds.ndim == 2 and preds.shape[1] == 1:
                preds = preds[:, 0]
        if preds.ndim != 1 or preds.shape[0] != n:
            raise GarbageOutput(f"predict returned shape {preds.shape} for {n} rows")
        try:
            values = preds.astype(float)
        except (TypeError, ValueError) as exc:
            raise GarbageOutput(f"non-numeric predictions: {exc}") from exc
        out_preds: list[float | None] = values.tolist()
        out_scores: list[float | None] | None = scores.tolist() if scores is not None else None
        errors: list[str | None] = [None] * n
        for i, value in enumerate(out_preds):
            if value is None or math.isnan(value) or math.isinf(value):
                errors[i] = "prediction is NaN or infinite"
            elif out_scores is not None and not (0.0 <= out_scores[i] <= 1.0):  # type: ignore[operator]
                errors[i] = "score outside [0, 1]"
        return out_preds, out_scores, errors


def validate_records(
    records: list[dict[str, Any]], columns: tuple[ColumnSpec, ...] | None, allowed: set[str] | None
) -> list[dict[str, Any]]:
    """Problems of a request against the served contract, each naming the row and the field."""
    if columns is None:
        return []
    problems: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        for spec in columns:
            if spec.name not in record:
                if spec.required:
                    problems.append({"row": i, "field": spec.name, "error": "missing column"})
                continue
            value = record[spec.name]
            if value is None:
                if not spec.nullable:
                    problems.append({"row": i, "field": spec.name, "error": "null not allowed (column is not nullable)"})
                continue
            if not _fits(value, spec.kind):
                problems.append(
                    {"row": i, "field": spec.name, "error": f"expected {spec.kind}, got {type(value).__name__} {value!r}"}
                )
        if allowed is not None:
            for name in record:
                if name not in allowed:
                    problems.append({"row": i, "field": name, "error": "unknown column"})
        if len(problems) >= 50:
            break
    return problems


def _fits(value: Any, kind: str) -> bool:
    if kind == NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == INTEGER:
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == STRING:
        return isinstance(value, str)
    if kind == BOOLEAN:
        return isinstance(value, bool)
    return True


def freeze_heap() -> None:
    """Take what is alive now (libraries, loaded models) out of the cyclic garbage collector's walks.

    A full collection walks every tracked object: about 235k once MLflow, scikit-learn and pandas are
    imported, 50-100 ms with every request stalled. Rows waiting in a shadow batch or the log queue
    outlive the young generations, so under load full collections come often, each a latency spike.
    Called after each model load, in the service and in each shadow child (whose unpickling of every
    batch's rows otherwise triggered collections that walked the model and the libraries too):
    gc.freeze() is O(1) and stalls nothing (a gc.collect() first would stall for a full walk).
    Reference counting still frees frozen objects; only reference cycles of a retired model stay (a
    model load is rare; a walk on every request path is not).
    """
    gc.freeze()
