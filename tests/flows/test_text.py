"""Free text as a user brings it: examples/tickets.yaml on the support tickets examples/make_tickets.py writes,
through `rollout make-suite` and `rollout ci` (robustness with empty, blank, 100k-character, non-ASCII and unseen
text), a challenger in shadow, the real service taking such text, labels, and the evaluation."""

from __future__ import annotations

import json
import runpy
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout.ci.robustness import TEXT_CASES
from rollout.config import load_policy
from rollout.registry import MlflowRegistry
from rollout.roles import Role
from tests.conftest import serve_and_label

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def tickets(tmp_path: Path) -> Path:
    """The example's script, policy and suite in a folder of their own, stores inside it, CI budgets relaxed."""
    shutil.copy(EXAMPLES / "make_tickets.py", tmp_path / "make_tickets.py")
    runpy.run_path(str(tmp_path / "make_tickets.py"), run_name="__main__")
    policy = yaml.safe_load((EXAMPLES / "tickets.yaml").read_text())
    policy["stores"] = {"mlflow_tracking_uri": "sqlite:///mlflow.db", "outcome_store_url": "sqlite:///outcomes.db",
                        "mlflow_artifacts": "mlartifacts", "reports_dir": "reports"}
    policy["ci"].update({"cv_folds": 3, "stress": {"single_requests": 30, "batch_size": 200, "batches": 4, "budget": {
        "p99_single_ms": 2000, "p99_batch_ms": 5000, "max_ratio_vs_champion": 20}}})
    path = tmp_path / "tickets.yaml"
    path.write_text(yaml.safe_dump(policy))
    made = CliRunner().invoke(app, ["make-suite", "--config", str(path), "--output", str(tmp_path / "tickets_suite.json")])
    assert made.exit_code == 0, made.output
    return path


def test_text_tickets_go_through_ci_serving_labels_and_evaluation(tickets: Path):
    import pandas as pd

    first = CliRunner().invoke(app, ["ci", "--config", str(tickets)], terminal_width=300)
    assert first.exit_code == 0, first.output
    said = " ".join(first.output.split())
    assert "robustness │ pass" in said and "registered version 1" in said
    policy = load_policy(tickets)
    registry = MlflowRegistry.for_policy(policy)
    report = next((tickets.parent / "reports").glob("ci-*/gate_robustness.md")).read_text()
    for label in TEXT_CASES:  # each odd text went through the model as the service sends it, and was scored
        assert f"{label}_message: prediction" in report, report

    second = CliRunner().invoke(app, ["ci", "--config", str(tickets), "--params", '{"C": 1.0}'], terminal_width=300)
    assert second.exit_code == 0, second.output
    aliases = registry.aliases()
    assert set(aliases) == {Role.CHAMPION, Role.CHALLENGER}

    frame = pd.read_csv(tickets.parent / "tickets.csv")
    features = frame.drop(columns=["escalated"])
    # What real users type, as well as the table's own rows: nothing at all, a whole document, other scripts.
    odd = features.head(len(TEXT_CASES)).copy()
    odd["message"] = list(TEXT_CASES.values())
    features = pd.concat([features, odd], ignore_index=True)
    labels = pd.concat([frame["escalated"], frame["escalated"].head(len(TEXT_CASES))], ignore_index=True)
    served = serve_and_label(policy, features, labels, "text-token", batch=250)
    assert len(served) == len(features) and {a["version"] for a in served} == {aliases[Role.CHAMPION]}
    assert all(0.0 <= a["score"] <= 1.0 for a in served)

    outcome = online_evaluation(config=str(tickets), params=EvaluationParameters(
        now=datetime.now(UTC) + timedelta(hours=1)))
    stats = json.loads(Path(outcome.report).with_suffix(".json").read_text())["stats"][aliases[Role.CHALLENGER]]
    assert stats["n"] == len(features)  # the challenger scored every row in shadow, the long and odd texts too
