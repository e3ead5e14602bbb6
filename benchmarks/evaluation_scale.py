"""The online evaluation step (gather + decide) on a large outcome store vs a bare SQL aggregate of the same table.

    .venv/bin/python benchmarks/evaluation_scale.py            # 1M, 3M, 10M prediction rows, SQLite + PostgreSQL
    .venv/bin/python benchmarks/evaluation_scale.py --quick    # 100k, 250k rows, both backends, one round (under a minute)
    .venv/bin/python benchmarks/evaluation_scale.py --sizes 1000000 --backends sqlite

A size is the number of logged prediction rows: a shadow rollout over 30 days where the champion
(version 1, served) and the challenger (version 2, shadow) score every request, so N rows = N/2
requests; three segments; 0.1 % challenger errors; 95 % of requests labelled (a few relabelled, so
the labels table keeps history rows with current = 0); champion rows carry a small features JSON.
Rows are generated with numpy in chunks and written with OutcomeStore.bulk_insert (COPY on
PostgreSQL, big executemany transactions on SQLite) into tables without their secondary indexes,
which OutcomeStore.create() then builds in one pass each; then OutcomeStore.analyze() (VACUUM ANALYZE
on PostgreSQL). The fill is timed but not part of the figures.

The evaluation is timed as it runs in production, hourly: after the fill, a first (cold) evaluation
builds the store's hourly summaries (timed separately: `cold_seconds`); then each round appends one
more simulated hour of traffic and labels (1/720 of the rows, through log_predictions/add_labels:
the new hour's requests, labels for about half of them, and labels (mostly relabels) of requests of
the previous hours and days at a 6 h exponential delay) and times the next evaluation (`seconds`,
the hourly figure, at now = the end of that hour).

Each measurement runs in a fresh subprocess, so its peak RSS (VmHWM) is the evaluation's own:
`eval` = rollout.cd.evaluation.gather(store, rollout, policy, now, training=None) then
rollout.cd.decision.decide(policy.rollout, evidence) (the PSI proxy is skipped: no training frame);
`bare` = SELECT version, count(*), sum(prediction) FROM predictions GROUP BY version.
The cold evaluation reads the whole table, so it warms the caches; then `--rounds` rounds alternate hourly eval and bare (order
flipped every round); figures are medians, ratio_vs_bare_scan = hourly seconds / bare seconds.
PostgreSQL gets a uniquely named database, dropped at the end; SQLite a file in a temporary folder.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from itertools import repeat
from datetime import UTC, datetime, timedelta
from pathlib import Path

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import numpy as np  # noqa: E402

from _common import PG_ADMIN, emit_json, parser, print_table, verdict  # noqa: E402

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAYS = 30
TARGET_RATIO = 3.0
TARGET_RSS_MB = 500.0
CHUNK = 500_000  # requests per generated chunk (1M prediction rows)
SEGMENTS = np.array(["standard", "VIP", "new"])
BARE_SQL = "SELECT version, count(*), sum(prediction) FROM predictions GROUP BY version"

PRED_COLS = ("request_id", "unit_id", "rollout_id", "ts", "day", "version", "role", "served", "propensity",
             "prediction", "score", "latency_ms", "error", "segment", "features")
LABEL_COLS = ("request_id", "label", "ts", "received_at", "current", "matched", "predicted_at")  # as add_labels


def _policy():  # noqa: ANN202
    from rollout.config import DataConfig, Policy, RolloutPolicy, SegmentGuardrail

    # a unit column: the paired losses are summed per unit too (a cluster-robust standard error)
    return Policy(data=DataConfig.model_validate({"unit_column": "customer_id"}), rollout=RolloutPolicy(
        mode="shadow", primary_metric="accuracy", margin=0.01, min_samples=500,
        segment_guardrails=[SegmentGuardrail(segment="VIP", metric="precision", min=0.6)],
    ))


# ------------------------------------------------------------------ fill

def _chunk(rng: np.random.Generator, start: int, stop: int, requests: int, rid: int):  # noqa: ANN202
    """Prediction rows (champion then challenger) and label rows of requests [start, stop)."""
    k = stop - start
    idx = np.arange(start, stop)
    span = DAYS * 86400.0
    ts = T0.timestamp() + (idx + rng.random(k)) * (span / requests)
    day_names = np.array([(T0 + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(DAYS + 1)])
    day = day_names[((ts - T0.timestamp()) // 86400).astype(int)]
    segment = SEGMENTS[rng.choice(3, k, p=[0.7, 0.2, 0.1])]
    label = (rng.random(k) < 0.4).astype(float)
    request_id = _request_ids(idx)
    unit_id = [f"u{i % 200_000}" for i in idx.tolist()]
    ts_l, day_l, seg_l = ts.tolist(), day.tolist(), segment.tolist()
    income = rng.lognormal(10.5, 0.5, k)
    features = [f'{{"income":{x:.1f},"tier":"{s}"}}' for x, s in zip(income.tolist(), seg_l, strict=True)]
    pred_rows: list[tuple] = []
    for version, served, noise in (("1", 1, 0.25), ("2", 0, 0.27)):
        score = np.clip(label * 0.6 + 0.2 + rng.normal(0, noise, k), 0.0, 1.0)
        prediction = (score >= 0.5).astype(float)
        latency = rng.lognormal(1.0 + 0.2 * served, 0.4, k).tolist()
        err = np.zeros(k, dtype=bool) if served else rng.random(k) < 0.001
        score_l = np.where(err, None, score.astype(object)).tolist()
        pred_l = np.where(err, None, prediction.astype(object)).tolist()
        error_l = np.where(err, "timeout", None).tolist()
        pred_rows.extend(zip(
            request_id, unit_id, repeat(rid), ts_l, day_l, repeat(version), repeat("champion" if served else "challenger"),
            repeat(served), repeat(1.0), pred_l, score_l, latency, error_l, seg_l,
            features if served else repeat(None), strict=False,
        ))
    labelled = rng.random(k) < 0.95
    relabel = labelled & (rng.random(k) < 0.02)
    delay = rng.exponential(6 * 3600.0, k)
    label_rows = []
    lab_l, delay_l = label.tolist(), delay.tolist()
    for i in np.flatnonzero(relabel).tolist():  # an earlier, wrong label kept as history
        label_rows.append((request_id[i], 1.0 - lab_l[i], ts_l[i] + delay_l[i] / 2, ts_l[i] + delay_l[i] / 2, 0, 1,
                           ts_l[i]))
    for i in np.flatnonzero(labelled).tolist():
        label_rows.append((request_id[i], lab_l[i], ts_l[i] + delay_l[i], ts_l[i] + delay_l[i], 1, 1, ts_l[i]))
    return pred_rows, label_rows


def fill(url: str, rows: int, seed: int) -> tuple[int, float]:
    """Create the store, open the rollout and write `rows` prediction rows with their labels; (rollout id, s)."""
    from rollout.outcomes import OutcomeStore
    from rollout.outcomes.schema import labels, predictions

    start = time.perf_counter()
    store = OutcomeStore(url).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "bench-salt", T0)
    # A bulk load's usual order: rows first, then each secondary index built in one sort (create() adds the
    # missing ones back), rather than millions of inserts at random places of the request-id indexes.
    for index in (*predictions.indexes, *labels.indexes):
        index.drop(store.engine, checkfirst=True)
    requests = rows // 2
    rng = np.random.default_rng(seed)
    for a in range(0, requests, CHUNK):
        pred_rows, label_rows = _chunk(rng, a, min(a + CHUNK, requests), requests, rid)
        store.bulk_insert("predictions", PRED_COLS, pred_rows)
        store.bulk_insert("labels", LABEL_COLS, label_rows)
    store.create()
    store.analyze()
    store.dispose()
    return rid, time.perf_counter() - start


def _request_ids(idx: np.ndarray) -> list[str]:
    """The requests' ids as the service writes them (ULIDs: 26 characters, 16 bytes in SQLite's log) but in no
    particular order, as a caller's own random ids would be (the request-id index's worst case): a bijective hash
    of the index in the top 64 bits."""
    from rollout.outcomes.ids import unpack

    return [unpack(((i * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big") + i.to_bytes(8, "big"))
            for i in idx.tolist()]


def add_hour(url: str, rows: int, rid: int, hour: int, seed: int) -> float:
    """Append simulated hour `hour` (1, 2, ...) after the 30 filled days: rows/720 prediction rows and about as
    many labels as requests, through the store's ordinary write paths; returns the seconds it took."""
    from rollout.outcomes import OutcomeStore, PredictionRow

    start = time.perf_counter()
    rng = np.random.default_rng(seed + 7919 * hour)
    requests = rows // 2
    k = max(rows // 1440, 1)  # requests this hour (2 prediction rows each)
    span = DAYS * 86400.0
    t_start = T0.timestamp() + span + (hour - 1) * 3600.0
    first = requests + (hour - 1) * k
    idx = np.arange(first, first + k)
    ts = np.sort(t_start + rng.random(k) * 3600.0)
    ids = _request_ids(idx)
    segment = SEGMENTS[rng.choice(3, k, p=[0.7, 0.2, 0.1])]
    label = (rng.random(k) < 0.4).astype(float)
    pred_rows = []
    for version, served, noise in (("1", 1, 0.25), ("2", 0, 0.27)):
        score = np.clip(label * 0.6 + 0.2 + rng.normal(0, noise, k), 0.0, 1.0)
        err = np.zeros(k, dtype=bool) if served else rng.random(k) < 0.001
        latency = rng.lognormal(1.0 + 0.2 * served, 0.4, k)
        for i in range(k):
            pred_rows.append(PredictionRow(
                request_id=ids[i], unit_id=f"u{int(idx[i]) % 200_000}", rollout_id=rid, ts=float(ts[i]),
                version=version, role="champion" if served else "challenger", served=bool(served),
                propensity=1.0, prediction=None if err[i] else float(score[i] >= 0.5),
                score=None if err[i] else float(score[i]), latency_ms=float(latency[i]),
                error="timeout" if err[i] else None, segment=str(segment[i]),
                features={"income": 36000.0, "tier": str(segment[i])} if served else None,
            ))
    # labels: half of this hour's requests, and as many of earlier requests at a 6 h exponential delay
    this_hour = rng.random(k) < 0.5
    back = rng.exponential(6 * 3600.0, k)
    earlier = np.clip(first - 1 - (back * requests / span).astype(int), 0, first - 1)
    end = t_start + 3600.0
    label_items = [(ids[i], float(label[i]), end) for i in np.flatnonzero(this_hour).tolist()]
    label_items += list(zip(_request_ids(np.unique(earlier[~this_hour])), repeat(1.0), repeat(end)))
    store = OutcomeStore(url, clock=lambda: datetime.fromtimestamp(end, tz=UTC)).create()
    for a in range(0, len(pred_rows), 1000):  # the serving log writer's batches
        store.log_predictions(pred_rows[a:a + 1000])
    for a in range(0, len(label_items), 500):
        store.add_labels(label_items[a:a + 500])
    store.dispose()
    return time.perf_counter() - start


# ----------------------------------------------------------- measurement

def _peak_rss_mb() -> float:
    """Peak resident set of this process (VmHWM). ru_maxrss is not used: on Linux it keeps the high-water
    mark of the parent at fork across exec, so a child of the (large) filling process would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(what: str, url: str, rid: int, hour: int = 0) -> None:
    """Runs in a fresh subprocess: one timed evaluation (at the end of simulated `hour`) or bare scan; prints one JSON line."""
    from rollout.outcomes import OutcomeStore

    if what == "eval":  # scipy and pandas take seconds to import: only the evaluation needs them
        from rollout.cd.decision import decide
        from rollout.cd.evaluation import gather

        policy = _policy()
    store = OutcomeStore(url)
    store.create()
    current = store.rollout(rid)
    now = T0 + timedelta(days=DAYS, hours=hour)
    with store.engine.connect() as conn:  # connect (and pool) outside the timer
        conn.exec_driver_sql("SELECT 1").all()
    base_rss = _peak_rss_mb()
    out: dict = {}
    if what == "eval":
        start = time.perf_counter()
        evidence = gather(store, current, policy, now, training=None)
        decision = decide(policy.rollout, evidence)
        out["seconds"] = time.perf_counter() - start
        ch = evidence.challengers[0]
        out["decision"] = decision.action
        out["paired_n"] = sum(m.n for m in ch.paired.values())
        out["paired_sum"] = sum(m.total for m in ch.paired.values())
        out["champion_loss_n"] = sum(m.n for m in evidence.champion_loss.values())
        out["requests"] = ch.requests
        out["errors"] = ch.errors
        out["agreement_n"] = ch.agreement.n if ch.agreement else 0
    else:
        start = time.perf_counter()
        with store.engine.connect() as conn:
            result = conn.exec_driver_sql(BARE_SQL).all()
        out["seconds"] = time.perf_counter() - start
        out["groups"] = len(result)
    out["peak_rss_mb"] = _peak_rss_mb()
    out["rss_before_mb"] = base_rss
    store.dispose()
    print(json.dumps(out))


def measure(what: str, url: str, rid: int, hour: int = 0) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", what, "--url", url, "--rollout", str(rid),
                           "--hour", str(hour)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def run_cell(backend: str, rows: int, seed: int, rounds: int, tmp: Path) -> dict:
    admin = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp / f'outcomes_{rows}.db'}"
    else:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True)
        name = f"rollout_bench_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        rid, fill_s = fill(url, rows, seed)
        print(f"{backend} {rows:,}: filled in {fill_s:.1f} s", file=sys.stderr, flush=True)
        cold = measure("eval", url, rid, 0)  # builds the hourly summaries; reads the whole table (warms caches)
        print(f"  first (cold) evaluation: {cold['seconds']:.3f} s, peak RSS {cold['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
        evals, bares, hour_s = [], [], []
        for i in range(rounds):
            hour_s.append(add_hour(url, rows, rid, i + 1, seed))
            for what in (("eval", "bare") if i % 2 == 0 else ("bare", "eval")):
                m = measure(what, url, rid, i + 1)
                (evals if what == "eval" else bares).append(m)
                print(f"  round {i + 1} (hour appended in {hour_s[-1]:.2f} s) {what}: {m['seconds']:.3f} s, "
                      f"peak RSS {m['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        size_mb = None
        if backend == "sqlite":
            size_mb = sum(os.path.getsize(p) for p in tmp.glob(f"outcomes_{rows}.db*")) / 2**20
        seconds = _median([m["seconds"] for m in evals])
        bare = _median([m["seconds"] for m in bares])
        return {
            "backend": backend, "rows": rows, "fill_seconds": fill_s, "seconds": seconds, "bare_seconds": bare,
            "ratio_vs_bare_scan": seconds / bare, "peak_rss_mb": max(m["peak_rss_mb"] for m in [cold, *evals]),
            "cold_seconds": cold["seconds"], "cold_ratio_vs_bare_scan": cold["seconds"] / bare,
            "cold_peak_rss_mb": cold["peak_rss_mb"], "hour_write_seconds": hour_s,
            "hour_rows": 2 * max(rows // 1440, 1),
            "rss_before_eval_mb": max(m["rss_before_mb"] for m in evals),
            "bare_peak_rss_mb": max(m["peak_rss_mb"] for m in bares),
            "seconds_rounds": [m["seconds"] for m in evals], "bare_seconds_rounds": [m["seconds"] for m in bares],
            "decision": evals[0]["decision"], "paired_n": evals[0]["paired_n"], "requests": evals[0]["requests"],
            "paired_sum": evals[0]["paired_sum"], "errors": evals[0]["errors"], "db_mb": size_mb,
        }
    finally:
        if backend == "sqlite":
            for p in tmp.glob(f"outcomes_{rows}.db*"):
                p.unlink()
        elif admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", help="comma-separated prediction-row counts (default 1M,3M,10M; --quick 100k,250k)")
    p.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    p.add_argument("--rounds", type=int, help="timed rounds per cell (default 3; --quick 1)")
    p.add_argument("--child", choices=["eval", "bare"], help=argparse_hidden())
    p.add_argument("--url", help=argparse_hidden())
    p.add_argument("--rollout", type=int, help=argparse_hidden())
    p.add_argument("--hour", type=int, default=0, help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args.child, args.url, args.rollout, args.hour)
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else (
        [100_000, 250_000] if args.quick else [1_000_000, 3_000_000, 10_000_000])
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rounds = args.rounds or (1 if args.quick else 3)
    started = time.perf_counter()
    cells = []
    tmp = Path(tempfile.mkdtemp(prefix="rollout-evalscale-", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        for backend in backends:
            for rows in sizes:
                cells.append(run_cell(backend, rows, args.seed % 2**31 + rows, rounds, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = []
    for c in cells:
        table.append([c["backend"], f"{c['rows']:,}", c["fill_seconds"], c["bare_seconds"], c["cold_seconds"],
                      c["seconds"], c["ratio_vs_bare_scan"], c["peak_rss_mb"], c["decision"]])
    print_table("Evaluation step (gather + decide) vs bare GROUP BY scan (medians, seconds; peak RSS MB); "
                "cold = first evaluation (builds the summaries), hourly = after one more hour of traffic",
                ["backend", "rows", "fill s", "bare s", "cold eval s", "hourly eval s", "ratio", "peak RSS MB",
                 "decision"], table)

    checks = []
    linear = {}
    for backend in backends:
        mine = sorted((c for c in cells if c["backend"] == backend), key=lambda c: c["rows"])
        if len(mine) >= 2:
            # seconds per million rows, largest over smallest: 1.0 = linear
            per_row = [c["seconds"] / c["rows"] for c in mine]
            linear[backend] = per_row[-1] / per_row[0]
            checks.append([f"{backend}: time per row, largest / smallest size", linear[backend], "<= 1.5",
                           verdict(linear[backend] <= 1.5)])
            growth = mine[-1]["peak_rss_mb"] - mine[0]["peak_rss_mb"]
            checks.append([f"{backend}: peak RSS growth {mine[0]['rows']:,} -> {mine[-1]['rows']:,} (MB)", growth,
                           "<= 50", verdict(growth <= 50)])
        for c in mine:
            checks.append([f"{backend} {c['rows']:,}: ratio vs bare scan", c["ratio_vs_bare_scan"],
                           f"<= {TARGET_RATIO:g}", verdict(c["ratio_vs_bare_scan"] <= TARGET_RATIO)])
            checks.append([f"{backend} {c['rows']:,}: peak RSS MB", c["peak_rss_mb"], f"< {TARGET_RSS_MB:g}",
                           verdict(c["peak_rss_mb"] < TARGET_RSS_MB)])
    print_table("Targets", ["figure", "value", "target", "status"], checks)
    misses = [r[0] for r in checks if r[3] != "PASS"]
    emit_json({
        "sizes": sizes, "backends": backends, "rounds": rounds, "seed": args.seed,
        "seconds": {b: {str(c["rows"]): c["seconds"] for c in cells if c["backend"] == b} for b in backends},
        "cold_seconds": {b: {str(c["rows"]): c["cold_seconds"] for c in cells if c["backend"] == b} for b in backends},
        "peak_rss_mb": {b: {str(c["rows"]): c["peak_rss_mb"] for c in cells if c["backend"] == b} for b in backends},
        "ratio_vs_bare_scan": {b: {str(c["rows"]): c["ratio_vs_bare_scan"] for c in cells if c["backend"] == b}
                               for b in backends},
        "bare_seconds": {b: {str(c["rows"]): c["bare_seconds"] for c in cells if c["backend"] == b} for b in backends},
        "time_per_row_growth": linear, "ratio_target": TARGET_RATIO, "rss_target_mb": TARGET_RSS_MB,
        "cells": cells, "misses": misses, "pass": not misses, "wall_seconds": round(time.perf_counter() - started, 1),
    })


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
