"""Training rows from production: what the service served and what it learned later (`ci.training_data`).

The outcome store keeps every served request's inputs (as `serving.log_features` allows) and, once it
arrives, its label: the freshest labelled data a team has. `training_frame` turns the rows of the last
`days` days into the policy's own table (its columns, in its order, with its dtypes): the logged features,
the label as the target, the served time as `data.timestamp_column`, the unit id as `data.unit_column`,
and null for a column the service never receives (`data.drop_columns`). With `source: both` the policy's
rows come first and are dated before the first production row, so the time split's hold-out (the latest
rows) is production's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from rollout.config import CLASSIFICATION_TASKS, ConfigError, Policy
from rollout.outcomes import OutcomeStore
from rollout.outcomes.redaction import Redaction


@dataclass(frozen=True)
class TrainingData:
    """The table ci-pipeline trains on, and where its rows came from (logged with the run)."""

    frame: pd.DataFrame
    source: str
    policy_rows: int
    production_rows: int
    first_served: datetime | None = None
    last_served: datetime | None = None
    note: str = ""

    def params(self) -> dict[str, Any]:
        """What the CI run records about its data (MLflow params)."""
        out: dict[str, Any] = {"training_data.source": self.source, "training_data.policy_rows": self.policy_rows,
                               "training_data.production_rows": self.production_rows}
        if self.first_served is not None and self.last_served is not None:
            out["training_data.served_from"] = self.first_served.isoformat(timespec="seconds")
            out["training_data.served_to"] = self.last_served.isoformat(timespec="seconds")
        return out

    def sentence(self) -> str:
        if self.source == "policy":
            return f"Trained on the policy's data ({self.policy_rows:,} rows)."
        window = (f" served {self.first_served:%Y-%m-%d %H:%M} to {self.last_served:%Y-%m-%d %H:%M} UTC"
                  if self.first_served and self.last_served else "")
        policy = f"{self.policy_rows:,} rows of the policy's data, then " if self.policy_rows else ""
        return (f"Trained on {policy}{self.production_rows:,} labelled production rows{window}; the hold-out and "
                f"the champion gate use the latest rows by served time.{' ' + self.note if self.note else ''}")


def training_frame(policy: Policy, policy_frame: pd.DataFrame, store: OutcomeStore) -> TrainingData:
    """The rows `ci.training_data` asks for, as a table with the columns, order and dtypes of `policy_frame`."""
    cfg = policy.ci.training_data
    if cfg.source == "policy":
        return TrainingData(policy_frame, "policy", len(policy_frame), 0)
    data = policy.data
    logged = store.production_rows(cfg.days, cfg.max_rows, cfg.challenger_rows)
    note = Redaction.for_policy(policy, require_key=False).describe()
    if len(logged) < cfg.min_rows:
        raise ConfigError(f"ci.training_data.min_rows: only {len(logged):,} labelled production rows with their "
                          f"features in the last {cfg.days:g} days (at least {cfg.min_rows:,} needed)"
                          f"{'; ' + note if note else ''}")
    template = policy_frame
    roles = {data.target, data.timestamp_column, data.unit_column}
    inputs = [c for c in template.columns if c not in roles and c not in data.drop_columns]
    unlogged = [c for c in inputs if c not in logged.columns]
    hidden = [c for c in inputs if c in data.pii_columns and data.pii_action == "hash"]
    if unlogged or hidden:
        raise ConfigError(f"ci.training_data.source: the model's inputs {sorted({*unlogged, *hidden})} are not logged "
                          f"in clear (serving.log_features, data.pii_columns), so production rows cannot train on "
                          "them")
    logged = logged.iloc[::-1].reset_index(drop=True)  # oldest first, as time flows
    served = pd.to_datetime(logged["_ts"], unit="s", utc=True)
    out = pd.DataFrame(index=logged.index)
    for column in template.columns:
        if column == data.target:
            label = logged["_label"]
            out[column] = label.round().astype(template[column].dtype) if policy.data.task in CLASSIFICATION_TASKS \
                else label.astype(float)
        elif column == data.timestamp_column:
            out[column] = _like(served, template[column])
        elif column == data.unit_column:
            out[column] = _typed(logged["_unit"], template[column])
        elif column in logged.columns:
            out[column] = _typed(logged[column], template[column])
        else:  # never sent to the service (data.drop_columns)
            out[column] = pd.Series([None] * len(logged), dtype=template[column].dtype
                                    if template[column].dtype.kind in "fO" else object)
    first, last = served.iloc[0].to_pydatetime(warn=False), served.iloc[-1].to_pydatetime(warn=False)
    if cfg.source == "production":
        return TrainingData(out, "production", 0, len(out), first, last, note)
    older = template.copy()
    ts = data.timestamp_column
    assert ts is not None  # the policy requires it with production rows
    cap = _like(pd.Series([served.iloc[0] - pd.Timedelta(seconds=1)]), template[ts]).iloc[0]
    stamped = older[ts].where(older[ts].notna() & (older[ts] < cap), cap) if older[ts].notna().any() else cap
    older[ts] = stamped
    both = pd.concat([older, out], ignore_index=True)
    return TrainingData(both, "both", len(older), len(out), first, last, note)


def _like(times: pd.Series, template: pd.Series) -> pd.Series:
    """UTC times in the template column's kind: tz-aware, naive (UTC) or text."""
    if isinstance(template.dtype, pd.DatetimeTZDtype):
        return times.dt.tz_convert(template.dtype.tz).astype(template.dtype)
    if pd.api.types.is_datetime64_any_dtype(template):
        return times.dt.tz_convert(UTC).dt.tz_localize(None).astype(template.dtype)
    return times.dt.strftime("%Y-%m-%dT%H:%M:%S")


def _typed(values: pd.Series, template: pd.Series) -> pd.Series:
    """Logged JSON values in the template column's dtype (numbers as numbers, null as NaN or None)."""
    if template.dtype.kind in "fiu":
        numbers = pd.to_numeric(values, errors="coerce")
        if template.dtype.kind in "iu" and numbers.notna().all() and (numbers == numbers.round()).all():
            return numbers.astype(template.dtype)
        return numbers.astype(float)
    if template.dtype.kind == "b":
        return values.astype(object)
    if template.dtype != object:  # pandas' string dtype: nulls become its missing value
        return values.astype(template.dtype)
    return values.astype(object).where(values.notna(), None)

