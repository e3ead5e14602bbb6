"""The pictures in the README, taken from a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright (`pip install playwright`; never `playwright install`: it is pointed at the system browser).

    .venv/bin/python docs/screenshots.py          # writes docs/images/*.png (about three minutes)

It starts a Prefect server and an MLflow tracking server on free ports with their own stores under
.rollout/screens, deploys prefect.yaml to a process pool there, runs ci-pipeline from the command line
against both (one run passes and registers v1, one fails its data-validation gate, one more registers v2
as a shadow challenger), logs three simulated days of shadow outcomes and runs online-evaluation, then
photographs:

- the ci-pipeline deployment's Run form (custom run), overrides expanded;
- a passed and a failed run's artifacts;
- the evaluation run's artifacts, and its effect plot as Prefect shows it (an image artifact served by MLflow);
- the MLflow model version page of v2, promoted by the evaluation (tags, description), and the
  experiment's runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = ROOT / "docs" / "images"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args[:3]} exited early")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"{url} not up after {timeout} s")


def main() -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("pip install playwright (the browser is the system chromium: apt-get install -y chromium)")
    from cli.demo import write_policy

    work = ROOT / ".rollout" / "screens"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = write_policy(work, mode="shadow")
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api,
           "ROLLOUT_MLFLOW_TRACKING_URI": mlflow_url}
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--port", str(prefect_port)], env=env,
                                  stdout=(work / "prefect.log").open("w"), stderr=subprocess.STDOUT)
        procs.append(server)
        ui = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                               "--artifacts-destination", str(work / "mlartifacts"), "--port", str(mlflow_port),
                               "--workers", "1"], env=env, stdout=(work / "mlflow.log").open("w"),
                              stderr=subprocess.STDOUT)
        procs.append(ui)
        wait(f"{api}/health", server)
        wait(f"{mlflow_url}/health", ui)
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "rollout-process", "--type", "process"], env=env, check=True,
                       capture_output=True)
        subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        for args in ([], ["--drift", "3"], []):  # v1 passes; a drift of 3 fails data validation; v2 in shadow
            subprocess.run([sys.executable, "-m", "cli.main", "ci", "--config", str(config), *args], env=env, cwd=ROOT,
                           capture_output=True)
        evaluation = evaluate(config, env)
        experiment = httpx.get(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name",
                               params={"experiment_name": "rollout-ci"}).json()["experiment"]["experiment_id"]
        flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}).json()}
        runs = [r for r in httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_ASC", "limit": 20}).json()
                if flows.get(r["flow_id"]) == "ci-pipeline"]
        deployments = httpx.post(f"{api}/deployments/filter", json={}).json()
        ci_deployment = next(d for d in deployments if d["name"] == "ci-pipeline")
        plot = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [
            "loan-approval-rollout-1-effect-plot"]}}}).json()[0]
        passed = next(r for r in runs if r["state_type"] == "COMPLETED")
        failed = next(r for r in runs if r["state_type"] == "FAILED")
        OUT.mkdir(parents=True, exist_ok=True)
        ui_base = f"http://127.0.0.1:{prefect_port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            shots = [  # (file, page, tab to open)
                ("run-form", f"{ui_base}/deployments/deployment/{ci_deployment['id']}/run", None),
                ("ci-passed-artifacts", f"{ui_base}/runs/flow-run/{passed['id']}", "Artifacts"),
                ("ci-failed-run", f"{ui_base}/runs/flow-run/{failed['id']}", None),
                ("evaluation-plots", f"{ui_base}/runs/flow-run/{evaluation}", "Artifacts"),
                ("evaluation-effect-plot", f"{ui_base}/artifacts/artifact/{plot['id']}", None),
                ("mlflow-model-version", f"{mlflow_url}/#/models/loan-approval/versions/2", None),  # promoted
                # MLflow 3.17 picks its view from the URL (or the browser's last choice), not from the experiment
                ("mlflow-experiment", f"{mlflow_url}/#/experiments/{experiment}"
                                      "?workflowType=machine_learning", None),
            ]
            for name, url, tab in shots:
                page.goto(url)
                page.wait_for_load_state("load")  # MLflow's UI polls: never network-idle
                time.sleep(3)  # client-side rendering after the data arrives
                if tab is not None:
                    page.screenshot(path=str(work / f"{name}-before-tab.png"), full_page=True)  # for a failed click
                    page.get_by_text(tab, exact=True).first.click(timeout=60_000)
                    time.sleep(2)
                page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
                print(f"{OUT / (name + '.png')}  <-  {url}")
            browser.close()
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def evaluate(config: Path, env: dict[str, str]) -> str:
    """Three simulated days of shadow outcomes (the challenger better), then one online-evaluation run against
    the servers; the run's id."""
    from datetime import timedelta

    from rollout.config import load_policy
    from rollout.outcomes import OutcomeStore
    from tests.flows.test_online_evaluation import log_shadow

    store = OutcomeStore(load_policy(config).outcome_url)
    rollout = store.current_rollout()
    if rollout is None:
        sys.exit("the third ci-pipeline run opened no rollout")
    log_shadow(store, rollout.rollout_id, 3000, champion_acc=0.78, challenger_acc=0.88, start=rollout.started_at,
               label_after=timedelta(0))
    now = (rollout.started_at + timedelta(days=3.5)).isoformat()
    subprocess.run([sys.executable, "-m", "cli.main", "evaluate", "--config", str(config), "--now", now], env=env,
                   cwd=ROOT, check=True, capture_output=True)
    api = env["PREFECT_API_URL"]
    flows = {f["name"]: f["id"] for f in httpx.post(f"{api}/flows/filter", json={}).json()}
    runs = httpx.post(f"{api}/flow_runs/filter", json={  # the run just made, not the schedule's next ones
        "sort": "START_TIME_DESC", "limit": 1, "flows": {"id": {"any_": [flows["online-evaluation"]]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}).json()
    return str(runs[0]["id"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
