"""The one way any model is called, in serving and in every CI gate: records or a frame in, per-row outputs out.

A model is anything with `.predict(DataFrame)`: an MLflow pyfunc (its signature is the input contract,
and the estimator behind it is called directly), a scikit-learn estimator (`feature_names_in_`) or a test
fake (`input_schema` {name: type} with `nullable`, or `columns`). A classifier with
`predict_proba` gives both outputs in one call: the label is the class of the largest probability (a tie is
the first), as scikit-learn's own `predict` decides; a binary classifier's score is P(classes_[1]), a
multiclass one's is the list of its class probabilities (classes 0..K-1, in order). A `predict` that returns
K >= 2 columns is read the same way, as the probabilities of classes 0..K-1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from rollout.compiled import Compiled, Linear, Unsupported, compile_pipeline

# Kinds of a column value as JSON carries it.
NUMBER, INTEGER, STRING, BOOLEAN, ANY = "number", "integer", "string", "boolean", "any"
_MLFLOW_KINDS = {"double": NUMBER, "float": NUMBER, "long": INTEGER, "integer": INTEGER, "string": STRING,
                 "boolean": BOOLEAN}


class Predictor(Protocol):
    """What any model offers: outputs for a frame of inputs (a pyfunc, an estimator, a fake)."""

    def predict(self, frame: pd.DataFrame) -> Any: ...


class ModelError(RuntimeError):
    """A model call failed as a whole: it raised, or returned something that is not one output per row."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str = ANY
    required: bool = True  # must be present in a record
    nullable: bool = False  # may be null


@dataclass(frozen=True, slots=True)
class Outputs:
    """Per-row predictions and scores (classifiers only: P(class 1) when binary, the list of class
    probabilities when multiclass) and why a row has none (its error)."""

    predictions: list[float | None]
    scores: list[Any] | None
    errors: list[str | None]

    def checked(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Predictions and scores as arrays when every row has one; ModelError naming the first bad row else."""
        for i, error in enumerate(self.errors):
            if error is not None:
                raise ModelError(f"row {i}: {error}")
        scores = None if self.scores is None else np.asarray(self.scores, dtype=float)
        return np.asarray(self.predictions, dtype=float), scores


class LoadedModel:
    """One model (a registry version, a fitted candidate) ready to score; thread-safe if the model is."""

    def __init__(self, model: Predictor, version: str = "") -> None:
        self.version = str(version)
        self.model = model
        self.columns = input_columns(model)
        self.names = tuple(c.name for c in self.columns) if self.columns else None
        self._call = _estimator(model)
        # what MLflow's own server answers for this model: predict_proba for rollout's classifiers
        self.pyfunc_predict_fn = _pyfunc_predict_fn(model)
        classes = getattr(self._call, "classes_", None)
        self._proba = hasattr(self._call, "predict_proba") and classes is not None and len(classes) >= 2
        self._classes = np.asarray(classes) if self._proba else np.empty(0)
        self._binary_values = _binary_values(self._classes)
        self.compiled = _checked(self, compile_pipeline(self._call, self.names))

    @property
    def n_classes(self) -> int | None:
        """How many classes the model tells apart (known for an estimator with classes_), else None."""
        return len(self._classes) if self._proba else None

    def __repr__(self) -> str:
        return f"LoadedModel(version={self.version!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Sent to a shadow child process: scoring needs the estimator, not the MLflow wrapper, whose
        # unpickling would import MLflow there for nothing.
        state = dict(self.__dict__)
        if state.get("_call") is not state.get("model"):
            state["model"] = None
        return state

    def frame(self, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
        """One DataFrame for a batch of records, columns in the model's order (an absent optional is null)."""
        if self.names is not None:
            return pd.DataFrame.from_records(records, columns=list(self.names))
        return pd.DataFrame.from_records(records)

    def own(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The model's own columns of a wider frame, in its order (an absent optional column is null); a
        ModelError naming the required columns the frame lacks."""
        if self.names is None:
            return frame
        missing = [c.name for c in self.columns or () if c.required and c.name not in frame.columns]
        if missing:
            raise ModelError(f"model{' v' + self.version if self.version else ''} is missing inputs {missing}")
        return frame.reindex(columns=list(self.names))

    def problems(self, records: Sequence[dict[str, Any]], allowed: set[str] | None = None) -> list[dict[str, Any]]:
        """What is wrong with records against this model's input contract, each naming the row and the field."""
        return check_records(records, self.columns, allowed)

    def score(self, records: Sequence[dict[str, Any]]) -> Outputs:
        """Outputs of a batch of records (the service's call): through the compiled preprocessing when the model
        has one and it takes these records (rollout.compiled), else through the model itself."""
        if not records:
            return Outputs([], [] if self._proba else None, [])
        matrix = self._matrix(records)
        if matrix is not None:
            return self._outputs(self.compiled.final, matrix, len(records))  # type: ignore[union-attr]
        return self.predict(self.frame(records))

    def _matrix(self, records: Sequence[dict[str, Any]]) -> np.ndarray | None:
        """The compiled preprocessing's matrix of the records, or None (no compiled path, or it refuses them)."""
        if self.compiled is None:
            return None
        try:
            return self.compiled.matrix(records)
        except Exception:  # noqa: BLE001 - Unsupported, or anything: the model's own path decides
            return None

    @property
    def pure(self) -> bool:
        """Whether a batch can be scored by this package's own numpy code alone (`score_pure`): a compiled
        pipeline whose final step is a plain linear model (rollout.compiled.Linear)."""
        return (self.compiled is not None and isinstance(self.compiled.final, Linear)
                and self.compiled.final.classifier == self._proba)  # else Linear would hand over to the model

    def score_pure(self, records: Sequence[dict[str, Any]]) -> Outputs | None:
        """The outputs `score` gives, computed without calling any of the model's own code (no scikit-learn
        method, nothing a registered artifact defines), so bounded and safe on the service's event loop; None
        when that is not possible for these records (not `pure`, a record the compiled path refuses, a matrix
        `Linear` would hand to the model, or a call that fails as a whole), and the caller calls `score_each`."""
        if not records or not self.pure:
            return None
        final: Linear = self.compiled.final  # type: ignore[union-attr]  # pure: compiled
        matrix = self._matrix(records)
        if matrix is None or not final.takes(matrix):
            return None
        try:  # taken: Linear's own arithmetic, without checking the matrix again
            return self._outputs(final.taken, matrix, len(records))
        except ModelError:
            return None

    def score_each(self, records: Sequence[dict[str, Any]], budget: int | None = None) -> Outputs:
        """As `score`, but a call that fails as a whole is repeated on each half, down to the rows that fail
        alone, so only they carry the error (a model failing on 5% of inputs is not charged 100% of a batch).

        Three rows alone first: when all three fail too, the model fails on everything and every row carries
        the error. Else at most `budget` extra calls (default: one a row, so never more calls than scoring each row
        alone; half the rows plus 16 left 5% of batches with 5% bad rows charging rows that did not fail); rows
        not yet told apart when it runs out carry the error of the part they were in."""
        records = list(records)
        try:
            return self.score(records)
        except ModelError as exc:
            if len(records) > 3 and all(self._fails(records[i]) for i in (0, len(records) // 2, len(records) - 1)):
                return self._failed(len(records), str(exc))
        spare = [len(records) if budget is None else budget]
        half = len(records) // 2
        return self._joined(self._halving(records[:half], spare), self._halving(records[half:], spare))

    def _fails(self, record: dict[str, Any]) -> bool:
        try:
            self.score([record])
        except ModelError:
            return True
        return False

    def _failed(self, n: int, error: str) -> Outputs:
        return Outputs([None] * n, [None] * n if self._proba else None, [error] * n)

    @staticmethod
    def _joined(left: Outputs, right: Outputs) -> Outputs:
        scores = None if left.scores is None or right.scores is None else left.scores + right.scores
        return Outputs(left.predictions + right.predictions, scores, left.errors + right.errors)

    def _halving(self, records: list[dict[str, Any]], spare: list[int]) -> Outputs:
        if not records:
            return self.score(records)
        spare[0] -= 1
        try:
            return self.score(records)
        except ModelError as exc:
            if len(records) == 1 or spare[0] < 2:
                return self._failed(len(records), str(exc))
        half = len(records) // 2
        return self._joined(self._halving(records[:half], spare), self._halving(records[half:], spare))

    def predict(self, frame: pd.DataFrame) -> Outputs:
        """Outputs of a frame; raises ModelError when the call fails as a whole, else errors are per row."""
        return self._outputs(self._call, frame, len(frame))

    def _outputs(self, call: Any, inputs: Any, n: int) -> Outputs:
        """`call`'s outputs for n rows of `inputs` (the model with a frame, or a compiled pipeline's estimator
        with its matrix), checked."""
        if n == 0:  # scikit-learn refuses zero rows; an empty batch has an empty answer
            return Outputs([], [] if self._proba else None, [])
        scores: np.ndarray | None = None
        try:
            if self._proba:
                proba = np.asarray(call.predict_proba(inputs), dtype=float)
                if proba.ndim != 2 or proba.shape != (n, len(self._classes)):
                    raise ModelError(f"predict_proba returned shape {proba.shape} for {n} rows")
                if self._binary_values is not None:
                    scores = proba[:, 1]
                    if ((scores >= 0.0) & (scores <= 1.0)).all():  # finite, in range (NaN compares False):
                        # what the checks below find with nothing to flag, in a few numpy calls (each a
                        # microsecond or more, on the service's event loop for its small batches)
                        values = self._binary_values[np.argmax(proba, axis=1)]
                        return Outputs(values.tolist(), scores.tolist(), [None] * n)
                scores = proba[:, 1] if proba.shape[1] == 2 else proba
                preds = self._classes[np.argmax(proba, axis=1)]
            else:
                preds = np.asarray(call.predict(inputs))
                if preds.ndim == 2 and preds.shape[1] == 1:
                    preds = preds[:, 0]
                elif preds.ndim == 2 and preds.shape[0] == n and preds.shape[1] >= 2:  # class probabilities
                    proba = preds.astype(float)  # (a pyfunc's predict_proba)
                    scores = proba[:, 1] if proba.shape[1] == 2 else proba
                    preds = np.argmax(proba, axis=1)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the model raises is the model's failure
            raise ModelError(f"{type(exc).__name__}: {exc}"[:500]) from exc
        if preds.ndim != 1 or preds.shape[0] != n:
            raise ModelError(f"predict returned shape {preds.shape} for {n} rows")
        try:
            values = preds.astype(float)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"non-numeric predictions: {exc}") from exc
        errors: list[str | None] = [None] * n
        _flag(errors, ~np.isfinite(values), "prediction is NaN or infinite")
        if scores is not None:
            rows = scores if scores.ndim == 2 else scores[:, None]
            finite = np.isfinite(rows).all(axis=1)
            _flag(errors, ~finite, "score is NaN or infinite")
            _flag(errors, finite & ((rows < 0.0) | (rows > 1.0)).any(axis=1), "score outside [0, 1]", keep=True)
            if scores.ndim == 2:
                _flag(errors, finite & (np.abs(rows.sum(axis=1) - 1.0) > 1e-3),
                      "class probabilities do not add up to 1", keep=True)
        out_preds: list[float | None] = values.tolist()
        out_scores: list[Any] | None = None if scores is None else scores.tolist()
        return Outputs(out_preds, out_scores, errors)


def _binary_values(classes: np.ndarray) -> np.ndarray | None:
    """Two classes as the floats a prediction logs, when both are finite numbers (the usual 0/1 or False/True):
    a binary classifier's outputs then need no check of the predictions, only of the scores. Else None."""
    if classes.shape != (2,):
        return None
    try:
        values = classes.astype(float)
    except (TypeError, ValueError):
        return None
    return values if bool(np.isfinite(values).all()) else None


def _flag(errors: list[str | None], bad: np.ndarray, message: str, keep: bool = False) -> None:
    """`message` for the rows `bad` marks (after an error a row already has, with `keep`); the rows are looked
    for only when there is one (the usual batch has none)."""
    if bad.any():
        for i in np.flatnonzero(bad).tolist():
            errors[i] = (errors[i] or message) if keep else message


def _checked(model: LoadedModel, compiled: Compiled | None) -> Compiled | None:
    """The compiled preprocessing when it gives the very outputs of the model's own path on every probe batch
    (both failing counts as agreeing), else None: a difference in any bit keeps the model's own path."""
    if compiled is None:
        return None
    try:
        probes = compiled.probes()
    except Exception:  # noqa: BLE001 - a model whose statistics make no probe is not compiled
        return None
    for batch in probes:
        try:
            matrix = compiled.matrix(batch)
        except Unsupported:
            continue
        except Exception:  # noqa: BLE001 - a compiled path that breaks is not used
            return None
        try:
            mine: Outputs | None = model._outputs(compiled.final, matrix, len(batch))
        except ModelError:
            mine = None
        try:
            theirs: Outputs | None = model.predict(model.frame(batch))
        except ModelError:
            theirs = None
        except Exception:  # noqa: BLE001 - a probe the model's own path cannot even frame
            return None
        if mine != theirs:
            return None
    return compiled


def input_columns(model: Predictor) -> tuple[ColumnSpec, ...] | None:
    """The model's input contract, or None when it declares none (then nothing is checked)."""
    schema = _mlflow_schema(model)
    if schema is not None:
        return schema
    declared = getattr(model, "input_schema", None)
    nullable = set(getattr(model, "nullable", ()) or ())
    if isinstance(declared, dict):
        return tuple(ColumnSpec(name, _MLFLOW_KINDS.get(str(kind), str(kind)), name not in nullable, name in nullable)
                     for name, kind in declared.items())
    names = declared if isinstance(declared, list | tuple) else getattr(model, "columns", None)
    if names is None:
        names = getattr(model, "feature_names_in_", None)
    if names is None:
        return None
    return tuple(ColumnSpec(str(name), ANY, True, True) for name in names)


def _mlflow_schema(model: Predictor) -> tuple[ColumnSpec, ...] | None:
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


def _pyfunc_predict_fn(model: Predictor) -> str:
    """The method MLflow's pyfunc wrapper calls (the sklearn flavour's `pyfunc_predict_fn`), 'predict' by default."""
    flavors = getattr(getattr(model, "metadata", None), "flavors", None)
    if not isinstance(flavors, dict):
        return "predict"
    return str((flavors.get("python_function") or {}).get("predict_fn") or "predict")


def _estimator(model: Predictor) -> Any:
    """The object to call: the raw estimator behind an MLflow pyfunc when there is one."""
    getter = getattr(model, "get_raw_model", None)
    if getter is not None:
        try:
            raw = getter()
        except Exception:  # noqa: BLE001 - not every flavour has a raw model
            return model
        if hasattr(raw, "predict"):
            return raw
    return model


def check_records(records: Sequence[dict[str, Any]], columns: tuple[ColumnSpec, ...] | None,
                  allowed: set[str] | None) -> list[dict[str, Any]]:
    """Problems of records against an input contract (at most ~50), each naming the row and the field."""
    if columns is None:
        return []
    problems: list[dict[str, Any]] = []
    # the exact types that fit each column without a call (JSON's own; others, numpy's say, go through _fits)
    plain = [(spec, _PLAIN_TYPES.get(spec.kind, ())) for spec in columns]
    for i, record in enumerate(records):
        for spec, types in plain:
            if spec.name not in record:
                if spec.required:
                    problems.append({"row": i, "field": spec.name, "error": "missing column"})
                continue
            value = record[spec.name]
            if type(value) in types:
                continue
            if value is None:
                if not spec.nullable:
                    problems.append({"row": i, "field": spec.name, "error": "null not allowed (column is not nullable)"})
                continue
            if not _fits(value, spec.kind):
                problems.append({"row": i, "field": spec.name,
                                 "error": f"expected {spec.kind}, got {type(value).__name__} {_short(value)}"})
        if allowed is not None and not allowed.issuperset(record):
            problems += [{"row": i, "field": name, "error": "unknown column"} for name in record if name not in allowed]
        if len(problems) >= 50:
            break
    return problems


def check_frame(frame: pd.DataFrame, columns: tuple[ColumnSpec, ...] | None) -> list[dict[str, Any]]:
    """Every problem of a frame's rows against an input contract, as `check_records` finds them in its records
    (the frame's columns are those it may have; a row's problems in the contract's order), without a Python
    step per row for a column whose dtype already says its values fit (numbers in a numeric column, flags in
    a boolean one): a batch file's chunk is checked by the column."""
    if columns is None:
        return []
    found: list[tuple[int, int, dict[str, Any]]] = []
    n = len(frame)
    for k, spec in enumerate(columns):
        if spec.name not in frame.columns:
            if spec.required:
                found += [(i, k, {"row": i, "field": spec.name, "error": "missing column"}) for i in range(n)]
            continue
        column = frame[spec.name]
        missing = column.isna().to_numpy()
        if not spec.nullable:
            found += [(int(i), k, {"row": int(i), "field": spec.name,
                                   "error": "null not allowed (column is not nullable)"}) for i in np.flatnonzero(missing)]
        if _dtype_fits(column, spec.kind):
            continue
        values = column.tolist()
        for i in np.flatnonzero(~missing):
            value = values[i]
            if not _fits(value, spec.kind):
                found.append((int(i), k, {"row": int(i), "field": spec.name,
                                          "error": f"expected {spec.kind}, got {type(value).__name__} {_short(value)}"}))
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]))]


def _dtype_fits(column: pd.Series, kind: str) -> bool:
    """Whether every non-null value of the column fits the kind, by its dtype alone."""
    dtype = column.dtype
    if kind == NUMBER:
        return (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
                and not pd.api.types.is_complex_dtype(dtype))
    if kind == INTEGER:
        if pd.api.types.is_integer_dtype(dtype):
            return True
        if pd.api.types.is_float_dtype(dtype):
            values = column.dropna().to_numpy(dtype=float)
            return bool(np.all(np.isfinite(values) & (values == np.floor(values))))
        return False
    if kind == STRING:
        return pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype)
    if kind == BOOLEAN:
        return bool(pd.api.types.is_bool_dtype(dtype))
    return kind not in (NUMBER, INTEGER, STRING, BOOLEAN)


def allowed_columns(models: Iterable[LoadedModel]) -> set[str] | None:
    """Every column some model reads, or None when one of them declares no contract (then anything goes)."""
    names: set[str] = set()
    for model in models:
        if model.names is None:
            return None
        names.update(model.names)
    return names


# Types whose every value fits a kind (a float fits an integer column only when whole: _fits decides).
_PLAIN_TYPES: dict[str, tuple[type, ...]] = {NUMBER: (int, float), INTEGER: (int,), STRING: (str,), BOOLEAN: (bool,)}


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


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, list | dict) else f"{type(value).__name__} of {len(value)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def metric_value(metric: str, y_true: Any, prediction: np.ndarray, score: np.ndarray | None) -> float:
    """A CI metric from labels and model outputs, in its natural direction (see config.LOWER_IS_BETTER).
    `score` is P(class 1) per row for a binary classifier, a row of class probabilities for a multiclass one.
    Besides the built-in names: any scikit-learn scorer name (greater is better, as scikit-learn's scorers are),
    or your own 'package.module:function', called as function(y_true, prediction, score) and returning a
    number where greater is better."""
    if ":" in metric:
        return float(own_metric(metric)(np.asarray(y_true), prediction, score))
    if metric not in BUILT_IN_METRICS:
        return _scikit_learn_score(metric, np.asarray(y_true), prediction, score)
    y = np.asarray(y_true, dtype=float)
    if metric in ("roc_auc", "roc_auc_ovr", "log_loss") and score is None:
        raise ValueError(f"{metric} needs scores (class probabilities)")
    if metric == "roc_auc":
        return float(skm.roc_auc_score(y, score))
    if metric == "roc_auc_ovr":
        assert score is not None
        return float(skm.roc_auc_score(y, score, multi_class="ovr", labels=list(range(score.shape[1]))))
    if metric == "log_loss":
        assert score is not None
        if score.ndim == 2:
            return float(skm.log_loss(y, score, labels=list(range(score.shape[1]))))
        return float(skm.log_loss(y, np.clip(score, 1e-15, 1 - 1e-15), labels=[0, 1]))
    if metric == "accuracy":
        return float(skm.accuracy_score(y, prediction))
    if metric == "f1_macro":
        return float(skm.f1_score(y, prediction, average="macro", zero_division=0))
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


BUILT_IN_METRICS = frozenset({"roc_auc", "roc_auc_ovr", "log_loss", "accuracy", "f1_macro", "f1", "precision",
                              "recall", "r2", "rmse", "mae"})


def own_metric(metric: str, setting: str = "ci.metric") -> Any:
    """Your metric function named 'package.module:function' (its package trusted by the policy)."""
    import importlib

    module, _, name = metric.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{setting} {metric!r}: cannot import it ({exc})") from None


class _Answers:
    """Stands for a model whose outputs are already known, so a scikit-learn scorer can score them."""

    def __init__(self, prediction: np.ndarray, score: np.ndarray | None) -> None:
        self.prediction, self.score = prediction, score
        self.classes_ = None if score is None else np.arange(2 if score.ndim == 1 else score.shape[1])

    def __sklearn_tags__(self) -> Any:
        from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

        kind = ClassifierMixin if self.score is not None else RegressorMixin
        return type("Tagged", (kind, BaseEstimator), {})().__sklearn_tags__()

    def predict(self, x: Any) -> np.ndarray:
        return self.prediction

    def predict_proba(self, x: Any) -> np.ndarray:
        assert self.score is not None
        return np.c_[1.0 - self.score, self.score] if self.score.ndim == 1 else self.score

    def decision_function(self, x: Any) -> np.ndarray:
        assert self.score is not None
        return self.score


def _scikit_learn_score(name: str, y: np.ndarray, prediction: np.ndarray, score: np.ndarray | None) -> float:
    from sklearn.metrics import get_scorer

    scorer = get_scorer(name)
    return float(scorer(_Answers(prediction, score), np.zeros((len(y), 1)), y))


def evaluate(model: Predictor, x: pd.DataFrame, y: Any, metric: str) -> float:
    """One metric of a model (fitted estimator or loaded pyfunc) on labelled rows, called as the service calls it:
    on its own columns of `x`."""
    loaded = LoadedModel(model)
    predictions, scores = loaded.predict(loaded.own(x)).checked()
    return metric_value(metric, y, predictions, scores)
