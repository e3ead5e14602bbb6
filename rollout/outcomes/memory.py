"""An outcome store in memory, for unit tests of the CD phase (gather, act, rollback).

It keeps rows in lists and computes `evidence` in one plain Python pass, from the definitions in
`rollout.outcomes.summaries` (losses, pairs, weights, buckets), so it is also the reference the SQL
summaries are tested against.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from rollout.outcomes.audit import AuditEntry, Rollout, StoredPlan
from rollout.outcomes.engine import LockHeld
from rollout.outcomes.retention import Expired
from rollout.outcomes.log import ClassCell, LabelReport, OutcomeCell, PredictionRow, Time
from rollout.outcomes.schema import METRICS, UNSCORED_PREFIX
from rollout.outcomes.sqlexpr import EPS
from rollout.outcomes.summaries import _LAT_BUCKETS_PER_E, _LAT_OFFSET, EvidenceSums, TrafficCounts
from rollout.roles import UNIT_SPLIT_MODES, Role
from rollout.stats.bandit import IPWSums
from rollout.stats.guardrails import AgreementSums, LabelSums
from rollout.stats.moments import ClusterSums, Confusion, Moments
from rollout.times import day_of, from_epoch, to_epoch

_SCORED = {"log_loss", "brier"}  # losses of the score; the others are losses of the prediction


def loss(metric: str, prediction: float | None, score: float | Sequence[float] | None,
         label: float) -> float | None:
    """The per-request loss of a metric (None when the input it needs is missing), as the store's SQL has it:
    a multiclass score (class probabilities) has the log loss of the labelled class's entry."""
    if metric == "accuracy":
        return None if prediction is None else float(prediction != label)
    if metric == "log_loss":
        if score is None:
            return None
        if not isinstance(score, int | float):
            k = int(label)
            p_true = float(score[k]) if 0 <= k < len(score) else 0.0
        else:
            p_true = score if label == 1 else 1.0 - score
        return -math.log(min(max(p_true, EPS), 1.0 - EPS))
    score = _scalar(score)
    if metric == "brier":
        return None if score is None else (score - label) ** 2
    if prediction is None:
        return None
    return (prediction - label) ** 2 if metric == "mse" else abs(prediction - label)


def _scalar(score: float | Sequence[float] | None) -> float | None:
    """The stored score: a multiclass row's is its predicted class's probability (the largest)."""
    return score if score is None or isinstance(score, int | float) else max(map(float, score))


@dataclass
class InMemoryStore:
    """The `Store` protocol over Python lists; `clock` gives the time of writes without one."""

    clock: Callable[[], datetime] = field(default=lambda: datetime.now(tz=UTC))
    predictions: list[PredictionRow] = field(default_factory=list)
    labels: dict[str, tuple[float, float]] = field(default_factory=dict)  # request id -> (ts, label), current
    routing: dict[int, Rollout] = field(default_factory=dict)
    audit: list[AuditEntry] = field(default_factory=list)
    plans: list[StoredPlan] = field(default_factory=list)
    label_batches: list[dict[str, Any]] = field(default_factory=list)
    label_requests: dict[tuple[int, str], float] = field(default_factory=dict)  # (rollout, request) -> probability
    _held: set[str] = field(default_factory=set)
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return to_epoch(self.clock())

    def log_predictions(self, rows: Iterable[PredictionRow]) -> int:
        added = [replace(r, ts=self.now() if r.ts is None else to_epoch(r.ts)) for r in rows]
        self.predictions += added
        return len(added)

    def add_labels(self, items: Iterable[Sequence[Any]]) -> LabelReport:
        received = self.now()
        known = {r.request_id for r in self.predictions}
        stored = replaced = 0
        unknown: list[str] = []
        for item in items:
            rid, value = str(item[0]), float(item[1])
            ts = to_epoch(item[2]) if len(item) > 2 and item[2] is not None else received
            stored += 1
            if rid not in known and rid not in unknown:
                unknown.append(rid)
            current = self.labels.get(rid)
            if current is None or ts >= current[0]:
                replaced += current is not None
                self.labels[rid] = (ts, value)
        return LabelReport(stored, replaced, len(unknown), tuple(unknown[:100]))

    # ---------------------------------------------------------------------------- routing and audit

    def open_rollout(self, mode: str, versions: Mapping[str, str], weights: Mapping[str, float] | None = None,
                     salt: str | None = None, started_at: Time | None = None) -> int:
        start = from_epoch(self.now() if started_at is None else to_epoch(started_at))
        for rid, r in self.routing.items():
            if r.ended_at is None:
                self.routing[rid] = replace(r, ended_at=start, end_reason="superseded by a new rollout")
        rollout_id = len(self.routing) + 1
        self.routing[rollout_id] = Rollout(rollout_id, mode, {str(k): str(v) for k, v in versions.items()},
                                           {str(k): float(v) for k, v in (weights or {}).items()},
                                           salt or uuid.uuid4().hex, start, start)
        return rollout_id

    def current_rollout(self) -> Rollout | None:
        open_ = [r for r in self.routing.values() if r.ended_at is None]
        return max(open_, key=lambda r: r.rollout_id) if open_ else None

    def rollout(self, rollout_id: int) -> Rollout | None:
        return self.routing.get(rollout_id)

    def rollouts(self) -> list[Rollout]:
        return [self.routing[rid] for rid in sorted(self.routing)]

    def set_weights(self, rollout_id: int, weights: Mapping[str, float]) -> None:
        if rollout_id not in self.routing:
            raise KeyError(f"no rollout {rollout_id}")
        self.routing[rollout_id] = replace(self.routing[rollout_id], weights=dict(weights),
                                           updated_at=from_epoch(self.now()))

    def end_rollout(self, rollout_id: int, ended_at: Time | None = None, reason: str = "") -> None:
        r = self.routing[rollout_id]
        if r.ended_at is None:
            end = from_epoch(self.now() if ended_at is None else to_epoch(ended_at))
            self.routing[rollout_id] = replace(r, ended_at=end, end_reason=reason, updated_at=end)

    def record_decision(self, rollout_id: int | None, decision: str, stats: Mapping[str, Any],
                        alias_moves: Sequence[Any] = (), actor: str = "", ts: Time | None = None) -> int:
        entry = AuditEntry(len(self.audit) + 1, from_epoch(self.now() if ts is None else to_epoch(ts)), rollout_id,
                           decision, dict(stats), list(alias_moves), actor or "test")
        self.audit.append(entry)
        return entry.id

    def audit_log(self, rollout_id: int | None = None) -> list[AuditEntry]:
        entries = [e for e in self.audit if rollout_id is None or e.rollout_id == rollout_id]
        return sorted(entries, key=lambda e: (e.ts, e.id))

    def save_plan(self, rollout_id: int | None, decision: str, steps: list[dict[str, Any]],
                  stats: Mapping[str, Any], actor: str, ts: Time) -> int:
        plan = StoredPlan(len(self.plans) + 1, rollout_id, decision, list(steps), 0, "pending", dict(stats),
                          actor or "test", to_epoch(ts))
        self.plans.append(plan)
        return plan.id

    def plan_progress(self, plan_id: int, done: int) -> None:
        plan = self.plans[plan_id - 1]
        self.plans[plan_id - 1] = replace(plan, done=max(plan.done, done))

    def finish_plan(self, plan_id: int, status: str, alias_moves: list[Any]) -> int | None:
        plan = self.plans[plan_id - 1]
        if plan.status != "pending":
            return None
        self.plans[plan_id - 1] = replace(plan, status=status)
        decision = plan.decision if status == "done" else f"{plan.decision} reversed"
        return self.record_decision(plan.rollout_id, decision, plan.stats, alias_moves, plan.actor, plan.ts)

    def pending_plans(self) -> list[StoredPlan]:
        return [p for p in self.plans if p.status == "pending"]

    def reopen_rollout(self, rollout_id: int) -> None:
        if max(self.routing) == rollout_id:
            self.routing[rollout_id] = replace(self.routing[rollout_id], ended_at=None, end_reason=None)

    @contextmanager
    def lock(self, name: str, ttl_s: float = 3600.0) -> Iterator[None]:
        with self._mutex:
            if name in self._held:
                raise LockHeld(f"lock {name!r} is held")
            self._held.add(name)
        try:
            yield
        finally:
            with self._mutex:
                self._held.discard(name)

    # --------------------------------------------------------------------------------- answers

    def _labelled(self, rollout_id: int, cutoff: Time | None) -> Iterator[tuple[PredictionRow, float]]:
        """The rollout's error-free rows before the cut that have a current label, with the label: what the
        SQL store's labelled queries join."""
        cut = math.inf if cutoff is None else to_epoch(cutoff)
        for r in self.predictions:
            label = self.labels.get(r.request_id)
            if r.rollout_id == rollout_id and r.error is None and label is not None and _ts(r) < cut:
                yield r, label[1]

    def _champion_rows(self, rollout_id: int, champion: str | None) -> dict[str, PredictionRow]:
        """The champion's error-free rows of the rollout by request id (none without a champion)."""
        return {r.request_id: r for r in self.predictions
                if champion is not None and r.rollout_id == rollout_id and r.version == champion and r.error is None}

    def class_counts(self, rollout_id: int, cutoff: Time | None = None) -> dict[ClassCell, int]:
        out: dict[ClassCell, int] = {}
        for r, y in self._labelled(rollout_id, cutoff):
            if r.prediction is None:
                continue
            key = (str(r.version), r.segment, float(r.prediction), float(y))
            out[key] = out.get(key, 0) + 1
        return out

    def first_seen(self, rollout_id: int) -> datetime | None:
        times = [_ts(r) for r in self.predictions if r.rollout_id == rollout_id]
        return from_epoch(min(times)) if times else None

    def last_seen(self, rollout_id: int) -> datetime | None:
        times = [_ts(r) for r in self.predictions if r.rollout_id == rollout_id]
        return from_epoch(max(times)) if times else None

    def outcome_cells(self, rollout_id: int, cutoff: Time | None = None,
                      champion: str | None = None) -> dict[OutcomeCell, int]:
        champ = self._champion_rows(rollout_id, champion)
        out: dict[OutcomeCell, int] = {}
        for r, y in self._labelled(rollout_id, cutoff):
            if r.prediction is None:
                continue
            h = champ.get(r.request_id) if r.version != champion else None
            key = (str(r.version), r.segment, day_of(_ts(r)), float(r.prediction), float(y),
                   None if h is None or h.prediction is None else float(h.prediction))
            out[key] = out.get(key, 0) + 1
        return out

    def score_histograms(self, rollout_id: int, cutoff: Time | None = None,
                         buckets: int = 200) -> dict[str, tuple[list[int], list[int]]]:
        out: dict[str, tuple[list[int], list[int]]] = {}
        for r, y in self._labelled(rollout_id, cutoff):
            if y not in (0.0, 1.0) or not isinstance(r.score, int | float):
                continue
            pos, neg = out.setdefault(r.version, ([0] * buckets, [0] * buckets))
            (pos if y == 1.0 else neg)[min(max(int(float(r.score) * buckets), 0), buckets - 1)] += 1
        return out

    def label_sums(self, rollout_id: int, cutoff: Time | None = None) -> dict[str, LabelSums]:
        cut = math.inf if cutoff is None else to_epoch(cutoff)
        out: dict[str, list[Any]] = {}
        for r in self.predictions:
            if r.rollout_id != rollout_id or r.error is not None or not _ts(r) < cut:
                continue
            acc = out.setdefault(r.version, [0, 0, {}])
            acc[0] += 1
            label = self.labels.get(r.request_id)
            if label is not None:
                acc[1] += 1
                hour = int(max(label[0] - _ts(r), 0.0) / 3600.0)
                acc[2][hour] = acc[2].get(hour, 0) + 1
        return {v: LabelSums(a[0], a[1], tuple(sorted(a[2].items()))) for v, a in out.items()}

    def label_request_pool(self, rollout_id: int) -> tuple[float, pd.DataFrame]:
        ends = [b["ts_to"] for b in self.label_batches if b["rollout_id"] == rollout_id]
        start = max(ends) if ends else -math.inf
        rows = [(r.request_id, r.unit_id, _ts(r), r.version, r.prediction, _scalar(r.score)) for r in self.predictions
                if r.rollout_id == rollout_id and r.error is None and _ts(r) > start]
        from rollout.outcomes.requests import POOL_COLUMNS

        return start, pd.DataFrame.from_records(rows, columns=POOL_COLUMNS)

    def save_label_requests(self, rollout_id: int, ts_from: float, ts_to: float, pool_size: int, budget: int,
                            chosen: Sequence[tuple[str, float]]) -> int:
        batch = len(self.label_batches) + 1
        self.label_batches.append({"rollout_id": rollout_id, "ts_to": ts_to, "pool": pool_size, "budget": budget,
                                   "requested": len(chosen)})
        for rid, pi in chosen:
            if (rollout_id, rid) in self.label_requests:
                raise ValueError(f"request {rid} was already requested in rollout {rollout_id}")
            self.label_requests[(rollout_id, rid)] = float(pi)
        return batch

    def label_request_details(self, rollout_id: int, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        wanted = set(request_ids)
        return {r.request_id: {"unit_id": r.unit_id, "ts": _ts(r), "segment": r.segment, "features": r.features}
                for r in self.predictions if r.rollout_id == rollout_id and r.served and r.request_id in wanted}

    def requested_rows(self, rollout_id: int) -> pd.DataFrame:
        from rollout.outcomes.requests import REQUESTED_COLUMNS

        rows = []
        for r in self.predictions:
            pi = self.label_requests.get((rollout_id, r.request_id))
            if pi is None or r.rollout_id != rollout_id or r.error is not None:
                continue
            label = self.labels.get(r.request_id)
            rows.append((r.request_id, pi, r.unit_id, _ts(r), r.version, r.prediction, _scalar(r.score),
                         math.nan if label is None else label[1], math.nan if label is None else label[0],
                         r.segment))
        frame = pd.DataFrame.from_records(rows, columns=REQUESTED_COLUMNS)
        return frame.astype({"label": float, "label_ts": float, "prediction": float, "score": float})

    def recent_label_delays(self, limit: int = 10_000) -> LabelSums:
        first: dict[str, float] = {}
        for r in self.predictions:
            first[r.request_id] = min(first.get(r.request_id, math.inf), _ts(r))
        latest = sorted(((ts, rid) for rid, (ts, _) in self.labels.items() if rid in first), reverse=True)[:limit]
        by_hour: dict[int, int] = {}
        for ts, rid in latest:
            hour = int(max(ts - first[rid], 0.0) // 3600.0)
            by_hour[hour] = by_hour.get(hour, 0) + 1
        return LabelSums(len(latest), len(latest), tuple(sorted(by_hour.items())))

    def unit_sums(self, rollout_id: int, metric: str, cutoff: Time | None = None,
                  champion: str | None = None) -> dict[str, ClusterSums]:
        champ = self._champion_rows(rollout_id, champion)
        units: dict[str, list[str]] = {}
        values: dict[str, list[float]] = {}
        for r, y in self._labelled(rollout_id, cutoff):
            value = loss(metric, r.prediction, r.score, y)
            if champion is not None:
                h = champ.get(r.request_id)
                if r.version == champion or h is None:
                    continue
                theirs = loss(metric, h.prediction, h.score, y)
                value = None if value is None or theirs is None else value - theirs
            if value is None:
                continue
            units.setdefault(r.version, []).append(r.unit_id or r.request_id)
            values.setdefault(r.version, []).append(value)
        return {v: ClusterSums.of(units[v], values[v]) for v in units}

    def expire(self, before: Time, dry_run: bool = False) -> Expired:
        """As OutcomeStore.expire: rows older than `before` go, except an open rollout's; then orphan labels."""
        cut = to_epoch(before)
        open_ids = {i for i, r in self.routing.items() if r.ended_at is None}
        old = [r for r in self.predictions if _ts(r) < cut and r.rollout_id not in open_ids]
        kept = sum(1 for r in self.predictions if _ts(r) < cut and r.rollout_id in open_ids)
        if dry_run:
            return Expired(cut, len(old), 0, 0, 0, kept, None, "Dry run: nothing removed.", dry_run=True)
        gone = {id(r) for r in old}
        self.predictions = [r for r in self.predictions if id(r) not in gone]
        known = {r.request_id for r in self.predictions}
        orphans = [rid for rid, (ts, _) in self.labels.items() if ts < cut and rid not in known]
        for rid in orphans:
            del self.labels[rid]
        return Expired(cut, len(old), len(orphans), 0, 0, kept, None)

    def recent_features(self, limit: int = 10_000, since: Time | None = None) -> pd.DataFrame:
        start = -math.inf if since is None else to_epoch(since)
        rows = [r for r in self.predictions if r.served and r.features is not None and _ts(r) >= start]
        rows.sort(key=_ts, reverse=True)
        return pd.DataFrame.from_records([_features(r) for r in rows[:limit]])

    def evidence(self, rollout_id: int, cutoff: Time | None = None, champion: str | None = None) -> EvidenceSums:
        """The same sums as OutcomeStore.evidence, in one pass over the rows."""
        rollout = self.routing.get(rollout_id)
        champion = champion if champion is not None else (rollout.champion if rollout else None)
        cut = math.inf if cutoff is None else to_epoch(cutoff)
        rows = [r for r in self.predictions if r.rollout_id == rollout_id]
        champ_rows = {r.request_id: r for r in rows if r.version == champion and r.error is None}
        loss_acc: dict[str, dict[Any, list[float]]] = {m: {} for m in METRICS}
        pair_acc: dict[str, dict[Any, list[float]]] = {m: {} for m in METRICS}
        ipw_acc: dict[str, dict[str, list[float]]] = {m: {} for m in METRICS}
        conf: dict[tuple[str, str | None], list[int]] = {}
        agree: dict[str, list[float]] = {}
        traffic: dict[str, list[int]] = {}
        hist: dict[tuple[str, int], int] = {}
        units: dict[str, set[tuple[str, str]]] = {}
        for r in rows:
            version, ts = r.version, _ts(r)
            t = traffic.setdefault(version, [0, 0, 0])
            t[0] += 1
            t[1] += r.error is not None and not r.error.startswith(UNSCORED_PREFIX)
            t[2] += bool(r.served)
            if r.latency_ms is not None:
                b = int((math.log(max(r.latency_ms, 1e-4)) + _LAT_OFFSET) * _LAT_BUCKETS_PER_E)
                hist[(version, b)] = hist.get((version, b), 0) + 1
            chosen = r.served and (r.propensity is None or r.propensity > 0)  # not a fallback for a failed arm
            if chosen or (r.role != Role.CHAMPION and r.error is not None):
                units.setdefault(version, set()).add(("r", r.request_id) if r.unit_id is None else ("u", r.unit_id))
            if r.error is not None:
                continue
            h = champ_rows.get(r.request_id) if version != champion else None
            if h is not None:
                x = _scalar(h.score) if h.score is not None else h.prediction
                y = _scalar(r.score) if r.score is not None else r.prediction
                a = agree.setdefault(version, [0, 0, 0.0, 0.0, 0.0, 0.0, 0.0])
                a[0] += 1
                a[1] += r.prediction is not None and r.prediction == h.prediction
                if x is not None:
                    a[2] += x
                    a[4] += x * x
                if y is not None:
                    a[3] += y
                    a[5] += y * y
                if x is not None and y is not None:
                    a[6] += x * y
            label = self.labels.get(r.request_id)
            if label is None or ts >= cut:
                continue
            y_true = label[1]
            key = (version, r.segment, day_of(ts))
            c = conf.setdefault((version, r.segment), [0, 0, 0, 0])
            if r.prediction is not None:
                positive, actual = r.prediction == 1, y_true == 1
                c[0 if positive and actual else 1 if positive else 2 if actual else 3] += 1
            for m in METRICS:
                own = loss(m, r.prediction, r.score, y_true)
                if own is not None:
                    _add(loss_acc[m], key, own)
                if h is not None:
                    theirs = loss(m, h.prediction, h.score, y_true)
                    if own is not None and theirs is not None:
                        _add(pair_acc[m], key, own - theirs)
                needed = r.score if m in _SCORED else r.prediction
                if r.served and r.propensity and r.propensity > 0 and needed is not None and own is not None:
                    w = 1.0 / r.propensity
                    acc = ipw_acc[m].setdefault(version, [0, 0.0, 0.0, 0.0, 0.0, 0.0])
                    for i, v in enumerate((1, w, w * own, w * w, w * w * own, w * w * own * own)):
                        acc[i] += v
        ipw: dict[str, dict[str, IPWSums]] = {}
        for m in METRICS:
            n_total = sum(int(a[0]) for a in ipw_acc[m].values())
            ipw[m] = {v: IPWSums(n_total, int(a[0]), *a[1:]) for v, a in ipw_acc[m].items()}
        latency: dict[str, list[tuple[int, int]]] = {}
        for (version, b), n in sorted(hist.items()):
            latency.setdefault(version, []).append((b, n))
        return EvidenceSums(
            rollout_id, None if cutoff is None else cut, champion,
            loss={m: {k: Moments(int(v[0]), v[1], v[2]) for k, v in d.items()} for m, d in loss_acc.items()},
            paired={m: {k: Moments(int(v[0]), v[1], v[2]) for k, v in d.items()} for m, d in pair_acc.items()},
            confusion={k: Confusion(*c) for k, c in conf.items() if sum(c)},
            agreement={v: AgreementSums(int(a[0]), int(a[1]), *a[2:]) for v, a in agree.items()},
            ipw=ipw,
            traffic={v: TrafficCounts(*t) for v, t in traffic.items()},
            latency_hist=latency,
            units={v: len(u) for v, u in units.items()} if rollout and rollout.mode in UNIT_SPLIT_MODES else None,
        )


def _ts(row: PredictionRow) -> float:
    return math.nan if row.ts is None else to_epoch(row.ts)


def _features(row: PredictionRow) -> dict[str, Any]:
    return json.loads(row.features) if isinstance(row.features, str) else dict(row.features or {})


def _add(acc: dict[Any, list[float]], key: Any, value: float) -> None:
    m = acc.setdefault(key, [0, 0.0, 0.0])
    m[0] += 1
    m[1] += value
    m[2] += value * value

