"""The pictures in the README, taken from a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright (`pip install playwright`; never `playwright install`: it is pointed at the system browser).

    .venv/bin/python docs/screenshots.py          # writes docs/images/*.png (about three minutes)

It starts a Prefect server and an MLflow UI on free ports with their own stores under .rollout/screens,
deploys prefect.yaml to a process pool there, runs ci-pipeline twice from the command line against that
server (one run passes and registers v1, one fails its data-validation gate), then photographs:

- the ci-pipeline deployment's Run form (custom run), overrides expanded;
- a passed and a failed run's artifacts;
- the MLflow model version page of v1 (tags, description) and the experiment's runs.
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
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api}
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--port", str(prefect_port)], env=env,
                                  stdout=(work / "prefect.log").open("w"), stderr=subprocess.STDOUT)
        procs.append(server)
        wait(f"{api}/health", server)
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "rollout-process", "--type", "process"], env=env, check=True,
                       capture_output=True)
        subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        for args in ([], ["--drift", "3"]):  # v1 passes; a drift of 3 fails data validation
            subprocess.run([sys.executable, "-m", "cli.main", "ci", "--config", str(config), *args], env=env, cwd=ROOT,
                           capture_output=True)
        tracking = f"sqlite:///{work / 'mlflow.db'}"
        ui = subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking, "--port", str(mlflow_port),
                               "--default-artifact-root", str(work / "mlartifacts")], env=env,
                              stdout=(work / "mlflow.log").open("w"), stderr=subprocess.STDOUT)
        procs.append(ui)
        wait(f"http://127.0.0.1:{mlflow_port}/health", ui)
        experiment = httpx.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/get-by-name",
                               params={"experiment_name": "rollout-ci"}).json()["experiment"]["experiment_id"]
        runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 10}).json()
        deployments = httpx.post(f"{api}/deployments/filter", json={}).json()
        ci_deployment = next(d for d in deployments if d["name"] == "ci-pipeline")
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
                ("mlflow-model-version", f"http://127.0.0.1:{mlflow_port}/#/models/loan-approval/versions/1", None),
                # MLflow 3.17 picks its view from the URL (or the browser's last choice), not from the experiment
                ("mlflow-experiment", f"http://127.0.0.1:{mlflow_port}/#/experiments/{experiment}"
                                      "?workflowType=machine_learning", None),
            ]
            for name, url, tab in shots:
                page.goto(url)
                page.wait_for_load_state("load")  # MLflow's UI polls: never network-idle
                time.sleep(3)  # client-side rendering after the data arrives
                if tab is not None:
                    page.get_by_text(tab, exact=True).first.click()
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


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
