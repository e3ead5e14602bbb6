"""The `rollout` command: run the flows, serve, simulate traffic, inspect and roll back."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rollout.config import ConfigError, Policy, load_policy

app = typer.Typer(help="Safe, boring ML model rollouts as Prefect workflows.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()

CONFIG = typer.Option("rollout.yaml", "--config", "-c", help="Policy file.")


@app.callback()
def _setup() -> None:
    """Quiet defaults for the embedded (ephemeral) Prefect server the commands may start."""
    import os

    # Its telemetry call fails with an ERROR line on machines without internet access.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _start_prefect() -> None:
    """Before a command imports its flow: Prefect's temporary server starts meanwhile (`flows.runners`), and the
    process ends without tearing its modules down (`_quick_exit`)."""
    from flows.runners import start_temporary_server

    try:
        start_temporary_server()
    except RuntimeError as exc:  # ROLLOUT_PREFECT_IDLE_SECONDS that is not a number
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    _exit["quick"] = 1


def _policy(config: str) -> Policy:
    try:
        return load_policy(config)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _time_option(option: str, value: str, alternatives: str = "") -> datetime:
    """An ISO 8601 time given on the command line, or exit 2 naming the option."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        console.print(f"[red]{option} {value!r}: expected an ISO 8601 time (2026-03-01T12:00){alternatives}[/red]")
        raise typer.Exit(2) from None


def gate_table(results: list[Any]) -> Table:
    table = Table(title="CI gates")
    table.add_column("gate")
    table.add_column("verdict")
    table.add_column("reason", overflow="fold")
    for r in results:
        shown = {"PASS": "[green]pass[/green]", "SKIPPED": "[yellow]skipped[/yellow]", "FAIL": "[red]FAIL[/red]",
                 "INCONCLUSIVE": "[red]INCONCLUSIVE[/red]"}
        table.add_row(r.gate, shown[getattr(r, "headline", "PASS" if r.passed else "FAIL")], r.reason)
    return table


@app.command("check-config")
def check_config(
    config: str = CONFIG,
    data: bool = typer.Option(False, "--data", help="Also load the data and check the policy against it: every "
                              "problem at once."),
) -> None:
    """Validate a policy file and print it with every default filled in; with --data, check it against its data."""
    policy = _policy(config)
    if not data:
        console.print_json(json.dumps(policy.model_dump(mode="json")))
        return
    from rollout.checks import ERROR, check_data
    from rollout.data import load_dataset

    try:
        frame = load_dataset(policy)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]data.source: {exc}[/red]" if not str(exc).startswith("data.") else f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    problems = check_data(policy, frame)
    for problem in problems:
        colour = {ERROR: "red", "warning": "yellow"}.get(problem.severity, "white")
        console.print(f"[{colour}]{problem.severity}[/{colour}] {problem}", soft_wrap=True, highlight=False)
    errors = sum(p.severity == ERROR for p in problems) + _check_suite(policy, frame)
    if errors:
        console.print(f"[red]{errors} error(s): the policy does not fit its data ({len(frame)} rows)[/red]")
        raise typer.Exit(2)
    console.print(f"[green]the policy fits its data[/green] ({len(frame)} rows, {len(frame.columns)} columns"
                  + (f"; {len(problems)} warning(s)" if problems else "") + ")")


def _check_suite(policy: Policy, frame: Any) -> int:
    """The data validation step of `rollout ci` on the data: the committed Great Expectations suite run on it, each
    failed expectation printed as an error (how many). No suite yet is said, not counted: `rollout make-suite`."""
    from rollout.ci.validation import MissingSuite, validate

    path = policy.path(policy.ci.expectations_suite)
    try:
        report = validate(frame, path)
    except MissingSuite:
        console.print(f"ci.expectations_suite: no suite at {path} yet (`rollout make-suite` writes a starter one; "
                      "`rollout ci` needs it)", soft_wrap=True, highlight=False)
        return 0
    except ValueError as exc:
        console.print(f"[red]error[/red] ci.expectations_suite: {exc}", soft_wrap=True, highlight=False)
        return 1
    missing = {f.column: None for f in report.failed if f.column_missing}
    for failed in report.failed:
        if failed.column not in missing:
            console.print(f"[red]error[/red] data validation ({report.suite}): {failed.sentence}", soft_wrap=True,
                          highlight=False)
    if missing:  # one line, not one per expectation of each: most likely a suite made for another table
        console.print(f"[red]error[/red] data validation ({report.suite}): {len(missing)} column(s) of the suite are not "
                      f"in the data: {', '.join(map(str, missing))}; a suite for another table? `rollout make-suite "
                      "--force` writes one from this data", soft_wrap=True, highlight=False)
    evaluated = int(report.statistics.get("evaluated_expectations", 0))
    console.print(f"data validation ({report.suite}): {evaluated - len(report.failed)} of {evaluated} expectations "
                  f"met on {report.rows:,} rows", soft_wrap=True, highlight=False)
    errors = sum(f.column not in missing for f in report.failed) + (1 if missing else 0)
    return errors if errors or report.success else 1  # a suite that failed without a failed expectation: 1


@app.command("config-reference")
def config_reference() -> None:
    """Print every policy field with its type, default and meaning."""
    from rollout.config import Policy as Root

    def walk(model: Any, prefix: str) -> None:
        for name, field in model.model_fields.items():
            if name == "base_dir":
                continue
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                console.print(f"[bold]{prefix}{name}[/bold]: {ann.__doc__ or ''}".rstrip(), soft_wrap=True)
                walk(ann, f"{prefix}{name}.")
            else:
                shown = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
                console.print(f"  {prefix}{name} = {shown}  # {field.description or ''}", soft_wrap=True,
                              markup=False)

    walk(Root, "")


@app.command()
def ci(
    config: str = CONFIG,
    data_source: str = typer.Option(None, help="Override data.source."),
    drift: float = typer.Option(None, help="Override data.example.drift."),
    seed: int = typer.Option(None, help="Override data.example.seed."),
    estimator: str = typer.Option(None, help="Override estimator.name."),
    params: str = typer.Option(None, help='Override estimator.params, as JSON: \'{"C": 0.5}\' (merged over the policy\'s; with --estimator, that estimator\'s params).'),
    dask: bool = typer.Option(False, help="Run CV folds and stress on a local Dask cluster."),
    dask_address: str = typer.Option(None, help="Run them on the Dask scheduler at this address instead."),
) -> None:
    """Run the ci-pipeline flow: validate, train with CV, gate, stress, register @challenger."""
    policy = _policy(config)
    try:
        overrides = json.loads(params) if params is not None else None
    except json.JSONDecodeError as exc:
        console.print(f"[red]--params {params!r}: not JSON ({exc})[/red]")
        raise typer.Exit(2) from None
    if overrides is not None and not isinstance(overrides, dict):
        console.print(f"[red]--params {params!r}: expected a JSON object of parameter names and values[/red]")
        raise typer.Exit(2)
    _start_prefect()
    from flows.ci_pipeline import CIParameters, ci_pipeline
    from flows.runners import dask_runner

    run = CIParameters(data_source=data_source, example_drift=drift, example_seed=seed, estimator=estimator,
                       estimator_params=overrides)
    flow = ci_pipeline.with_options(task_runner=dask_runner(dask_address)) if (dask or dask_address) else ci_pipeline
    outcome = _gated("ci-pipeline", lambda: flow(config=config, params=run), policy)
    console.print(f"[green]registered version {outcome.version}[/green] as "
                  + ", ".join("@" + a for a in outcome.aliases)
                  + (f"; rollout {outcome.rollout_id} opened" if outcome.rollout_id is not None else "")
                  + f"; reports in {outcome.reports_dir}")
    if outcome.superseded:
        console.print(f"[yellow]{outcome.superseded}[/yellow]")


class _NoTraceback(logging.Formatter):
    """A console formatter that prints a record's message without its traceback (the log file keeps it)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


@contextmanager
def _log_file(path: Path) -> Iterator[Path]:
    """Everything the run logs, tracebacks included, goes to `path`; the terminal gets one line per record."""
    root = logging.getLogger()
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    formatters = [h.formatter for h in consoles]
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for handler in consoles:
        handler.setFormatter(_NoTraceback(handler.formatter))
    root.addHandler(to_file)
    try:
        yield path
    finally:
        root.removeHandler(to_file)
        to_file.close()
        for handler, formatter in zip(consoles, formatters, strict=True):
            handler.setFormatter(formatter)


def _gated(name: str, run: Callable[[], Any], policy: Policy) -> Any:
    """Run a gated flow on the embedded server and print every verdict: a failed gate exits 1 (nothing was
    registered), a bad policy or input 2, any other failure 1 with one line saying where it stopped; the full
    log with tracebacks goes to <reports_dir>/<flow>.log."""
    from flows.runners import embedded_run
    from rollout.ci.gates import GateFailed, StepFailed

    log_path = policy.path(policy.stores.reports_dir) / f"{name}.log"
    try:
        with embedded_run(), _log_file(log_path):
            outcome = run()
    except GateFailed as exc:
        console.print(gate_table(exc.outcome.gates if exc.outcome else [exc.result]))
        console.print(f"[red]{name} stopped: {exc}[/red]\nNothing was registered.")
        raise typer.Exit(1) from None
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except StepFailed as exc:
        if exc.outcome is not None and exc.outcome.gates:
            console.print(gate_table(exc.outcome.gates))
        console.print(f"[red]{name} {exc}[/red]\nNothing was registered. Full log with the traceback: {log_path}")
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - never a raw traceback on the terminal: one line, the log has the rest
        console.print(f"[red]{name} failed: {type(exc).__name__}: {exc}[/red]\nFull log with the traceback: {log_path}")
        raise typer.Exit(1) from None
    console.print(gate_table(outcome.gates))
    return outcome


@app.command()
def adopt(
    config: str = CONFIG,
    model_uri: str = typer.Option(..., help="models:/name/7, models:/name@alias, runs:/<run id>/model, ..."),
    data_source: str = typer.Option(None, help="Override data.source: the labelled rows it is judged on."),
) -> None:
    """Run the adopt-model flow: gate a model trained elsewhere as CI gates its own, then register it."""
    from pydantic import ValidationError

    policy = _policy(config)
    _start_prefect()
    from flows.adopt_model import AdoptParameters, adopt_model

    try:
        params = AdoptParameters(model_uri=model_uri, data_source=data_source)
    except ValidationError as exc:
        console.print(f"[red]--model-uri {model_uri!r}: {exc.errors()[0]['msg']}[/red]")
        raise typer.Exit(2) from None
    outcome = _gated("adopt-model", lambda: adopt_model(config=config, params=params), policy)
    console.print(f"[green]adopted {model_uri} as version {outcome.version}[/green]: "
                  + ", ".join("@" + a for a in outcome.aliases) + f"; reports in {outcome.reports_dir}")


@app.command()
def serve(
    config: str = CONFIG,
    host: str = typer.Option(None, help="Bind address (default: serving.host)."),
    port: int = typer.Option(None, help="Port (default: serving.port)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    workers: int = typer.Option(1, min=1, help="Processes serving on the one port (each with its own lanes and "
                                "challenger children; they share the stores and the routing table)."),
) -> None:
    """Serve @champion (and challengers, by the open rollout's mode) over HTTP."""
    from rollout.outcomes.engine import check_reachable, make_engine
    from serving.app import run

    policy = _policy(config)
    store = make_engine(policy.outcome_url)
    try:
        check_reachable(store)  # before uvicorn: its startup failure is a page of traceback
    finally:
        store.dispose()
    run(policy, host=host, port=port, log_level=log_level, workers=workers, config=config)


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8080", help="Base URL of a running `rollout serve`."),
    config: str = CONFIG,
    data: str = typer.Option(None, help="Replay your own rows (CSV/Parquet) instead of the loan generator."),
    label_column: str = typer.Option(None, help="With --data: the column holding each row's label (default: "
                                     "data.target)."),
    ts_column: str = typer.Option(None, help="With --data: each request carries this column's time (the window "
                                  "is the data's); else rows spread over --days."),
    requests: int = typer.Option(None, help="Single-record requests to send (default: 1000, or every row of "
                                 "--data)."),
    days: float = typer.Option(7.0, help="Simulated days the requests are spread over."),
    label_delay: str = typer.Option("24h", help="Typical delay before a label arrives (hours, or 90m, 12h, 2d)."),
    missing_rate: float = typer.Option(None, help="Share of labels that never arrive (default: 0.1 generated, "
                                       "0 replayed)."),
    concurrency: int = typer.Option(8, help="Requests in flight."),
    seed: int = typer.Option(0, help="Seed of the traffic."),
    drift: float = typer.Option(0.0, help="Shift of the population in the second part of the window."),
    start: str = typer.Option(None, help="Start of the simulated window (ISO 8601); default: now - days."),
) -> None:
    """Send traffic (generated loan applications, or your own rows with --data) and post delayed labels."""
    from cli.simulate import OptionError, parse_delay, replay_from
    from cli.simulate import simulate as run_simulation

    policy = _policy(config)
    try:
        delay = parse_delay(label_delay)
        replay = None if data is None else replay_from(data, policy, label_column, ts_column, requests)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if replay is None and (label_column or ts_column):
        console.print("[red]--label-column and --ts-column go with --data[/red]")
        raise typer.Exit(2)
    try:
        summary = run_simulation(url, policy, requests=requests or 1000, days=days, label_delay_hours=delay,
                                 missing_rate=(0.0 if replay else 0.1) if missing_rate is None else missing_rate,
                                 concurrency=concurrency, seed=seed, drift=drift, start=start, replay=replay)
    except OptionError as exc:  # an option or the data to change, before any request: the message says which
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(summary)
    if summary.labels_unknown:
        console.print(f"{summary.labels_unknown:,} label(s) reached the store before their prediction's row (the log "
                      "writer batches its rows; with `serve --workers N` a label can reach another worker): they are "
                      "kept and count once the row is written", soft_wrap=True, highlight=False)
    if summary.errors or summary.label_errors:
        raise typer.Exit(1)


@app.command()
def evaluate(
    config: str = CONFIG,
    now: str = typer.Option(None, help="Evaluate as of this time (ISO 8601, UTC), or 'data': as of the rollout's "
                            "latest logged prediction (traffic replayed with its own times); default: now."),
    dry_run: bool = typer.Option(False, help="Decide and report, act on nothing."),
) -> None:
    """Run the online-evaluation flow once: promote, keep collecting, or reject."""
    policy = _policy(config)
    at = None if now in (None, "data") else _time_option("--now", now, " or 'data'")
    _start_prefect()
    from flows.online_evaluation import EvaluationParameters, online_evaluation
    from flows.runners import embedded_run

    params = EvaluationParameters(now=at, clock="data" if now == "data" else "wall", dry_run=dry_run,
                                  actor="rollout evaluate")
    log_path = policy.path(policy.stores.reports_dir) / "online-evaluation.log"
    try:
        with embedded_run(), _log_file(log_path):
            outcome = online_evaluation(config=config, params=params)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - one line on the terminal; the log has the traceback
        console.print(f"[red]online-evaluation failed: {type(exc).__name__}: {exc}[/red]\n"
                      f"Nothing was decided. Full log with the traceback: {log_path}")
        raise typer.Exit(1) from None
    colour = {"promote": "green", "reject": "red"}.get(outcome.action, "yellow")
    console.print(f"[{colour}]{outcome.action.upper()}[/{colour}]"
                  + (f" version {outcome.winner}" if outcome.winner else ""))
    for reason in outcome.reasons:
        console.print(f"  - {reason}")
    if outcome.report:
        console.print(f"report: {outcome.report}")
    if outcome.retention:
        console.print(f"retention: {outcome.retention}")


@app.command("last-run")
def last_run(flow: str = typer.Option("ci-pipeline", help="Flow name: ci-pipeline, adopt-model, online-evaluation, "
                                      "continuous-training.")) -> None:
    """Print the latest run of a flow on the Prefect server (PREFECT_API_URL) that is not still scheduled: its state,
    the state's message (a failed gate's reason) and its gate summary; exit 1 unless it completed. For CI logs after
    `--watch`."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName,
                                                FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    # Not a run still scheduled: a deployment's schedule (the hourly evaluation) keeps some ahead of now.
    started = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])))

    async def read() -> tuple[Any, list[Any]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                               flow_run_filter=started, sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                               limit=1)
            if not runs:
                return None, []
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
            return runs[0], [a for a in found if (a.key or "").endswith("-ci-summary")]

    run, summaries = asyncio.run(read())
    if run is None:
        console.print(f"[red]no run of {flow} on this Prefect server[/red]")
        raise typer.Exit(1)
    state = run.state
    console.print(f"{flow} run {run.name}: {state.name if state else 'unknown'}", soft_wrap=True)
    if state is not None and state.message:
        console.print(f"  {state.message}", soft_wrap=True, markup=False)
    for artifact in summaries:
        table = Table(title=artifact.description or "gates")
        for column in ("gate", "verdict", "reason"):
            table.add_column(column, overflow="fold")
        rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        for row in rows or []:
            table.add_row(str(row.get("gate")), str(row.get("verdict")), str(row.get("reason")))
        console.print(table)
    if state is None or not state.is_completed():
        raise typer.Exit(1)


@app.command()
def rollback(config: str = CONFIG,
             actor: str = typer.Option("rollout rollback", help="Who is recorded in the audit log.")) -> None:
    """Restore @previous-champion as @champion, now, and record it."""
    from datetime import datetime, timezone

    from rollout.cd.evaluation import rollback as do_rollback
    from rollout.registry import MlflowRegistry
    from rollout.outcomes import OutcomeStore

    policy = _policy(config)
    store = OutcomeStore(policy.outcome_url)
    registry = MlflowRegistry.for_policy(policy)
    try:
        with store.lock("evaluation"):
            result = do_rollback(registry, store, datetime.now(timezone.utc), actor)
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    for note in result["settled"]:
        console.print(f"[yellow]{note}[/yellow]")
    console.print(f"[green]version {result['champion']} is @champion again[/green] (replacing {result['replaced']})")


@app.command()
def repair(config: str = CONFIG) -> None:
    """Finish (or, when an alias was moved by hand meanwhile, reverse) a promotion or rollback an outage cut short."""
    from rollout.cd.plans import settle
    from rollout.outcomes import OutcomeStore
    from rollout.registry import MlflowRegistry

    policy = _policy(config)
    store = OutcomeStore(policy.outcome_url)
    with store.lock("evaluation"):
        settled = settle(MlflowRegistry.for_policy(policy), store)
    for s in settled:
        console.print(f"[{'green' if s.finished else 'yellow'}]{s.note}[/]")
    if not settled:
        console.print("nothing to repair: every recorded plan is finished")


@app.command()
def history(config: str = CONFIG, limit: int = typer.Option(50, help="Most recent entries to show."),
            show_all: bool = typer.Option(False, "--all", help="Include the hourly 'continue' evaluations.")) -> None:
    """Which version was champion when, and why: the audit log with every alias move."""
    from rollout.outcomes import OutcomeStore
    from rollout.report import effects_line

    policy = _policy(config)
    # Short columns that never wrap, and one wide column that wraps at spaces: fits 100 columns, no figure cut
    table = Table(title=f"History of {policy.registry.model_name}", expand=True)
    for col in ("time (UTC)", "rollout", "decision"):
        table.add_column(col, no_wrap=True)
    table.add_column("alias moves, and why", ratio=1)
    table.add_column("by", max_width=20)
    hidden = ("continue", "drift-check")  # the hourly evaluations and drift checks that changed nothing
    store = OutcomeStore(policy.outcome_url)
    log = store.audit_log()
    entries = [d for d in log if show_all or d.decision not in hidden]
    current = store.current_rollout()
    store.dispose()
    for d in entries[-limit:]:
        moves = "\n".join(f"@{m.get('alias')} {m.get('from') or '-'}→{m.get('to') or '-'}" for m in d.alias_moves)
        reasons = d.stats.get("reasons") or []
        why = effects_line(d.stats.get("stats") or {}) or (reasons[0] if reasons else "")
        why = why if len(why) <= 240 else why[:237] + "..."
        table.add_row(d.ts.strftime("%Y-%m-%d %H:%M"), str(d.rollout_id or "-"), d.decision,
                      f"{moves}\n{why}" if moves else why, d.actor)
    console.print(table)
    # What the table leaves out, said, so an empty or short table is not read as "nothing happened"
    if (left_out := len(log) - len(entries)):
        console.print(f"Not shown: {left_out:,} {'entry' if left_out == 1 else 'entries'} that changed nothing "
                      "(hourly 'continue' evaluations, drift checks); --all shows them.")
    if len(entries) > limit:
        console.print(f"The latest {limit} of {len(entries):,} entries (--limit).")
    if current is not None:
        roles = ", ".join(f"@{role} v{version}" for role, version in current.versions.items())
        console.print(f"Open: rollout {current.rollout_id} ({current.mode}: {roles}) since "
                      f"{current.started_at:%Y-%m-%d %H:%M} UTC, not decided yet.")
    elif not log:
        console.print("No rollout has been opened or decided yet: `rollout ci` opens one when it registers a "
                      "challenger.")


@app.command()
def score(
    config: str = CONFIG,
    input: str = typer.Option(None, "--input",  # noqa: A002
                              help="The rows to score: a .csv or .parquet file, or its http(s) URL."),
    query: str = typer.Option(None, help="Or the rows a SQL query returns from --database (needs --batch-id and "
                              "--key-column)."),
    database: str = typer.Option(None, help="Database URL for --query and --output-table (postgresql://..., "
                                 "sqlite:///...)."),
    output: str = typer.Option(None, help="Where the answers go: a .csv or .parquet file..."),
    output_table: str = typer.Option(None, help="...or a table of --database (replaced when the run completes)."),
    batch_id: str = typer.Option(None, help="Names the batch in request ids; a rerun logs only what is missing. "
                                 "Default: the input's file name."),
    key_column: str = typer.Option(None, help="The column identifying a row; default: its position."),
    chunk_rows: int | None = typer.Option(None, help="Rows read, scored and logged at a time (default 10,000)."),
) -> None:
    """Score a file, URL or query with the champion and the open rollout's challengers; log every prediction as the
    service does."""
    from serving.batch import CHUNK_ROWS, BatchSummary, score_file, sink_of, source_of

    policy = _policy(config)
    with console.status("scoring...") as status:
        def progress(summary: BatchSummary) -> None:
            status.update(f"{summary.rows:,} rows scored, {summary.logged:,} requests logged")

        try:
            summary = score_file(policy, source_of(input, query, database), sink_of(output, output_table, database),
                                 batch_id=batch_id, key_column=key_column, chunk_rows=chunk_rows or CHUNK_ROWS,
                                 on_chunk=progress)
        except (ConfigError, FileNotFoundError) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    console.print(summary.sentence())
    for version, errors in sorted(summary.challenger_errors.items()):
        console.print(f"[yellow]challenger v{version}: {errors:,} rows failed (logged as its errors; the champion "
                      "answered them)[/yellow]")


@app.command()
def stream(
    config: str = CONFIG,
    redis_url: str = typer.Option("redis://127.0.0.1:6379/0", "--redis", help="The Redis server of the streams."),
    input_stream: str = typer.Option("rollout:requests", "--input", help="Stream of requests (field `body`: a "
                                     "/predict body as JSON)."),
    output_stream: str = typer.Option("rollout:answers", "--output", help="Stream the answers go to."),
    group: str = typer.Option("rollout", help="Consumer group: run several consumers with one group to share "
                              "the stream."),
    consumer: str = typer.Option(None, help="This consumer's name (default: host and process id); a restart "
                                 "under the same name takes over its unacknowledged messages at once."),
) -> None:
    """Answer a Redis Stream of requests as `rollout serve` answers HTTP: same routing, logging and isolation."""
    import asyncio
    import os
    import signal
    import socket

    try:
        from serving.stream import StreamConsumer
        import redis  # noqa: F401
    except ImportError:
        console.print("[red]rollout stream needs the redis client: pip install 'rollout[stream]'[/red]")
        raise typer.Exit(2) from None
    policy = _policy(config)
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish the batch in hand, drain the log, then exit
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        summary = await StreamConsumer(policy, redis_url, input_stream, output_stream, group, name).run(stop)
        console.print(f"answered {summary.answered:,} messages ({summary.refused:,} refused, {summary.reclaimed:,} "
                      f"taken over after a stop, {summary.relogged_skipped:,} requests answered again unlogged)")

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console.print(f"consumer {name} of group {group}: {input_stream} -> {output_stream} on {redis_url}")
    asyncio.run(main())


@app.command()
def retention(
    config: str = CONFIG,
    now: str = typer.Option(None, help="As of this time (ISO 8601, UTC); default: now. The hourly evaluation runs "
                            "the same step as of its own time."),
    dry_run: bool = typer.Option(False, help="Count what would be removed; remove nothing."),
    vacuum: bool = typer.Option(False, help="Then compact the store once (SQLite: rewrites the file and switches "
                                "it to giving freed space back; stop the service first)."),
    partition: bool = typer.Option(False, help="PostgreSQL: first convert a prediction log made before "
                                   "partitioning into daily partitions (one transaction; stop the service first)."),
) -> None:
    """Remove prediction and label rows older than stores.retention_days (never an open rollout's)."""
    from datetime import UTC, datetime, timedelta

    from rollout.outcomes import OutcomeStore

    policy = _policy(config)
    if partition:
        try:
            moved = OutcomeStore(policy.outcome_url).partition()
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        console.print(f"prediction log partitioned by day ({moved:,} rows moved)" if moved
                      else "the prediction log is partitioned already")
    days = policy.stores.retention_days
    if days is None:
        console.print("stores.retention_days is null: every row is kept")
    else:
        at = datetime.now(UTC) if now is None else _time_option("--now", now)
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        expired = OutcomeStore(policy.outcome_url).expire(at - timedelta(days=days), dry_run=dry_run)
        console.print(expired.sentence())
    if vacuum and not dry_run:
        OutcomeStore(policy.outcome_url).vacuum()
        console.print("store compacted")


@app.command()
def export(
    config: str = CONFIG,
    since: str = typer.Option(..., help="First day (YYYY-MM-DD, UTC)."),
    until: str = typer.Option(None, help="Last day (YYYY-MM-DD, UTC), inclusive; default: the latest."),
    to: Path = typer.Option(..., help="Folder for the files: <to>/day=YYYY-MM-DD/predictions.parquet."),
) -> None:
    """Daily Parquet files of the logged predictions with their labels, for pandas, DuckDB or Spark."""
    from datetime import date

    from rollout.outcomes import OutcomeStore

    for name, value in (("--since", since), ("--until", until)):
        if value is not None:
            try:
                date.fromisoformat(value)
            except ValueError:
                console.print(f"[red]{name} {value!r}: expected a day as YYYY-MM-DD[/red]")
                raise typer.Exit(2) from None
    policy = _policy(config)
    exported = OutcomeStore(policy.outcome_url).export(since, until, to)
    for day in exported:
        console.print(f"{day.day}: {day.rows:,} predictions ({day.labelled:,} labelled) -> {day.path}")
    if not exported:
        console.print(f"no predictions logged from {since}" + (f" to {until}" if until else ""))


@app.command("label-requests")
def label_requests(
    config: str = CONFIG,
    budget: int = typer.Option(..., min=1, help="How many predictions to propose for labelling (in expectation)."),
    output: Path = typer.Option(None, help="Where the requests go: a .csv or .parquet file..."),
    output_table: str = typer.Option(None, help="...or a table of --database they are appended to (a labelling "
                                     "queue)."),
    database: str = typer.Option(None, help="Database URL for --output-table (postgresql://user@host/db)."),
) -> None:
    """Propose which of the open rollout's predictions to label (those that tell the versions apart, each with
    its inclusion probability); send the labels back to POST /labels (rollout.label_requests)."""
    from rollout.cd.label_requests import OUTPUT_SUFFIXES, request_labels, write, write_table
    from rollout.outcomes import OutcomeStore
    from rollout.tables import SqlTable, destination

    try:  # checked before drawing: a drawn batch is never offered again
        where = destination(output, output_table, database, "requests", suffixes=OUTPUT_SUFFIXES)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    policy = _policy(config)
    if not policy.rollout.label_requests.enabled:
        console.print("[red]rollout.label_requests.enabled is false: the evaluation would read labels favoured "
                      "toward disagreements as a plain sample; enable it in the policy first[/red]")
        raise typer.Exit(2)
    store = OutcomeStore(policy.outcome_url)
    rollout = store.current_rollout()
    if rollout is None:
        console.print("no rollout is open: nothing to label for")
        raise typer.Exit(1)
    batch = request_labels(store, rollout, policy, budget)
    path = write_table(batch, where) if isinstance(where, SqlTable) else write(batch, where)
    console.print(f"{len(batch.requests):,} of {batch.pool:,} requests logged since the last batch proposed for "
                  f"labelling -> {path}")


@app.command("make-suite")
def make_suite(
    config: str = CONFIG,
    output: Path = typer.Option(None, help="Where to write the Great Expectations suite (JSON); default: the "
                                "policy's ci.expectations_suite, where `rollout ci` reads it."),
    force: bool = typer.Option(False, help="Replace a suite already there (a reviewed suite is lost)."),
) -> None:
    """Write a starter Great Expectations suite derived from the policy's training data."""
    from rollout.data import infer_schema, load_dataset
    from rollout.ci.validation import build_suite, write_suite

    policy = _policy(config)
    try:
        frame = load_dataset(policy)
        schema = infer_schema(frame, policy.data)
    except (ConfigError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    reads = policy.path(policy.ci.expectations_suite)
    output = reads if output is None else output
    if output.exists() and not force:
        console.print(f"[red]{output} exists (a suite someone may have reviewed): --force replaces it, or --output "
                      "writes elsewhere[/red]")
        raise typer.Exit(2)
    suite = build_suite(frame, schema, output.stem)
    console.print(f"wrote {len(suite.expectations)} expectations to {write_suite(suite, output)}; review before committing")
    if output.resolve() != Path(reads).resolve():
        import os

        relative = os.path.relpath(output.resolve(), policy.base_dir.resolve())  # as the policy file names paths
        console.print(f"[yellow]`rollout ci` reads {reads}: set ci.expectations_suite: {relative} in "
                      f"{config}[/yellow]")


_exit: dict[str, int] = {}  # "code": the command's exit code once it ended; "quick": it ran a flow (_quick_exit)


def _quick_exit() -> None:
    """The last thing at exit after a command that ran a flow: skip the interpreter's teardown of the ~2 GB
    of modules a flow imports (1.8 s of the example's `rollout ci`). Every `atexit` handler has run by now
    (registered first, this runs last): Prefect's log and event workers have drained, the temporary server
    has stopped, the log files are flushed and closed; the stores commit before a command returns."""
    import os

    if "code" in _exit and _exit.get("quick"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit["code"])


def main() -> None:
    """The `rollout` console entry (and `python -m cli.main`)."""
    import atexit

    atexit.register(_quick_exit)
    try:
        app()
    except SystemExit as exc:
        _exit["code"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except KeyboardInterrupt:
        _exit["code"] = 130  # what a shell reports for Ctrl-C
        raise
    except (ConnectionError, ValueError) as exc:
        from rollout.config import ConfigError
        from rollout.outcomes.engine import StoreUnreachable

        if not isinstance(exc, StoreUnreachable | ConfigError):
            _exit["code"] = 1
            raise
        _exit["code"] = 2  # a setting to fix, said in one line: no traceback
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise SystemExit(2) from None
    except BaseException:
        _exit["code"] = 1
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
