"""The batch-scoring flow on a real champion from ci-pipeline: a team's nightly file, scored and logged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.batch_scoring import BatchParameters, batch_scoring
from flows.ci_pipeline import ci_pipeline
from rollout.config import load_policy
from rollout.data import example_dataset
from rollout.outcomes import OutcomeStore
from tests.conftest import ROOT, write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_a_nightly_file_is_scored_by_the_champion_and_logged(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    assert ci_pipeline(config=str(path)).version == "1"
    nightly = example_dataset(rows=600, seed=77).drop(columns=["approved"])
    nightly.insert(0, "application_id", [f"app-{i}" for i in range(len(nightly))])
    nightly.to_parquet(tmp_path / "nightly.parquet", index=False)
    summary = batch_scoring(params=BatchParameters(input=str(tmp_path / "nightly.parquet"),
                                                   output=str(tmp_path / "scored.csv"), key_column="application_id",
                                                   chunk_rows=250), config=str(path))
    assert (summary.rows, summary.logged, summary.answered_by, summary.refused) == (600, 600, {"1": 600}, 0)
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert scored["score"].between(0, 1).all() and set(scored["prediction"]) <= {0, 1}
    assert scored["request_id"].iloc[0] == "nightly:app-0"
    store = OutcomeStore(load_policy(path).outcome_url)
    assert store.count_predictions() == 600
    # the same file again from the command line: nothing is logged twice
    done = subprocess.run([sys.executable, "-m", "cli.main", "score", "--config", str(path), "--input",
                           str(tmp_path / "nightly.parquet"), "--output", str(tmp_path / "again.parquet"),
                           "--key-column", "application_id"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logged 0 requests; 600 were logged by an earlier run of batch 'nightly'" in " ".join(done.stdout.split())
    assert store.count_predictions() == 600 and len(pd.read_parquet(tmp_path / "again.parquet")) == 600
