"""Task runners: threads by default; a Dask cluster (prefect-dask) to spread CV folds and stress runs."""

from __future__ import annotations

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
