"""The outcome store: one object over the prediction log, routing and audit, summaries and the lock.

`Store` is what the CD phase asks of it; `OutcomeStore` answers on SQLite or PostgreSQL and
`rollout.outcomes.memory.InMemoryStore` in unit tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from sqlalchemy import Integer, and_, case, cast, delete, func, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from rollout.outcomes import audit, engine, export, log, migrate, partitions, requests, retention
from rollout.outcomes.export import ExportedDay
from rollout.outcomes.audit import AuditEntry, Rollout, StoredPlan
from rollout.outcomes.log import ClassCell, LabelReport, OutcomeCell, PredictionRow, Time
from rollout.outcomes.features import Decoder
from rollout.outcomes.schema import (DROPPED_INDEXES, FEATURES_SERVED, METRICS, label_changes,
                                     labels, metadata, predictions, rollout_units, summary_state)
from rollout.outcomes.sqlexpr import loss_expr, probed
from rollout.outcomes.summaries import EvidenceSums, Summaries
from rollout.stats.guardrails import LabelSums
from rollout.stats.moments import ClusterSums
from rollout.times import from_epoch, to_epoch


RECENT_ROWS = 50_000  # prediction rows the hourly label and AUC diagnostics read: the rollout's latest


def _rollout_rows(rollout_id: int, cutoff: Time | None) -> tuple[Any, Any, Any, list[Any]]:
    """What every labelled query of the store starts from: predictions `p` and labels `l` (aliases), the join
    on a request's current label, and the WHERE terms of the rollout's error-free rows before the cut."""
    p, lab = predictions.alias("p"), labels.alias("l")
    where = [p.c.rollout_id == rollout_id, p.c.error.is_(None)]
    if cutoff is not None:
        where.append(p.c.ts < to_epoch(cutoff))
    return p, lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1), where


class Store(Protocol):
    """What the CD phase (gather, act, rollback) asks of the outcome store."""

    def evidence(self, rollout_id: int, cutoff: Time | None = None, champion: str | None = None) -> EvidenceSums: ...
    def recent_features(self, limit: int = 10_000, since: Time | None = None) -> pd.DataFrame: ...
    def expire(self, before: Time, dry_run: bool = False) -> retention.Expired: ...
    def class_counts(self, rollout_id: int, cutoff: Time | None = None) -> dict[ClassCell, int]: ...
    def first_seen(self, rollout_id: int) -> datetime | None: ...
    def last_seen(self, rollout_id: int) -> datetime | None: ...
    def unit_sums(self, rollout_id: int, metric: str, cutoff: Time | None = None,
                  champion: str | None = None) -> dict[str, ClusterSums]: ...
    def label_sums(self, rollout_id: int, cutoff: Time | None = None) -> dict[str, LabelSums]: ...
    def recent_label_delays(self, limit: int = 10_000) -> LabelSums: ...
    def label_request_pool(self, rollout_id: int) -> tuple[float, pd.DataFrame]: ...
    def save_label_requests(self, rollout_id: int, ts_from: float, ts_to: float, pool_size: int, budget: int,
                            chosen: Sequence[tuple[str, float]]) -> int: ...
    def label_request_details(self, rollout_id: int, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    def requested_rows(self, rollout_id: int) -> pd.DataFrame: ...
    def score_histograms(self, rollout_id: int, cutoff: Time | None = None,
                         buckets: int = 200) -> dict[str, tuple[list[int], list[int]]]: ...
    def outcome_cells(self, rollout_id: int, cutoff: Time | None = None,
                      champion: str | None = None) -> dict[OutcomeCell, int]: ...
    def current_rollout(self) -> Rollout | None: ...
    def rollout(self, rollout_id: int) -> Rollout | None: ...
    def rollouts(self) -> list[Rollout]: ...
    def open_rollout(self, mode: str, versions: Mapping[str, str], weights: Mapping[str, float] | None = None,
                     salt: str | None = None, started_at: Time | None = None) -> int: ...
    def set_weights(self, rollout_id: int, weights: Mapping[str, float]) -> None: ...
    def end_rollout(self, rollout_id: int, ended_at: Time | None = None, reason: str = "") -> None: ...
    def record_decision(self, rollout_id: int | None, decision: str, stats: Mapping[str, Any],
                        alias_moves: Sequence[Any] = (), actor: str = "", ts: Time | None = None) -> int: ...
    def audit_log(self, rollout_id: int | None = None) -> list[AuditEntry]: ...
    def lock(self, name: str, ttl_s: float = 3600.0) -> AbstractContextManager[None]: ...
    def save_plan(self, rollout_id: int | None, decision: str, steps: list[dict[str, Any]],
                  stats: Mapping[str, Any], actor: str, ts: Time) -> int: ...
    def plan_progress(self, plan_id: int, done: int) -> None: ...
    def finish_plan(self, plan_id: int, status: str, alias_moves: list[Any]) -> int | None: ...
    def pending_plans(self) -> list[StoredPlan]: ...
    def reopen_rollout(self, rollout_id: int) -> None: ...


class OutcomeStore:
    """Predictions, labels, routing state, evaluation summaries and the audit log, in one SQL database."""

    def __init__(self, url: str, clock: Callable[[], datetime] | None = None) -> None:
        self.url = url
        self.engine = engine.make_engine(url)
        self.clock = clock or (lambda: datetime.now(tz=UTC))
        self.summaries = Summaries(self.engine)
        self._created = False

    def __repr__(self) -> str:
        return f"OutcomeStore({self.engine.url.render_as_string(hide_password=True)!r})"

    @property
    def is_sqlite(self) -> bool:
        return engine.is_sqlite(self.engine)

    def now(self) -> float:
        return to_epoch(self.clock())

    def create(self, log_indexes: bool = True) -> OutcomeStore:
        """Create tables and indexes if missing (idempotent). Without `log_indexes`, a plain PostgreSQL log's
        missing indexes are not built (`partition` is about to copy it into a partitioned one that has them).
        An unreachable store raises engine.StoreUnreachable, naming the setting to check."""
        engine.check_reachable(self.engine)
        existing = inspect(self.engine)
        had_summaries = existing.has_table(summary_state.name)
        new_units = not existing.has_table(rollout_units.name)
        old_log = existing.has_table(predictions.name) and not any(
            c["name"] == "probabilities" for c in existing.get_columns(predictions.name))
        old_changes = existing.has_table(label_changes.name) and not any(
            c["name"] == "day_from" for c in existing.get_columns(label_changes.name))
        old_labels = existing.has_table(labels.name) and not any(
            c["name"] == "predicted_at" for c in existing.get_columns(labels.name))
        if not self.is_sqlite and not existing.has_table(predictions.name):
            partitions.create_partitioned(self.engine)  # PostgreSQL: a day expires by dropping its partition
        metadata.create_all(self.engine, checkfirst=True)
        if old_log:  # a store from before multiclass: the column
            with self.engine.begin() as conn:
                conn.exec_driver_sql("ALTER TABLE predictions ADD COLUMN probabilities TEXT")
        if old_changes:  # a store from before the changes' days: its pending changes search every day
            with self.engine.begin() as conn:
                for column in ("day_from", "day_to"):
                    conn.exec_driver_sql(f"ALTER TABLE label_changes ADD COLUMN {column} VARCHAR(10)")
        if old_labels:  # a store from before the labels' prediction times: their delays are found by a join
            with self.engine.begin() as conn:
                conn.exec_driver_sql("ALTER TABLE labels ADD COLUMN predicted_at FLOAT")
        if not self.is_sqlite:  # a partitioned log from before pairing: renamed, readers through the view
            partitions.pair_existing(self.engine)
        if had_summaries and new_units:  # a store from before rollout_units: rebuild its summaries, units too
            with self.engine.begin() as conn:
                conn.execute(delete(summary_state))
        if self.is_sqlite:  # a log from before the compact row: copied into it, before anything looks up an id
            migrate.compact(self.engine)
        if not any(ix["name"] == "ux_labels_current" for ix in inspect(self.engine).get_indexes(labels.name)):
            log.dedupe_current_labels(self.engine)  # a store from before the unique index
        self._create_indexes(log=log_indexes or self.is_sqlite or partitions.is_partitioned(self.engine))
        self._drop_unused_indexes()
        if not self.is_sqlite and partitions.is_partitioned(self.engine):
            partitions.ensure_ahead(self.engine)
            partitions.drop_key(self.engine)  # a log partitioned with a key (id, day): 32 B a row back
        self._created = True
        return self

    def _drop_unused_indexes(self) -> None:
        """Indexes no query needs any more (schema.DROPPED_INDEXES): their space back. On PostgreSQL a DROP INDEX takes
        the log's exclusive lock (no CONCURRENTLY for a partitioned index), which waits for every query in flight on
        it while every insert waits behind the drop: each waits at most a second for its lock, and a drop that gets
        none is left for the next process that opens the store."""
        for name in DROPPED_INDEXES:
            try:
                with self.engine.begin() as conn:
                    if not self.is_sqlite:
                        conn.exec_driver_sql("SET LOCAL lock_timeout = '1s'")
                    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
            except OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available: the next open drops it
                    raise

    def _create_indexes(self, log: bool = True) -> None:
        for table in (predictions, labels) if log else (labels,):  # indexes added since a store was first created
            for index in table.indexes:
                if self.is_sqlite or index.unique:
                    index.create(self.engine, checkfirst=True)
                else:  # PostgreSQL: CONCURRENTLY (a partitioned log's day by day), blocking no writer
                    partitions.create_index(self.engine, index)

    def partition(self) -> int:
        """PostgreSQL: convert a prediction log made before partitioning (stop the service first); returns the
        rows moved (rollout.outcomes.partitions)."""
        if not self._created:
            self.create(log_indexes=False)
        if self.is_sqlite:
            raise ValueError("partitions are PostgreSQL's: SQLite deletes in batches and gives the space back")
        if partitions.is_partitioned(self.engine):
            return 0
        return partitions.convert(self.engine, self._create_indexes)

    def _ensure(self) -> None:
        if not self._created:
            self.create()

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------ the log

    def log_predictions(self, rows: Iterable[PredictionRow]) -> int:
        """Write prediction rows (a row without `ts` is logged at the store's clock); returns how many."""
        self._ensure()
        return log.log_predictions(self.engine, rows, self.now())

    def dead_letters(self) -> int:
        """Rows the store refused (kept with their reason in the dead_letters table)."""
        self._ensure()
        return log.dead_letter_count(self.engine)

    def expire(self, before: Time, dry_run: bool = False) -> retention.Expired:
        """Remove raw rows older than `before` that no open rollout needs (rollout.outcomes.retention)."""
        self._ensure()
        return retention.expire(self.engine, to_epoch(before), dry_run=dry_run)

    def export(self, since: str, until: str | None, directory: Path) -> list[ExportedDay]:
        """Daily Parquet files of predictions with their current labels (rollout.outcomes.export)."""
        self._ensure()
        return export.export(self.engine, since, until, directory)

    def vacuum(self) -> None:
        """Compact the file once (SQLite: switch to incremental auto-vacuum; exclusive: stop writers first)."""
        self._ensure()
        retention.vacuum(self.engine)

    def add_labels(self, items: Iterable[Sequence[Any]]) -> LabelReport:
        """Store (request id, label[, ts]) items; the later label of a request wins."""
        self._ensure()
        return log.add_labels(self.engine, items, self.now())

    def bulk_insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                    batch: int = 200_000) -> int:
        self._ensure()
        return log.bulk_insert(self.engine, table, columns, rows, batch)

    def analyze(self) -> None:
        self._ensure()
        log.analyze(self.engine)

    # -------------------------------------------------------------------------- routing and audit

    def open_rollout(self, mode: str, versions: Mapping[str, str], weights: Mapping[str, float] | None = None,
                     salt: str | None = None, started_at: Time | None = None) -> int:
        """Record a new rollout (ending any open one) and return its id."""
        self._ensure()
        start = self.now() if started_at is None else to_epoch(started_at)
        return audit.open_rollout(self.engine, mode, versions, weights or {}, salt or uuid.uuid4().hex, start)

    def current_rollout(self) -> Rollout | None:
        self._ensure()
        return audit.current_rollout(self.engine)

    def rollout(self, rollout_id: int) -> Rollout | None:
        self._ensure()
        found = audit.rollouts(self.engine, rollout_id)
        return found[0] if found else None

    def rollouts(self) -> list[Rollout]:
        """Every rollout, oldest first."""
        self._ensure()
        return audit.rollouts(self.engine)

    def set_weights(self, rollout_id: int, weights: Mapping[str, float]) -> None:
        self._ensure()
        audit.set_weights(self.engine, rollout_id, weights, self.now())

    def end_rollout(self, rollout_id: int, ended_at: Time | None = None, reason: str = "") -> None:
        self._ensure()
        audit.end_rollout(self.engine, rollout_id, self.now() if ended_at is None else to_epoch(ended_at), reason)

    def record_decision(self, rollout_id: int | None, decision: str, stats: Mapping[str, Any],
                        alias_moves: Sequence[Any] = (), actor: str = "", ts: Time | None = None) -> int:
        self._ensure()
        return audit.record_decision(self.engine, rollout_id, decision, stats, list(alias_moves), actor,
                                     self.now() if ts is None else to_epoch(ts))

    def audit_log(self, rollout_id: int | None = None) -> list[AuditEntry]:
        self._ensure()
        return audit.audit_log(self.engine, rollout_id)

    def save_plan(self, rollout_id: int | None, decision: str, steps: list[dict[str, Any]],
                  stats: Mapping[str, Any], actor: str, ts: Time) -> int:
        """Record a multi-step change before its first step; returns its id."""
        self._ensure()
        return audit.save_plan(self.engine, rollout_id, decision, steps, stats, actor, to_epoch(ts))

    def plan_progress(self, plan_id: int, done: int) -> None:
        self._ensure()
        audit.plan_progress(self.engine, plan_id, done)

    def finish_plan(self, plan_id: int, status: str, alias_moves: list[Any]) -> int | None:
        """Mark a pending plan done or reversed and write its audit row at once; None if it was not pending."""
        self._ensure()
        return audit.finish_plan(self.engine, plan_id, status, alias_moves)

    def pending_plans(self) -> list[StoredPlan]:
        self._ensure()
        return audit.pending_plans(self.engine)

    def reopen_rollout(self, rollout_id: int) -> None:
        self._ensure()
        audit.reopen_rollout(self.engine, rollout_id, self.now())

    @contextmanager
    def lock(self, name: str, ttl_s: float = 3600.0) -> Iterator[None]:
        """Hold a named lock (promotion, rollback); raises LockHeld while another process holds it."""
        self._ensure()
        with engine.lock(self.engine, name, ttl_s):
            yield

    # --------------------------------------------------------------------------- what is answered

    def evidence(self, rollout_id: int, cutoff: Time | None = None, champion: str | None = None) -> EvidenceSums:
        """Every sum an evaluation of the rollout needs, at maturity cut `cutoff`, from one snapshot."""
        self._ensure()
        return self.summaries.evidence(rollout_id, None if cutoff is None else to_epoch(cutoff), champion)

    def _floor(self, value: Any) -> Any:
        """floor(value) as an integer in SQL (SQLite's cast truncates, and these values are never negative)."""
        return cast(value, Integer) if self.is_sqlite else cast(func.floor(value), Integer)

    def class_counts(self, rollout_id: int, cutoff: Time | None = None) -> dict[ClassCell, int]:
        """Labelled error-free predictions of the rollout before the maturity cut, counted per (version, segment,
        predicted class, labelled class): a multiclass confusion matrix, for per-class guardrails. One pass over
        the rollout's rows (the summaries keep binary confusion cells only), so it is asked only when a
        multiclass policy has guardrails."""
        self._ensure()
        p, lab, on, where = _rollout_rows(rollout_id, cutoff)
        query = (select(p.c.version, p.c.segment, p.c.prediction, lab.c.label, func.count())
                 .select_from(p.join(lab, on)).where(*where, p.c.prediction.is_not(None))
                 .group_by(p.c.version, p.c.segment, p.c.prediction, lab.c.label))
        with self.engine.connect() as conn:
            return {(str(v), s, float(pr), float(la)): int(n) for v, s, pr, la, n in conn.execute(query)}

    def unit_sums(self, rollout_id: int, metric: str, cutoff: Time | None = None,
                  champion: str | None = None) -> dict[str, ClusterSums]:
        """Per version, its per-row loss (with `champion`: loss minus the champion's on the same request, for the
        other versions) summed per unit (the unit id, or the request id of a request without one), summarised
        for a cluster-robust standard error. Matured, labelled, error-free rows before the cut. One pass over
        the rollout's rows (sums of squares of unit totals do not add up across the hourly summaries) unless the
        kept unit totals answer (rollout.outcomes.units): at a cut, paired as the rollout's evaluation pairs
        (a shadow rollout with its champion, an A/B rollout not at all)."""
        self._ensure()
        rollout = self.rollout(rollout_id)
        if cutoff is not None and rollout is not None and metric in METRICS and (
                champion == rollout.champion if rollout.mode == "shadow" else champion is None):
            kept = self.summaries.units.sums(rollout_id, metric, to_epoch(cutoff), champion)
            if kept is not None:
                return kept
        p, lab, on, where = _rollout_rows(rollout_id, cutoff)
        join = p.join(lab, on)
        label = lab.c.label
        value = loss_expr(metric, p.c.prediction, p.c.score, label, p.c.probabilities)
        if champion is not None:
            h = predictions.alias("h")
            join = join.join(h, and_(h.c.request_id == p.c.request_id, h.c.version == str(champion),
                                     probed(self.is_sqlite, h.c.rollout_id, rollout_id), h.c.error.is_(None)))
            value = value - loss_expr(metric, h.c.prediction, h.c.score, label, h.c.probabilities)
            where.append(p.c.version != str(champion))
        unit = func.coalesce(p.c.unit_id, p.c.request_id)
        inner = (select(p.c.version.label("version"), func.count(value).label("n"), func.sum(value).label("y"))
                 .select_from(join).where(*where).group_by(p.c.version, unit).subquery("u"))
        u = inner.c
        query = (select(u.version, func.count(), func.sum(u.n), func.sum(u.y), func.sum(u.y * u.y),
                        func.sum(u.y * u.n), func.sum(u.n * u.n))
                 .where(u.n > 0).group_by(u.version))
        with self.engine.connect() as conn:
            return {str(r[0]): ClusterSums(int(r[1]), int(r[2]), float(r[3]), float(r[4]), float(r[5]), float(r[6]))
                    for r in conn.execute(query)}

    def outcome_cells(self, rollout_id: int, cutoff: Time | None = None,
                      champion: str | None = None) -> dict[OutcomeCell, int]:
        """Labelled error-free predictions before the cut, counted per (version, segment, day, prediction, label,
        and with `champion` the champion's prediction of the same request for the other versions): enough to
        compute any per-row loss of (label, prediction), your own included, with its paired differences, in
        Python. One pass over the rollout's rows, asked only when the primary metric is your own."""
        self._ensure()
        p, lab, on, where = _rollout_rows(rollout_id, cutoff)
        join = p.join(lab, on)
        theirs: Any = None
        if champion is not None:
            h = predictions.alias("h")
            join = join.outerjoin(h, and_(h.c.request_id == p.c.request_id, h.c.version == str(champion),
                                          probed(self.is_sqlite, h.c.rollout_id, rollout_id), h.c.error.is_(None),
                                          p.c.version != str(champion)))
            theirs = h.c.prediction
        keys = [p.c.version, p.c.segment, p.c.day, p.c.prediction, lab.c.label,
                *([theirs] if theirs is not None else [])]
        query = (select(*keys, func.count()).select_from(join).where(*where, p.c.prediction.is_not(None))
                 .group_by(*keys))
        with self.engine.connect() as conn:
            out: dict[OutcomeCell, int] = {}
            for r in conn.execute(query):
                h_pred = r[5] if theirs is not None else None
                key = (str(r[0]), r[1], str(r[2]), float(r[3]), float(r[4]), None if h_pred is None else float(h_pred))
                out[key] = int(r[-1])
            return out

    def _recent(self, conn: Connection, p: Any, rollout_id: int, cutoff: Time | None,
                rows: int = RECENT_ROWS) -> list[Any]:
        """WHERE terms (on the alias `p`) keeping the rollout's latest `rows` prediction rows before the cut: one
        backward range of the time index finds where they start. What the hourly diagnostics read, so their
        cost stays flat however long the rollout runs (a pass over 1M rows took seconds each). On a paired log the
        table's own rows are counted (a shadow request's pair once), where the view would hide the index seek."""
        q = partitions.log_source(self.engine)
        bounds = [q.c.rollout_id == rollout_id, *([q.c.ts < to_epoch(cutoff)] if cutoff is not None else [])]
        first = conn.execute(select(q.c.day, q.c.ts).where(*bounds).order_by(q.c.ts.desc())  # the time index
                             .offset(rows - 1).limit(1)).first()
        return [] if first is None else [p.c.day >= first[0], p.c.ts >= first[1]]

    def score_histograms(self, rollout_id: int, cutoff: Time | None = None,
                         buckets: int = 200) -> dict[str, tuple[list[int], list[int]]]:
        """Per version, counts of its binary scores in `buckets` equal buckets of [0, 1], for labelled positives
        and for labelled negatives (error-free rows before the cut, the rollout's latest RECENT_ROWS): the online
        ROC AUC of the report, from one grouped query."""
        self._ensure()
        p, lab, on, where = _rollout_rows(rollout_id, cutoff)
        bucket = self._floor(p.c.score * float(buckets))
        out: dict[str, tuple[list[int], list[int]]] = {}
        with self.engine.connect() as conn:
            recent = self._recent(conn, p, rollout_id, cutoff)
            query = (select(p.c.version, lab.c.label, bucket, func.count()).select_from(p.join(lab, on))
                     .where(*where, *recent, p.c.score.is_not(None), p.c.probabilities.is_(None),
                            lab.c.label.in_([0.0, 1.0]))
                     .group_by(p.c.version, lab.c.label, bucket))
            for version, label, b, n in conn.execute(query):
                pos, neg = out.setdefault(str(version), ([0] * buckets, [0] * buckets))
                (pos if label == 1.0 else neg)[min(max(int(b), 0), buckets - 1)] += int(n)
        return out

    def label_sums(self, rollout_id: int, cutoff: Time | None = None) -> dict[str, LabelSums]:
        """Per version, its error-free predictions before the maturity cut (the rollout's latest RECENT_ROWS), how
        many have a current label, and the labels' delays after their prediction in whole hours (label time minus
        prediction time, 0 if earlier): label coverage and delay as they are lately, at a flat cost."""
        self._ensure()
        p, lab, on, where = _rollout_rows(rollout_id, cutoff)
        delay = case((lab.c.id.is_(None), None), (lab.c.ts > p.c.ts, lab.c.ts - p.c.ts), else_=0.0)
        hour = self._floor(delay / 3600.0)  # NULL without a label
        with self.engine.connect() as conn:  # one pass: rows per (version, delay hour), the unlabelled under NULL
            where = where + self._recent(conn, p, rollout_id, cutoff)
            query = (select(p.c.version, hour, func.count()).select_from(p.outerjoin(lab, on)).where(*where)
                     .group_by(p.c.version, hour))
            rows: dict[str, int] = {}
            by_hour: dict[str, list[tuple[int, int]]] = {}
            for version, h, n in conn.execute(query):
                rows[str(version)] = rows.get(str(version), 0) + int(n)
                if h is not None:
                    by_hour.setdefault(str(version), []).append((int(h), int(n)))
        return {v: LabelSums(m, sum(n for _, n in by_hour.get(v, [])), tuple(sorted(by_hour.get(v, []))))
                for v, m in rows.items()}

    # --------------------------------------------------------------- label requests (rollout.outcomes.requests)

    def label_request_pool(self, rollout_id: int) -> tuple[float, pd.DataFrame]:
        """Where the rollout's last label-request batch ended, and its error-free rows logged since."""
        self._ensure()
        return requests.pool(self.engine, rollout_id)

    def save_label_requests(self, rollout_id: int, ts_from: float, ts_to: float, pool_size: int, budget: int,
                            chosen: Sequence[tuple[str, float]]) -> int:
        """Record a batch of label requests (request id, inclusion probability); returns the batch's id."""
        self._ensure()
        return requests.save(self.engine, rollout_id, self.now(), ts_from, ts_to, pool_size, budget, chosen)

    def label_request_details(self, rollout_id: int, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        self._ensure()
        return requests.details(self.engine, rollout_id, request_ids)

    def requested_rows(self, rollout_id: int) -> pd.DataFrame:
        """The rollout's requested rows with their predictions, probabilities and current labels."""
        self._ensure()
        return requests.requested(self.engine, rollout_id)

    def recent_label_delays(self, limit: int = 10_000) -> LabelSums:
        """The delays of the latest `limit` current labels received, of any rollout or none, each after its
        request's first prediction, in whole hours. Labels of predictions made before a rollout opened have
        had their whole delay to arrive, so this sees a slow class of outcomes (defaults that take months)
        that a young rollout's own labels cannot show yet."""
        self._ensure()
        lab, p = labels.alias("l"), predictions.alias("p")
        latest = (select(lab.c.request_id, lab.c.ts, lab.c.predicted_at).where(lab.c.current == 1, lab.c.matched == 1)
                  .order_by(lab.c.ts.desc()).limit(limit).subquery("latest"))
        # the label's own record of its prediction's time; for labels stored before it, the prediction log's (a label
        # whose predictions are gone by retention and that never recorded their time is left out)
        recorded = select(latest.c.ts, latest.c.predicted_at).where(latest.c.predicted_at.is_not(None))
        logged = (select(latest.c.ts, func.min(p.c.ts)).select_from(latest.join(p, p.c.request_id == latest.c.request_id))
                  .where(latest.c.predicted_at.is_(None)).group_by(latest.c.request_id, latest.c.ts))
        by_hour: dict[int, int] = {}
        with self.engine.connect() as conn:
            for label_ts, predicted in [*conn.execute(recorded), *conn.execute(logged)]:
                hour = int(max(float(label_ts) - float(predicted), 0.0) // 3600.0)
                by_hour[hour] = by_hour.get(hour, 0) + 1
        n = sum(by_hour.values())
        return LabelSums(n, n, tuple(sorted(by_hour.items())))

    def recent_features(self, limit: int = 10_000, since: Time | None = None) -> pd.DataFrame:
        """The latest served inputs (newest first), for production drift checks."""
        self._ensure()
        p = partitions.log_source(self.engine)  # served rows: a paired log's table itself
        query = select(p.c.features).where(FEATURES_SERVED)  # ix_predictions_features, newest first
        if since is not None:
            query = query.where(p.c.ts >= to_epoch(since))
        query = query.order_by(p.c.ts.desc()).limit(int(limit))
        with self.engine.connect() as conn:
            decode = Decoder(conn)
            return pd.DataFrame.from_records([decode(r[0]) for r in conn.execute(query)])

    def production_rows(self, days: float, limit: int, challengers: bool = False) -> pd.DataFrame:
        """What production served and got labelled: the served, error-free predictions with logged features of the
        last `days` days before the latest such one, newest first, at most `limit`; one row per request (the row
        that answered it: the champion's, or with `challengers` also an A/B challenger's). Columns: the logged
        features, then `_label`, `_ts` (epoch seconds), `_unit`, `_role`."""
        self._ensure()
        p, lab = partitions.log_source(self.engine).alias("p"), labels.alias("l")  # served rows: the table itself
        where: list[Any] = [FEATURES_SERVED, p.c.error.is_(None)]  # ix_predictions_features
        if not challengers:
            where.append(p.c.role == "champion")
        joined = p.join(lab, and_(lab.c.request_id == p.c.request_id, lab.c.current == 1))
        with self.engine.connect() as conn:
            latest = conn.execute(select(func.max(p.c.ts)).select_from(joined).where(*where)).scalar_one()
            if latest is None:
                return pd.DataFrame(columns=["_label", "_ts", "_unit", "_role"])
            query = (select(p.c.features, lab.c.label, p.c.ts, p.c.unit_id, p.c.role).select_from(joined)
                     .where(*where, p.c.ts >= float(latest) - days * 86400.0)
                     .order_by(p.c.ts.desc()).limit(int(limit)))
            rows = conn.execute(query).all()
            decode = Decoder(conn)
            frame = pd.DataFrame.from_records([decode(r[0]) for r in rows])
        frame["_label"], frame["_ts"] = [r[1] for r in rows], [r[2] for r in rows]
        frame["_unit"], frame["_role"] = [r[3] for r in rows], [r[4] for r in rows]
        return frame

    def daily_metric(self, metric: str) -> list[tuple[str, str, int, float]]:
        """(day, version, labelled rows, mean per-request loss) of every rollout's summaries, for the monitoring
        plot: the model's history as far as rollouts observed it (kept for good, whatever retention removes).
        Empty for a metric the summaries do not keep (your own loss)."""
        self._ensure()
        from rollout.outcomes.schema import METRICS, daily_aggregates as da

        if metric not in METRICS:
            return []
        n, total = da.c[f"{metric}_n"], da.c[f"{metric}_sum"]
        query = (select(da.c.day, da.c.version, func.sum(n), func.sum(total)).group_by(da.c.day, da.c.version)
                 .having(func.sum(n) > 0).order_by(da.c.day, da.c.version))
        with self.engine.connect() as conn:
            return [(str(d), str(v), int(k), float(t) / int(k)) for d, v, k, t in conn.execute(query)]

    def logged_requests(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these request ids have a logged prediction (a batch rerun logs only the others)."""
        return {request_id for request_id, _ in self.logged_versions(request_ids)}

    def logged_versions(self, request_ids: Sequence[str]) -> set[tuple[str, str]]:
        """(request id, version) of every logged prediction of these requests (the rows a shadow child that died
        after its write committed had logged already)."""
        self._ensure()
        found: set[tuple[str, str]] = set()
        p = predictions.c
        with self.engine.connect() as conn:
            for chunk in engine.chunks(sorted(set(request_ids)), 500):
                found.update((str(r), str(v)) for r, v in conn.execute(
                    select(p.request_id, p.version).where(p.request_id.in_(chunk)).distinct()))
        return found

    def any_request_with_prefix(self, prefix: str) -> bool:
        """Whether any logged request id starts with `prefix`: a LIKE, which no collation can reorder (a range
        of the index could miss ids under a locale's collation on PostgreSQL); asked once per batch run."""
        self._ensure()
        c = predictions.c.request_id
        with self.engine.connect() as conn:
            return conn.execute(select(c).where(c.startswith(prefix, autoescape=True)).limit(1)).first() is not None

    def unmatched_labels(self) -> int:
        """Current labels whose request id still has no stored prediction."""
        self._ensure()
        known = select(predictions.c.id).where(predictions.c.request_id == labels.c.request_id).exists()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(labels)
                                    .where(labels.c.current == 1, ~known)).scalar_one())

    def first_seen(self, rollout_id: int) -> datetime | None:
        return self._seen(rollout_id, func.min)

    def last_seen(self, rollout_id: int) -> datetime | None:
        return self._seen(rollout_id, func.max)

    def _seen(self, rollout_id: int, agg: Any) -> datetime | None:
        """The rollout's first (min) or last (max) prediction time, by seeks of the time index (rollout_id, ts)
        rather than a pass over the rollout's rows."""
        self._ensure()
        p = partitions.log_source(self.engine)  # a pair shares its time: the table's own index seeks
        with self.engine.connect() as conn:
            value = conn.execute(select(agg(p.c.ts)).where(p.c.rollout_id == rollout_id)).scalar()
        return None if value is None else from_epoch(value)

    def count_predictions(self, rollout_id: int | None = None) -> int:
        self._ensure()
        query = select(func.count()).select_from(predictions)
        if rollout_id is not None:
            query = query.where(predictions.c.rollout_id == rollout_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def served_version_at(self, when: Time) -> str | None:
        """Which version answered callers at time `when` (the latest served prediction at or before it)."""
        self._ensure()
        p = partitions.log_source(self.engine)  # served rows: a paired log's table itself
        query = (select(p.c.version).where(p.c.served == 1, p.c.error.is_(None), p.c.ts <= to_epoch(when))
                 .order_by(p.c.ts.desc()).limit(1))
        with self.engine.connect() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else str(value)
