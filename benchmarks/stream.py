"""Streaming rollouts against the HTTP service: `rollout stream` answering a Redis Stream and `rollout serve`
answering HTTP, on the same two models in shadow mode, side by side in alternating rounds.

    .venv/bin/python benchmarks/stream.py            # 3 rounds of 6,000 requests each
    .venv/bin/python benchmarks/stream.py --quick    # 2 rounds of 2,000

Setup: the example's logistic-regression pipeline registered twice in a local MLflow registry (champion and
challenger), a shadow rollout open in each contender's own SQLite outcome store, single-record requests from
the example generator. Redis: the machine's on 127.0.0.1:6379, else a `redis-server` started here.

- HTTP: `rollout serve` under wrk (1 thread, 32 connections, the same bodies) for 8 s a round, or without wrk
  the benchmarks' fallback load generator (`_common.loadgen_worker`, which tops out far below the server:
  install wrk, `apt-get install -y wrk`); either shares the two cores with the server.
- Stream: the same requests written to the input stream beforehand; `rollout stream` (one consumer) reads,
  answers to the output stream and acknowledges after logging.

The stream's figure is its steady rate: answers between the first 10% and the last one, over the time between
them (start-up and model loading excluded); HTTP's is requests over the load's duration, after a warm-up. The stream's target: at least 0.8x the HTTP rate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import statistics as stats_  # noqa: E402 - after the path fix: benchmarks/statistics.py shares the name

from _common import (WRK_LUA, emit_json, example_policy, free_port, parser, print_table, run_python_loadgen,  # noqa: E402
                     run_wrk, shadow_pair, verdict)

VENV_BIN = Path(sys.executable).parent
CONCURRENCY = 32
TARGET = 0.8  # stream rate over HTTP rate, at least


def _reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _redis(tmp: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    if _reachable(6379):
        return "redis://127.0.0.1:6379/0", None
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("no Redis on 127.0.0.1:6379 and no redis-server to start one (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not _reachable(port) and time.time() < deadline:
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc


def _policy(directory: Path, name: str, outcomes: str, seed: int) -> Path:
    import yaml

    policy = example_policy(directory, 6000, seed, outcomes)
    policy["serving"] = {**policy.get("serving", {}), "port": 0}
    path = directory / name
    path.write_text(yaml.safe_dump(policy))
    return path


def _bodies(n: int, seed: int, features: list[str]) -> list[dict[str, Any]]:
    from rollout.data import example_dataset, records_of

    frame = example_dataset(rows=n, seed=seed)
    return [{"record": r} for r in records_of(frame[features])]


def _steady_rate(times: list[float]) -> float:
    """Answers after the first 10%, over the time from the 10% mark to the last answer."""
    times = sorted(times)
    start = len(times) // 10
    span = times[-1] - times[start]
    return (len(times) - 1 - start) / span if span > 0 else float("nan")


def _http_round(base: str, bodies: Path, seconds: float, script: Path | None) -> float:
    """Requests/s of `rollout serve` at concurrency 32 for `seconds`: under wrk when installed (`script`), else
    the fallback load generator (its own process, keep-alive; it tops out well below what wrk shows)."""
    url = base + "/predict"
    out = (run_wrk(url, bodies, script, CONCURRENCY, seconds) if script is not None
           else run_python_loadgen(url, bodies, CONCURRENCY, seconds))
    if out["bad_status"] or out["socket_errors"]:
        raise RuntimeError(f"HTTP load: {out}")
    return float(out["requests"]) / float(out["duration_s"])


def _stream_round(policy: Path, redis_url: str, bodies: list[dict[str, Any]], round_no: int, env: dict[str, str],
                  log: Path) -> float:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    names = (f"bench:requests:{os.getpid()}:{round_no}", f"bench:answers:{os.getpid()}:{round_no}")
    client.delete(*names)
    pipe = client.pipeline(transaction=False)
    for body in bodies:
        pipe.xadd(names[0], {"body": json.dumps(body, default=str)})
    pipe.execute()
    proc = subprocess.Popen([str(VENV_BIN / "rollout"), "stream", "--config", str(policy), "--redis", redis_url,
                             "--input", names[0], "--output", names[1], "--group", "bench", "--consumer", "c1"],
                            env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[float] = []
    try:
        deadline = time.monotonic() + 1800
        count = 0
        while count < len(bodies):
            if proc.poll() is not None:
                raise RuntimeError(f"rollout stream exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError("rollout stream did not answer every message in 30 minutes")
            now_count = int(client.xlen(names[1]))
            now = time.perf_counter()
            seen += [now] * (now_count - count)  # answers come in batches: each stamped when first seen
            count = now_count
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        client.delete(*names)
    return _steady_rate(seen)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rollout serve exited; see {log}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"rollout serve not ready in 180 s; see {log}")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, help="requests per round (default 6,000; --quick 2,000)")
    p.add_argument("--rounds", type=int, help="rounds (default 3; --quick 2)")
    args = p.parse_args()
    n = args.requests or (2000 if args.quick else 6000)
    rounds = args.rounds or (2 if args.quick else 3)
    seed = args.seed % 2**31
    started = time.perf_counter()
    rates: dict[str, list[float]] = {"http": [], "stream": []}
    with tempfile.TemporaryDirectory(prefix="rollout-bench-stream-") as tmp_name:
        tmp = Path(tmp_name)
        redis_url, redis_proc = _redis(tmp)
        serve = None
        try:
            http_policy = _policy(tmp, "http.yaml", "outcomes-http.db", seed)
            stream_policy = _policy(tmp, "stream.yaml", "outcomes-stream.db", seed)
            challenger_policy = _policy(tmp, "challenger.yaml", "outcomes-http.db", seed + 1)
            champion, challenger, features = shadow_pair(http_policy, challenger_policy, [http_policy, stream_policy])
            from rollout.config import load_policy

            env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": load_policy(http_policy).tracking_uri}
            port = free_port()
            log = tmp / "serve.log"
            serve = subprocess.Popen([str(VENV_BIN / "rollout"), "serve", "--config", str(http_policy), "--port",
                                      str(port), "--log-level", "warning"], env=env, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, serve, log)
            bodies = _bodies(n, seed + 7, features)
            body_file = tmp / "bodies.jsonl"
            body_file.write_text("\n".join(json.dumps(b, default=str) for b in bodies))
            seconds = 4.0 if args.quick else 8.0
            script = None
            if shutil.which("wrk") is not None:
                script = tmp / "post.lua"
                script.write_text(WRK_LUA)
            loadgen = "wrk" if script is not None else "python"
            _http_round(base, body_file, 2.0, script)  # untimed: connections, lanes, the shadow child
            print(f"{n:,} single-record requests a stream round, HTTP {seconds:g} s a round, {rounds} rounds; "
                  f"champion v{champion}, challenger v{challenger} (shadow)", flush=True)
            for r in range(rounds):
                rates["http"].append(_http_round(base, body_file, seconds, script))
                rates["stream"].append(_stream_round(stream_policy, redis_url, bodies, r, env, tmp / "stream.log"))
                print(f"round {r + 1}: HTTP {rates['http'][-1]:,.0f} req/s, stream {rates['stream'][-1]:,.0f} req/s",
                      flush=True)
        finally:
            if serve is not None:
                os.killpg(serve.pid, signal.SIGTERM)
                serve.wait(timeout=60)
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(timeout=10)
    ratios = [s / h for s, h in zip(rates["stream"], rates["http"], strict=True)]
    ratio = stats_.median(ratios)
    out = {"requests": n, "rounds": rounds, "concurrency": CONCURRENCY, "loadgen": loadgen,
           "http_rps": stats_.median(rates["http"]),
           "stream_rps": stats_.median(rates["stream"]), "ratio": ratio, "ratios": ratios, "seed": args.seed,
           "seconds": round(time.perf_counter() - started, 1)}
    table = [["HTTP (rollout serve, shadow, concurrency 32): requests/s", out["http_rps"], "", ""],
             ["stream (rollout stream, shadow, one consumer): requests/s", out["stream_rps"], "", ""],
             ["stream over HTTP (median of the rounds' ratios)", ratio, f">= {TARGET}", verdict(ratio >= TARGET)]]
    print_table("Streaming vs HTTP (steady rates; rounds alternate)", ["figure", "value", "target", "status"], table)
    out["misses"] = [r[0] for r in table if r[-1] == "MISS"]
    emit_json(out)


if __name__ == "__main__":
    main()
