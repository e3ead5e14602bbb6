"""Prometheus text exposition of the service's counters, kept in plain dicts (no lock: one event loop)."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float, count: int = 1) -> None:
        self.counts[bisect_left(BUCKETS_S, seconds)] += count
        self.total += seconds * count
        self.n += count


class Metrics:
    """Requests, errors and latency per version and role, batches per lane, plus gauges read at scrape time."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.latency: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.batch_rows: defaultdict[str, int] = defaultdict(int)
        self.batches: defaultdict[str, int] = defaultdict(int)
        self.http: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def observe(self, version: str, role: str, seconds: float, ok: bool, rows: int = 1, count: int = 1) -> None:
        """`rows` scored by `count` requests that each took `seconds`."""
        key = (version, role)
        self.requests[key] += rows
        if not ok:
            self.errors[key] += rows
        self.latency[key].observe(seconds, count)

    def batch(self, lane: str, rows: int, seconds: float, ok: bool) -> None:
        self.batches[lane] += 1
        self.batch_rows[lane] += rows

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        out: list[str] = []

        def header(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        header("rollout_requests_total", "counter", "Rows scored, by model version and role (served and shadow).")
        for (v, r), n in sorted(self.requests.items()):
            out.append(f'rollout_requests_total{{version="{v}",role="{r}"}} {n}')
        header("rollout_errors_total", "counter", "Rows that failed (raised, garbage, timeout), by version and role.")
        for (v, r) in sorted(self.requests):
            out.append(f'rollout_errors_total{{version="{v}",role="{r}"}} {self.errors.get((v, r), 0)}')
        header(
            "rollout_latency_seconds",
            "histogram",
            "Per request: end-to-end for served rows, model call time for shadow rows.",
        )
        for (v, r), h in sorted(self.latency.items()):
            acc = 0
            for edge, count in zip((*BUCKETS_S, float("inf")), h.counts, strict=True):
                acc += count
                le = "+Inf" if edge == float("inf") else f"{edge:g}"
                out.append(f'rollout_latency_seconds_bucket{{version="{v}",role="{r}",le="{le}"}} {acc}')
            out.append(f'rollout_latency_seconds_sum{{version="{v}",role="{r}"}} {h.total:.6f}')
            out.append(f'rollout_latency_seconds_count{{version="{v}",role="{r}"}} {h.n}')
        header("rollout_batches_total", "counter", "Model calls, by lane (version/serve: the champion; version/challenger; version/shadow).")
        for lane, n in sorted(self.batches.items()):
            out.append(f'rollout_batches_total{{lane="{lane}"}} {n}')
        header("rollout_batch_rows_total", "counter", "Rows scored in those calls (rows/calls = mean batch size).")
        for lane, n in sorted(self.batch_rows.items()):
            out.append(f'rollout_batch_rows_total{{lane="{lane}"}} {n}')
        header("rollout_http_responses_total", "counter", "HTTP responses by path and status.")
        for (path, status), n in sorted(self.http.items()):
            out.append(f'rollout_http_responses_total{{path="{path}",status="{status}"}} {n}')
        for name, (text, read) in sorted(self.gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            header(name, kind, text)
            out.append(f"{name} {read():g}")
        return "\n".join(out) + "\n"
