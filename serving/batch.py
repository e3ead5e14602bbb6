"""Batch rollouts: a table of rows (a CSV or Parquet file, its http(s) URL, a SQL query) scored by the champion
and the open rollout's challengers, every prediction logged to the outcome store exactly as the HTTP service
logs it, so the same online evaluation, labels and promotion apply to a model that scores in batch.

- The routing is the service's: the open rollout's mode, salt and weights with the registry's aliases
  (`serving.routing.build_view`). Shadow: the champion answers every row (the output), each challenger
  scores every row too (logged, not in the output). A/B: the same sticky unit assignment as the service
  (the unit column's value, or the row's request id). Bandit: a draw per row (seeded by the batch id).
- Request ids come from the row, not the clock: `<batch id>:<key>` (the key column's value, or the row's
  position in the input), hashed when longer than the store's 64 characters. A rerun of the same batch
  (after a crash, or by mistake) logs only what is not logged yet: a chunk's rows are written in one
  transaction, so a request is logged whole or not at all. A first run does not look each request up (a
  tenth of its time): it knows it is one when neither its first chunk's requests nor any request id under
  its prefix are logged (chunks are logged in input order; keys are expected to be unique in the input).
- Bounded memory: the input is read `chunk_rows` at a time (a query through a server-side cursor) and the
  output written as it goes (to a temporary file or staging table, renamed at the end, so a reader never
  sees half an output).
- The champion scores in this process; each challenger in a child process under a deadline
  (`serving.shadow_timeout_s` per `shadow_max_batch_size` rows, at least 5 s), as in the service (unless
  `serving.challenger_isolation` / `shadow_isolation` say thread): a challenger that raises, crashes or
  hangs costs its own rows (logged as its errors), never the champion's answers. The children get a
  chunk's rows first and score while this process scores the champion; unlike the service's they are not
  niced, since here the answers wait for them.
- A chunk's inputs are checked against the champion's contract by the column (`models.check_frame`): the
  same problems the service names, without a Python step per value where the column's dtype vouches.
- What is logged of the inputs follows `serving.log_features` and `data.pii_columns`, as in the service.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from rollout.config import CLASSIFICATION_TASKS, ConfigError, Policy
from rollout.data import records_of
from rollout.models import INTEGER, NUMBER, LoadedModel, Outputs, allowed_columns, check_frame
from rollout.outcomes import OutcomeStore, PredictionRow
from rollout.outcomes.redaction import Redaction
from rollout.roles import Role
from rollout.tables import SqlTable, database_url, destination, safe_url
from serving.isolation import ChildScorer
from serving.loading import ModelSource
from serving.routing import Arm, RoutingView, build_view

REQUEST_ID_CHARS = 64
DOWNLOAD_TIMEOUT_S = 60.0  # an http(s) input that stalls this long fails (the whole download has no deadline)
# Rows read, scored and logged at a time. 10,000 keeps the scoring process under 500 MB (imports ~240 MB,
# MLflow's model loading ~100 MB) at the same speed as 20,000 (benchmarks/batch.py); 5,000 is ~5% slower.
CHUNK_ROWS = 10_000


@dataclass
class BatchSummary:
    """What one batch run did."""

    batch_id: str
    mode: str
    rows: int = 0
    logged: int = 0  # requests logged by this run
    already_logged: int = 0  # requests a previous run of the same batch had logged
    refused: int = 0  # rows the champion's input contract refused (an `error` in the output, nothing logged)
    answered_by: dict[str, int] = field(default_factory=dict)  # version -> rows of the output
    challenger_errors: dict[str, int] = field(default_factory=dict)
    output: Sink | None = None
    seconds: float = 0.0

    def sentence(self) -> str:
        versions = ", ".join(f"v{v}: {n:,}" for v, n in sorted(self.answered_by.items()))
        resumed = f"; {self.already_logged:,} were logged by an earlier run of batch {self.batch_id!r}" \
            if self.already_logged else ""
        refused = f"; {self.refused:,} rows refused by the input contract (see `error`)" if self.refused else ""
        return (f"Scored {self.rows:,} rows in {self.mode} mode in {self.seconds:.1f} s (answers: {versions}); logged "
                f"{self.logged:,} requests{resumed}{refused}. Output: {self.output}")


def request_id(batch_id: str, key: Any) -> str:
    """The stable request id of a row: `<batch id>:<key>`, or its hash when that would not fit the store."""
    text = f"{batch_id}:{key}"
    return text if len(text) <= REQUEST_ID_CHARS else "b-" + hashlib.sha256(text.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class SqlQuery:
    """Rows to score: what a SQL query returns from a database, read `chunk_rows` at a time through a
    server-side cursor (PostgreSQL) or a stepped statement (SQLite)."""

    url: str
    query: str

    def __str__(self) -> str:
        return f"query on {safe_url(self.url)}"


Source = Path | str | SqlQuery  # a file, an http(s) URL of one, or a query
Sink = Path | SqlTable
def source_of(input: str | None, query: str | None, database: str | None) -> Source:  # noqa: A002
    """What `--input` / `--query` / `--database` name, checked: exactly one of a file (or http(s) URL) and a
    query, and a query needs its database."""
    if (input is None) == (query is None):
        raise ConfigError("--input or --query: name one source of rows (a .csv/.parquet file or URL, or a SQL query)")
    if query is not None:
        if not database:
            raise ConfigError("--database: a --query needs the database URL it runs on (e.g. postgresql://host/db)")
        return SqlQuery(database_url(database), query)
    assert input is not None
    if input.lower().startswith(("http://", "https://")):
        return input
    path = Path(input)
    if not path.is_file():  # said before the models load (seconds), not after
        raise ConfigError(f"--input {input}: no such file")
    return path


def sink_of(output: str | None, table: str | None, database: str | None) -> Sink:
    """What `--output` / `--output-table` / `--database` name, checked as `source_of` does."""
    return destination(output, table, database, "answers")


def read_chunks(source: Path | SqlQuery, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The input, `chunk_rows` rows at a time (CSV, Parquet or a query's rows)."""
    if isinstance(source, SqlQuery):
        yield from _query_chunks(source, chunk_rows)
        return
    suffix = source.suffix.lower()
    if suffix == ".csv":
        yield from pd.read_csv(source, chunksize=chunk_rows)
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(source).iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    else:
        raise ConfigError(f"--input {source}: expected a .csv or .parquet file")


def _query_chunks(source: SqlQuery, chunk_rows: int) -> Iterator[pd.DataFrame]:
    engine = create_engine(source.url)
    try:
        with engine.connect() as conn:
            streamed = conn.execution_options(stream_results=True, max_row_buffer=chunk_rows)
            try:
                chunks = pd.read_sql_query(text(source.query), streamed, chunksize=chunk_rows)
            except DBAPIError as exc:
                raise ConfigError(f"--query failed on {safe_url(source.url)}: {str(exc.orig).strip()}") from None
            yield from chunks
    finally:
        engine.dispose()


@contextmanager
def _local(source: Source) -> Iterator[Path | SqlQuery]:
    """The source as something `read_chunks` reads: an http(s) URL is downloaded to a temporary file first (a
    Parquet file is read by seeking; neither format is read twice)."""
    if not isinstance(source, str):
        yield source
        return
    name = Path(urlparse(source).path).name or "input"
    with tempfile.TemporaryDirectory(prefix="rollout-score-") as tmp:
        path = Path(tmp) / name
        try:
            with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response, path.open("wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--input {source}: could not download it: {exc}") from None
        yield path


def _system_arrow_pool() -> Callable[[], None]:
    """Have Arrow allocate with malloc while a file is scored (models loaded, chunks read and written), and
    return what restores its pool. Its default allocator (mimalloc) keeps the pages it was given: ~30-45 MB more
    at the scoring process's peak (benchmarks/batch.py)."""
    try:
        import pyarrow as pa
    except ImportError:  # a CSV-only setup
        return lambda: None
    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    return lambda: pa.set_memory_pool(before)


class _Output:
    """The answers, written chunk by chunk to a temporary file (or staging table) and renamed when complete."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.table: SqlTable | None = sink if isinstance(sink, SqlTable) else None
        self._engine: Any = None
        self._first = True
        self._writer: Any = None
        if self.table is not None:
            self.kind = "table"
            self._engine = create_engine(self.table.url)
            # one staging name per table: a run killed half-way leaves it, and the next run replaces it
            self.partial_table = f"{self.table.name}__partial"
            return
        assert not isinstance(sink, SqlTable)
        path = Path(sink)
        self.path = path
        self.partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.kind = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
        if self.kind == "csv" and path.suffix.lower() != ".csv":
            raise ConfigError(f"--output {path}: expected a .csv or .parquet file")

    def write(self, frame: pd.DataFrame) -> None:
        if self.kind == "table":
            frame.to_sql(self.partial_table, self._engine, if_exists="replace" if self._first else "append",
                         index=False)
        elif self.kind == "csv":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(self.partial, mode="w" if self._first else "a", header=self._first, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.partial, table.schema)
            self._writer.write_table(table.cast(self._writer.schema))
        self._first = False

    def close(self) -> None:
        if self.table is not None:
            if not self._first:  # the old table is replaced in one transaction: readers see one or the other
                quote = self._engine.dialect.identifier_preparer.quote
                with self._engine.begin() as conn:
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {quote(self.table.name)}")
                    conn.exec_driver_sql(f"ALTER TABLE {quote(self.partial_table)} RENAME TO "
                                         f"{quote(self.table.name)}")
            self._engine.dispose()
            return
        if self._writer is not None:
            self._writer.close()
        if self._first and self.kind == "csv":  # an empty input: an empty output
            self.partial.write_text("")
        if self.partial.exists():
            os.replace(self.partial, self.path)

    def discard(self) -> None:
        if self.table is not None:
            quote = self._engine.dialect.identifier_preparer.quote
            with self._engine.begin() as conn:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {quote(self.partial_table)}")
            self._engine.dispose()
            return
        if self._writer is not None:
            self._writer.close()
        self.partial.unlink(missing_ok=True)


def _load_view(policy: Policy, registry: ModelSource, store: OutcomeStore) -> tuple[RoutingView,
                                                                                      dict[str, LoadedModel]]:
    aliases = registry.aliases()
    rollout = store.current_rollout()
    wanted = {aliases[Role.CHAMPION]} if Role.CHAMPION in aliases else set()
    if rollout is not None:
        wanted |= {aliases.get(role, pinned) for role, pinned in rollout.versions.items()}
    models = {v: LoadedModel(registry.load(v), v) for v in sorted(wanted)}
    view = build_view(rollout, aliases, set(models), policy.rollout.exposure)
    if view is None:
        raise ConfigError("no @champion in the registry: run `rollout ci` first")
    return view, models


def score_file(policy: Policy, source: Source, sink: Sink, *, batch_id: str | None = None,
               key_column: str | None = None, chunk_rows: int = CHUNK_ROWS, registry: ModelSource | None = None,
               store: OutcomeStore | None = None, ts: float | None = None,
               on_chunk: Callable[[BatchSummary], None] | None = None) -> BatchSummary:
    """Score the rows of `source` (a file, an http(s) URL of one, a `SqlQuery`) with the champion and the open
    rollout's challengers; write the answers to `sink` (a file or a `SqlTable`: the input's columns, then
    request_id, prediction, score, version, role, error) and log every prediction. `ts` (epoch seconds) is the
    logged time, default now."""
    if isinstance(source, SqlQuery):
        if batch_id is None or key_column is None:
            raise ConfigError("--batch-id and --key-column: a query's rows need a batch id and the column that "
                              "identifies a row (their order may differ between runs; a rerun must find its rows)")
        batch = batch_id
    else:
        batch = batch_id or Path(urlparse(source).path if isinstance(source, str) else source).stem
    restore = _system_arrow_pool()
    try:
        with _local(source) as local:
            return _score_file(policy, local, sink, batch, key_column, chunk_rows, registry, store, ts, on_chunk)
    finally:
        restore()


def _score_file(policy: Policy, source: Path | SqlQuery, sink: Sink, batch: str, key_column: str | None,
                chunk_rows: int, registry: ModelSource | None, store: OutcomeStore | None, ts: float | None,
                on_chunk: Callable[[BatchSummary], None] | None) -> BatchSummary:
    if registry is None:
        from rollout.registry import MlflowRegistry

        registry = MlflowRegistry.for_policy(policy)
    store = store or OutcomeStore(policy.outcome_url)
    started = time.perf_counter()
    view, models = _load_view(policy, registry, store)
    summary = BatchSummary(batch, view.mode)
    cfg = policy.serving
    isolated = [a for a in view.arms[1:] if cfg.challenger_isolation == "process"]
    isolated += [a for a in view.shadows if cfg.shadow_isolation == "process"]
    # not niced as the service's are: here the answers wait for the children, nobody else's requests do
    children = {a.version: ChildScorer(models[a.version], nice=0) for a in isolated}
    scorer = _Scorer(policy, view, models, children)
    output = _Output(sink)
    resumed: bool | None = None  # whether this batch was logged before: known after the first chunk
    try:
        offset = 0
        for chunk in read_chunks(source, chunk_rows):
            if key_column is not None and key_column not in chunk.columns:
                raise ConfigError(f"--key-column {key_column!r} is not a column of {source}")
            keys = chunk[key_column].astype(str).tolist() if key_column else list(range(offset, offset + len(chunk)))
            offset += len(chunk)
            out, rows = scorer.chunk(chunk, [request_id(batch, k) for k in keys], ts or store.now(), summary)
            ids = [r.request_id for r in rows]
            if resumed is None:
                # A rerun of this batch (after a crash) finds its first chunk's rows logged, or rows under its
                # prefix: each chunk is then checked request by request. A first run writes without asking:
                # a run logs its chunks in input order, so a batch with none of its first rows logged has none.
                known = store.logged_requests(ids)
                resumed = bool(known) or store.any_request_with_prefix(f"{batch}:")
            else:
                known = store.logged_requests(ids) if resumed else set()
            fresh = [r for r in rows if r.request_id not in known]
            store.log_predictions(fresh)
            summary.logged += len({r.request_id for r in fresh})
            summary.already_logged += len({r.request_id for r in rows if r.request_id in known})
            output.write(out)
            summary.rows += len(chunk)
            if on_chunk is not None:
                on_chunk(summary)
        output.close()
    except BaseException:
        output.discard()
        raise
    finally:
        for child in children.values():
            child.close()
    summary.output = sink
    summary.seconds = time.perf_counter() - started
    return summary


class _Scorer:
    """Scores a chunk on every arm and shadow of a routing view, as the service's predict path does."""

    def __init__(self, policy: Policy, view: RoutingView, models: dict[str, LoadedModel],
                 children: dict[str, ChildScorer]) -> None:
        self.policy = policy
        self.view = view
        self.models = models
        self.children = children
        self.redaction = Redaction.for_policy(policy)
        self.rng = random.Random(view.salt)
        self.classification = policy.data.task in CLASSIFICATION_TASKS
        champion = models[view.champion.version]
        self.champion = champion
        self.allowed = allowed_columns(models.values())
        cfg = policy.serving
        self.per_rows_s = cfg.shadow_timeout_s / max(cfg.shadow_max_batch_size, 1)

    def chunk(self, chunk: pd.DataFrame, rids: list[str], ts: float,
              summary: BatchSummary) -> tuple[pd.DataFrame, list[PredictionRow]]:
        data = self.policy.data
        names = list(self.allowed) if self.allowed is not None else [c for c in chunk.columns]
        missing = [c.name for c in self.champion.columns or () if c.required and c.name not in chunk.columns]
        if missing:
            raise ConfigError(f"the input lacks the champion's required columns {missing}")
        inputs = self._typed(chunk[[c for c in chunk.columns if c in set(names)]])
        records = records_of(inputs)
        units: list[str | None] = ([None if pd.isna(u) else str(u) for u in chunk[data.unit_column]]
                                   if data.unit_column and data.unit_column in chunk.columns else [None] * len(chunk))
        units = [self.redaction.unit(u) for u in units]
        segments = (chunk[data.segment_column].tolist() if data.segment_column and data.segment_column in chunk.columns
                    else [None] * len(chunk))
        refused: dict[int, str] = {}
        for p in check_frame(inputs, self.champion.columns):  # every row's problems, by the column
            refused.setdefault(int(p["row"]), f"{p['field']}: {p['error']}")
        summary.refused += len(refused)
        ok = [i for i in range(len(records)) if i not in refused]
        groups: dict[str, tuple[Arm, list[int]]] = {}
        for i in ok:
            arm = self.view.choose(units[i], rids[i], self.rng)
            groups.setdefault(arm.version, (arm, []))[1].append(i)
        answers: dict[int, tuple[Arm, Outputs, int, float]] = {}
        rows: list[PredictionRow] = []
        fallback: list[int] = []
        # Children get their rows first (shadows: every scorable row), so they score while this process does.
        shadows = {arm.version: self._begin(arm.version, [records[i] for i in ok]) for arm in self.view.shadows}
        arms = {version: self._begin(version, [records[i] for i in idx]) for version, (_, idx) in groups.items()}
        for version, (arm, idx) in groups.items():
            outputs, latency = arms[version]()
            for j, i in enumerate(idx):
                if outputs.errors[j] is None:
                    answers[i] = (arm, outputs, j, latency)
                elif arm.role == Role.CHAMPION:
                    refused[i] = f"champion: {outputs.errors[j]}"
                else:  # the challenger's error is logged; the champion answers the row
                    rows.append(self._row(rids[i], arm, ts, units[i], segments[i], None, None, 0, latency,
                                          outputs.errors[j], served=False))
                    summary.challenger_errors[version] = summary.challenger_errors.get(version, 0) + 1
                    fallback.append(i)
        if fallback:
            champion = Arm(Role.CHAMPION, self.view.champion.version, 0.0)  # propensity 0, as the service's fallback
            outputs, latency = self._begin(champion.version, [records[i] for i in fallback])()
            for j, i in enumerate(fallback):
                if outputs.errors[j] is None:
                    answers[i] = (champion, outputs, j, latency)
                else:
                    refused[i] = f"champion: {outputs.errors[j]}"
        for i, (arm, outputs, j, latency) in answers.items():
            kept = self.redaction.features(records[i], rids[i])
            rows.append(self._row(rids[i], arm, ts, units[i], segments[i], outputs, kept, j, latency, None))
        for arm in self.view.shadows:  # every scorable row, off the answers
            outputs, latency = shadows[arm.version]()
            for j, i in enumerate(ok):
                error = outputs.errors[j]
                rows.append(self._row(rids[i], arm, ts, units[i], segments[i], None if error else outputs, None, j,
                                      latency, error, served=False))
                if error is not None:
                    summary.challenger_errors[arm.version] = summary.challenger_errors.get(arm.version, 0) + 1
        return self._output(chunk, rids, answers, refused, summary), rows

    def _typed(self, inputs: pd.DataFrame) -> pd.DataFrame:
        """Numeric columns as numbers: a CSV column with one bad cell is read as text throughout; its good
        cells become numbers again and only the bad one stays text, for the contract to refuse (its row)."""
        numeric = {c.name for c in self.champion.columns or () if c.kind in (NUMBER, INTEGER)}
        out = inputs
        for name in numeric & set(inputs.columns):
            column = inputs[name]
            if column.dtype.kind in "fiub":
                continue
            numbers = pd.to_numeric(column, errors="coerce")
            if out is inputs:
                out = inputs.copy()
            out[name] = numbers.astype(object).where(numbers.notna() | column.isna(), column)
        return out

    def _begin(self, version: str, records: list[dict[str, Any]]) -> Callable[[], tuple[Outputs, float]]:
        """Start scoring `records`: a version with a child gets them now, so it scores while this process does
        other work; the returned call waits for its outputs (the deadline counts from now). A version scored in
        this process scores when the call is made."""
        if not records:
            return lambda: (Outputs([], None, []), 0.0)
        child = self.children.get(version)
        if child is None:
            def here() -> tuple[Outputs, float]:
                started = time.perf_counter()
                out = self.models[version].score_each(records)
                return out, (time.perf_counter() - started) * 1000.0 / len(records)
            return here
        deadline = max(5.0, self.per_rows_s * len(records))
        try:
            child.ready.result(timeout=120)
            future = child.submit(records)
        except FutureTimeout:
            child.restart()
            outcome = self._failed(child, records, None, f"timeout: no answer within {deadline:g} s")
            return lambda: outcome
        except Exception as exc:  # noqa: BLE001 - a child that never started costs its own rows only
            outcome = self._failed(child, records, exc)
            return lambda: outcome
        submitted = time.perf_counter()

        def wait() -> tuple[Outputs, float]:
            try:
                left = max(deadline - (time.perf_counter() - submitted), 0.0)
                preds, scores, errors, _, latency_ms = future.result(timeout=left)
                return Outputs(preds, scores, errors), latency_ms / len(records)
            except FutureTimeout:
                child.restart()
                return self._failed(child, records, None, f"timeout: no answer within {deadline:g} s")
            except Exception as exc:  # noqa: BLE001 - a crashed child costs its own rows only
                return self._failed(child, records, exc)
        return wait

    @staticmethod
    def _failed(child: ChildScorer, records: list[dict[str, Any]], exc: BaseException | None,
                error: str | None = None) -> tuple[Outputs, float]:
        if exc is not None:
            child.revive()
            error = f"{type(exc).__name__}: {exc}"[:500]
        return Outputs([None] * len(records), None, [error] * len(records)), 0.0

    def _row(self, rid: str, arm: Arm, ts: float, unit: str | None, segment: Any, outputs: Outputs | None,
             features: Any, j: int, latency: float, error: str | None, served: bool = True) -> PredictionRow:
        return PredictionRow(
            # a shadow's row as the service logs it (propensity 1: it scored every request), which the paired
            # PostgreSQL log stores in its champion's row when they are logged together
            rid, arm.version, arm.role, ts, unit, self.view.rollout_id, served, arm.weight if served else 1.0,
            None if outputs is None else outputs.predictions[j],
            None if outputs is None or outputs.scores is None else outputs.scores[j],
            latency, error, segment, features if served else None)

    def _output(self, chunk: pd.DataFrame, rids: list[str], answers: dict[int, tuple[Arm, Outputs, int, float]],
                refused: dict[int, str], summary: BatchSummary) -> pd.DataFrame:
        n = len(chunk)
        prediction: list[Any] = [None] * n
        score: list[Any] = [None] * n
        probabilities: list[Any] = [None] * n
        version: list[Any] = [None] * n
        role: list[Any] = [None] * n
        for i, (arm, outputs, j, _) in answers.items():
            p = outputs.predictions[j]
            prediction[i] = int(p) if self.classification and p is not None and float(p).is_integer() else p
            s = outputs.scores[j] if outputs.scores is not None else None
            if isinstance(s, Sequence):
                probabilities[i], s = list(s), max(s)
            score[i], version[i], role[i] = s, arm.version, arm.role
            summary.answered_by[arm.version] = summary.answered_by.get(arm.version, 0) + 1
        out = chunk.reset_index(drop=True).copy()
        out["request_id"], out["prediction"], out["score"] = rids, prediction, score
        if any(p is not None for p in probabilities):
            out["probabilities"] = [None if p is None else ",".join(f"{x:.6g}" for x in p) for p in probabilities]
        out["version"], out["role"] = version, role
        out["error"] = [refused.get(i) for i in range(n)]
        return out
