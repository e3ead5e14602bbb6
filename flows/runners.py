"""How flows run: threads by default, a Dask cluster (prefect-dask) to spread CV folds on request, and the
settings of runs made in this process against the embedded Prefect server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def dask_runner(address: str | None = None, workers: int = 2) -> Any:
    """A Dask task runner: an existing scheduler at `address`, or a local cluster of `workers` processes."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError("the Dask task runner needs prefect-dask: pip install 'rollout[dask]'") from None
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@contextmanager
def embedded_run(force: bool = False) -> Iterator[None]:
    """Flow runs called here against the embedded (ephemeral) Prefect server run without heartbeats.

    Prefect 3.9's sync flow engine ends every run by joining its heartbeat thread, which sleeps in
    1-second slices: up to 1 s added to each run (measured: an empty flow takes 1.1 s with them, 0.1 s
    without). Heartbeats feed zombie-run detection on a Prefect server; the embedded server lives and dies
    with this process, so nobody would watch them. With PREFECT_API_URL set (a real server) they stay on,
    unless `force` (a test harness or benchmark standing in for the embedded server).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if get_current_settings().api.url and not force:
        yield
        return
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
