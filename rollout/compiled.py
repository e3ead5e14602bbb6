"""A fitted scikit-learn pipeline's preprocessing as plain numpy, for the service's small batches.

Scoring one to a few dozen records through scikit-learn costs about 3 ms a call whatever the batch size (the
example's ColumnTransformer of imputers, a scaler and a one-hot encoder: a DataFrame built, then every step's
input validation, pandas indexing and joblib's dispatch), about 95% of it fixed. Under A/B, where each arm's
batches are half as large, that fixed cost is paid twice as often. Here the preprocessing of a pipeline made
only of the steps below is done on the records themselves: the same arithmetic in the same order on the
fitted step's own statistics, so the matrix is bit-identical to scikit-learn's; the final estimator is then
called as the pipeline calls it (its own `predict_proba` / `predict` on that matrix), except a plain linear model
(LogisticRegression, LinearRegression, Ridge), whose few operations are done here as its methods do them
(`Linear`): its input validation cost ~0.1 ms a call, half of a compiled call of the example's pipeline, paid
per call and so twice as often under A/B.

Handled: a Pipeline whose first step is a ColumnTransformer (columns named, remainder dropped, no weights,
default output) of SimpleImputer, StandardScaler and OneHotEncoder (string categories, no dropped or
infrequent levels), alone or in Pipelines, followed by StandardScaler or passthrough steps, then any estimator.
Anything else is not compiled. An input the compiled path cannot reproduce exactly (a boolean or a string in a
numeric column, a categorical column with no string in the batch, an infinity, an unknown level the encoder
would refuse) raises `Unsupported`, and the caller (rollout.models.LoadedModel) scores that batch through
scikit-learn as before; it also checks the compiled path against scikit-learn on probe batches when the model
loads and keeps scikit-learn alone when they differ in any bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import numpy as np

_NAN = float("nan")
_NUMBER_KINDS = frozenset({float, int, type(None)})
# Values a batch reads (records x columns) up to which the compiled path is used. It costs ~0.15 ms a call and
# ~0.16 us a value, scikit-learn's ~5 ms and ~0.12 us (DataFrame built in C): even at ~100,000 values, past it
# slower (200 numeric columns x 1,000 records: 33 ms against 28).
MAX_CELLS = 50_000


class Unsupported(Exception):
    """A model or an input the compiled path does not reproduce exactly: scikit-learn's own path takes it."""


@dataclass(frozen=True)
class _Impute:
    statistics: np.ndarray  # one fill value a column
    missing: str  # "nan" (a float NaN, or an absent key) or "none" (a JSON null)


@dataclass(frozen=True)
class _Scale:
    mean: np.ndarray | None
    scale: np.ndarray | None


@dataclass(frozen=True)
class _OneHot:
    levels: tuple[dict[str, int], ...]  # a column's level -> its position among the column's outputs
    widths: tuple[int, ...]
    dtype: Any
    ignore_unknown: bool


@dataclass(frozen=True)
class _Block:
    """One ColumnTransformer entry: its input columns and steps, numeric (float matrix) or categorical (one-hot)."""

    columns: tuple[str, ...]
    imputes: tuple[_Impute, ...]
    scales: tuple[_Scale, ...]  # numeric blocks, after the imputers
    onehot: _OneHot | None  # categorical blocks

    def numeric(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
        # Column-major, as scikit-learn's matrix comes from the DataFrame: the same numbers in another layout
        # change the order BLAS adds a matrix-vector product in, and so the last bit of a linear model's score.
        # All the values in one list, a column after another, made one array in one call: per column, the
        # list, its check and its copy into the matrix cost ~3 us each, most of a small batch's time.
        columns = self.columns
        values = [record.get(name) for name in columns for record in records]
        if not set(map(type, values)) <= _NUMBER_KINDS:  # not bool, not a string that looks like a number
            for name in columns:
                kinds = {type(record.get(name)) for record in records} - _NUMBER_KINDS
                if kinds:
                    raise Unsupported(f"{name}: {', '.join(sorted(k.__name__ for k in kinds))}")
        # None -> NaN, an int rounded as float() rounds it; (columns, records) transposed is column-major
        x = np.array(values, dtype=np.float64).reshape((len(columns), len(records))).T
        if not np.isfinite(x).all():  # the usual batch has no missing value: one check for both kinds
            if np.isinf(x).any():  # scikit-learn refuses it, naming it; let it
                raise Unsupported("infinite value")
            for impute in self.imputes:
                mask = np.isnan(x)
                if mask.any():
                    x[mask] = np.broadcast_to(impute.statistics, x.shape)[mask]
        for scale in self.scales:
            if scale.mean is not None:
                x -= scale.mean
            if scale.scale is not None:
                x /= scale.scale
        return x

    def categorical(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
        onehot = self.onehot
        assert onehot is not None
        out = np.zeros((len(records), sum(onehot.widths)), dtype=onehot.dtype)
        offset = 0
        for j, name in enumerate(self.columns):
            # as pandas builds the frame: an absent key is NaN, a null stays None
            column = [record.get(name, _NAN) for record in records]
            if not any(type(v) is str for v in column):  # pandas may then type the column as numbers
                raise Unsupported(f"{name}: no string in the batch")
            for impute in self.imputes:
                fill = impute.statistics[j]
                if impute.missing == "nan":
                    column = [fill if type(v) is float and math.isnan(v) else v for v in column]
                else:
                    column = [fill if v is None else v for v in column]
            levels = onehot.levels[j]
            for i, value in enumerate(column):
                if type(value) is not str:
                    raise Unsupported(f"{name}: {type(value).__name__}")
                at = levels.get(value)
                if at is not None:
                    out[i, offset + at] = 1
                elif not onehot.ignore_unknown:
                    raise Unsupported(f"{name}: unknown level")  # scikit-learn raises, naming it
            offset += onehot.widths[j]
        return out


@dataclass(frozen=True)
class Compiled:
    """The preprocessing of one fitted pipeline, and the estimator its matrix goes to."""

    blocks: tuple[_Block, ...]
    after: tuple[_Scale, ...]  # steps between the ColumnTransformer and the estimator
    final: Any

    def matrix(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
        """The matrix the pipeline's estimator sees for these records; Unsupported for an input not handled, and
        for a batch so large that scikit-learn's own path is the cheaper one."""
        if len(records) * self.width > MAX_CELLS:
            raise Unsupported("a batch of more than MAX_CELLS values")
        parts = [block.categorical(records) if block.onehot is not None else block.numeric(records)
                 for block in self.blocks]
        x = np.hstack(parts) if len(parts) > 1 else parts[0]
        if x.dtype != np.float64:
            x = x.astype(np.float64)
        for scale in self.after:
            x = x.copy(order="K")  # the layout kept, as scikit-learn's scaler keeps it
            if scale.mean is not None:
                x -= scale.mean
            if scale.scale is not None:
                x /= scale.scale
        return x

    @cached_property
    def width(self) -> int:
        """Values a record gives the matrix: the columns the blocks read."""
        return sum(len(block.columns) for block in self.blocks)

    def probes(self) -> list[list[dict[str, Any]]]:
        """Batches that walk every path of `matrix`: every level of every column, an unknown level, nulls,
        absent keys, the imputers' own values; then single records of each kind."""
        numeric, centre, spread = self._numeric()
        levels: dict[str, list[str]] = {}
        for block in self.blocks:
            if block.onehot is not None:
                for name, known in zip(block.columns, block.onehot.levels, strict=True):
                    levels.setdefault(name, []).extend(known)
        rows = max([len(v) for v in levels.values()] + [4]) + 4
        batch: list[dict[str, Any]] = []
        for i in range(rows):
            record: dict[str, Any] = {}
            for k, name in enumerate(numeric):
                kind = (i + k) % 5
                if kind != 4:  # 4: absent
                    record[name] = (None, 0, 1.5 * (i + 1), -0.25 * i)[kind]
            for k, (name, seen) in enumerate(levels.items()):
                kind = i + k
                if kind < len(seen):
                    record[name] = seen[kind]
                elif kind % 3 == 0:
                    record[name] = None
                elif kind % 3 == 1:
                    record[name] = "a level never seen"
                # else absent
            batch.append(record)
        nulls = {**{n: None for n in numeric}, **{n: None for n in levels}}
        # Values of full precision about each column's fitted mean and spread (the kinds above have few significant
        # bits, whose sums round alike in any order), in batches of every size to 40: a difference in how the
        # estimator's arithmetic runs (BLAS takes the rows past a multiple of its vector width apart) shows here.
        rng = np.random.default_rng(20261202)
        dense = [{**{n: float(v) for n, v in zip(numeric, centre + spread * rng.standard_normal(len(numeric)), strict=True)},
                  **{n: v[(i + k) % len(v)] for k, (n, v) in enumerate(levels.items()) if v}} for i in range(820)]
        sized = [dense[m * (m - 1) // 2: m * (m + 1) // 2] for m in range(1, 41)]
        return [batch, batch[:1], batch[-1:], [nulls], [{}], [{**nulls, **{n: v[0] for n, v in levels.items() if v}}],
                *sized]

    def _numeric(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The numeric columns, each with its fitted centre (its first imputer's statistic, finite: _impute checks)
        and spread (its first scaler's scale, positive: StandardScaler's), 0 and 1 where its block has none."""
        names: list[str] = []
        centre: list[float] = []
        spread: list[float] = []
        for block in self.blocks:
            if block.onehot is not None:
                continue
            scale = next((s.scale for s in block.scales if s.scale is not None), None)
            for j, name in enumerate(block.columns):
                names.append(name)
                centre.append(float(block.imputes[0].statistics[j]) if block.imputes else 0.0)
                spread.append(float(scale[j]) if scale is not None else 1.0)
        return names, np.array(centre, dtype=np.float64), np.array(spread, dtype=np.float64)


def compile_pipeline(model: Any, names: Sequence[str] | None) -> Compiled | None:
    """The compiled preprocessing of a fitted pipeline when every step is one handled, else None. `names` are the
    columns of the frame the service would build (the model's input contract); they must hold every column
    the pipeline reads, so that an absent key means what it means in that frame."""
    try:
        return _compile(model, names)
    except Unsupported:
        return None


def _compile(model: Any, names: Sequence[str] | None) -> Compiled:
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    if not isinstance(model, Pipeline) or len(model.steps) < 2 or names is None:
        raise Unsupported("not a pipeline with a named input contract")
    first, final = model.steps[0][1], model.steps[-1][1]
    if not (hasattr(final, "predict_proba") or hasattr(final, "predict")) or isinstance(final, str):
        raise Unsupported("the last step is not an estimator")  # the model's own path names the error
    if not isinstance(first, ColumnTransformer):
        raise Unsupported("first step is not a ColumnTransformer")
    if _output(first) or first.transformer_weights or hasattr(final, "feature_names_in_"):
        raise Unsupported("pandas output or weights")
    blocks = []
    for name, transformer, columns in first.transformers_:
        if isinstance(transformer, str) and transformer == "drop" or len(columns) == 0:
            continue
        if name == "remainder" or not isinstance(columns, list | tuple) or not all(isinstance(c, str) for c in columns):
            raise Unsupported("remainder kept, or columns not by name")
        blocks.append(_block(tuple(columns), transformer))
    if not blocks or not {c for b in blocks for c in b.columns} <= set(names):
        raise Unsupported("a column outside the input contract")
    after = tuple(_scale(step) for _, step in model.steps[1:-1] if step not in (None, "passthrough"))
    return Compiled(tuple(blocks), after, Linear.of(final) or final)


class Linear:
    """A fitted plain linear model's `predict_proba` / `predict` on a matrix the compiled path made: the operations
    of scikit-learn's own methods (`LinearClassifierMixin.decision_function`, `_predict_proba_lr`, `softmax`;
    `LinearModel._decision_function`) in the same order on the same arrays, without their input validation. A
    matrix that validation would refuse or change (not a float64 ndarray of the model's width, a value not
    finite) goes to the model's own method, which raises what it raises. Load-time probes check the bits
    (rollout.models.LoadedModel)."""

    def __init__(self, estimator: Any, classifier: bool) -> None:
        self.estimator = estimator
        self.classifier = classifier
        coef = estimator.coef_
        self.coef = coef.T if coef.ndim == 2 else coef
        self.intercept = estimator.intercept_
        self.width = coef.shape[-1]
        self.binary = classifier and estimator.classes_.size <= 2
        from scipy.special import expit
        from sklearn.utils.extmath import softmax

        self._expit, self._softmax = expit, softmax
        # `predict_proba` and `predict` of a matrix the caller has found that `takes` accepts: not checked again
        self.taken = SimpleNamespace(predict_proba=self.taken_proba, predict=self.taken_predict)

    @classmethod
    def of(cls, estimator: Any) -> Linear | None:
        """The fast path of a model whose scoring methods are those of scikit-learn's plain linear models (not
        overridden by a subclass), with dense coefficients; else None."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.linear_model._base import LinearClassifierMixin, LinearModel

        kind, coef = type(estimator), getattr(estimator, "coef_", None)
        intercept = getattr(estimator, "intercept_", None)
        if type(coef) is not np.ndarray or coef.dtype.kind != "f" or coef.ndim > 2:
            return None  # plain float arrays only: arithmetic on a subclass or objects would run their own code
        if type(intercept) not in (float, np.float64) and not (type(intercept) is np.ndarray
                                                              and intercept.dtype.kind == "f"):
            return None
        if (getattr(kind, "predict_proba", None) is LogisticRegression.predict_proba
                and getattr(kind, "decision_function", None) is LinearClassifierMixin.decision_function
                and getattr(kind, "_predict_proba_lr", None) is LinearClassifierMixin._predict_proba_lr):
            return cls(estimator, classifier=True)
        if (isinstance(estimator, LinearModel) and not isinstance(estimator, LinearClassifierMixin)
                and getattr(kind, "predict", None) is LinearModel.predict
                and getattr(kind, "_decision_function", None) is LinearModel._decision_function):
            return cls(estimator, classifier=False)
        return None

    def takes(self, x: Any) -> bool:
        """Whether this matrix is scored here (else by the model's own method)."""
        return (type(x) is np.ndarray and x.dtype == np.float64 and x.ndim == 2 and x.shape[1] == self.width
                and x.shape[0] > 0 and bool(np.isfinite(x).all()))

    def _decision(self, x: np.ndarray) -> np.ndarray:
        scores: np.ndarray = x @ self.coef + self.intercept
        if self.classifier and scores.ndim > 1 and scores.shape[1] == 1:
            return scores.reshape((-1,))
        return scores

    def predict_proba(self, x: Any) -> Any:
        if not self.classifier or not self.takes(x):
            return self.estimator.predict_proba(x)
        return self.taken_proba(x)

    def predict(self, x: Any) -> Any:
        if self.classifier or not self.takes(x):
            return self.estimator.predict(x)
        return self.taken_predict(x)

    def taken_proba(self, x: np.ndarray) -> np.ndarray:
        """`predict_proba` of a classifier's matrix that `takes` accepted (the caller checked it)."""
        prob = self._decision(x)
        if not self.binary:
            return self._softmax(prob, copy=False)  # type: ignore[no-any-return]
        self._expit(prob, out=prob)  # two classes: one row of coefficients, so `prob` is one score a row
        return np.vstack([1 - prob, prob]).T

    def taken_predict(self, x: np.ndarray) -> np.ndarray:
        """`predict` of a regressor's matrix that `takes` accepted (the caller checked it)."""
        return self._decision(x)


def _output(step: Any) -> bool:
    """Whether a step was set to output pandas (set_output), which the compiled matrix is not."""
    return getattr(step, "_sklearn_output_config", {}).get("transform") not in (None, "default")


def _block(columns: tuple[str, ...], transformer: Any) -> _Block:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    steps = [s for _, s in transformer.steps] if isinstance(transformer, Pipeline) else [transformer]
    steps = [s for s in steps if s not in (None, "passthrough")]
    if any(_output(s) for s in steps) or (isinstance(transformer, Pipeline) and _output(transformer)):
        raise Unsupported("pandas output")
    if steps and isinstance(steps[-1], OneHotEncoder):
        imputes = tuple(_impute(s, len(columns), categorical=True) for s in steps[:-1])
        return _Block(columns, imputes, (), _onehot(steps[-1], len(columns)))
    imputes_list: list[_Impute] = []
    scales: list[_Scale] = []
    for step in steps:
        if scales:  # an imputer after a scaler: not the shape handled
            scales.append(_scale(step))
        elif _is_imputer(step):
            imputes_list.append(_impute(step, len(columns), categorical=False))
        else:
            scales.append(_scale(step))
    return _Block(columns, tuple(imputes_list), tuple(scales), None)


def _is_imputer(step: Any) -> bool:
    from sklearn.impute import SimpleImputer

    return type(step) is SimpleImputer


def _impute(step: Any, width: int, categorical: bool) -> _Impute:
    if not _is_imputer(step) or step.add_indicator or getattr(step, "keep_empty_features", False):
        raise Unsupported(f"step {type(step).__name__}")
    statistics = np.asarray(step.statistics_)
    if statistics.shape != (width,):
        raise Unsupported("imputer width")
    missing = step.missing_values
    if missing is None:
        kind = "none"
    elif isinstance(missing, float) and math.isnan(missing):
        kind = "nan"
    else:
        raise Unsupported("missing_values")
    if categorical:
        if not all(type(v) is str for v in statistics.tolist()):
            raise Unsupported("a categorical fill that is not a string")
        return _Impute(statistics, kind)
    if kind != "nan" or statistics.dtype.kind != "f" or not np.isfinite(statistics).all():
        raise Unsupported("numeric imputer")
    return _Impute(statistics.astype(np.float64), kind)


def _scale(step: Any) -> _Scale:
    from sklearn.preprocessing import StandardScaler

    if type(step) is not StandardScaler or _output(step):
        raise Unsupported(f"step {type(step).__name__}")
    return _Scale(_floats(step.mean_) if step.with_mean else None, _floats(step.scale_) if step.with_std else None)


def _floats(values: Any) -> np.ndarray:
    """A fitted statistic used as it is stored: a plain float ndarray, or Unsupported (no subclass, no object
    dtype: arithmetic on those would run code of the model's own on the service's event loop)."""
    if type(values) is not np.ndarray or values.dtype.kind != "f":
        raise Unsupported("a statistic that is not a float array")
    return values


def _onehot(step: Any, width: int) -> _OneHot:
    if (step.drop is not None or getattr(step, "_infrequent_enabled", False) or step.sparse_output
            or step.handle_unknown not in ("ignore", "error") or len(step.categories_) != width):
        raise Unsupported("one-hot encoder options")
    levels = []
    for known in step.categories_:
        values = np.asarray(known).tolist()
        if not all(type(v) is str for v in values):
            raise Unsupported("categories that are not strings")
        levels.append({v: i for i, v in enumerate(values)})
    return _OneHot(tuple(levels), tuple(len(v) for v in levels), step.dtype, step.handle_unknown == "ignore")
