"""Edge cases synthesised from the schema, replay of saved problem inputs, and their outcomes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rollout.data import Schema, records_of
from rollout.models import LoadedModel, ModelError, Predictor


# What free text can be that training rarely had: nothing, blanks, a whole document, other scripts and emoji,
# words never seen.
TEXT_CASES = {
    "empty_text": "",
    "whitespace_text": " \t\n  ",
    "long_text": ("lorem ipsum dolor sit amet " * 4000)[:100_000],
    "non_ascii_text": "Ünïcödé テキスト 文本 نص 🙂🚀 — ½ ∑",
    "unseen_vocabulary_text": "qzxv wobblefrump glorptastic zyzzyva",
}


@dataclass(frozen=True)
class CaseResult:
    """What one edge case did: a well-formed prediction, a clean validation error, or a crash."""

    name: str
    outcome: str  # "prediction" | "validation_error" | "crash"
    detail: str = ""


def synthesize_cases(schema: Schema, sample: pd.DataFrame, large_rows: int = 5000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Edge-case inputs derived from the schema and a few real rows (features only)."""
    rng = np.random.default_rng(seed)
    base = sample[list(schema.features)].head(8).reset_index(drop=True)
    cases: dict[str, pd.DataFrame] = {"single_row": base.head(1), "empty_batch": base.head(0)}
    for col in schema.nullable or schema.features:
        frame = base.copy()
        frame[col] = None if schema.holds_strings(col) else np.nan
        cases[f"null_{col}"] = frame
    all_null = base.copy()
    for col in schema.nullable:
        all_null[col] = None if schema.holds_strings(col) else np.nan
    cases["null_every_nullable"] = all_null
    for col in schema.categorical:
        frame = base.copy()
        frame[col] = "__never_seen_level__"
        cases[f"unseen_{col}"] = frame
        frame = base.copy()
        frame[col] = ""
        cases[f"empty_string_{col}"] = frame
    for col in schema.text:
        for label, text in TEXT_CASES.items():
            frame = base.copy()
            frame[col] = text
            cases[f"{label}_{col}"] = frame
    for col in schema.numeric:
        lo, hi = schema.ranges.get(col, (0.0, 1.0))
        span = max(abs(hi - lo), 1.0)
        for label, value in (("huge", hi + 1e6 * span), ("negative_huge", lo - 1e6 * span), ("zero", 0.0)):
            frame = base.copy()
            frame[col] = float(value)
            cases[f"{label}_{col}"] = frame
    idx = rng.integers(0, len(sample), size=large_rows)
    cases["large_batch"] = sample[list(schema.features)].iloc[idx].reset_index(drop=True)
    cases["columns_reordered"] = base[list(reversed(base.columns))]
    return cases


def load_saved_inputs(path: Path) -> dict[str, pd.DataFrame]:
    """Saved problem inputs (CSV, or JSON records) replayed one row per case."""
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        frame = pd.DataFrame(json.loads(path.read_text()))
    return {f"saved_{i}": frame.iloc[[i]].reset_index(drop=True) for i in range(len(frame))}


def run_case(name: str, model: LoadedModel, frame: pd.DataFrame) -> CaseResult:
    """Send one case to the model as the service would (records, checked against the input contract)."""
    records = records_of(frame)
    problems = model.problems(records)
    if problems:
        first = problems[0]
        return CaseResult(name, "validation_error", _short(f"{first['field']}: {first['error']}"))
    try:
        outputs = model.score(records)
    except ModelError as exc:
        return CaseResult(name, "crash", _short(str(exc)))
    bad = [(i, e) for i, e in enumerate(outputs.errors) if e is not None]
    if bad:
        return CaseResult(name, "crash", f"malformed output: {len(bad)} of {len(records)} rows, first row {bad[0][0]}: "
                                         f"{bad[0][1]}")
    return CaseResult(name, "prediction")


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cases(model: LoadedModel, cases: dict[str, pd.DataFrame]) -> list[CaseResult]:
    return [run_case(name, model, frame) for name, frame in cases.items()]


def check(model: Predictor, schema: Schema, sample: pd.DataFrame, saved: Path | None, seed: int) -> list[CaseResult]:
    """Every synthesised edge case and every saved problem input, sent to the model as the service would."""
    cases = synthesize_cases(schema, sample, seed=seed)
    if saved is not None:
        cases.update(load_saved_inputs(saved))
    return run_cases(LoadedModel(model), cases)
