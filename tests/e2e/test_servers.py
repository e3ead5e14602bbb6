"""Real servers: `prefect server`, `mlflow server` (PostgreSQL backend), a process worker, deployments
from prefect.yaml, triggered with the same commands as .github/workflows/rollout.yml; the outcome
store in PostgreSQL too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from cli.demo import free_port
from tests.flows.test_online_evaluation import log_shadow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def _workflow_commands() -> list[str]:
    """The shell commands the CI workflow runs after `make test`, read from the file itself."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "rollout.yml").read_text())
    steps = workflow["jobs"]["test-deploy-train"]["steps"]
    # steps that run only after a failure (printing the failed gate) are not part of the happy path
    return [s["run"] for s in steps if "run" in s and s["run"] != "make test" and "if" not in s]


@pytest.fixture
def pg_urls() -> Iterator[dict[str, str]]:
    """Two fresh PostgreSQL databases: the outcome store's and MLflow's backend store."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    try:
        admin = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means: no server here
        pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({type(exc).__name__}); the e2e test needs it")
    names = {role: f"rollout_e2e_{role}_{uuid.uuid4().hex[:10]}" for role in ("outcomes", "mlflow")}
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield {role: f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}" for role, name in names.items()}
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def servers(tmp_path: Path, pg_urls: dict[str, str]) -> Iterator[dict[str, str]]:
    procs: list[subprocess.Popen] = []
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "ROLLOUT_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "ROLLOUT_OUTCOME_STORE_URL": pg_urls["outcomes"],
        "ROLLOUT_REPORTS_DIR": str(tmp_path / "reports"),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    env.pop("PREFECT_API_KEY", None)

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    prefect = start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                "--port", str(prefect_port)])
    mlflow = start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                              "--backend-store-uri", pg_urls["mlflow"],
                              "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"])
    try:
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", prefect, tmp_path / "prefect.log")
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, tmp_path / "mlflow.log")
        yield {"env": env, "tmp": str(tmp_path), "start": start}  # type: ignore[dict-item]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _sh(command: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    # The workflow's commands name .venv/bin/...; here the running interpreter's venv stands in for it.
    command = command.replace(".venv/bin/", f"{BIN}/")
    return subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _no_scheduled_runs(env: dict[str, str]) -> None:
    """The deploy starts prefect.yaml's schedules: at the top of an hour the hourly online-evaluation would run
    beside this test's own run of it, which its concurrency limit then cancels (CANCEL_NEW), and its decision would
    join the audit log the test reads. Pause them, and remove the runs the scheduler made already (before any
    worker could start one)."""
    import httpx

    done = _sh(".venv/bin/prefect --no-prompt deployment schedule pause --all", env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    api = env["PREFECT_API_URL"]
    ahead = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}},
                       timeout=30).json()
    for run in ahead:
        httpx.delete(f"{api}/flow_runs/{run['id']}", timeout=30).raise_for_status()
    deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
    schedules = [s for d in deployments for s in d.get("schedules") or []]
    assert schedules and not any(s["active"] for s in schedules)  # the hourly and daily ones, paused


def test_ci_workflow_commands_deploy_and_run_on_real_servers(servers):
    env, tmp = servers["env"], Path(servers["tmp"])
    commands = _workflow_commands()
    assert any("deploy --all" in c for c in commands) and any("deployment run ci-pipeline" in c for c in commands)
    setup, trigger = commands[:-1], commands[-1]
    for command in setup:
        done = _sh(command, env)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    _no_scheduled_runs(env)

    worker = servers["start"]("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "rollout-process"])
    try:
        # The first run makes the champion, the second (the same command) a challenger with a rollout.
        for _ in range(2):
            done = _sh(trigger, env)
            assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-2000:]}\n" + \
                (tmp / "worker.log").read_text()[-4000:]
            assert "Completed" in done.stdout

        from mlflow import MlflowClient

        from rollout.registry import MlflowRegistry
        from rollout.outcomes import OutcomeStore

        uri = env["ROLLOUT_MLFLOW_TRACKING_URI"]
        reg = MlflowRegistry(uri, "loan-approval")
        assert reg.aliases() == {"champion": "1", "challenger": "2"}
        assert MlflowClient(uri, uri).get_model_version("loan-approval", "2").current_stage == "Staging"
        store = OutcomeStore(env["ROLLOUT_OUTCOME_STORE_URL"])
        rollout = store.current_rollout()
        assert rollout is not None and rollout.versions == {"champion": "1", "challenger": "2"}

        # Outcomes of three simulated days, then one online-evaluation deployment run, acting.
        started = rollout.started_at
        # labels as they come (the example policy's label_delay_hours is 0: no waiting for late ones)
        log_shadow(store, rollout.rollout_id, 3000, champion_acc=0.78, challenger_acc=0.88, start=started,
                   label_after=timedelta(0))
        now = (started + timedelta(days=3.5)).astimezone(timezone.utc).isoformat()
        done = _sh(f".venv/bin/prefect deployment run online-evaluation/online-evaluation --watch --watch-timeout 600 "
                   f"--params '{json.dumps({'params': {'now': now, 'actor': 'e2e'}})}'", env)
        assert done.returncode == 0, f"{done.stdout[-4000:]}\n" + (tmp / "worker.log").read_text()[-4000:]
        assert reg.aliases() == {"champion": "2", "previous-champion": "1"}
        assert [d.decision for d in store.audit_log(rollout.rollout_id)] == ["promote"]
        assert store.current_rollout() is None
        store.dispose()

        # The evaluation's plots show in the Prefect UI: image artifacts whose URLs the MLflow server answers
        # with the PNGs, and a link to the evaluation's MLflow run.
        import httpx

        api = env["PREFECT_API_URL"]
        for name in ("effect-plot", "monitoring-plot", "evaluation-run"):
            key = f"loan-approval-rollout-{rollout.rollout_id}-{name}"
            found = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()
            assert len(found) == 1, (key, found)
            if name.endswith("plot"):
                assert found[0]["type"] == "image"
                image = httpx.get(found[0]["data"])
                assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n", found[0]["data"]
            else:
                assert "/#/experiments/" in found[0]["data"]
    finally:
        worker.terminate()  # waited for (or killed after 30 s) with the servers, by the fixture
    shutil.rmtree(tmp / "prefect-home", ignore_errors=True)
