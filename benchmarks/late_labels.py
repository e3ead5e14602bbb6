"""The hourly evaluation when labels arrive a day late: its time should not grow with the rollout's age.

    .venv/bin/python benchmarks/late_labels.py            # 8 days, 4,000 shadow requests a day, both backends
    .venv/bin/python benchmarks/late_labels.py --quick    # 4 days, 2,000 a day
    .venv/bin/python benchmarks/late_labels.py --backends sqlite

Each simulated day logs its requests (champion and challenger: two rows each) through the service's write
path, evaluates (the day's hours are summarised), then receives labels for 95% of the day's requests and
evaluates again: those labels reach the stored summaries as label changes. Both evaluations are timed
(OutcomeStore.evidence, as gather() calls it). A store whose work per label grows with the rows it holds
shows here as a time that climbs day after day (it was 8.6 s on day 1 and 44 s on day 5 on SQLite, 53 s on
PostgreSQL without statistics, before the fix). PostgreSQL runs with whatever autovacuum the server has.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from _common import emit_json, parser, print_table, verdict  # noqa: E402
from retention import _backend, _drop  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
TARGET_GROWTH = 2.0  # last day's evaluation after labels / first day's


def run(backend: str, days: int, requests: int, seed: int, tmp: Path) -> dict[str, Any]:
    from rollout.outcomes import OutcomeStore, PredictionRow

    url, _path, handle = _backend(backend, tmp, "late")
    now = [T0]
    store = OutcomeStore(url, clock=lambda: datetime.fromtimestamp(now[0], tz=UTC)).create()
    try:
        rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + 1)
        rng = np.random.default_rng(seed)
        after_rows, after_labels = [], []
        for day in range(days):
            start = T0 + day * 86400.0 + 10
            ts = np.sort(start + rng.random(requests) * 86000)
            ids = [f"d{day}-{i}" for i in range(requests)]
            rows = []
            for version, served in (("1", True), ("2", False)):
                s = rng.random(requests)
                rows += [PredictionRow(request_id=ids[i], version=version, role="champion" if served else "challenger",
                                       ts=float(ts[i]), rollout_id=rid, served=served, propensity=1.0,
                                       prediction=float(s[i] > .5), score=float(s[i]), latency_ms=2.0, segment="a")
                         for i in range(requests)]
            now[0] = start + 86000
            for a in range(0, len(rows), 1000):
                store.log_predictions(rows[a:a + 1000])
            t = time.perf_counter()
            store.evidence(rid)
            after_rows.append(time.perf_counter() - t)
            labelled = ids[: int(0.95 * requests)]
            items = [(i, float(rng.random() < .4), start + 86300) for i in labelled]
            for a in range(0, len(items), 500):
                store.add_labels(items[a:a + 500])
            t = time.perf_counter()
            store.evidence(rid)
            after_labels.append(time.perf_counter() - t)
            print(f"{backend} day {day}: evaluation after the day's rows {after_rows[-1]:.2f} s, "
                  f"after its labels {after_labels[-1]:.2f} s", flush=True)
    finally:
        store.dispose()
        _drop(handle)
    growth = after_labels[-1] / max(after_labels[0], 1e-3)
    return {"backend": backend, "after_rows_s": after_rows, "after_labels_s": after_labels, "growth": growth,
            "ok": growth <= TARGET_GROWTH}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    p.add_argument("--days", type=int, help="simulated days (default 8; --quick 4)")
    p.add_argument("--requests", type=int, help="requests a day (default 4000; --quick 2000)")
    args = p.parse_args()
    days = args.days or (4 if args.quick else 8)
    requests = args.requests or (2000 if args.quick else 4000)
    started = time.perf_counter()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            cells.append(run(backend.strip(), days, requests, args.seed, Path(tmp)))
    print_table(f"Evaluation after a day of late labels ({requests} requests a day, {days} days)",
                ["backend", "first day s", "last day s", "last / first", f"target <= {TARGET_GROWTH}"],
                [[c["backend"], c["after_labels_s"][0], c["after_labels_s"][-1], c["growth"], verdict(c["ok"])]
                 for c in cells])
    emit_json({"benchmark": "late_labels", "days": days, "requests_per_day": requests, "cells": cells,
               "targets_met": all(c["ok"] for c in cells), "wall_seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
