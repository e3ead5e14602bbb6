"""`make demo`: the whole lifecycle on the embedded default (SQLite stores, local MLflow, ephemeral Prefect).

Bootstrap a champion and serve it over real HTTP; the world drifts; continuous-training checks the served
inputs each simulated day and, once the drift has persisted, retrains on the served and labelled
production rows, judged on the latest of them: a challenger, in shadow mode; simulated traffic and delayed
labels arrive day by day; online-evaluation runs after every simulated half-day until it decides; serving
follows the promotion. Then a model trained on stale data goes out in A/B mode and is rejected, and
traffic returns to the champion.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()
DRIFT = 1.2  # the new regime: lower incomes, more debt


@dataclass
class Step:
    what: str
    result: str
    numbers: str = ""


def brief(outcome: Any) -> str:
    """Each challenger's effect, its bounds and its sample size: one evaluation in one line of the terminal."""
    from rollout.report import effects_line

    return effects_line(outcome.stats or {}) or (outcome.reasons[0] if outcome.reasons else "")


def _short(path: Path) -> str:
    """A path as typed from where the demo runs (the repository's folder), so commands fit the terminal."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _line(text: str) -> None:
    """One line of the demo's day-by-day log: cut to the terminal's width, never wrapped mid-figure."""
    console.print(text, no_wrap=True, overflow="ellipsis", crop=True)


def summary_table(steps: list[Step]) -> Table:
    """What happened, step by step; cells wrap at spaces, so a figure is never cut in two."""
    summary = Table(title="What happened", expand=True)
    for col, ratio in (("step", 3), ("result", 2), ("numbers", 4)):
        summary.add_column(col, ratio=ratio)
    for step in steps:
        summary.add_row(step.what, step.result, step.numbers)
    return summary


def free_port() -> int:
    """A port the kernel has just found free on 127.0.0.1, for a server started next (the tests use it too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_policy(workdir: Path, mode: str) -> Path:
    """The example policy with its stores inside the demo folder and the demo's time compression."""
    policy = yaml.safe_load((ROOT / "rollout.yaml").read_text())
    policy["ci"]["expectations_suite"] = str(ROOT / "expectations" / "loan_training.json")
    policy["rollout"].update({"mode": mode, "exposure": 0.4, "min_samples": 1000, "min_duration_hours": 24,
                              "label_delay_hours": 12, "max_duration_days": 14})
    policy["serving"] = {"reload_interval_s": 1.0}
    policy["stores"] = {"mlflow_tracking_uri": "sqlite:///mlflow.db", "outcome_store_url": "sqlite:///outcomes.db",
                        "mlflow_artifacts": "mlartifacts", "reports_dir": "reports"}
    path = workdir / "rollout.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


class Server:
    """`rollout serve` in a subprocess on a free loopback port."""

    def __init__(self, config: Path, token: str, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "ROLLOUT_TOKEN": token, "PYTHONPATH": str(ROOT)}
        self.log = open(config.parent / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--config", str(config), "--port", str(self.port),
             "--log-level", "warning", "--workers", str(workers)], env=env, stdout=self.log,
            stderr=subprocess.STDOUT, cwd=config.parent)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rollout serve exited; see {config.parent / 'serve.log'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("rollout serve did not become healthy in 120 s")

    def routing(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/routing", timeout=10).json()

    def wait_for(self, check, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.time() + timeout
        view = self.routing()
        while not check(view) and time.time() < deadline:
            time.sleep(0.5)
            view = self.routing()
        return view

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: uvicorn drains the log queue before exiting
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def arms(view: dict[str, Any]) -> str:
    parts = [f"{a['role']}=v{a['version']}" + (f" ({a['weight']:.0%})" if view["mode"] in ("ab", "abn", "bandit")
                                                else "") for a in view["arms"]]
    parts += [f"{s['role']}=v{s['version']} (shadow)" for s in view.get("shadows", [])]
    return f"{view['mode']}: " + ", ".join(parts)


def run_rollout(config: Path, server: Server, token: str, drift: float, days: int, per_day: int,
                seed: int, steps: list[Step]) -> Any:
    """Traffic and labels half a day at a time from the rollout's start, online-evaluation after each,
    until it decides: the hourly schedule, compressed."""
    from flows.online_evaluation import EvaluationParameters, online_evaluation
    from rollout.config import load_policy
    from cli.simulate import simulate
    from rollout.outcomes import OutcomeStore

    policy = load_policy(config)
    current = OutcomeStore(policy.outcome_url).current_rollout()
    if current is None:
        raise RuntimeError("no open rollout to send traffic to: ci-pipeline opens one when it registers a challenger")
    day0 = current.started_at
    outcome = None
    for half in range(days * 2):
        start = day0 + timedelta(hours=12 * half)
        with console.status(f"day {half / 2:.1f}: {per_day // 2} requests and their labels..."):
            summary = simulate(server.url, policy, requests=per_day // 2, days=0.5, label_delay_hours=6,
                               missing_rate=0.05, concurrency=16, seed=seed + half, start=start, drift=drift,
                               drift_start=0.0, token=token, send_pending=True)
        with console.status("online-evaluation..."):
            outcome = online_evaluation(config=str(config), params=EvaluationParameters(
                now=start + timedelta(hours=12), actor="demo schedule"))
        _line(f"  day {(half + 1) / 2:>4.1f}  {summary.predicted:>5,} served  "
              f"[bold]{outcome.action:>8}[/bold]  {brief(outcome)}")
        if outcome.action != "continue":
            steps.append(Step(f"online-evaluation after {(half + 1) / 2:g} simulated days",
                              outcome.action + (f" v{outcome.winner}" if outcome.winner else ""), brief(outcome)))
            return outcome
    steps.append(Step("online-evaluation", "still collecting at the end of the demo window"))
    return outcome


def watch_and_retrain(config: Path, server: Server, token: str, steps: list[Step]) -> Any:
    """Drifted traffic to the champion alone, a simulated day at a time, each followed by continuous-training:
    the first check finds drift and waits (a blip must not retrain); the second retrains on production rows."""
    from datetime import UTC, datetime

    from cli.simulate import simulate
    from flows.continuous_training import ContinuousTrainingParameters, continuous_training
    from rollout.config import load_policy

    policy = load_policy(config)
    day0 = datetime.now(UTC) - timedelta(days=2)
    for day in range(2):
        with console.status(f"day {day + 1} of the new regime: 2,400 requests to the champion and their labels..."):
            summary = simulate(server.url, policy, requests=2400, days=1.0, label_delay_hours=6, missing_rate=0.05,
                               concurrency=16, seed=40 + day, start=day0 + timedelta(days=day), drift=DRIFT,
                               drift_start=0.0, token=token, send_pending=True)
        with console.status("continuous-training..."):
            outcome = continuous_training(config=str(config), params=ContinuousTrainingParameters(window=2000))
        _line(f"  day {day + 1}  {summary.predicted:>5,} served  "
              f"[bold]{'retrain' if outcome.retrained else 'wait':>8}[/bold]  "
              + (f"drifted: {', '.join(outcome.drifted)}" if outcome.drifted else outcome.reason))
        steps.append(Step(f"continuous-training, day {day + 1} of the drift",
                          f"retrained: v{outcome.version}" if outcome.retrained else "drift seen; waits",
                          outcome.reason[:400]))
        if outcome.retrained:
            return outcome
    raise RuntimeError("continuous-training did not retrain after two days of drift")


def main() -> None:
    # The demo tells its story with rich; Prefect's per-task INFO lines would drown it (they are in the UI).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # this machine may have no network
    from flows.runners import embedded_run, start_temporary_server

    start_temporary_server()
    with embedded_run():
        run_demo()


def run_demo() -> None:
    from flows.ci_pipeline import CIParameters, ci_pipeline
    from cli.main import gate_table
    from rollout.config import load_policy
    from rollout.outcomes import OutcomeStore

    began = time.time()
    workdir = ROOT / ".rollout" / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    token = secrets.token_hex(16)
    steps: list[Step] = []
    config = write_policy(workdir, mode="shadow")
    console.print(Panel.fit(f"rollout demo in {_short(workdir)}\nPolicy: {_short(config)}", title="rollout"))

    console.rule("1. Bootstrap: the first model becomes @champion")
    first = ci_pipeline(config=str(config), params=CIParameters(example_seed=7))
    console.print(gate_table(first.gates))
    steps.append(Step("ci-pipeline on the original data", f"v{first.version} @" + ",@".join(first.aliases)))

    server = Server(config, token)
    try:
        console.rule(f"2. The population drifts (drift={DRIFT}); continuous-training watches what is served")
        console.print(f"serving at {server.url}  ->  {arms(server.routing())}")
        second = watch_and_retrain(config, server, token, steps)
        console.print(gate_table(second.gates))

        console.rule("3. The retrained model in shadow mode; traffic and labels arrive day by day")
        server.wait_for(lambda v: bool(v.get("shadows")))
        console.print(f"serving: {arms(server.routing())}")
        # Guardrails must hold with bounds valid at every half-daily look: about a week of VIP traffic.
        decided = run_rollout(config, server, token, DRIFT, days=10, per_day=2400, seed=100, steps=steps)
        if decided is not None and decided.action == "promote":
            view = server.wait_for(lambda v: v["arms"][0]["version"] == decided.winner and not v.get("shadows"))
            console.print(f"serving follows: {arms(view)}")
            steps.append(Step("serving after promotion", arms(view)))

        console.rule("4. A model trained on stale (pre-drift) data goes out in A/B mode")
        write_policy(workdir, mode="ab")
        # The next rollout starts where the simulated clock of the last one stopped.
        last = OutcomeStore(load_policy(config).outcome_url).audit_log()[-1].ts
        third = ci_pipeline(config=str(config), params=CIParameters(example_drift=0.0, example_seed=9,
                                                                    rollout_start=last + timedelta(hours=1)))
        console.print(gate_table(third.gates))
        steps.append(Step("ci-pipeline on stale data", f"v{third.version} @" + ",@".join(third.aliases),
                          f"rollout {third.rollout_id} opened in A/B mode"))
        view = server.wait_for(lambda v: v["mode"] == "ab")
        console.print(f"serving: {arms(view)}")
        run_rollout(config, server, token, DRIFT, days=7, per_day=2400, seed=500, steps=steps)
        view = server.wait_for(lambda v: len(v["arms"]) == 1 and not v.get("shadows"))
        console.print(f"traffic returns to the champion: {arms(view)}")
        steps.append(Step("serving after rejection", arms(view)))
    finally:
        server.stop()

    policy = load_policy(config)
    store = OutcomeStore(policy.outcome_url)
    console.print(summary_table(steps))
    console.print(f"Logged predictions: {store.count_predictions():,}; audit log entries: {len(store.audit_log())}")
    # Commands on lines of their own, never wrapped by the demo: a terminal shows them whole, ready to copy.
    console.rule("Where to look")
    for what, where in (
            ("Reports", _short(policy.path(policy.stores.reports_dir))),
            ("History", f".venv/bin/rollout history --config {_short(config)}"),
            ("MLflow UI", f".venv/bin/mlflow ui --backend-store-uri sqlite:///{_short(policy.path('mlflow.db'))}"),
            ("Prefect UI", ".venv/bin/prefect server start, then http://127.0.0.1:4200 (the demo's runs are there)")):
        console.print(f"{what + ':':<12}{where}", soft_wrap=True, highlight=False)
    console.print(f"Took {time.time() - began:.0f} s.")


if __name__ == "__main__":
    main()
