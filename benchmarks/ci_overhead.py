"""`rollout ci`'s fixed cost: the command's wall time over the sum of its Prefect task runs' time.

    .venv/bin/python benchmarks/ci_overhead.py            # 4 alternating rounds
    .venv/bin/python benchmarks/ci_overhead.py --quick    # 2 rounds

`rollout ci` on the example policy (6,000 rows, stores in a temporary folder), run as a user runs it: its own
process, `.venv/bin/rollout ci --config ...`. Three ways, alternating round by round:

- local: no PREFECT_API_URL, so the command starts Prefect's local server, or reuses the one the previous
  command left running (`flows/local_server.py`; the default: `make demo`, a laptop);
- per-command: the same with ROLLOUT_PREFECT_IDLE_SECONDS=0, every command starting its own server and
  stopping it at exit;
- kept: a `prefect server start` left running, PREFECT_API_URL pointing at it (what the README advises for
  browsing runs in its UI; a CI runner talks to its real server the same way).

Each way has its own policy folder and PREFECT_HOME; one untimed run each first registers the champion and
creates the databases, so every timed run is the steady state: a candidate gated against a champion. After the
rounds, each run's task runs are read from Prefect's API (the kept server; for the other two, a server started
on their PREFECT_HOME afterwards, the local one stopped first): the sum of their `total_run_time` is the work, the wall time over it
the overhead ratio. Tasks that run side by side (the champion's download beside cross-validation) both count.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import statistics  # noqa: E402 - after the path fix: benchmarks/statistics.py is not it

import httpx  # noqa: E402
import yaml  # noqa: E402

from _common import emit_json, example_policy, free_port, parser, print_table, verdict  # noqa: E402

TARGET_RATIO = 1.5  # issue 17: wall time <= 1.5x the sum of the task time
BIN = Path(sys.executable).parent
MODES = ("local", "per-command", "kept")


def _env(home: Path, api_url: str | None, idle: str = "600") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200",
               ROLLOUT_PREFECT_IDLE_SECONDS=idle)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_server(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`prefect server start` on `home`'s database; (process, API URL) once it answers."""
    port = free_port()
    log = open(home / "server.log", "wb")  # noqa: SIM115 - the server's lifetime
    process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env={**_env(home, None), "PREFECT_UI_ENABLED": "false"}, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("prefect server did not answer within 180 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def run_ci(policy: Path, home: Path, api_url: str | None, idle: str = "600") -> float:
    """One `rollout ci` as a user types it; its wall time in seconds."""
    began = time.perf_counter()
    done = subprocess.run([str(BIN / "rollout"), "ci", "--config", str(policy)], cwd=policy.parent,
                          env=_env(home, api_url, idle), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"rollout ci failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def task_times(api_url: str) -> list[tuple[float, float]]:
    """(sum of the task runs' run time, the flow run's run time) of every ci-pipeline run, oldest first."""
    with httpx.Client(base_url=api_url, timeout=30) as client:
        flows = client.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["ci-pipeline"]}},
                                                       "sort": "START_TIME_ASC", "limit": 200}).json()
        out = []
        for run in flows:
            tasks = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}},
                                                           "limit": 200}).json()
            out.append((sum(float(t["total_run_time"]) for t in tasks), float(run["total_run_time"])))
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    rounds = 2 if args.quick else 4
    root = Path(tempfile.mkdtemp(prefix="rollout-ci-overhead-"))
    policies, homes = {}, {}
    for mode in MODES:
        folder = root / mode
        (folder / "prefect").mkdir(parents=True)
        policies[mode] = folder / "rollout.yaml"
        policies[mode].write_text(yaml.safe_dump(example_policy(folder, rows=6000, seed=7)))
        homes[mode] = folder / "prefect"
    kept, kept_url = start_server(homes["kept"])
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    first: dict[str, float] = {}

    def run(mode: str) -> float:
        return run_ci(policies[mode], homes[mode], kept_url if mode == "kept" else None,
                      "0" if mode == "per-command" else "600")

    try:
        for mode in MODES:  # untimed: the first champion, the MLflow and Prefect databases
            first[mode] = run(mode)
        for r in range(rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                wall = run(mode)
                walls[mode].append(wall)
                print(f"round {r + 1} {mode}: {wall:.2f} s", flush=True)
        work = {"kept": task_times(kept_url)[1:]}
    finally:
        stop(kept)
    for mode in ("local", "per-command"):
        if mode == "local":  # the server the runs left behind, stopped: one server per database while reading it
            record = homes[mode] / "rollout-server.json"
            if record.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(json.loads(record.read_text())["pid"], signal.SIGTERM)
                time.sleep(2)
        server, url = start_server(homes[mode])
        try:
            work[mode] = task_times(url)[1:]
        finally:
            stop(server)

    figures: dict[str, Any] = {"rounds": rounds, "first_run_s": first}
    rows = []
    for mode in MODES:
        assert len(work[mode]) == len(walls[mode]), (mode, len(work[mode]), len(walls[mode]))
        ratios = [w / t for w, (t, _) in zip(walls[mode], work[mode], strict=True)]
        entry = {"wall_s": statistics.median(walls[mode]), "task_s": statistics.median(t for t, _ in work[mode]),
                 "flow_s": statistics.median(f for _, f in work[mode]), "ratio": statistics.median(ratios),
                 "ratios": [round(x, 3) for x in ratios]}
        entry["outside_flow_s"] = entry["wall_s"] - entry["flow_s"]
        figures[mode] = entry
        rows.append([mode, entry["wall_s"], entry["flow_s"], entry["task_s"], entry["outside_flow_s"], entry["ratio"]])
    print_table(f"rollout ci on the example, medians of {rounds} rounds (s)",
                ["Prefect API", "wall", "flow run", "sum of task runs", "outside the flow", "wall / tasks"], rows)
    figures["target_ratio"] = TARGET_RATIO
    for mode in MODES:
        figures[f"verdict_{mode.replace('-', '_')}"] = verdict(figures[mode]["ratio"] <= TARGET_RATIO)
    print(f"\nwall / tasks <= {TARGET_RATIO}: " + ", ".join(f"{m} {figures['verdict_' + m.replace('-', '_')]}"
                                                            for m in MODES))
    emit_json(figures)


if __name__ == "__main__":
    main()
