"""A team's own model for rollout: its feature engineering (a transformer of its own) and a factory.

rollout calls `build(schema, **params)` (policy: `estimator.factory: team_model:build`) and fits what it returns
in every CV fold and on the training rows; the registered model file names `team_model.QuantileClipper`, which
loads only where the policy trusts the package (`registry.trusted_modules: [team_model]`) and it is installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


class QuantileClipper(BaseEstimator, TransformerMixin):
    """Clip each numeric column to the quantiles it had in training, so one wild input cannot dominate a score."""

    def __init__(self, quantile: float = 0.01) -> None:
        self.quantile = quantile

    def fit(self, x: Any, y: Any = None) -> QuantileClipper:
        values = np.asarray(x, dtype=float)
        self.low_ = np.nanquantile(values, self.quantile, axis=0)
        self.high_ = np.nanquantile(values, 1 - self.quantile, axis=0)
        return self

    def transform(self, x: Any) -> Any:
        return np.clip(np.asarray(x, dtype=float), self.low_, self.high_)


def build(schema: Any, C: float = 1.0, quantile: float = 0.01) -> Pipeline:
    """Impute, clip to training quantiles and scale the numeric columns, one-hot the categorical ones, then a
    logistic regression: an unfitted Pipeline, as rollout expects of a factory."""
    numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("clip", QuantileClipper(quantile)),
                        ("scale", StandardScaler())])
    categorical = Pipeline([("impute", SimpleImputer(strategy="most_frequent")),
                            ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False))])
    prep = ColumnTransformer([("num", numeric, list(schema.numeric)), ("cat", categorical, list(schema.categorical))])
    return Pipeline([("prep", prep), ("model", LogisticRegression(C=C, max_iter=5000))])
