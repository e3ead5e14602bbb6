"""Shared helpers of the benchmarks: the command line, a plain-text table, the final JSON line, the policy."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def example_policy(directory: Path, rows: int, seed: int, outcomes: str = "outcomes.db") -> dict[str, Any]:
    """The example policy (rollout.yaml) with its data size and seed set and its stores in `directory`."""
    import yaml

    policy = yaml.safe_load((ROOT / "rollout.yaml").read_text())
    policy["data"]["example"] = {"rows": rows, "seed": seed, "drift": 0.0}
    policy["ci"]["expectations_suite"] = str(ROOT / "expectations" / "loan_training.json")
    policy["stores"] = {
        "mlflow_tracking_uri": f"sqlite:///{directory / 'mlflow.db'}",
        "outcome_store_url": f"sqlite:///{directory / outcomes}",
        "mlflow_artifacts": str(directory / "mlartifacts"),
        "reports_dir": str(directory / "reports"),
    }
    return policy


def parser(description: str) -> argparse.ArgumentParser:
    """Every benchmark takes --quick (a run under a minute) and --seed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    p.add_argument("--seed", type=int, default=20260101, help="master seed (every cell derives its own)")
    return p


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A left-aligned text table with a title line; values are formatted by `fmt`."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def _plain(value: Any) -> Any:
    """numpy scalars and nested containers as JSON-ready Python values; NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit_json(figures: dict[str, Any]) -> None:
    """The last line of stdout: every figure of the run as one JSON object."""
    print(json.dumps(_plain(figures), separators=(",", ":")), flush=True)
