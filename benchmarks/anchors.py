"""The servers people would pick instead of `rollout serve`, for benchmarks/serving.py: MLServer (mlserver-sklearn,
adaptive batching) and BentoML (a batchable API). Each runs in its own virtual environment, created on first use
(about 30 s each from PyPI) and cached under ~/.cache/rollout-bench (ROLLOUT_BENCH_CACHE), with this venv's
scikit-learn, pandas and numpy pinned so it loads the very pipeline the benchmark trained (exported with joblib).
Both answer one record with the approval probability, as `rollout serve` does, from one worker process, batching
up to 256 rows or 5 ms: their own documented way to carry concurrent single-record load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("ROLLOUT_BENCH_CACHE", Path.home() / ".cache" / "rollout-bench"))
MAX_BATCH_SIZE = 256
MAX_BATCH_MS = 5
ANCHORS = {
    # MLServer 1.7.1's inference pool does not start with uvloop 0.22 (its event-loop policy changed)
    "mlserver": ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22"],
    "bentoml": ["bentoml==1.4.40"],
}
READY_PATH = {"mlserver": "/v2/health/ready", "bentoml": "/readyz"}

BENTO_SERVICE = f'''
import os
from typing import Any

import bentoml
import joblib
import pandas as pd


@bentoml.service(workers=1)
class LoanApproval:
    def __init__(self) -> None:
        self.model = joblib.load(os.environ["ANCHOR_MODEL"])

    @bentoml.api(batchable=True, max_batch_size={MAX_BATCH_SIZE}, max_latency_ms=1000)
    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, float]]:
        score = self.model.predict_proba(pd.DataFrame.from_records(records))[:, 1]
        return [{{"prediction": float(s >= 0.5), "score": float(s)}} for s in score]
'''


def pins() -> list[str]:
    """This venv's versions of what a pickled pipeline needs to load unchanged."""
    return [f"{name}=={metadata.version(name)}" for name in ("scikit-learn", "pandas", "numpy", "scipy", "joblib")]


def venv(name: str) -> Path:
    """The anchor's virtual environment, created and cached on first use; raises RuntimeError with pip's output."""
    requirements = [*ANCHORS[name], *pins()]
    key = hashlib.sha256("\n".join([*requirements, sys.version]).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{key}"
    if (path / ".ready").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"creating the {name} environment in {path} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    done = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n{done.stderr[-3000:]}")
    (path / ".ready").write_text("\n".join(requirements) + "\n")
    return path


def command(name: str, directory: Path, model: Path, model_name: str, port: int,
            spare_ports: tuple[int, int]) -> tuple[list[str], dict[str, str], str]:
    """(command line, extra environment, the path to POST single records to) of an anchor serving `model`."""
    env = venv(name)
    home = directory / name
    home.mkdir(parents=True, exist_ok=True)
    if name == "mlserver":
        grpc, metrics = spare_ports
        (home / "settings.json").write_text(json.dumps({
            "http_port": port, "grpc_port": grpc, "metrics_port": metrics, "parallel_workers": 1,
            "host": "127.0.0.1", "debug": False}))
        (home / "model-settings.json").write_text(json.dumps({
            "name": model_name, "implementation": "mlserver_sklearn.SKLearnModel",
            "max_batch_size": MAX_BATCH_SIZE, "max_batch_time": MAX_BATCH_MS / 1000.0,
            "parameters": {"uri": str(model)}}))
        return [str(env / "bin" / "mlserver"), "start", str(home)], {}, f"/v2/models/{model_name}/infer"
    (home / "service.py").write_text(BENTO_SERVICE)
    return ([str(env / "bin" / "bentoml"), "serve", "service:LoanApproval", "--host", "127.0.0.1", "--port",
             str(port), "--working-dir", str(home)], {"ANCHOR_MODEL": str(model), "BENTOML_HOME": str(home / ".bentoml")},
            "/predict")


def body(name: str, record: dict[str, Any], text_columns: set[str]) -> dict[str, Any]:
    """One record as the anchor's client sends it: MLServer, the Open Inference Protocol with one tensor per column
    (typed by the column, not the value: adaptive batching merges requests column by column, and a missing
    category sent as FP64 breaks the whole batch) decoded as a pandas frame, asking for predict_proba; BentoML,
    the API's argument as JSON."""
    if name == "mlserver":
        return {"parameters": {"content_type": "pd"}, "outputs": [{"name": "predict_proba"}], "inputs": [
            {"name": k, "shape": [1], "datatype": "BYTES" if k in text_columns else "FP64", "data": [v]}
            for k, v in record.items()]}
    return {"records": [record]}
