"""`rollout serve` (champion-only, shadow, ab) vs MLflow's scoring server, same champion, same machine.

    .venv/bin/python benchmarks/serving.py            # 5 alternating rounds, 4 s per cell
    .venv/bin/python benchmarks/serving.py --quick    # 1 round, 1 s per cell (under a minute)

A temporary policy (stores in a temporary folder) gets a champion and a challenger trained on the
example data (rollout.ci.training) and registered in MLflow (rollout.registry.log_model). Servers run
as subprocesses on free 127.0.0.1 ports, one worker process each:

- `mlflow models serve -m models:/loan-approval@champion --env-manager local --workers 1`
- `rollout serve` (default serving config), its routing switched between rounds through
  `PUT /routing`: champion-only (no rollout open), shadow (champion answers, challenger scores
  every request in the background, every prediction logged), ab (50/50 by customer)
- `rollout serve` with `serving.max_wait_ms: 0` (no batching wait, own stores), measured at
  concurrency 1 only: the reference for the latency that batching adds
- the ceiling: uvicorn and a bare ASGI app that parses each body's JSON and answers a constant, at
  concurrency 32 only: what any Python HTTP server here could carry (`shadow_vs_ceiling_throughput`)
- the anchors, at concurrency 32 only: MLServer 1.7 (mlserver-sklearn, adaptive batching) and BentoML 1.4
  (a batchable API), one worker each, batching up to 256 rows or 5 ms, serving the champion's very pipeline
  (exported with joblib) from their own virtual environments, created once and cached (benchmarks/anchors.py);
  `shadow_vs_best_anchor_throughput` and `shadow_p99_vs_best_anchor_p99` compare with the faster of the two in
  each round

The load generator is a separate process on loopback: `wrk` (Debian package; one thread, one
keep-alive connection per unit of concurrency, a Lua script cycling through 1,000 single-record
bodies) or, when wrk is absent, a lean asyncio raw-socket client in a subprocess of this script
(`--loadgen python` forces it). Each cell runs at fixed concurrency for a fixed duration, after an
untimed warm-up; rounds alternate the servers (mlflow, single, shadow, ab, ...) so machine noise
falls on all alike; figures are medians over rounds, ratios medians of per-round ratios. Throughput counts
200 answers only; any non-200 of a rollout server is a miss, another server's (an overloaded anchor) is counted
in its row.

Server CPU a request is read from /proc for the server's processes (the service, its shadow and challenger
children); for `rollout serve` with one worker, "its event loop's" is the share of its main thread, which runs
the event loop: when requests/s stop growing, that thread is what ran out (the rest is the scoring and
log-writer threads and the children). `--serving KEY=VALUE` (repeatable) runs the rollout server with other
serving options, e.g. `--serving challenger_isolation=thread` or `--serving max_wait_ms=5`.

    .venv/bin/python benchmarks/serving.py --fastpath # POST /predict: direct ASGI path vs routed endpoint

    .venv/bin/python benchmarks/serving.py --workers 2  # `rollout serve --workers 2`: per-worker throughput

`--workers N` runs the rollout server as N processes on its port and reports `throughput_per_worker` (read
the scaling on a machine with more cores than this one's two; the log counters are then one worker's).

`--fastpath` compares two `rollout serve` processes built from the same code, one answering
`POST /predict` on the direct ASGI path, one through FastAPI's router, in champion-only and shadow
modes, alternating server and order every round (ratios: routed over direct).

    .venv/bin/python benchmarks/serving.py --protocols # the same rows by /predict, /invocations and v2 infer

`--protocols` sends the same single-record requests to one `rollout serve` by each protocol it speaks:
`POST /predict` (`{"record": ...}`), MLflow's `POST /invocations` (`dataframe_split`, the body MLflow's
own client sends) and the Open Inference Protocol's `POST /v2/models/loan-approval/infer` (one tensor
per column), in champion-only and shadow modes, the protocols' order alternating every round (ratios:
each protocol over /predict).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from collections.abc import Iterator
from typing import Any

# benchmarks/statistics.py would shadow the stdlib `statistics` (MLflow imports it): keep this folder
# off the front of the path, last so `_common` still imports; the repo root goes first.
_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import anchors  # noqa: E402
from _common import (WRK_LUA, emit_json, example_policy, free_port, parser, print_table, run_python_loadgen,  # noqa: E402
                     run_wrk, train_and_register, verdict)

MODEL_NAME = "loan-approval"
TOKEN = "bench-token"
CONCURRENCY = (1, 8, 32)
TARGETS = ("mlflow", "single", "shadow", "ab")
OURS = ("single", "shadow", "ab", "nowait")  # rollout's own servers: their cells read /metrics, their errors are misses
HEADLINE_C = 32
BODIES = 1000

TARGET_VS_MLFLOW = 10.0  # shadow throughput over MLflow's, at concurrency 32
TARGET_SHADOW_COST = 0.95  # shadow throughput over single-model throughput, at least
TARGET_P99_RATIO = 1.1  # shadow p99 over single-model p99, at most
TARGET_VS_CEILING = 0.15  # shadow throughput over the bare ASGI app's (the ceiling), at least
TARGET_VS_ANCHOR = 2.5  # shadow throughput over the best anchor's (MLServer or BentoML), at least
TARGET_P99_VS_ANCHOR = 0.5  # shadow p99 over that anchor's p99, at most
TARGET_AB = 0.9  # ab (50/50) throughput over champion-only, at least
TARGET_AB_P99 = 1.2  # ab p99 over champion-only p99, at most

VENV_BIN = Path(sys.executable).parent


def median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# ------------------------------------------------------------------------------- load generator

# ------------------------------------------------------------------------------- setup

def write_policy(directory: Path, name: str, rows: int, seed: int, estimator: dict[str, Any],
                 serving: dict[str, Any], outcomes: str = "outcomes.db") -> Path:
    import yaml

    policy = example_policy(directory, rows, seed, outcomes)
    policy["estimator"] = estimator
    policy["serving"] = {**policy.get("serving", {}), **serving}
    path = directory / name
    path.write_text(yaml.safe_dump(policy))
    return path


def bodies_file(directory: Path, features: list[str], seed: int, kind: str) -> Path:
    """One JSON body per line: a single loan application (built as cli.simulate builds them)."""
    import pandas as pd

    from rollout.data import example_dataset

    frame = example_dataset(rows=BODIES, seed=seed)
    records = frame[features].astype(object).where(frame[features].notna(), None).to_dict("records")
    units = frame["customer_id"].astype(str).tolist()
    text_columns = {c for c in features if not pd.api.types.is_numeric_dtype(frame[c])}
    path = directory / f"bodies-{kind}.jsonl"
    with path.open("w") as fh:
        for record, unit in zip(records, units, strict=True):
            if kind == "mlflow":
                body: dict[str, Any] = {"dataframe_records": [record]}
            elif kind == "invocations":  # what MLflow's ScoringServerClient sends for a DataFrame
                body = {"dataframe_split": {"columns": list(record), "data": [list(record.values())]},
                        "unit_ids": [unit]}
            elif kind == "v2":  # a tensor per column, as an Open Inference Protocol client sends a frame; no
                # `id`: like the other bodies, the service makes the (time-ordered) request id
                body = {"inputs": [
                    {"name": k, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64", "data": [v]}
                    for k, v in record.items()]}
            elif kind in anchors.ANCHORS:
                body = anchors.body(kind, record, text_columns)
            else:
                body = {"record": record, "unit_id": unit}
            fh.write(json.dumps(body, separators=(",", ":")) + "\n")
    return path


class Server:
    """A server subprocess in its own process group; stopped (SIGTERM, then SIGKILL) by its own id."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port = name, port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, path: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=40)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._fh.close()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in a process group and of its leader's descendants (a
    server that starts its workers in sessions of their own, as BentoML's arbiter does), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, pgrp, utime + stime)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after "comm)": state, ppid, pgrp, ..., utime (11), stime (12)
        stats[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    members = {pid for pid, (_, pgrp, _) in stats.items() if pgrp == pgid}
    stack = [pgid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    return sum(stats[pid][2] for pid in members if pid in stats) / tick


def thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds (user + system) of one thread of a process, from /proc; 0 when it is gone. The service's event
    loop runs in its main thread (tid == pid) with one worker: the resource it runs out of first."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def server_env(tracking_uri: str) -> dict[str, str]:
    """The servers' environment; PYTHONPATH: they import this checkout (a worktree), not the editable install."""
    return {**os.environ, "ROLLOUT_TOKEN": TOKEN, "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def set_mode(server: Server, mode: str, versions: dict[str, str]) -> None:
    if mode == "single":
        status, body = http("GET", server.base + "/routing")
        if body.get("rollout_id") is not None:
            status, body = http("PUT", server.base + "/routing", {"end": True, "reason": "benchmark"}, TOKEN)
    elif mode == "shadow":
        status, body = http("PUT", server.base + "/routing", {"mode": "shadow", "versions": versions}, TOKEN)
    else:
        status, body = http("PUT", server.base + "/routing",
                            {"mode": "ab", "versions": versions, "weights": {"challenger": 0.5}}, TOKEN)
    if status != 200:
        raise RuntimeError(f"PUT /routing for {mode}: {status} {body}")
    expected = {"single": "champion-only", "shadow": "shadow", "ab": "ab"}[mode]
    # Each read is a new connection, so with --workers N it reaches any worker: the others take the change
    # at their next reload (serving.reload_interval_s), so wait until several reads in a row agree.
    agreed, deadline, view = 0, time.monotonic() + 60, {}
    while agreed < 8 and time.monotonic() < deadline:
        status, view = http("GET", server.base + "/routing")
        ok = view.get("mode") == expected and (mode == "single" or bool(view.get("shadows"))
                                               or len(view.get("arms", [])) > 1)
        agreed = agreed + 1 if ok else 0
        if not ok:
            time.sleep(0.2)
    if agreed < 8:
        raise RuntimeError(f"routing is not {mode}: {view}")


def drain(server: Server, timeout_s: float = 120.0) -> float:
    """Wait until the server's scoring and log queues are empty; seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        m = metrics(server.base)
        if m.get("rollout_log_queue_depth", 0) == 0 and m.get("rollout_scoring_queue_depth", 0) == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"{server.name}: queues not drained after {timeout_s:.0f} s")


# ------------------------------------------------------------------------------- main

def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, help="alternating rounds (default 5; --quick 1)")
    p.add_argument("--seconds", type=int, help="seconds per measured cell (default 4; --quick 1)")
    p.add_argument("--shadow-wait-ms", type=float,
                   help="serving.shadow_max_wait_ms of the rollout server (default: the policy default)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator: wrk when installed (auto), or the built-in asyncio client")
    p.add_argument("--fastpath", action="store_true",
                   help="only POST /predict on the direct ASGI path vs the routed endpoint (champion-only, shadow)")
    p.add_argument("--protocols", action="store_true",
                   help="only the same requests by /predict, MLflow's /invocations and v2 infer (champion-only, shadow)")
    p.add_argument("--workers", type=int, default=1,
                   help="`rollout serve --workers N` for the rollout server; throughput per worker is reported")
    p.add_argument("--serving", action="append", default=[], metavar="KEY=VALUE",
                   help="a serving option of the rollout server (repeatable), e.g. challenger_isolation=thread")
    args = p.parse_args()
    import yaml

    try:
        extra_serving = {k.strip(): yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.serving)}
    except yaml.YAMLError as exc:
        p.error(f"--serving: {exc}")
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1 if args.quick else 4)
    warmup = 1
    rows = 3000 if args.quick else 6000

    loadgen = args.loadgen
    if loadgen in ("auto", "wrk") and shutil.which("wrk") is None:
        if loadgen == "wrk":
            sys.exit("wrk is not installed: `apt-get install -y wrk`, or run with --loadgen python")
        print("wrk not found (apt-get install -y wrk); using the built-in asyncio load generator", file=sys.stderr)
        loadgen = "python"
    elif loadgen == "auto":
        loadgen = "wrk"

    started = time.perf_counter()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="rollout-bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            if args.protocols:
                proto = _run_protocols(tmp, servers, rounds, seconds, warmup, rows, args.seed, loadgen)
            elif args.fastpath:
                fast = _run_fastpath(tmp, servers, rounds, seconds, warmup, rows, args.seed, loadgen)
            else:
                results, info = _run(tmp, servers, rounds, seconds, warmup, rows, args.seed, loadgen,
                                     args.shadow_wait_ms, args.workers, extra_serving)
        finally:
            for server in servers:
                server.stop()
    if args.protocols:
        report_protocols(proto, rounds, seconds, loadgen, args.seed, time.perf_counter() - started)
    elif args.fastpath:
        report_fastpath(fast, rounds, seconds, loadgen, args.seed, time.perf_counter() - started)
    else:
        report(results, info, rounds, seconds, loadgen, args.seed, time.perf_counter() - started)


# The ceiling for any Python server here: uvicorn and an ASGI app that reads the body, parses its JSON and
# answers a constant (no framework, no model, no log).
CEILING_APP = """
import orjson


async def app(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if body:
        orjson.loads(body)
    answer = b'{"prediction": 1, "score": 0.5}'
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
"""


def _run(tmp: Path, servers: list[Server], rounds: int, seconds: float, warmup: float, rows: int, seed: int,
         loadgen: str, shadow_wait_ms: float | None = None, workers: int = 1,
         extra_serving: dict[str, Any] | None = None) -> tuple[dict[tuple[str, int], list[dict[str, Any]]], dict[str, Any]]:
    seed32 = seed % 2**31
    lr = {"name": "logistic_regression", "params": {"C": 1.0}}
    serving = {"port": 0} if shadow_wait_ms is None else {"port": 0, "shadow_max_wait_ms": shadow_wait_ms}
    serving.update(extra_serving or {})
    policy = write_policy(tmp, "rollout.yaml", rows, seed32, lr, serving)
    challenger_policy = write_policy(tmp, "challenger.yaml", rows, seed32 + 1,
                                     {"name": "logistic_regression", "params": {"C": 0.3}}, {"port": 0})
    nowait_policy = write_policy(tmp, "nowait.yaml", rows, seed32, lr, {"port": 0, "max_wait_ms": 0},
                                 outcomes="outcomes-nowait.db")
    t0 = time.perf_counter()
    from rollout.config import load_policy
    from rollout.registry import MlflowRegistry
    from rollout.outcomes import OutcomeStore

    pol = load_policy(policy)
    champion, features = train_and_register(policy, export=tmp / "champion.joblib")
    registry = MlflowRegistry(pol.tracking_uri, MODEL_NAME, pol.registry.mirror_stages)
    registry.set_alias("champion", champion)
    env = server_env(pol.tracking_uri)
    ports = {k: free_port() for k in ("mlflow", "rollout", "nowait", "ceiling")}
    (tmp / "ceiling_app.py").write_text(CEILING_APP)
    ceiling_srv = Server("ceiling", [sys.executable, "-m", "uvicorn", "ceiling_app:app", "--app-dir", str(tmp),
                                     "--host", "127.0.0.1", "--port", str(ports["ceiling"]), "--lifespan", "off",
                                     "--no-access-log", "--log-level", "warning"], env, ports["ceiling"],
                         tmp / "ceiling.log")
    servers.append(ceiling_srv)
    # The champion-only servers start while the challenger trains.
    mlflow_srv = Server("mlflow", [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
                                   "--env-manager", "local", "--workers", "1", "--host", "127.0.0.1",
                                   "--port", str(ports["mlflow"])], env, ports["mlflow"], tmp / "mlflow.log")
    servers.append(mlflow_srv)
    nowait_srv = Server("rollout-nowait", [str(VENV_BIN / "rollout"), "serve", "--config", str(nowait_policy),
                                           "--port", str(ports["nowait"]), "--log-level", "warning"], env,
                        ports["nowait"], tmp / "rollout-nowait.log")
    servers.append(nowait_srv)
    anchor_srv: dict[str, Server] = {}
    anchor_path: dict[str, str] = {}
    for name in anchors.ANCHORS:  # the servers people would pick instead, on the same pipeline
        try:
            port = free_port()
            cmd, extra, anchor_path[name] = anchors.command(name, tmp, tmp / "champion.joblib", MODEL_NAME, port,
                                                            (free_port(), free_port()))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"WARNING: {name} left out: {exc}", file=sys.stderr)
            continue
        anchor_srv[name] = Server(name, cmd, {**env, **extra}, port, tmp / f"{name}.log")
        servers.append(anchor_srv[name])
    challenger, _ = train_and_register(challenger_policy)
    registry.set_alias("challenger", challenger)
    OutcomeStore(pol.outcome_url).create()
    versions = {"champion": champion, "challenger": challenger}
    print(f"trained and registered champion v{champion}, challenger v{challenger}: "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rollout_srv = Server("rollout", [str(VENV_BIN / "rollout"), "serve", "--config", str(policy), "--port",
                                     str(ports["rollout"]), "--log-level", "warning", "--workers",
                                     str(workers)], env, ports["rollout"], tmp / "rollout.log")
    servers.append(rollout_srv)
    mlflow_srv.wait_ready("/ping")
    rollout_srv.wait_ready("/healthz")
    nowait_srv.wait_ready("/healthz")
    ceiling_srv.wait_ready("/")
    for name, srv in anchor_srv.items():
        srv.wait_ready(anchors.READY_PATH[name])
    print(f"servers ready: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    bodies = {kind: bodies_file(tmp, features, seed32 + 7, kind) for kind in ("mlflow", "rollout", *anchor_srv)}
    script = tmp / "post.lua"
    script.write_text(WRK_LUA)
    # Both servers must answer the very bodies the load generator sends (the load generator counts non-200s).
    first = {k: json.loads(v.read_text().splitlines()[0]) for k, v in bodies.items()}
    checks = [(mlflow_srv.base + "/invocations", first["mlflow"]), (rollout_srv.base + "/predict", first["rollout"]),
              *((srv.base + anchor_path[name], first[name]) for name, srv in anchor_srv.items())]
    for base, body in checks:
        status, answer = http("POST", base, body)
        if status != 200:
            raise RuntimeError(f"{base}: {status} {answer}")
        print(f"{base}: {json.dumps(answer)[:200]}", file=sys.stderr)

    def load(url: str, body_path: Path, concurrency: int, secs: float) -> dict[str, Any]:
        if loadgen == "wrk":
            return run_wrk(url, body_path, script, concurrency, secs)
        return run_python_loadgen(url, body_path, concurrency, secs)

    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    order = (*TARGETS[:2], "nowait", *TARGETS[2:], "ceiling", *anchor_srv)
    written_before = metrics(rollout_srv.base).get("rollout_log_written_total", 0.0)
    for r in range(rounds):
        for target in order:
            if target == "mlflow":
                server, url, body_path = mlflow_srv, mlflow_srv.base + "/invocations", bodies["mlflow"]
            elif target == "nowait":
                server, url, body_path = nowait_srv, nowait_srv.base + "/predict", bodies["rollout"]
            elif target == "ceiling":
                server, url, body_path = ceiling_srv, ceiling_srv.base + "/predict", bodies["rollout"]
            elif target in anchor_srv:
                server, url, body_path = anchor_srv[target], anchor_srv[target].base + anchor_path[target], bodies[target]
            else:
                server, url, body_path = rollout_srv, rollout_srv.base + "/predict", bodies["rollout"]
                set_mode(server, target, versions)
            levels = (1,) if target == "nowait" else (HEADLINE_C,) if target in ("ceiling", *anchor_srv) else CONCURRENCY
            load(url, body_path, max(levels), warmup)  # untimed: connections, lanes, caches
            for c in levels:
                ours = target in OURS
                if ours:
                    drain(server)
                before = metrics(server.base) if ours else {}
                loop0 = thread_cpu_s(server.proc.pid, server.proc.pid) if ours and workers == 1 else None
                cpu0 = group_cpu_s(server.proc.pid)
                out = load(url, body_path, c, seconds)
                # answers that were not 200 (an anchor overloaded on a slow day) are not throughput
                out["throughput"] = (out["requests"] - out["bad_status"] - out["socket_errors"]) / out["duration_s"]
                if ours:
                    out["log_queue_at_end"] = metrics(server.base).get("rollout_log_queue_depth", 0.0)
                    out["drain_s"] = drain(server)  # the cell's log rows and shadow rows are part of its cost
                    after = metrics(server.base)
                    out["log_dropped"] = after.get("rollout_log_dropped_total", 0.0) - before.get("rollout_log_dropped_total", 0.0)
                    out["shadow_dropped"] = after.get("rollout_shadow_dropped_total", 0.0) - before.get("rollout_shadow_dropped_total", 0.0)
                    for lane in ("serve", "shadow"):
                        keys = [k for k in after if k.startswith("rollout_batch") and f"/{lane}" in k]
                        calls = sum(after[k] - before.get(k, 0.0) for k in keys if k.startswith("rollout_batches_total"))
                        rows_ = sum(after[k] - before.get(k, 0.0) for k in keys if k.startswith("rollout_batch_rows_total"))
                        out[f"{lane}_batch_mean"] = rows_ / calls if calls else None
                out["cpu_us_per_request"] = (group_cpu_s(server.proc.pid) - cpu0) / max(out["requests"], 1) * 1e6
                if loop0 is not None:  # the rest is the service's other threads (scoring, log writer) and children
                    out["loop_cpu_us_per_request"] = ((thread_cpu_s(server.proc.pid, server.proc.pid) - loop0)
                                                      / max(out["requests"], 1) * 1e6)
                if out["bad_status"] or out["socket_errors"]:
                    print(f"WARNING {target} c={c}: {out['bad_status']} non-200, {out['socket_errors']} socket errors",
                          file=sys.stderr)
                results.setdefault((target, c), []).append(out)
                print(f"round {r + 1} {target:7s} c={c:2d}: {out['throughput']:8.1f} req/s  p50 {out['p50_ms']:7.2f} ms"
                      f"  p99 {out['p99_ms']:7.2f} ms", file=sys.stderr)
    # Every prediction logged: the served rows (single, ab, shadow, and warm-ups) plus shadow rows.
    m = metrics(rollout_srv.base)
    info = {
        "champion_version": champion, "challenger_version": challenger,
        # with --workers N, /metrics is the answering worker's: the log counters are one worker's share
        "workers": workers,
        "log_rows_written": m.get("rollout_log_written_total", 0.0) - written_before,
        "log_rows_dropped": m.get("rollout_log_dropped_total", 0.0),
        "log_rows_lost": m.get("rollout_log_lost_total", 0.0),
        "shadow_rows_dropped": m.get("rollout_shadow_dropped_total", 0.0),
        "features": len(features), "train_rows": rows,
        "max_wait_ms": pol.serving.max_wait_ms, "shadow_max_wait_ms": pol.serving.shadow_max_wait_ms,
        "serving_options": extra_serving or {},
        "anchors": {name: anchors.ANCHORS[name] for name in anchor_srv},
        "anchor_batching": {"max_batch_size": anchors.MAX_BATCH_SIZE, "max_batch_ms": anchors.MAX_BATCH_MS},
    }
    return results, info


PATHS = ("direct", "routed")
FASTPATH_MODES = ("single", "shadow")


def serve_worker(policy_path: str, port: int, path: str) -> None:
    """`rollout serve` (serving.app.run's settings) with POST /predict on the given path: direct or routed."""
    import logging

    import uvicorn

    from rollout.config import load_policy
    from serving.app import create_app
    from serving.fastpath import App

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(load_policy(policy_path))
    assert isinstance(app, App)
    if path == "routed":
        app.fast_predict = None
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=30)


def _run_fastpath(tmp: Path, servers: list[Server], rounds: int, seconds: float, warmup: float, rows: int,
                  seed: int, loadgen: str) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """Two servers of this checkout, one per path, each with its own outcome store; same registry and bodies."""
    seed32 = seed % 2**31
    lr = {"name": "logistic_regression", "params": {"C": 1.0}}
    policies = {path: write_policy(tmp, f"{path}.yaml", rows, seed32, lr, {"port": 0}, outcomes=f"outcomes-{path}.db")
                for path in PATHS}
    challenger_policy = write_policy(tmp, "challenger.yaml", rows, seed32 + 1,
                                     {"name": "logistic_regression", "params": {"C": 0.3}}, {"port": 0})
    from rollout.config import load_policy
    from rollout.outcomes import OutcomeStore
    from rollout.registry import MlflowRegistry

    pol = load_policy(policies["direct"])
    champion, features = train_and_register(policies["direct"])
    challenger, _ = train_and_register(challenger_policy)
    registry = MlflowRegistry(pol.tracking_uri, MODEL_NAME, pol.registry.mirror_stages)
    registry.set_alias("champion", champion)
    registry.set_alias("challenger", challenger)
    versions = {"champion": champion, "challenger": challenger}
    env = server_env(pol.tracking_uri)
    by_path: dict[str, Server] = {}
    for path, policy in policies.items():
        OutcomeStore(load_policy(policy).outcome_url).create()
        port = free_port()
        by_path[path] = Server(path, [sys.executable, str(Path(__file__).resolve()), "--serve-worker", str(policy),
                                      str(port), path], env, port, tmp / f"{path}.log")
        servers.append(by_path[path])
    for server in by_path.values():
        server.wait_ready("/healthz")
    body_path = bodies_file(tmp, features, seed32 + 7, "rollout")
    script = tmp / "post.lua"
    script.write_text(WRK_LUA)

    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for mode in FASTPATH_MODES:
            order = PATHS if r % 2 == 0 else PATHS[::-1]
            for path in order:
                server = by_path[path]
                set_mode(server, mode, versions)
                url = server.base + "/predict"

                for c, out in _cells(server, url, body_path, script, loadgen, warmup, seconds,
                                     f"round {r + 1} {path:6s} {mode:6s}"):
                    results.setdefault((path, mode, c), []).append(out)
    return results


def _cells(server: Server, url: str, body_path: Path, script: Path, loadgen: str, warmup: float, seconds: float,
           label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """After an untimed warm-up (connections, lanes, the shadow child), one measured cell per concurrency:
    the load generator's figures, the server's CPU per request and the time its log queue took to drain."""

    def load(concurrency: int, secs: float) -> dict[str, Any]:
        if loadgen == "wrk":
            return run_wrk(url, body_path, script, concurrency, secs)
        return run_python_loadgen(url, body_path, concurrency, secs)

    load(max(CONCURRENCY), warmup)
    for c in CONCURRENCY:
        drain(server)
        cpu0 = group_cpu_s(server.proc.pid)
        out = load(c, seconds)
        out["cpu_us_per_request"] = (group_cpu_s(server.proc.pid) - cpu0) / max(out["requests"], 1) * 1e6
        out["throughput"] = out["requests"] / out["duration_s"]
        out["drain_s"] = drain(server)
        if out["bad_status"] or out["socket_errors"]:
            print(f"WARNING {label} c={c}: {out['bad_status']} non-200, {out['socket_errors']} socket errors",
                  file=sys.stderr)
        print(f"{label} c={c:2d}: {out['throughput']:8.1f} req/s  p50 {out['p50_ms']:6.2f} ms  "
              f"p99 {out['p99_ms']:6.2f} ms  cpu {out['cpu_us_per_request']:6.1f} us/req", file=sys.stderr)
        yield c, out


PROTOCOLS = {"predict": "/predict", "invocations": "/invocations", "v2": f"/v2/models/{MODEL_NAME}/infer"}


def _run_protocols(tmp: Path, servers: list[Server], rounds: int, seconds: float, warmup: float, rows: int,
                   seed: int, loadgen: str) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """One server; the same rows sent by each protocol, cell after cell, the order alternating every round."""
    seed32 = seed % 2**31
    policy = write_policy(tmp, "policy.yaml", rows, seed32, {"name": "logistic_regression", "params": {"C": 1.0}},
                          {"port": 0})
    challenger_policy = write_policy(tmp, "challenger.yaml", rows, seed32 + 1,
                                     {"name": "logistic_regression", "params": {"C": 0.3}}, {"port": 0})
    from rollout.config import load_policy
    from rollout.outcomes import OutcomeStore
    from rollout.registry import MlflowRegistry

    pol = load_policy(policy)
    champion, features = train_and_register(policy)
    challenger, _ = train_and_register(challenger_policy)
    registry = MlflowRegistry(pol.tracking_uri, MODEL_NAME, pol.registry.mirror_stages)
    registry.set_alias("champion", champion)
    registry.set_alias("challenger", challenger)
    versions = {"champion": champion, "challenger": challenger}
    OutcomeStore(pol.outcome_url).create()
    port = free_port()
    server = Server("rollout", [sys.executable, str(Path(__file__).resolve()), "--serve-worker", str(policy),
                                str(port), "direct"], server_env(pol.tracking_uri), port, tmp / "rollout.log")
    servers.append(server)
    server.wait_ready("/healthz")
    bodies = {name: bodies_file(tmp, features, seed32 + 7, "rollout" if name == "predict" else name)
              for name in PROTOCOLS}
    script = tmp / "post.lua"
    script.write_text(WRK_LUA)
    names = list(PROTOCOLS)
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for mode in FASTPATH_MODES:
            set_mode(server, mode, versions)
            for name in names if r % 2 == 0 else names[::-1]:
                for c, out in _cells(server, server.base + PROTOCOLS[name], bodies[name], script, loadgen, warmup,
                                     seconds, f"round {r + 1} {name:11s} {mode:6s}"):
                    results.setdefault((name, mode, c), []).append(out)
    return results


def report_protocols(results: dict[tuple[str, str, int], list[dict[str, Any]]], rounds: int, seconds: float,
                     loadgen: str, seed: int, wall: float) -> None:
    keys = ("throughput", "p50_ms", "p99_ms", "cpu_us_per_request")
    table = []
    figures: dict[str, Any] = {}
    for mode in FASTPATH_MODES:
        for c in CONCURRENCY:
            for name in PROTOCOLS:
                runs = results[(name, mode, c)]
                cell = {k: median([o[k] for o in runs]) for k in keys}
                cell["non_200"] = sum(o["bad_status"] + o["socket_errors"] for o in runs)
                pairs = list(zip(runs, results[("predict", mode, c)], strict=True))
                cell["over_predict"] = {k: median([a[k] / b[k] for a, b in pairs if b[k]]) for k in keys}
                figures.setdefault(mode, {}).setdefault(str(c), {})[name] = cell
                table.append([mode, c, name, cell["throughput"], cell["p50_ms"], cell["p99_ms"],
                              cell["cpu_us_per_request"], cell["over_predict"]["throughput"],
                              cell["over_predict"]["cpu_us_per_request"], cell["non_200"]])
    print_table(f"The same single-record requests by each protocol, {seconds:g} s per cell, median of {rounds} "
                f"round(s), load generator {loadgen}",
                ["mode", "conc", "protocol", "req/s", "p50 ms", "p99 ms", "CPU us/req", "req/s / predict",
                 "CPU / predict", "errors"], table)
    emit_json({"rounds": rounds, "seconds_per_cell": seconds, "loadgen": loadgen, "seed": seed,
               "protocols": figures, "wall_seconds": round(wall, 1)})


def report_fastpath(results: dict[tuple[str, str, int], list[dict[str, Any]]], rounds: int, seconds: float,
                    loadgen: str, seed: int, wall: float) -> None:
    keys = ("throughput", "p50_ms", "p99_ms", "cpu_us_per_request")
    table = []
    figures: dict[str, Any] = {}
    for mode in FASTPATH_MODES:
        for c in CONCURRENCY:
            row: list[Any] = [mode, c]
            cell: dict[str, Any] = {}
            for path in PATHS:
                runs = results[(path, mode, c)]
                cell[path] = {k: median([o[k] for o in runs]) for k in keys}
                cell[path]["non_200"] = sum(o["bad_status"] + o["socket_errors"] for o in runs)
                row += [cell[path]["throughput"], cell[path]["p50_ms"], cell[path]["p99_ms"]]
            # One ratio per round (the two paths ran back to back), then the median: noise falls on both alike.
            pairs = list(zip(results[("routed", mode, c)], results[("direct", mode, c)], strict=True))
            cell["routed_over_direct"] = {k: median([a[k] / b[k] for a, b in pairs if b[k]]) for k in keys}
            row += [cell["routed_over_direct"][k] for k in keys]
            figures.setdefault(mode, {})[str(c)] = cell
            table.append(row)
    print_table(f"POST /predict, direct ASGI path vs routed endpoint, {seconds:g} s per cell, median of {rounds} "
                f"round(s), load generator {loadgen}",
                ["mode", "conc", "direct req/s", "direct p50", "direct p99", "routed req/s", "routed p50",
                 "routed p99", "req/s ratio", "p50 ratio", "p99 ratio", "cpu/req ratio"], table)
    emit_json({"rounds": rounds, "seconds_per_cell": seconds, "loadgen": loadgen, "seed": seed,
               "fastpath": figures, "wall_seconds": round(wall, 1)})


def report(results: dict[tuple[str, int], list[dict[str, Any]]], info: dict[str, Any], rounds: int, seconds: float,
           loadgen: str, seed: int, wall: float) -> None:
    def med(target: str, c: int, key: str) -> float:
        return median([o[key] for o in results.get((target, c), []) if o.get(key) is not None])

    def ratio(a: str, b: str, c: int, key: str) -> float:
        pairs = zip(results.get((a, c), []), results.get((b, c), []), strict=False)
        return median([x[key] / y[key] for x, y in pairs if y[key]])

    rows = []
    per: dict[str, Any] = {}
    for target in (*TARGETS, "nowait", "ceiling", *anchors.ANCHORS):
        for c in CONCURRENCY:
            if (target, c) not in results:
                continue
            runs = results[(target, c)]
            fig = {"throughput": med(target, c, "throughput"), "p50_ms": med(target, c, "p50_ms"),
                   "p99_ms": med(target, c, "p99_ms"), "cpu_us_per_request": med(target, c, "cpu_us_per_request"),
                   "non_200": sum(o["bad_status"] + o["socket_errors"] for o in runs)}
            if target in OURS:
                fig["serve_batch_mean"] = med(target, c, "serve_batch_mean")
                fig["shadow_batch_mean"] = med(target, c, "shadow_batch_mean")
                fig["log_dropped"] = sum(o["log_dropped"] for o in runs)
                fig["drain_s"] = med(target, c, "drain_s")
                fig["loop_cpu_us_per_request"] = med(target, c, "loop_cpu_us_per_request")
            per.setdefault(target, {})[str(c)] = fig
            rows.append([target, c, fig["throughput"], fig["p50_ms"], fig["p99_ms"], fig["cpu_us_per_request"],
                         fig.get("loop_cpu_us_per_request", ""), fig.get("serve_batch_mean", ""),
                         fig.get("shadow_batch_mean", ""), fig["non_200"]])
    print_table(f"Single-record requests, {seconds:g} s per cell, median of {rounds} round(s), load generator {loadgen}",
                ["server", "conc", "req/s", "p50 ms", "p99 ms", "server CPU us/req", "its event loop's",
                 "serve batch", "shadow batch", "errors"],
                [[x if x is not None else "" for x in r] for r in rows])

    ratios: dict[str, dict[str, float]] = {}
    for c in CONCURRENCY:
        ratios[str(c)] = {
            "shadow_vs_mlflow_throughput": ratio("shadow", "mlflow", c, "throughput"),
            "single_vs_mlflow_throughput": ratio("single", "mlflow", c, "throughput"),
            "shadow_vs_single_throughput": ratio("shadow", "single", c, "throughput"),
            "ab_vs_single_throughput": ratio("ab", "single", c, "throughput"),
            "shadow_p99_vs_single_p99": ratio("shadow", "single", c, "p99_ms"),
            "shadow_p99_vs_mlflow_p99": ratio("shadow", "mlflow", c, "p99_ms"),
            "shadow_cpu_vs_single_cpu": ratio("shadow", "single", c, "cpu_us_per_request"),
        }
    print_table("Ratios by concurrency (median of per-round ratios)",
                ["conc", *ratios[str(CONCURRENCY[0])].keys()],
                [[c, *ratios[str(c)].values()] for c in CONCURRENCY])

    h = ratios[str(HEADLINE_C)]
    h["shadow_vs_ceiling_throughput"] = ratio("shadow", "ceiling", HEADLINE_C, "throughput")
    h["ab_p99_vs_single_p99"] = ratio("ab", "single", HEADLINE_C, "p99_ms")
    # the best anchor of each round (MLServer or BentoML, by throughput), and shadow over it
    vs_anchor, p99_vs_anchor, best_names = [], [], []
    shadow_runs = results.get(("shadow", HEADLINE_C), [])
    for i, ours in enumerate(shadow_runs):
        theirs = [(name, results[(name, HEADLINE_C)][i]) for name in anchors.ANCHORS
                  if len(results.get((name, HEADLINE_C), [])) > i]
        if theirs:
            name, best = max(theirs, key=lambda t: t[1]["throughput"])
            best_names.append(name)
            vs_anchor.append(ours["throughput"] / best["throughput"])
            p99_vs_anchor.append(ours["p99_ms"] / best["p99_ms"])
    h["shadow_vs_best_anchor_throughput"] = median(vs_anchor)
    h["shadow_p99_vs_best_anchor_p99"] = median(p99_vs_anchor)
    best_anchor = max(set(best_names), key=best_names.count) if best_names else None
    wait_ms = info["max_wait_ms"]
    added_p50 = med("single", 1, "p50_ms") - med("nowait", 1, "p50_ms")
    p99_below_mlflow = all(ratios[str(c)]["shadow_p99_vs_mlflow_p99"] < 1.0 for c in CONCURRENCY)
    every_logged = info["log_rows_dropped"] == 0 and info["log_rows_lost"] == 0 and info["shadow_rows_dropped"] == 0
    # rollout's servers must answer every request; another server's errors (BentoML's under overload, on a slow
    # day) are its own: counted in its row, left out of its throughput, not a miss of ours
    no_errors = all(f["non_200"] == 0 for t, cells in per.items() if t in OURS for f in cells.values())
    checks = [
        ["shadow / MLflow throughput (c=32)", h["shadow_vs_mlflow_throughput"], f">= {TARGET_VS_MLFLOW:g}",
         h["shadow_vs_mlflow_throughput"] >= TARGET_VS_MLFLOW],
        [f"shadow / best anchor throughput (c=32; {best_anchor})", h["shadow_vs_best_anchor_throughput"],
         f">= {TARGET_VS_ANCHOR:g}", h["shadow_vs_best_anchor_throughput"] >= TARGET_VS_ANCHOR],
        [f"shadow p99 / best anchor p99 (c=32; {best_anchor})", h["shadow_p99_vs_best_anchor_p99"],
         f"<= {TARGET_P99_VS_ANCHOR:g}", h["shadow_p99_vs_best_anchor_p99"] <= TARGET_P99_VS_ANCHOR],
        ["ab 50/50 / single throughput (c=32)", h["ab_vs_single_throughput"], f">= {TARGET_AB:g}",
         h["ab_vs_single_throughput"] >= TARGET_AB],
        ["ab p99 / single p99 (c=32)", h["ab_p99_vs_single_p99"], f"<= {TARGET_AB_P99:g}",
         h["ab_p99_vs_single_p99"] <= TARGET_AB_P99],
        ["shadow / bare ASGI ceiling throughput (c=32)", h["shadow_vs_ceiling_throughput"],
         f">= {TARGET_VS_CEILING:g}", h["shadow_vs_ceiling_throughput"] >= TARGET_VS_CEILING],
        ["shadow / single throughput (c=32)", h["shadow_vs_single_throughput"], f">= {TARGET_SHADOW_COST:g}",
         h["shadow_vs_single_throughput"] >= TARGET_SHADOW_COST],
        ["shadow p99 / single p99 (c=32)", h["shadow_p99_vs_single_p99"], f"<= {TARGET_P99_RATIO:g}",
         h["shadow_p99_vs_single_p99"] <= TARGET_P99_RATIO],
        ["shadow p99 / MLflow p99 (worst conc)", max(ratios[str(c)]["shadow_p99_vs_mlflow_p99"] for c in CONCURRENCY),
         "< 1", p99_below_mlflow],
        ["batching's added p50 at c=1, ms (vs max_wait_ms=0)", added_p50, f"<= {wait_ms:g} (max_wait_ms)",
         added_p50 <= wait_ms],
        ["every prediction logged (no drops, no losses)", str(every_logged), "True", every_logged],
        ["every request to rollout answered 200", str(no_errors), "True", no_errors],
    ]
    print_table("Targets", ["figure", "value", "target", "status"], [[*c[:3], verdict(c[3])] for c in checks])
    misses = [c[0] for c in checks if not c[3]]
    emit_json({
        "rounds": rounds, "seconds_per_cell": seconds, "loadgen": loadgen, "seed": seed,
        "concurrency": list(CONCURRENCY),
        "throughput": {t: {c: f["throughput"] for c, f in v.items()} for t, v in per.items()},
        "p50_ms": {t: {c: f["p50_ms"] for c, f in v.items()} for t, v in per.items()},
        "p99_ms": {t: {c: f["p99_ms"] for c, f in v.items()} for t, v in per.items()},
        "shadow_vs_mlflow_throughput": h["shadow_vs_mlflow_throughput"],
        "shadow_vs_single_throughput": h["shadow_vs_single_throughput"],
        "shadow_p99_vs_single_p99": h["shadow_p99_vs_single_p99"],
        "shadow_p99_vs_mlflow_p99": h["shadow_p99_vs_mlflow_p99"],
        "shadow_cpu_vs_single_cpu": h["shadow_cpu_vs_single_cpu"],
        "shadow_vs_ceiling_throughput": h["shadow_vs_ceiling_throughput"],
        "ab_vs_single_throughput": h["ab_vs_single_throughput"],
        "ab_p99_vs_single_p99": h["ab_p99_vs_single_p99"],
        "shadow_vs_best_anchor_throughput": h["shadow_vs_best_anchor_throughput"],
        "shadow_p99_vs_best_anchor_p99": h["shadow_p99_vs_best_anchor_p99"], "best_anchor": best_anchor,
        "batching_added_p50_ms_c1": added_p50,
        # read the scaling on a machine with more cores: requests/s of each rollout mode over the workers
        "throughput_per_worker": {t: {c: f["throughput"] / info["workers"] for c, f in per[t].items()}
                                  for t in ("single", "shadow", "ab") if t in per},
        "ratios_by_concurrency": ratios, "cells": per, **info,
        "pass": not misses, "misses": misses, "wall_seconds": round(wall, 1),
    })


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen-worker":  # kept for older command lines
        from _common import loadgen_worker

        loadgen_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-worker":
        serve_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
