"""Logging that keeps up: `rollout serve` in shadow mode under 1,000-row requests, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/log_load.py            # 16 connections, 20 s a backend
    .venv/bin/python benchmarks/log_load.py --quick    # 6 s a backend
    .venv/bin/python benchmarks/log_load.py --backends sqlite

The example's champion and a challenger (logistic regression) are trained and registered once; for each
backend a fresh outcome store (SQLite in a temporary folder; PostgreSQL: a new database on 127.0.0.1:5432,
dropped afterwards) gets a shadow rollout, and `rollout serve` (default serving config: a 100,000-row log
queue, `on_log_overflow: reject`) takes `{"records": [...1,000 rows]}` bodies from wrk (or the benchmarks'
Python load generator) at 16 connections. Every answered row is logged twice (champion served, challenger
shadow). After the load the service is stopped (SIGTERM drains its queue and its shadow child), and the
store is counted:

- `answered_rows`: 200 answers x rows per request; `refused_requests`: 503s (the log queue was full: the
  caller is told to retry, nothing was scored);
- `answered_not_logged`: answered rows without their champion row in the store (target 0);
- `shadow_refused_rows`: challenger rows logged as "queue full: challenger cannot keep up" (the shadow lane
  refused them so the champion's traffic never waits);
- `logged_rows_per_s`: rows written (both versions) over the time from the first request until the
  service had written everything (load plus drain).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from _common import (PG_ADMIN, WRK_LUA, emit_json, example_policy, free_port, parser, print_table,  # noqa: E402
                     run_python_loadgen, run_wrk, train_and_register, verdict)

VENV_BIN = Path(sys.executable).parent
TOKEN = "bench-token"


def _bodies(path: Path, features: list[str], rows: int, per_request: int, seed: int) -> Path:
    """Request bodies of `per_request` example applications each, with their customers as unit ids (wrk
    cycles through them)."""
    from rollout.data import example_dataset

    frame = example_dataset(rows=rows, seed=seed)
    records = frame[features].astype(object).where(frame[features].notna(), None).to_dict("records")
    units = frame["customer_id"].astype(str).tolist()
    with path.open("w") as fh:
        for start in range(0, len(records) - per_request + 1, per_request):
            body = {"records": records[start:start + per_request], "unit_ids": units[start:start + per_request]}
            fh.write(json.dumps(body, separators=(",", ":")) + "\n")
    return path


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rollout serve exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200 and json.loads(r.read()).get("mode") == "shadow":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"rollout serve not ready:\n{log.read_text()[-3000:]}")


def run_backend(name: str, url: str, tmp: Path, policy_doc: dict[str, Any], versions: dict[str, str],
                bodies: Path, per_request: int, connections: int, seconds: float, loadgen: str) -> dict[str, Any]:
    import yaml
    from sqlalchemy import text

    from rollout.outcomes import OutcomeStore

    doc = json.loads(json.dumps(policy_doc))
    doc["stores"]["outcome_store_url"] = url
    doc["serving"] = {"port": 0}
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(doc))
    store = OutcomeStore(url).create()
    store.open_rollout("shadow", versions, {}, "bench")
    port = free_port()
    log = tmp / f"serve-{name}.log"
    proc = subprocess.Popen([str(VENV_BIN / "rollout"), "serve", "--config", str(config), "--port", str(port),
                             "--log-level", "warning"], env={**os.environ, "ROLLOUT_TOKEN": TOKEN},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        script = tmp / "post.lua"
        script.write_text(WRK_LUA)
        started = time.perf_counter()
        out = (run_wrk(base + "/predict", bodies, script, connections, seconds) if loadgen == "wrk"
               else run_python_loadgen(base + "/predict", bodies, connections, seconds))
        loaded = time.perf_counter()
    finally:
        proc.send_signal(signal.SIGTERM)  # drains the log queue and the shadow child's batches
        proc.wait(timeout=300)
    drained = time.perf_counter()
    with store.engine.connect() as conn:
        counts = dict(conn.execute(text("SELECT served, count(*) FROM predictions GROUP BY served")).all())
        shadow_refused = int(conn.execute(text("SELECT count(*) FROM predictions WHERE served = 0 AND error LIKE "
                                                "'queue full%'")).scalar_one())
    store.dispose()
    answered_requests = out["requests"] - out["bad_status"] - out["socket_errors"]
    answered = answered_requests * per_request
    served, shadow = int(counts.get(1, counts.get(True, 0))), int(counts.get(0, counts.get(False, 0)))
    if served < answered:  # the service says why (its log is gone with the temporary folder afterwards)
        print(f"{name}: {answered - served} answered rows not logged; the service's log:\n"
              + log.read_text()[-6000:], file=sys.stderr)
    return {"backend": name, "requests": out["requests"], "refused_requests": out["bad_status"],
            "socket_errors": out["socket_errors"], "answered_rows": answered, "logged_served_rows": served,
            "logged_shadow_rows": shadow, "shadow_refused_rows": shadow_refused,
            "answered_not_logged": max(answered - served, 0),
            "answered_rows_per_s": answered / (loaded - started),
            "logged_rows_per_s": (served + shadow) / (drained - started), "drain_s": drained - loaded,
            "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"]}


def _pg_database() -> tuple[str, Any] | None:
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except Exception as exc:  # noqa: BLE001
        print(f"PostgreSQL skipped: not reachable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    name = f"rollout_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", (admin, name)


def main() -> None:
    import shutil

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, help="load per backend (default 20; --quick 6)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rows-per-request", type=int, default=1000)
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    args = p.parse_args()
    seconds = args.seconds or (6 if args.quick else 20)
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    began = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        doc = example_policy(tmp, 6000, args.seed % 2**31)
        import yaml

        (tmp / "champion.yaml").write_text(yaml.safe_dump(doc))
        challenger_doc = json.loads(json.dumps(doc))
        challenger_doc["estimator"] = {"name": "logistic_regression", "params": {"C": 0.3}}
        (tmp / "challenger.yaml").write_text(yaml.safe_dump(challenger_doc))
        from rollout.config import load_policy
        from rollout.registry import MlflowRegistry

        champion, features = train_and_register(tmp / "champion.yaml")
        challenger, _ = train_and_register(tmp / "challenger.yaml")
        registry = MlflowRegistry.for_policy(load_policy(tmp / "champion.yaml"))
        registry.set_alias("champion", champion)
        registry.set_alias("challenger", challenger)
        versions = {"champion": champion, "challenger": challenger}
        bodies = _bodies(tmp / "bodies.jsonl", features, 10 * args.rows_per_request, args.rows_per_request,
                         args.seed % 2**31 + 7)
        for backend in args.backends.split(","):
            if backend == "sqlite":
                results.append(run_backend("sqlite", f"sqlite:///{tmp / 'outcomes.db'}", tmp, doc, versions, bodies,
                                           args.rows_per_request, args.connections, seconds, loadgen))
            elif backend == "postgres":
                made = _pg_database()
                if made is None:
                    continue
                url, (admin, name) = made
                try:
                    results.append(run_backend("postgres", url, tmp, doc, versions, bodies, args.rows_per_request,
                                               args.connections, seconds, loadgen))
                finally:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    admin.close()
    print_table(f"{args.rows_per_request:,}-row requests, {args.connections} connections, {seconds:g} s, shadow "
                f"(two rows logged per answered row), load generator {loadgen}",
                ["backend", "answered rows", "answered rows/s", "503s", "logged rows/s", "drain s",
                 "shadow refused", "answered, not logged", "p99 ms"],
                [[r["backend"], r["answered_rows"], r["answered_rows_per_s"], r["refused_requests"],
                  r["logged_rows_per_s"], r["drain_s"], r["shadow_refused_rows"], r["answered_not_logged"],
                  r["p99_ms"]] for r in results])
    ok = all(r["answered_not_logged"] == 0 and r["socket_errors"] == 0 for r in results) and bool(results)
    print_table("Targets", ["figure", "value", "target", "status"],
                [["rows answered and not logged (every backend)", sum(r["answered_not_logged"] for r in results), "0",
                  verdict(ok)]])
    emit_json({"rows_per_request": args.rows_per_request, "connections": args.connections, "seconds": seconds,
               "loadgen": loadgen, "backends": {r["backend"]: r for r in results},
               "misses": [] if ok else ["rows answered and not logged"], "wall_seconds": round(time.perf_counter() - began, 1)})


if __name__ == "__main__":
    main()
