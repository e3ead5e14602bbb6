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
    """Flow runs called here against the embedded Prefect server run without heartbeats (with a real server,
    PREFECT_API_URL set, they stay on unless `force`: a test harness standing in for the embedded one)."""
    # Prefect 3.9's sync engine ends every run by joining its heartbeat thread, which sleeps in 1 s slices
    # (an empty flow: 1.1 s with, 0.1 s without). Heartbeats feed zombie-run detection on a server; the
    # embedded server lives and dies with this process, so nobody would watch them.
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if get_current_settings().api.url and not force:
        yield
        return
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
