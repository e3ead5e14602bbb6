"""Realistic traffic for a running service: loan applications to /predict, true labels to /labels later.

Simulated time: every request carries an explicit `ts` (spread over `days` starting at `start`),
so the outcome store records simulated time and a demo compresses days into minutes. A label
is due `label_delay_hours` (±50 %) after its request and is posted, with that due time as its
`ts`, once the simulated clock has passed it; a share `missing_rate` never arrives. Labels not
yet due at the end of the window are reported as pending (not sent) unless `send_pending`.
Explicit timestamps and labels need the bearer token (policy.serving.token_env).

Replay (`replay=`, from `rollout simulate --data FILE`): your own rows instead of the loan generator, in file
order, each with its label from `label_column`; with `ts_column` each request carries its row's own time
(the window is the data's), else the rows are spread over `days` as generated traffic is. Rows without a
label are sent and never labelled.
"""

from __future__ import annotations

import asyncio
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from rollout.config import Policy
from rollout.data import example_dataset, records_of


@dataclass(frozen=True)
class SimulationSummary:
    """What was sent and what came back."""

    requests: int
    predicted: int
    errors: int
    labels_sent: int
    labels_missing: int
    labels_pending: int
    labels_unknown: int
    label_errors: int
    by_version: dict[str, int]
    start: str
    end: str
    seconds: float
    error_samples: tuple[str, ...] = field(default_factory=tuple)


class OptionError(ValueError):
    """An option or the data to change, found before any request is sent (the CLI prints it, exit 2)."""


def simulate(url: str, policy: Policy, **options: Any) -> SimulationSummary:
    """Blocking form of `simulate_async` (same keyword options), for the CLI and the demo."""
    return asyncio.run(simulate_async(url, policy, **options))


def parse_delay(text: str | float) -> float:
    """A label delay in hours: a number of hours, or a number with a unit ('90m', '12h', '2d')."""
    if isinstance(text, int | float):
        return float(text)
    value = str(text).strip().lower()
    units = {"m": 1 / 60, "h": 1.0, "d": 24.0}
    try:
        if value and value[-1] in units:
            hours = float(value[:-1]) * units[value[-1]]
        else:
            hours = float(value)
    except ValueError:
        raise ValueError(f"label delay {text!r}: expected hours, or a number with m, h or d (e.g. 12h)") from None
    if hours < 0 or not math.isfinite(hours):
        raise ValueError(f"label delay {text!r}: must be a finite time of 0 or more")
    return hours


@dataclass(frozen=True)
class Replay:
    """Rows of your own to send: the features, each row's label (NaN: none), and its time (epoch seconds) when
    the data has one."""

    features: pd.DataFrame
    labels: pd.Series
    times: np.ndarray | None
    units: list[str | None]


def replay_from(path: str, policy: Policy, label_column: str | None = None, ts_column: str | None = None,
                limit: int | None = None) -> Replay:
    """Your own rows (CSV/Parquet) to replay, in order; a ValueError naming the option that does not fit."""
    from pathlib import Path

    from rollout.data import read_table

    frame = read_table(Path(path))
    label = label_column or policy.data.target
    for option, column in (("--label-column", label), ("--ts-column", ts_column)):
        if column is not None and column not in frame.columns:
            raise ValueError(f"{option}: {column!r} is not a column of {path} (columns: "
                             f"{', '.join(map(str, frame.columns[:20]))})")
    times = None
    if ts_column is not None:
        with warnings.catch_warnings():  # no common format: each value parsed alone, and unreadable ones counted
            warnings.simplefilter("ignore", UserWarning)
            when = pd.to_datetime(frame[ts_column], errors="coerce", utc=True)
        if when.isna().any():
            raise ValueError(f"--ts-column: {int(when.isna().sum())} of {len(frame)} rows of {ts_column!r} are not "
                             "readable times")
        frame = frame.assign(_when=when).sort_values("_when", kind="stable")
        epoch = pd.Timestamp("1970-01-01", tz="UTC")
        times = (frame.pop("_when") - epoch).dt.total_seconds().to_numpy()
    if limit is not None:
        frame = frame.iloc[:limit]
        times = None if times is None else times[:limit]
    unit = policy.data.unit_column
    drop = {label, ts_column, policy.data.target, policy.data.timestamp_column, unit} - {None}
    units = frame[unit].astype(str).tolist() if unit in frame.columns else [None] * len(frame)
    return Replay(frame[[c for c in frame.columns if c not in drop]].reset_index(drop=True),
                  frame[label].reset_index(drop=True), times, units)


def traffic_frame(
    policy: Policy, requests: int, seed: int, drift: float, drift_start: float, new_levels: bool
) -> pd.DataFrame:
    """The applications to send, in order; the tail after `drift_start` drifts when `drift` > 0."""
    base = example_dataset(rows=requests, seed=seed)
    if drift <= 0 and not new_levels:
        return base
    shifted = example_dataset(rows=requests, seed=seed + 1, drift=drift, new_levels=new_levels)
    cut = int(round(requests * min(max(drift_start, 0.0), 1.0)))
    return pd.concat([base.iloc[:cut], shifted.iloc[cut:]], ignore_index=True)


async def simulate_async(
    url: str,
    policy: Policy,
    *,
    requests: int = 1000,
    days: float = 7.0,
    label_delay_hours: float = 24.0,
    missing_rate: float = 0.1,
    concurrency: int = 8,
    seed: int = 0,
    start: datetime | str | None = None,
    drift: float = 0.0,
    drift_start: float = 0.5,
    new_levels: bool = False,
    token: str | None = None,
    clock: Callable[[], datetime] | None = None,
    send_pending: bool = False,
    transport: Any = None,
    timeout_s: float = 30.0,
    replay: Replay | None = None,
) -> SimulationSummary:
    """Send `requests` single-record predictions over `days` of simulated time, then their labels.

    `start` defaults to `clock()` minus `days`, so the simulated window ends now. With `drift`,
    requests after the `drift_start` share of the window come from a shifted population.
    `transport` (an httpx transport, e.g. ASGITransport) lets tests run without a server.
    """
    import httpx

    if requests < 1:
        raise OptionError("requests: must be at least 1")
    if not 0 <= missing_rate <= 1:
        raise OptionError("missing_rate: must be within [0, 1]")
    token = token or os.environ.get(policy.serving.token_env)
    if not token:
        raise OptionError(f"a bearer token is needed for simulated timestamps and labels: set the environment variable "
                          f"{policy.serving.token_env} (serving.token_env) to the service's token")
    if replay is None and policy.data.source != "example":
        raise OptionError(f"the built-in traffic is the example's loan applications, not rows of {policy.data.source} "
                          "(data.source): replay your own rows with --data FILE")
    rng = np.random.default_rng(seed)
    now = (clock or (lambda: datetime.now(tz=UTC)))()
    if isinstance(start, str):
        try:
            start = datetime.fromisoformat(start)
        except ValueError:
            raise OptionError(f"--start {start!r}: expected an ISO 8601 time, e.g. 2026-05-01T00:00:00+00:00") from None
    if replay is not None:
        requests = len(replay.features)
        if requests < 1:
            raise OptionError("--data: the file has no rows to replay")
    if replay is not None and replay.times is not None:  # the data's own clock
        begin_s = float(replay.times[0])
        days = max((float(replay.times[-1]) - begin_s) / 86400.0, 1e-9)
        offsets = replay.times - begin_s
    else:
        begin = start or (now - timedelta(days=days))
        if begin.tzinfo is None:
            begin = begin.replace(tzinfo=UTC)
        begin_s = begin.timestamp()
        offsets = np.sort(rng.uniform(0, days * 86400.0, requests))
    end_s = begin_s + days * 86400.0

    data = policy.data
    delays = label_delay_hours * 3600.0 * rng.uniform(0.5, 1.5, requests)
    missing = rng.random(requests) < missing_rate
    if replay is not None:
        records = records_of(replay.features)
        units = replay.units
        truth = replay.labels.tolist()
        missing |= replay.labels.isna().to_numpy()
    else:
        frame = traffic_frame(policy, requests, seed, drift, drift_start, new_levels)
        drop = {data.target, data.timestamp_column, data.unit_column} - {None}
        feature_cols = [c for c in frame.columns if c not in drop]
        records = records_of(frame[feature_cols])
        units = frame[data.unit_column].astype(str).tolist() if data.unit_column in frame else [None] * requests
        truth = frame[data.target].tolist()

    headers = {"Authorization": f"Bearer {token}"}
    counts: Counter[str] = Counter()
    errors: list[str] = []
    due: list[tuple[float, str, Any]] = []  # (label ts, request id, label)
    sent = unknown = label_errors = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async with httpx.AsyncClient(base_url=url, transport=transport, headers=headers, timeout=timeout_s) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            ts = begin_s + float(offsets[i])
            body = {"record": records[i], "unit_id": units[i], "ts": ts}
            async with sem:
                try:
                    response = await client.post("/predict", json=body)
                except httpx.HTTPError as exc:
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                    return
            if response.status_code != 200:
                errors.append(f"request {i}: HTTP {response.status_code}: {response.text[:200]}")
                return
            answer = response.json()
            counts[str(answer.get("version"))] += 1
            if not missing[i]:
                due.append((ts + float(delays[i]), answer["request_id"], _plain(truth[i])))

        async def post_labels(until: float) -> None:
            nonlocal sent, unknown, label_errors
            due.sort()
            ready = [d for d in due if d[0] <= until]
            del due[: len(ready)]
            for k in range(0, len(ready), 1000):
                chunk = ready[k : k + 1000]
                payload = {"labels": [{"request_id": rid, "label": label, "ts": ts} for ts, rid, label in chunk]}
                try:
                    response = await client.post("/labels", json=payload)
                except httpx.HTTPError as exc:
                    label_errors += len(chunk)
                    errors.append(f"labels: {type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    label_errors += len(chunk)
                    errors.append(f"labels: HTTP {response.status_code}: {response.text[:200]}")
                    continue
                sent += len(chunk)
                unknown += int(response.json().get("unknown", 0))

        step = max(concurrency * 8, 64)
        for first in range(0, requests, step):
            last = min(first + step, requests)
            await asyncio.gather(*(one(i) for i in range(first, last)))
            await post_labels(begin_s + float(offsets[last - 1]))
        await post_labels(math.inf if send_pending else end_s)

    return SimulationSummary(
        requests=requests,
        predicted=sum(counts.values()),
        errors=len([e for e in errors if e.startswith("request")]),
        labels_sent=sent,
        labels_missing=int(missing.sum()),
        labels_pending=len(due),
        labels_unknown=unknown,
        label_errors=label_errors,
        by_version=dict(counts),
        start=datetime.fromtimestamp(begin_s, tz=UTC).isoformat(),
        end=datetime.fromtimestamp(end_s, tz=UTC).isoformat(),
        seconds=round(loop.time() - t0, 3),
        error_samples=tuple(errors[:10]),
    )


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value
