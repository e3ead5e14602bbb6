"""Label requests (active evaluation): which predictions to ask labels for, and what their labels say.

A batch considers every row the rollout logged since the last batch, gives each request an inclusion probability
proportional to how much its label could move the promotion test (plus a floor), draws the budget with exactly
those probabilities (`rollout.stats.sampling`), and records them. The evaluation then estimates the effect from
the requested rows only, each labelled row weighted by 1 / its probability: unbiased for the mean over every
logged row, whatever the sampling favoured, with a standard error the sequential test can use.

Informativeness of a request, for the primary metric's per-row loss L(prediction, y):
- shadow (binary classification): the root mean square of the paired difference L(challenger) - L(champion)
  over y drawn from the two models' mean probability. Rows where the models agree have a difference of 0 for
  the 0/1 loss whatever the label: their labels carry no information about the effect, and get only the floor.
- ab/abn (binary classification): the root mean square of the row's own loss under its own probability.
- regression: shadow |challenger - champion|; ab/abn every row alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rollout.config import Policy
from rollout.models import own_metric
from rollout.outcomes import Rollout, Store
from rollout.outcomes.sqlexpr import EPS  # the store's clip of a probability in the log loss
from rollout.stats.guardrails import LabelSums
from rollout.stats.moments import Confusion
from rollout.tables import SqlTable
from rollout.stats.sampling import WeightedMean, inclusion_probabilities, systematic_sample
from rollout.times import from_epoch

OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")  # what `write` writes: checked before a batch is drawn
LossFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (y, prediction, score) -> loss per row


def loss_function(metric: str) -> LossFn:
    """The primary metric's per-row loss as the store's SQL computes it (a binary score is P(class 1)), or your
    own function(y_true, prediction)."""
    if ":" in metric:
        fn = own_metric(metric, "rollout.primary_metric")
        return lambda y, prediction, score: np.asarray(fn(y, prediction), dtype=float)
    if metric == "accuracy":
        return lambda y, prediction, score: (prediction != y).astype(float)
    if metric == "log_loss":
        return lambda y, prediction, score: -np.log(np.clip(np.where(y == 1, score, 1.0 - score), EPS, 1.0 - EPS))
    if metric == "brier":
        return lambda y, prediction, score: (score - y) ** 2
    if metric == "mse":
        return lambda y, prediction, score: (prediction - y) ** 2
    if metric == "mae":
        return lambda y, prediction, score: np.abs(prediction - y)
    raise ValueError(f"rollout.primary_metric {metric!r}: no per-row loss for label requests")


def _rms_over_labels(loss: LossFn, q: np.ndarray, *sides: tuple[np.ndarray, np.ndarray, float]) -> np.ndarray:
    """sqrt(E[v(y)^2]) for y ~ Bernoulli(q), v(y) = sum of sign * L(prediction, score, y) over the sides."""
    out = np.zeros(q.size)
    for y, weight in ((1.0, q), (0.0, 1.0 - q)):
        labels = np.full(q.size, y)
        v = sum(sign * loss(labels, pred, score) for pred, score, sign in sides)
        out += weight * np.nan_to_num(np.asarray(v, dtype=float), nan=0.0) ** 2
    return np.sqrt(out)


def informativeness(pool: pd.DataFrame, mode: str, task: str, champion: str, loss: LossFn) -> pd.Series:
    """Per request id of the pool, how much its label could move the estimate of the effect (module docstring)."""
    rows = pool.assign(score=pool["score"].astype(float), prediction=pool["prediction"].astype(float))
    requests = pd.Index(rows["request_id"].unique())
    if mode != "shadow":
        if task != "classification":
            return pd.Series(1.0, index=requests)
        served = rows.drop_duplicates("request_id").set_index("request_id")
        q = served["score"].fillna(0.5).clip(0, 1).to_numpy()
        s = _rms_over_labels(loss, q, (served["prediction"].to_numpy(), served["score"].to_numpy(), 1.0))
        return pd.Series(s, index=served.index).reindex(requests, fill_value=0.0)
    mine = rows[rows["version"] != champion]
    theirs = rows[rows["version"] == champion].drop_duplicates("request_id")
    pairs = mine.merge(theirs, on="request_id", suffixes=("", "_c"))
    if pairs.empty:
        return pd.Series(0.0, index=requests)
    if task == "classification":
        q = ((pairs["score"] + pairs["score_c"]) / 2).fillna(0.5).clip(0, 1).to_numpy()
        s = _rms_over_labels(loss, q, (pairs["prediction"].to_numpy(), pairs["score"].to_numpy(), 1.0),
                             (pairs["prediction_c"].to_numpy(), pairs["score_c"].to_numpy(), -1.0))
    else:
        s = np.abs(pairs["prediction"] - pairs["prediction_c"]).fillna(0.0).to_numpy()
    per_request = pd.Series(s, index=pairs["request_id"].to_numpy()).groupby(level=0).max()
    return per_request.reindex(requests, fill_value=0.0)


def propose(pool: pd.DataFrame, budget: int, policy: Policy, mode: str, champion: str,
            rng: np.random.Generator) -> pd.DataFrame:
    """The requests to label (request_id, probability): drawn from the pool's requests with probabilities
    proportional to their informativeness plus the floor, `budget` of them in expectation."""
    if pool.empty:
        return pd.DataFrame({"request_id": [], "probability": []})
    s = informativeness(pool, mode, policy.data.task, champion, loss_function(policy.rollout.primary_metric))
    pi = inclusion_probabilities(s.to_numpy(), budget, policy.rollout.label_requests.floor)
    chosen = systematic_sample(pi, rng)
    return pd.DataFrame({"request_id": s.index[chosen].astype(str), "probability": pi[chosen]})


@dataclass(frozen=True)
class LabelRequestBatch:
    """One batch of label requests: the rows it considered and the requests to label, with what a labeller needs."""

    rollout_id: int
    batch: int | None
    pool: int
    budget: int
    requests: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rollout_id": self.rollout_id, "batch": self.batch, "considered": self.pool, "budget": self.budget,
                "requested": len(self.requests), "requests": self.requests}


def request_labels(store: Store, rollout: Rollout, policy: Policy, budget: int,
                   rng: np.random.Generator | None = None) -> LabelRequestBatch:
    """Draw and record a batch of label requests from the rows the rollout logged since its last batch (under
    the store's `label-requests` lock, so two callers never draw the same rows)."""
    if budget < 1:
        raise ValueError("budget: at least 1")
    rng = rng if rng is not None else np.random.default_rng()
    rid = rollout.rollout_id
    with store.lock("label-requests", ttl_s=600.0):
        start, pool = store.label_request_pool(rid)
        considered = int(pool["request_id"].nunique()) if not pool.empty else 0
        if not considered:
            return LabelRequestBatch(rid, None, 0, budget)
        chosen = propose(pool, budget, policy, rollout.mode, rollout.champion, rng)
        pairs = list(zip(chosen["request_id"], chosen["probability"], strict=True))
        batch = store.save_label_requests(rid, start, float(pool["ts"].max()), considered, budget, pairs)
    info = store.label_request_details(rid, [r for r, _ in pairs])
    out = []
    for request_id, pi in pairs:
        seen = info.get(request_id, {})
        features = seen.get("features")
        out.append({"request_id": request_id, "probability": float(pi), "unit_id": seen.get("unit_id"),
                    "ts": from_epoch(seen["ts"]).isoformat() if "ts" in seen else None,
                    "segment": seen.get("segment"),
                    "features": json.loads(features) if isinstance(features, str) else features})
    return LabelRequestBatch(rid, batch, considered, budget, out)


@dataclass(frozen=True)
class RequestedEvidence:
    """What the labels of requested rows say: per version the weighted mean of its loss (ab/abn) or, per
    challenger, of its paired difference loss - champion's loss (shadow); per version the requested rows'
    label coverage and delays."""

    means: Mapping[str, WeightedMean]
    labels: Mapping[str, LabelSums]
    # binary classification: per version, per segment, the confusion counts each labelled row weighted by
    # 1 / its inclusion probability, scaled to the sample's effective size (for the segment guardrails)
    confusion: Mapping[str, Mapping[str, Confusion]] = field(default_factory=dict)


def requested_evidence(rows: pd.DataFrame, mode: str, champion: str, metric: str, cutoff: float,
                       units: bool, binary: bool = False) -> RequestedEvidence:
    """From the store's requested rows (`Store.requested_rows`), those logged before the maturity cut; with
    `binary` (a binary classifier's 0/1 predictions), the weighted confusion counts too."""
    loss = loss_function(metric)
    rows = rows[rows["ts"] < cutoff]
    labels: dict[str, LabelSums] = {}
    for version, group in rows.groupby("version"):
        got = group[group["label"].notna()]
        delay = np.floor(np.maximum(got["label_ts"] - got["ts"], 0.0) / 3600.0).astype(int)
        counts = delay.value_counts().sort_index()
        labels[str(version)] = LabelSums(len(group), len(got), tuple((int(h), int(n)) for h, n in counts.items()))
    labelled = rows[rows["label"].notna()].copy()
    if labelled.empty:
        return RequestedEvidence({}, labels)
    confusion = weighted_confusion(labelled) if binary else {}
    labelled["loss"] = loss(labelled["label"].to_numpy(), labelled["prediction"].to_numpy(),
                            labelled["score"].to_numpy())
    labelled = labelled[np.isfinite(labelled["loss"])]
    unit_of = labelled["unit_id"].fillna(labelled["request_id"]).astype(str)
    labelled = labelled.assign(unit=unit_of)
    means: dict[str, WeightedMean] = {}
    if mode == "shadow":
        theirs = labelled[labelled["version"] == champion].drop_duplicates("request_id")[["request_id", "loss"]]
        pairs = labelled[labelled["version"] != champion].merge(theirs, on="request_id", suffixes=("", "_c"))
        for version, group in pairs.groupby("version"):
            means[str(version)] = WeightedMean.of(group["loss"] - group["loss_c"], group["probability"],
                                                  group["unit"].tolist() if units else None)
    else:
        for version, group in labelled.groupby("version"):
            means[str(version)] = WeightedMean.of(group["loss"], group["probability"],
                                                  group["unit"].tolist() if units else None)
    return RequestedEvidence(means, labels, confusion)


def weighted_confusion(labelled: pd.DataFrame) -> dict[str, dict[str, Confusion]]:
    """Per version and segment, the confusion counts of labelled requested rows, each weighted by 1 / its
    inclusion probability and scaled so they add up to the rows' effective sample size (Kish: (sum w)^2 /
    sum w^2). The shares estimate the segment's precision, recall and accuracy over all its traffic (the
    requested rows favour disagreements, where both models are wrong more often), and a confidence bound
    on the counts is as wide as the weights make the estimate."""
    frame = labelled[labelled["prediction"].notna()]
    out: dict[str, dict[str, Confusion]] = {}
    for (version, segment), group in frame.groupby([frame["version"], frame["segment"].fillna("")]):
        w = 1.0 / group["probability"].to_numpy(dtype=float)
        scale = w.sum() / float((w * w).sum())
        said, was = group["prediction"].to_numpy() == 1, group["label"].to_numpy() == 1
        cells = [int(round(scale * float(w[m].sum()))) for m in (said & was, said & ~was, ~said & was, ~said & ~was)]
        out.setdefault(str(version), {})[str(segment)] = Confusion(*cells)
    return out


def _frame(batch: LabelRequestBatch) -> pd.DataFrame:
    records = [{k: v for k, v in r.items() if k != "features"} | dict(r.get("features") or {})
               for r in batch.requests]
    return pd.DataFrame.from_records(records, columns=None if records else
                                     ["request_id", "probability", "unit_id", "ts", "segment"])


def write(batch: LabelRequestBatch, path: Path) -> Path:
    """The batch's requests as a file for the people who label (.csv or .parquet): request_id, probability,
    unit_id, ts, segment, then the logged features one column each. Send the labels back to POST /labels
    under the same request ids."""
    frame = _frame(batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    elif path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise ValueError(f"output: {path.name!r}: write a .csv or .parquet file")  # callers check OUTPUT_SUFFIXES
    return path


def write_table(batch: LabelRequestBatch, table: SqlTable) -> SqlTable:
    """The batch's requests appended to a table of your database (a labelling queue): the file's columns after
    rollout_id and batch. Each batch's rows go in one transaction; the table is created by the first batch."""
    from sqlalchemy import create_engine

    frame = _frame(batch)
    frame.insert(0, "batch", batch.batch)
    frame.insert(0, "rollout_id", batch.rollout_id)
    engine = create_engine(table.url)
    try:
        with engine.begin() as conn:
            frame.to_sql(table.name, conn, if_exists="append", index=False)
    finally:
        engine.dispose()
    return table
