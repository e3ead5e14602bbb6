"""What the terminal shows fits 100 columns, with figures rounded for reading and never cut in two."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

import cli.demo as demo
from cli.main import gate_table
from rollout.ci.gates import GateResult

WIDTH = 100
FIGURE = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Console:
    console = Console(width=WIDTH, record=True, color_system=None)
    monkeypatch.setattr(demo, "console", console)
    return console


def _lines(console: Console) -> list[str]:
    return console.export_text().splitlines()


def test_an_evaluation_is_one_line_of_rounded_figures(terminal: Console) -> None:
    outcome = SimpleNamespace(stats={"7": {"estimate": 0.048123456, "lower": 0.0391, "upper": 0.05799, "n": 12546.0},
                                     "8": {"estimate": math.nan, "lower": -math.inf, "upper": math.inf, "n": 0}},
                              reasons=["a long sentence"])
    assert demo.brief(outcome) == "v7 effect +0.048 [+0.039, +0.058], n=12,546; v8: no labelled outcomes yet"
    demo._line(f"  day  6.0  1,200 served   promote  {demo.brief(outcome)} and some more words " * 2)
    (line,) = _lines(terminal)
    assert len(line) <= WIDTH and line.endswith("…")  # cut to the width, not wrapped onto a second line


def test_tables_wrap_at_spaces_so_no_figure_is_split(terminal: Console) -> None:
    reason = ("Held-out roc_auc 0.8637 vs champion v1 0.7853 (difference +0.0784, allowed regression 0.01); "
              "single-row p99 3.22 ms, 1.00x the champion's; batch p99 4.8 ms; within budget.")
    numbers = "Production inputs drifted from the training data on income (2000 rows). v2 effect +0.048 " \
              "[+0.039, +0.058], n=12,546"
    terminal.print(gate_table([GateResult("champion", True, reason, {})]))
    terminal.print(demo.summary_table([demo.Step("online-evaluation after 6 simulated days", "promote v2", numbers)]))
    lines = _lines(terminal)
    assert max(map(len, lines)) <= WIDTH
    for figure in FIGURE.findall(reason + numbers):
        assert any(figure in line for line in lines), figure  # whole, on one line


def test_confidence_levels_read_as_people_write_them() -> None:
    from rollout.cd.decision import _percent

    assert [_percent(x) for x in (0.95, 0.975, 1 - 0.05 / 3)] == ["95%", "97.5%", "98.33%"]


def test_rollout_history_fits_100_columns_with_each_alias_move_and_effect(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    import cli.main
    from rollout.config import load_policy
    from rollout.outcomes import OutcomeStore
    from tests.conftest import write_policy

    config = write_policy(Path(tmp_path))
    store = OutcomeStore(load_policy(config).outcome_url).create()
    rollout = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    reason = ("Version 2: effect +0.0485 (accuracy, better-is-positive, paired differences, clustered by unit), one-sided "
              "95% bounds [+0.0394, +0.0575] vs margin -0.01, n=12546: the lower bound clears -margin.")
    store.record_decision(rollout, "promote", {"reasons": [reason], "stats": {"2": {
        "estimate": 0.048512, "lower": 0.039411, "upper": 0.057533, "n": 12546}}},
        [{"alias": "champion", "from": "1", "to": "2"}, {"alias": "previous-champion", "from": None, "to": "1"}],
        actor="continuous-training")
    store.dispose()
    console = Console(width=WIDTH, record=True, color_system=None)
    monkeypatch.setattr(cli.main, "console", console)

    cli.main.history(config=str(config), limit=50, show_all=False)

    lines = _lines(console)
    assert max(map(len, lines)) <= WIDTH
    text = " ".join(" ".join(part.strip() for part in line.split("│")) for line in lines)
    for shown in ("@champion 1→2", "@previous-champion -→1", "+0.049", "[+0.039,", "+0.058],", "n=12,546",
                  "continuous-training", "promote"):
        assert any(shown in line for line in lines), shown  # each whole, on one line
    assert "0.0485" not in text  # rounded for reading


def test_the_evaluation_report_counts_samples_and_rounds_hours() -> None:
    from datetime import UTC, datetime

    from rollout.report import evaluation_markdown

    decision = {"action": "promote", "winner": "2", "reasons": ["2: promote."], "bandit_weights": None,
                "stats": {"2": {"verdict": "promote", "estimate": 0.0485, "lower": 0.0394, "upper": 0.0575,
                                "n": 12546.0, "power": 0.913, "samples_needed": 0.0, "hours_to_decision": 0.0,
                                "srm_p": 0.52}}}
    markdown = evaluation_markdown(decision, model_name="m", rollout_id=1, mode="shadow", metric="accuracy",
                                   margin=0.01, champion="1", now=datetime(2026, 1, 1, tzinfo=UTC))
    row = next(line for line in markdown.splitlines() if line.startswith("| 2 |"))
    assert row == "| 2 | promote | 0.0485 | 0.0394 | 0.0575 | 12,546 | 0.91 | 0 | 0.0 | 0.520 |"


def test_an_evaluation_before_any_label_says_so_instead_of_an_empty_table() -> None:
    from datetime import UTC, datetime

    from rollout.cd.decision import Evidence
    from rollout.report import metrics_markdown

    now = datetime(2026, 1, 1, tzinfo=UTC)
    markdown = metrics_markdown(Evidence("shadow", now, now, "1", ()), "accuracy")
    assert "No labelled outcomes yet" in markdown and "| version |" not in markdown


def test_rollout_history_says_what_it_leaves_out_and_what_is_still_open(tmp_path, monkeypatch) -> None:
    """Before any decision the table is empty: it says the hourly evaluations it hides and the open rollout,
    instead of reading as "nothing happened"."""
    from pathlib import Path

    import cli.main
    from rollout.config import load_policy
    from rollout.outcomes import OutcomeStore
    from tests.conftest import write_policy

    config = write_policy(Path(tmp_path))
    console = Console(width=WIDTH, record=True, color_system=None)
    monkeypatch.setattr(cli.main, "console", console)
    cli.main.history(config=str(config), limit=50, show_all=False)
    assert "No rollout has been opened or decided yet" in " ".join(_lines(console))

    store = OutcomeStore(load_policy(config).outcome_url).create()
    rollout = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"champion": 0.9, "challenger": 0.1}, "s")
    for _ in range(3):
        store.record_decision(rollout, "continue", {"reasons": ["the bounds still straddle -margin"]}, [], actor="e")
    store.dispose()
    console = Console(width=WIDTH, record=True, color_system=None)
    monkeypatch.setattr(cli.main, "console", console)
    cli.main.history(config=str(config), limit=50, show_all=False)
    said = " ".join(" ".join(_lines(console)).split())
    assert "Not shown: 3 entries that changed nothing" in said and "--all shows them" in said, said
    assert f"Open: rollout {rollout} (ab: @champion v1, @challenger v2)" in said, said
    assert "continue" not in said.split("Not shown")[0]  # the table itself holds none of them
