"""The README's "Your own data" walk-through, command by command, on a table the project did not make: a
weather series with a time column, a regression written as a policy file alone (no code), validated by
time, served, replayed from the team's own later rows with their own times and delayed labels, and judged at
the data's time until a decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cli.demo import Server

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def readings(days: int, start: str, seed: int) -> pd.DataFrame:
    """A reading every 10 minutes: temperature over the day (cold at dawn, warm mid-afternoon), humidity, and the
    hour and weekday."""
    rng = np.random.default_rng(seed)
    ts = pd.date_range(start, periods=days * 144, freq="10min")
    hour = ts.hour.to_numpy()
    n = len(ts)
    humidity = np.clip(rng.normal(65, 12, n), 10, 100)
    temperature = 12 + 6 * np.sin(2 * np.pi * (hour - 9) / 24) - 0.05 * (humidity - 65) + rng.normal(0, 1.0, n)
    return pd.DataFrame({"ts": ts.strftime("%Y-%m-%dT%H:%M:%S"), "hour": hour, "humidity": humidity.round(1),
                         "weekday": ts.day_name(), "temperature": temperature.round(2)})


POLICY = """\
registry: {model_name: weather}
data:
  source: weather.csv
  target: temperature
  task: regression
  timestamp_column: ts
estimator: {name: ridge}
ci:
  split: time
  metric: rmse
  expectations_suite: weather_suite.json
  stress: {budget: {max_ratio_vs_champion: 10}}
rollout:
  mode: shadow
  margin: 0.2                  # mse, in degrees squared: the champion's is about 20
  min_detectable_effect: 1.0
  min_samples: 300
  label_delay_hours: 18        # labels come 6-18 h after the reading; younger readings wait for theirs
  min_duration_hours: 24
stores:
  mlflow_tracking_uri: sqlite:///mlflow.db
  outcome_store_url: sqlite:///outcomes.db
  mlflow_artifacts: mlartifacts
  reports_dir: reports
"""


def test_your_own_data_walkthrough_reaches_a_decision(tmp_path: Path):
    readings(30, "2025-01-01", seed=1).to_csv(tmp_path / "weather.csv", index=False)  # the training history
    readings(10, "2025-04-01", seed=2).to_csv(tmp_path / "april.csv", index=False)  # what production saw next
    config = tmp_path / "rollout.yaml"
    config.write_text(POLICY)
    def ok(*args: str, env: dict[str, str] | None = None) -> str:
        """A command as a user types it: its own process, run from the policy's folder."""
        result = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600, env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT),
                                                             **(env or {})})
        assert result.returncode == 0, result.stdout + result.stderr
        return " ".join(result.stdout.split())

    said = ok("check-config", "--config", str(config), "--data")
    assert "the policy fits its data (4320 rows, 5 columns)" in said
    ok("make-suite", "--config", str(config), "--output", str(tmp_path / "weather_suite.json"))
    said = ok("ci", "--config", str(config))  # a straight line through the hours: the first champion
    assert "registered version 1 as @champion" in said and "floor │ skipped" in said, said
    said = ok("ci", "--config", str(config), "--estimator", "gradient_boosting_regressor",
              "--params", json.dumps({"max_depth": 2}))
    assert "registered version 2 as @challenger" in said, said

    server = Server(config, "weather-token")
    try:
        said = ok("simulate", "--url", server.url, "--config", str(config), "--data", str(tmp_path / "april.csv"),
                  "--label-column", "temperature", "--ts-column", "ts", "--label-delay", "12h",
                  env={"ROLLOUT_TOKEN": "weather-token"})
    finally:
        server.stop()
    assert "requests=1440" in said and "errors=0" in said and "start='2025-04-01T00:00:00+00:00'" in said, said

    said = ok("evaluate", "--config", str(config), "--now", "data")
    assert said.startswith("PROMOTE version 2"), said
    policy = yaml.safe_load(config.read_text())
    assert policy["estimator"] == {"name": "ridge"}  # the policy file was all it took: nothing edited
