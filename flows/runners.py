"""How flows run: threads by default, a Dask cluster (prefect-dask) to spread CV folds on request, and the
settings of runs made in this process against the embedded Prefect server."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

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
    """Prefect's local API server for a command run without PREFECT_API_URL: the one Prefect would start itself
    (its app, database and settings), but started by the command before it imports its flow, so that the
    server's ~3.5 s of start-up run on the other core while this process spends ~2.4 s importing
    scikit-learn, MLflow and Prefect (Prefect starts its own only when the flow's first API call needs it:
    the two waits then add up), and kept for the next command (`flows.local_server`): a server of the same
    Prefect home and settings still running is reused, at no start-up cost. With
    ROLLOUT_PREFECT_IDLE_SECONDS=0 the server is this command's own and stops when it exits, after Prefect's
    log and event workers have drained (they drain at interpreter shutdown, before `atexit` handlers run)."""

    def __init__(self) -> None:
        from flows import local_server

        self.port = 0
        self.pid = 0
        self.process: subprocess.Popen[bytes] | None = None  # a server this command started
        self.ready = False
        self.kept = False  # shared with later commands (stops itself when idle) rather than this command's own
        self.reused = False
        self._lease: IO[bytes]
        self.idle = local_server.idle_seconds()
        self.home = local_server.prefect_home()
        if self.idle > 0:
            try:
                self._start_or_reuse()
            except OSError as exc:  # a Prefect home it cannot lock or write: a server of its own, as with idle 0
                print(f"Prefect's local server cannot be kept in {self.home} ({exc}); starting one for this command",
                      file=sys.stderr)
                self.idle, self.kept, self.reused = 0.0, False, False
        if not self.kept:
            self._lease_path = Path(tempfile.mkdtemp(prefix="rollout-prefect-")) / local_server.LEASE
            if local_server.fcntl is not None:  # its watchdog stops it if this process dies without stopping it
                self._lease = local_server.take_lease(self._lease_path.parent)
            self._spawn()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _start_or_reuse(self) -> None:
        from flows import local_server

        self._lease = local_server.take_lease(self.home)
        self._lease_path = self.home / local_server.LEASE
        self.kept = True
        self._claim()

    def _claim(self) -> None:
        """Under the Prefect home's spawn lock: the recorded server when it is alive and of this key, else a new
        one, recorded (a dead one's record, or one of other settings, which stays until idle, is replaced)."""
        from flows import local_server

        key = local_server.server_key()
        with local_server.spawn_lock(self.home):
            record = local_server.read_record(self.home)
            if record is not None and record["key"] == key and local_server.pid_alive(int(record["pid"])):
                self.port, self.pid, self.process, self.reused = int(record["port"]), int(record["pid"]), None, True
                return
            self.reused = False
            self._spawn()
            local_server.write_record(self.home, self.pid, self.port, key)

    def _spawn(self) -> None:
        from flows import local_server

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        args = [sys.executable, "-m", "flows.local_server", str(self.port), str(self._lease_path), str(self.idle)]
        if self.kept:
            args.append(str(self.home))  # take_lease made the folder
            log: Any = open(self.home / local_server.LOG, "ab")  # noqa: SIM115 - handed to the server
        else:
            log = None
        # A kept server runs in its own session: a Ctrl-C in this terminal is meant for this command, not for it.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self.process = subprocess.Popen(args, env=env, start_new_session=self.kept, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log)
        self.pid = self.process.pid
        if log is not None:
            log.close()

    def _exited(self) -> int | None:
        from flows import local_server

        if self.process is not None:
            return self.process.poll()
        return None if local_server.pid_alive(self.pid) else -1

    def wait(self, timeout: float) -> None:
        """Return once the server answers its health check; RuntimeError if it exits or `timeout` passes."""
        from flows import local_server

        deadline = time.monotonic() + timeout
        while not self.ready:
            code = self._exited()
            if code == ADDRESS_IN_USE and self.process is not None:  # the port was taken before the server bound it
                self._respawn()
                continue
            if code is not None:
                if self.reused:  # it stopped or was killed since its record was read: start one
                    self._respawn()
                    continue
                raise RuntimeError(f"the temporary Prefect server exited with code {code} before it answered"
                                   + (f" (its log: {self.home / local_server.LOG})" if self.kept else ""))
            if time.monotonic() > deadline:
                self.stop(force=True)
                raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    self.ready = response.status == 200
            except OSError:
                time.sleep(0.05)

    def _respawn(self) -> None:
        """The server died before answering (its port taken, or a reused one stopped): start another, or take
        the one another command started meanwhile."""
        if self.kept:
            self._claim()
        else:
            self._spawn()

    def stop(self, force: bool = False) -> None:
        """At exit: a kept server stays for the next command (it stops itself once idle); this command's own
        server stops now. `force`: stop a server this command started, kept or not."""
        process, self.ready = self.process, False
        if process is None or process.poll() is not None or (self.kept and not force):
            return
        self.process = None
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not self.kept:  # its lease lived in a folder of its own
            if hasattr(self, "_lease"):
                self._lease.close()
            shutil.rmtree(self._lease_path.parent, ignore_errors=True)


_temporary: TemporaryServer | None = None


def start_temporary_server() -> None:
    """Start (or find) Prefect's local server in the background now, if this process will need one: no
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
        server.stop(force=True)
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
            if server.kept and not server.reused:  # say once what stays behind, and how to have it not stay
                print(f"Prefect's local server stays up for the next command at {server.api_url} until idle "
                      f"{server.idle:g} s (ROLLOUT_PREFECT_IDLE_SECONDS; 0: stop with the command)", file=sys.stderr)
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before
