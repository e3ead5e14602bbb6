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
    outcome: str  # "prediction" | "validation_error" | "crash" | "unstable" (answers moved under small noise)
    detail: str = ""


def synthesize_cases(schema: Schema, sample: pd.DataFrame, large_rows: int = 5000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Edge-case inputs derived from the schema and a few real rows (features only): nulls only in columns the
    training data had nulls in (elsewhere the input contract refuses them before any model sees them), numbers
    at the edges of the range training saw and one span beyond each edge, unseen and empty categories, odd
    texts, batches empty and large, columns reordered."""
    rng = np.random.default_rng(seed)
    base = sample[list(schema.features)].head(8).reset_index(drop=True)
    cases: dict[str, pd.DataFrame] = {"single_row": base.head(1), "empty_batch": base.head(0)}
    for col in schema.nullable:
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
        span = abs(hi - lo) or max(abs(hi), 1.0)
        for label, value in (("min", lo), ("max", hi), ("below_min", lo - span), ("above_max", hi + span)):
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


def invariance(model: LoadedModel, schema: Schema, sample: pd.DataFrame, seed: int, perturbation: float = 0.01,
               max_changed: float = 0.15, rows: int = 300) -> CaseResult:
    """Small perturbations leave answers alone (a behavioural test in the manner of Made-With-ML's): every numeric
    feature of real rows moved by noise of `perturbation` x its training range; a classifier's class may change on
    at most `max_changed` of the rows (rows next to a decision boundary flip under any noise: a stump on 54 wine
    rows flips 7%, a model that jumps flips half), a regression's prediction by more than a quarter of the
    predictions' spread on at most that share (a linear model moves about 0.06 of it). Answers must stay finite
    (a row error is a crash)."""
    if not schema.numeric:
        return CaseResult("invariance_small_noise", "prediction", "no numeric feature to perturb")
    rng = np.random.default_rng(seed)
    frame = sample[list(schema.features)].head(rows).reset_index(drop=True)
    moved = frame.copy()
    for col in schema.numeric:
        lo, hi = schema.ranges.get(col, (0.0, 1.0))
        values = pd.to_numeric(moved[col], errors="coerce")
        noisy = values + rng.normal(0.0, perturbation * (abs(hi - lo) or 1.0), len(moved))
        # whole numbers stay whole (a count moved by a fraction would break an integer input contract)
        moved[col] = noisy.round() if pd.api.types.is_integer_dtype(frame[col]) else noisy
    try:
        before, after = model.score(records_of(frame)), model.score(records_of(moved))
    except ModelError as exc:
        return CaseResult("invariance_small_noise", "crash", _short(str(exc)))
    bad = [e for e in (*before.errors, *after.errors) if e is not None]
    if bad:
        return CaseResult("invariance_small_noise", "crash", f"malformed output on perturbed rows: {bad[0]}")
    a = np.asarray(before.predictions, dtype=float)
    b = np.asarray(after.predictions, dtype=float)
    if before.scores is not None:  # a classifier: its class
        changed, what = float(np.mean(a != b)), "class"
    else:
        tolerance = 0.25 * float(np.std(a)) if len(a) > 1 and np.std(a) > 0 else 1e-9
        changed, what = float(np.mean(np.abs(a - b) > tolerance)), "prediction (by > 25% of their spread)"
    detail = (f"{changed:.1%} of {len(a)} rows changed {what} under noise of {perturbation:g} x each numeric "
              f"feature's range (at most {max_changed:.0%}, ci.invariance)")
    return CaseResult("invariance_small_noise", "unstable" if changed > max_changed else "prediction", detail)


def check(model: Predictor, schema: Schema, sample: pd.DataFrame, saved: Path | None, seed: int,
          perturbation: float = 0.01, max_changed: float = 0.15) -> list[CaseResult]:
    """Every synthesised edge case and every saved problem input, sent to the model as the service would, and
    the invariance of its answers to small noise."""
    cases = synthesize_cases(schema, sample, seed=seed)
    if saved is not None:
        cases.update(load_saved_inputs(saved))
    loaded = LoadedModel(model)
    return [*run_cases(loaded, cases), invariance(loaded, schema, sample, seed, perturbation, max_changed)]
