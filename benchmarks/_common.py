"""Shared helpers of the benchmarks: the command line, a plain-text table, the final JSON line, the policy, the
example's models registered, and the fallback HTTP load generator."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def example_policy(directory: Path, rows: int, seed: int, outcomes: str = "outcomes.db") -> dict[str, Any]:
    """The example policy (rollout.yaml) with its data size and seed set and its stores in `directory`."""
    import yaml

    policy = yaml.safe_load((ROOT / "rollout.yaml").read_text())
    policy["data"]["example"] = {"rows": rows, "seed": seed, "drift": 0.0}
    policy["ci"]["expectations_suite"] = str(ROOT / "expectations" / "loan_training.json")
    policy["stores"] = {
        "mlflow_tracking_uri": f"sqlite:///{directory / 'mlflow.db'}",
        "outcome_store_url": f"sqlite:///{directory / outcomes}",
        "mlflow_artifacts": str(directory / "mlartifacts"),
        "reports_dir": str(directory / "reports"),
    }
    return policy


def train_and_register(policy_path: Path, export: Path | None = None) -> tuple[str, list[str]]:
    """Fit the policy's pipeline on its example data and register it; (version, feature columns). With `export`,
    the fitted pipeline is also written there with joblib (for servers that load a pickle)."""
    import mlflow

    from rollout import registry
    from rollout.ci import training
    from rollout.config import load_policy
    from rollout.data import infer_schema, load_dataset

    policy = load_policy(policy_path)
    frame = load_dataset(policy)
    schema = infer_schema(frame, policy.data)
    data = training.split(frame, schema, policy.data.holdout_fraction, policy.data.seed)
    model = training.fit(training.build_pipeline(schema, policy.estimator, policy.data.seed), data)
    if export is not None:
        import joblib

        joblib.dump(model, export)
    mlflow.set_tracking_uri(policy.tracking_uri)
    mlflow.set_registry_uri(policy.tracking_uri)
    experiment = mlflow.get_experiment_by_name("bench")
    if experiment is None:
        location = policy.path(policy.stores.mlflow_artifacts).resolve().as_uri()
        experiment_id = mlflow.create_experiment("bench", artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    with mlflow.start_run(experiment_id=experiment_id):
        info = registry.log_model(model, data.x_train.head(100), schema.task, policy.registry.model_name)
    return str(info.registered_model_version), [*schema.numeric, *schema.categorical]


def shadow_pair(champion_policy: Path, challenger_policy: Path, stores: list[Path]) -> tuple[str, str, list[str]]:
    """Train and register a champion and a challenger (one registered model), set their aliases, and open a
    shadow rollout of the two in each policy's outcome store; (champion, challenger, feature columns)."""
    from rollout.config import load_policy
    from rollout.outcomes import OutcomeStore
    from rollout.registry import MlflowRegistry

    champion, features = train_and_register(champion_policy)
    challenger, _ = train_and_register(challenger_policy)
    registry = MlflowRegistry.for_policy(load_policy(champion_policy))
    registry.set_alias("champion", champion)
    registry.set_alias("challenger", challenger)
    for path in stores:
        store = OutcomeStore(load_policy(path).outcome_url).create()
        store.open_rollout("shadow", {"champion": champion, "challenger": challenger}, {}, "s")
        store.dispose()
    return champion, challenger, features


PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server subprocess."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parser(description: str) -> argparse.ArgumentParser:
    """Every benchmark takes --quick (a run under a minute) and --seed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    p.add_argument("--seed", type=int, default=20260101, help="master seed (every cell derives its own)")
    return p


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A left-aligned text table with a title line; values are formatted by `fmt`."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def _plain(value: Any) -> Any:
    """numpy scalars and nested containers as JSON-ready Python values; NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit_json(figures: dict[str, Any]) -> None:
    """The last line of stdout: every figure of the run as one JSON object."""
    print(json.dumps(_plain(figures), separators=(",", ":")), flush=True)


WRK_LUA = r"""
local bodies = {}
local n = 0
local i = 0
function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    bodies[n] = line
  end
  i = math.random(n) - 1
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  i = i % n + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_s":%.6f,"bad_status":%d,"socket_errors":%d,' ..
    '"p50_ms":%.4f,"p99_ms":%.4f,"mean_ms":%.4f,"max_ms":%.4f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.mean / 1e3, latency.max / 1e3))
end
"""


def run_wrk(url: str, bodies: Path, script: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(script), url, "--", str(bodies)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    return json.loads(line[len("WRKJSON "):])


def run_python_loadgen(url: str, bodies: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """The fallback load generator (`loadgen_worker`) in its own process for `seconds`: its JSON summary."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--loadgen-worker", url, str(bodies),
           str(concurrency), str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}): {out.stderr[-1000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loadgen_worker(url: str, bodies_path: str, concurrency: int, seconds: float) -> None:
    """The fallback load generator: keep-alive HTTP/1.1 over raw asyncio streams, one per connection."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port, path = parts.hostname, parts.port, parts.path or "/"
    requests = []
    for line in Path(bodies_path).read_text().splitlines():
        body = line.encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        requests.append(head + body)
    latencies: list[float] = []
    bad = [0, 0]  # bad status, socket errors

    async def conn(offset: int, deadline: float) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        clock = time.perf_counter
        try:
            while clock() < deadline:
                payload = requests[i % len(requests)]
                i += 1
                t0 = clock()
                writer.write(payload)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for hline in head.split(b"\r\n"):
                    if hline[:15].lower() == b"content-length:":
                        length = int(hline[15:])
                if length:
                    await reader.readexactly(length)
                latencies.append(clock() - t0)
                if head[9:12] != b"200":
                    bad[0] += 1
        except (OSError, asyncio.IncompleteReadError):
            bad[1] += 1
        finally:
            writer.close()

    async def main() -> float:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(conn(random.randrange(len(requests)), deadline) for _ in range(concurrency)))
        return time.perf_counter() - start

    duration = asyncio.run(main())
    lat = sorted(latencies)
    n = len(lat)

    def pct(q: float) -> float:
        return lat[min(n - 1, int(q * n))] * 1000.0 if n else float("nan")

    print(json.dumps({"requests": n, "duration_s": duration, "bad_status": bad[0], "socket_errors": bad[1],
                      "p50_ms": pct(0.5), "p99_ms": pct(0.99), "mean_ms": sum(lat) / n * 1000.0 if n else None,
                      "max_ms": lat[-1] * 1000.0 if n else None}))


if __name__ == "__main__" and len(sys.argv) > 5 and sys.argv[1] == "--loadgen-worker":
    loadgen_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
