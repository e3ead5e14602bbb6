"""How flows run: threads by default, a Dask cluster (prefect-dask) to spread CV folds on request, and the
settings of runs made in this process against the embedded Prefect server."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ADDRESS_IN_USE = 3  # uvicorn's exit code when its port is taken (Prefect's own temporary server retries too)


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


class TemporaryServer:
    """Prefect's temporary API server, the one it starts itself when no PREFECT_API_URL is set (the same
    uvicorn command, database and settings), but started by a command before it imports its flow, so that
    the server's ~5 s of start-up run on the other core while this process spends ~3 s importing
    scikit-learn, MLflow and Prefect. Prefect starts its own only when the flow's first API call needs it:
    the two waits then add up. Stopped when this process exits, after Prefect's log and event workers have
    drained (they drain at interpreter shutdown, before `atexit` handlers run)."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False
        self._spawn()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"], env=env)

    def wait(self, timeout: float) -> None:
        """Return once the server answers its health check; RuntimeError if it exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            assert self.process is not None, "the temporary Prefect server was stopped"
            code = self.process.poll()
            if code == ADDRESS_IN_USE:  # another process took the port between our check and uvicorn's bind
                self._spawn()
                continue
            if code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {code} before it answered")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    self.ready = response.status == 200
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        process, self.process, self.ready = self.process, None, False
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_temporary: TemporaryServer | None = None


def start_temporary_server() -> None:
    """Start Prefect's temporary server in the background now, if this process will need one: no
    PREFECT_API_URL in the environment or the active profile, and ephemeral mode not turned off. Call it
    before the flow's imports; `embedded_run` waits for it and points the runs at it."""
    global _temporary
    if _temporary is not None or os.environ.get("PREFECT_API_URL"):
        return
    if "prefect.settings" in sys.modules and not _wants_temporary_server():  # known at no cost: ask first
        return
    _temporary = TemporaryServer()  # the profile is read later (importing Prefect's settings takes ~1 s)


def _wants_temporary_server() -> bool:
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


@contextmanager
def embedded_run(force: bool = False) -> Iterator[None]:
    """Flow runs called here against the embedded Prefect server run without heartbeats (with a real server,
    PREFECT_API_URL set, they stay on unless `force`: a test harness standing in for the embedded one). A
    temporary server started by `start_temporary_server` is waited for and used."""
    # Prefect 3.9's sync engine ends every run by joining its heartbeat thread, which sleeps in 1 s slices
    # (an empty flow: 1.1 s with, 0.1 s without). Heartbeats feed zombie-run detection on a server; the
    # embedded server lives and dies with this process, so nobody would watch them.
    global _temporary
    from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_UI_URL,
                                  get_current_settings, temporary_settings)

    server = _temporary
    if server is not None and not _wants_temporary_server():  # a profile names a server: ours is not needed
        server.stop()
        _temporary = server = None
    if get_current_settings().api.url and not force:
        yield
        return
    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    before = os.environ.get("PREFECT_API_URL")
    if server is not None:
        # Prefect's own default (20 s) is tight for a first start, which creates and migrates its database.
        server.wait(max(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), 120.0))
        updates[PREFECT_API_URL] = server.api_url
        updates[PREFECT_UI_URL] = ""  # no UI to link runs to: it serves no pages and is gone after the command
        os.environ["PREFECT_API_URL"] = server.api_url  # processes the run starts (Dask workers) report to it
    try:
        with temporary_settings(updates):
            yield
    finally:
        if server is not None:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before
