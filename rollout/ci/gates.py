"""Pure gate functions: (metrics, criteria, baseline | None) -> GateResult, each with its reason in words."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rollout.config import LOWER_IS_BETTER


@dataclass(frozen=True)
class GateResult:
    """The verdict of one gate: passed or not, why in one sentence, and the numbers behind it."""

    gate: str
    passed: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The headline in lower case: a version's `gate.NAME` tag, the log line, a gate report's title. A gate that
        passed without looking says "skipped", not "pass"."""
        return self.headline.lower()

    @property
    def headline(self) -> str:
        """PASS, FAIL, INCONCLUSIVE (failed for want of evidence: rerun) or SKIPPED (passed without looking):
        what a person should see first."""
        if not self.passed:
            return "INCONCLUSIVE" if self.numbers.get("inconclusive") else "FAIL"
        return "SKIPPED" if self.numbers.get("skipped") else "PASS"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"## Gate `{self.gate}`: **{self.verdict.upper()}**", "", self.reason, ""]
        if self.numbers:
            lines += ["| number | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in self.numbers.items()]
            lines.append("")
        lines += [f"- {d}" for d in self.details]
        return "\n".join(lines).rstrip() + "\n"


class GateFailed(RuntimeError):
    """Raised by the flow when a gate fails; carries the result so the reason reaches the caller."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(f"gate {result.gate!r} failed: {result.reason}")
        self.result = result
        self.outcome: Any = None


class StepFailed(RuntimeError):
    """A CI or adopt run stopped on something other than a gate: what it was doing, the error in one line, what to
    change when that is known, and every verdict so far (`outcome`)."""

    def __init__(self, stage: str, cause: BaseException, hint: str = "", outcome: Any = None) -> None:
        self.stage, self.hint, self.outcome = stage, hint, outcome
        self.cause = f"{type(cause).__name__}: {cause}".strip().splitlines()[0][:500]
        super().__init__(f"stopped while {stage}: {self.cause}" + (f" ({hint})" if hint else ""))


# What to change when a step fails with an error of this kind: (stage, exception type names) -> hint.
_HINTS = (
    ("loading data", ("MissingSuite",), "set ci.expectations_suite to your suite, or write a starter one there: "
     "rollout make-suite --config POLICY"),
    ("training", ("InvalidParameterError", "ValueError", "TypeError"),
     "check estimator.name and estimator.params (rollout check-config --data)"),
    ("loading data", ("FileNotFoundError", "ParserError", "UnicodeDecodeError"), "check data.source"),
    ("registering", ("ConnectionError", "MlflowException", "OperationalError"), "check stores.mlflow_tracking_uri"),
)


def step_failed(stage: str, cause: BaseException, outcome: Any = None) -> StepFailed:
    """The StepFailed of an error raised while `stage` ran, with a hint of what to change where one is known."""
    kinds = {k.__name__ for k in type(cause).__mro__}
    hint = next((h for s, names, h in _HINTS if stage.startswith(s) and kinds & set(names)), "")
    policy = getattr(outcome, "policy", None)
    if policy is not None and getattr(policy.estimator, "factory", None):  # the team's code, not a name
        hint = hint.replace("estimator.name", "estimator.factory")
    return StepFailed(stage, cause, hint, outcome)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _better(metric: str, a: float, b: float) -> float:
    """How much better a is than b, positive when a is better, whatever the metric's direction."""
    return (b - a) if metric in LOWER_IS_BETTER else (a - b)


Limit = float | tuple[float, str]  # a limit, or (limit, how a message names it: "0.05, ci.max_fold_std")


def _limit(limit: Limit, setting: str) -> tuple[float, str]:
    return limit if isinstance(limit, tuple) else (float(limit), f"{float(limit):g}, {setting}")


def overfit_gate(
    metric: str,
    train_scores: Sequence[float],
    val_scores: Sequence[float],
    max_gap_limit: Limit,
    max_fold_std_limit: Limit,
    curve: tuple[Sequence[float], Sequence[float]] | None = None,
    curve_tolerance: float = 0.02,
) -> GateResult:
    """Train-validation gap and fold spread within limits; validation loss must not climb while training loss falls."""
    import numpy as np

    max_gap, gap_said = _limit(max_gap_limit, "ci.max_train_val_gap")
    max_fold_std, std_said = _limit(max_fold_std_limit, "ci.max_fold_std")

    gap = _better(metric, float(np.mean(train_scores)), float(np.mean(val_scores)))
    spread = float(np.std(val_scores, ddof=1)) if len(val_scores) > 1 else 0.0
    numbers: dict[str, Any] = {"metric": metric, "train_mean": float(np.mean(train_scores)),
                               "validation_mean": float(np.mean(val_scores)), "gap": gap, "max_gap": max_gap,
                               "fold_std": spread, "max_fold_std": max_fold_std}
    problems = []
    if gap > max_gap:
        problems.append(f"the model scores {gap:.4f} better on training folds than on validation folds "
                        f"(limit {gap_said})")
    unstable = spread > max_fold_std
    if unstable:
        problems.append(f"validation {metric} varies by {spread:.4f} across folds (limit {std_said}; fewer rows "
                        "per fold or ci.cv_folds spread it more)")
    if curve is not None:
        train, val = curve
        best = int(np.argmin(val))
        rise = (val[-1] - val[best]) / max(abs(val[best]), 1e-12)
        numbers.update({"curve_best_iteration": best + 1, "curve_iterations": len(val), "validation_loss_rise": rise})
        if rise > curve_tolerance and train[-1] < train[best]:
            problems.append(
                f"validation loss rose {rise:.1%} after iteration {best + 1} of {len(val)} while training loss kept falling"
            )
    if problems:
        # Fold spread alone is instability (small folds, a noisy metric), not overfitting: say which it is.
        head = "Unstable across folds: " if unstable and len(problems) == 1 else "Overfitting: "
        return GateResult("overfit", False, head + "; ".join(problems) + ".", numbers)
    return GateResult(
        "overfit", True, f"Train-validation gap {gap:.4f} and fold spread {spread:.4f} are within limits.", numbers
    )


def floor_gate(metric: str, value: float, floor: float | None, source: str = "fixed") -> GateResult:
    """The held-out metric must reach an absolute floor (a fixed number or the champion's live metric)."""
    numbers = {"metric": metric, "holdout": value, "floor": floor, "floor_source": source}
    if floor is None:
        bound = "ceiling" if metric in LOWER_IS_BETTER else "floor"
        return GateResult("floor", True, f"Skipped: no fixed {bound} for {metric} (set ci.floor to the worst held-out "
                          f"{metric} you accept; the baseline and champion gates still judge it).",
                          {**numbers, "skipped": True})
    margin = _better(metric, value, floor)
    # For an error metric (rmse, log loss) the "floor" is a ceiling: say so.
    bound, reached, missed = (("ceiling", "stays under", "is over") if metric in LOWER_IS_BETTER
                              else ("floor", "reaches", "misses"))
    setting = "ci.floor" if source == "fixed" else "ci.floor_source"
    if margin < 0:
        return GateResult("floor", False, f"Held-out {metric} {value:.4f} {missed} the {source} {bound} {floor:.4f} "
                          f"({setting}).", numbers)
    return GateResult("floor", True, f"Held-out {metric} {value:.4f} {reached} the {source} {bound} {floor:.4f}.",
                      numbers)


def baseline_gate(metric: str, value: float, baseline: float, min_margin_limit: Limit) -> GateResult:
    """The candidate must beat the naive baseline (DummyClassifier/DummyRegressor) by a margin."""
    min_margin, said = _limit(min_margin_limit, "ci.min_margin_over_baseline")
    lift = _better(metric, value, baseline)
    numbers = {"metric": metric, "holdout": value, "baseline": baseline, "lift": lift, "min_margin": min_margin}
    if lift < min_margin:
        return GateResult(
            "baseline", False,
            f"Held-out {metric} {value:.4f} beats the naive baseline {baseline:.4f} by only {lift:.4f} "
            f"(at least {said}).", numbers,
        )
    return GateResult("baseline", True, f"Beats the naive baseline by {lift:.4f} ({metric} {value:.4f} vs {baseline:.4f}).",
                      numbers)


def champion_gate(metric: str, value: float, champion: float | None, max_regression_limit: Limit,
                  champion_version: str | None = None, champion_error: str | None = None) -> GateResult:
    """No regression beyond the policy's limit vs the current champion on the same held-out rows."""
    max_regression, said = _limit(max_regression_limit, "ci.max_regression_vs_champion")
    if champion_error is not None:
        # Nothing shows the candidate does not regress, so it does not pass; the fix is in the data.
        return GateResult("champion", False,
                          f"Champion v{champion_version} could not be scored on the held-out rows ({champion_error}): "
                          "keep the columns it reads in the data (data.drop_columns and data.features choose the "
                          "candidate's features only).",
                          {"metric": metric, "holdout": value, "champion": None, "champion_version": champion_version,
                           "no_champion": False, "error": champion_error})
    if champion is None:
        # The first model has nothing to be compared with; the skip is recorded, not silent.
        return GateResult("champion", True, "No champion yet: nothing to regress against; recorded as the first model.",
                          {"metric": metric, "holdout": value, "champion": None, "no_champion": True})
    delta = _better(metric, value, champion)
    numbers = {"metric": metric, "holdout": value, "champion": champion, "champion_version": champion_version,
               "delta": delta, "max_regression": max_regression, "no_champion": False}
    if delta < -max_regression:
        return GateResult(
            "champion", False,
            f"Held-out {metric} {value:.4f} trails champion v{champion_version} ({champion:.4f}) by {-delta:.4f}, "
            f"beyond the allowed {said}.", numbers,
        )
    return GateResult("champion", True,
                      f"Held-out {metric} {value:.4f} vs champion v{champion_version} {champion:.4f} "
                      f"(difference {delta:+.4f}, allowed regression {max_regression:.4g}).", numbers)


def robustness_gate(cases: Sequence[Any]) -> GateResult:
    """Every edge case must give a well-formed prediction or a clean validation error; a crash fails, named."""
    crashed = [c for c in cases if c.outcome == "crash"]
    unstable = [c for c in cases if c.outcome == "unstable"]
    details = [f"{c.name}: {c.outcome}{' - ' + c.detail if c.detail else ''}" for c in cases]
    numbers = {"cases": len(cases), "crashes": len(crashed), "unstable": len(unstable),
               "clean_errors": sum(c.outcome == "validation_error" for c in cases)}
    problems = []
    if crashed:
        names = ", ".join(f"{c.name} ({c.detail})" for c in crashed)
        problems.append(f"{len(crashed)} of {len(cases)} edge cases crashed the model: {names}")
    problems += [f"answers are not stable under small noise: {c.detail}" for c in unstable]
    if problems:
        return GateResult("robustness", False, "; ".join(problems) + ".", numbers, details)
    return GateResult("robustness", True, f"All {len(cases)} edge cases gave a well-formed prediction or a clean error; "
                      "answers held under small noise.", numbers, details)


def stress_gate(candidate: dict[str, float], champion: dict[str, float] | None, p99_single_ms: float,
                p99_batch_ms: float, max_ratio: float) -> GateResult:
    """Latency within an absolute budget and within a ratio of the champion's on the same inputs."""
    numbers: dict[str, Any] = {f"candidate_{k}": v for k, v in candidate.items()}
    problems = []
    if candidate["single_p99_ms"] > p99_single_ms:
        problems.append(f"single-row p99 {candidate['single_p99_ms']:.2f} ms exceeds the budget {p99_single_ms} ms "
                        "(ci.stress.budget.p99_single_ms)")
    if candidate["batch_p99_ms"] > p99_batch_ms:
        problems.append(f"batch p99 {candidate['batch_p99_ms']:.2f} ms exceeds the budget {p99_batch_ms} ms "
                        "(ci.stress.budget.p99_batch_ms)")
    unsure = []
    if champion is not None:
        numbers.update({f"champion_{k}": v for k, v in champion.items()})
        for kind in ("single", "batch"):
            p99_ratio = candidate[f"{kind}_p99_ms"] / max(champion[f"{kind}_p99_ms"], 1e-9)
            numbers[f"{kind}_p99_ratio"] = p99_ratio
            # stress.run estimates the slowdown per interleaved round with an interval: decide on that. Without
            # it (figures from elsewhere), on the ratio of p99s.
            ratio = candidate.get(f"{kind}_ratio", p99_ratio)
            low, high = candidate.get(f"{kind}_ratio_low", ratio), candidate.get(f"{kind}_ratio_high", ratio)
            what = ("single-row calls are" if kind == "single" else "batch calls are") if f"{kind}_ratio" in candidate \
                else f"{kind} p99 is"
            band = f" (90% interval {low:.2f}-{high:.2f}x)" if high > low else ""
            if low > max_ratio:
                problems.append(f"{what} {ratio:.2f}x the champion's{band} (limit {max_ratio}x, "
                                "ci.stress.budget.max_ratio_vs_champion)")
            elif high > max_ratio:
                unsure.append(f"{what} {ratio:.2f}x the champion's{band}, around the limit {max_ratio}x")
    if problems:
        return GateResult("stress", False, "Too slow: " + "; ".join(problems) + ".", numbers)
    if unsure:
        calls = int(candidate.get("single_calls", 0))
        return GateResult("stress", False, f"Inconclusive after {calls} single-row calls: " + "; ".join(unsure)
                          + ". Rerun on a quieter machine, or raise ci.stress.single_requests and ci.stress.batches "
                          "for a narrower interval (ci.stress.budget.max_ratio_vs_champion is the limit).",
                          {**numbers, "inconclusive": True})
    vs = "" if champion is None else f", {numbers['single_p99_ratio']:.2f}x the champion's"
    return GateResult("stress", True, f"Single-row p99 {candidate['single_p99_ms']:.2f} ms{vs}; "
                      f"batch p99 {candidate['batch_p99_ms']:.1f} ms; within budget.", numbers)


def stress_clear(candidate: dict[str, float], champion: dict[str, float] | None, p99_single_ms: float,
                 p99_batch_ms: float, max_ratio: float, margin: float = 0.5) -> bool:
    """Whether the stress gate would pass even with every limit cut to `margin` of itself: a verdict so
    clear that more calls cannot change it (the stress test stops early on it)."""
    return stress_gate(candidate, champion, p99_single_ms * margin, p99_batch_ms * margin,
                       max(1.0, max_ratio * margin)).passed


def validation_gate(success: bool, failed: Sequence[str], statistics: dict[str, Any]) -> GateResult:
    """The Great Expectations suite must pass on the training data."""
    if success:
        return GateResult("data_validation", True, "Every expectation of the suite holds on the training data.",
                          dict(statistics))
    return GateResult("data_validation", False,
                      f"{len(failed)} expectation(s) failed on the training data: " + "; ".join(failed) + ".",
                      dict(statistics), list(failed))


def drift_gate(drifted: Sequence[str], checked: int, details: Sequence[str]) -> GateResult:
    """Training data must still look like production: no feature drifts materially and significantly."""
    numbers = {"features_checked": checked, "features_drifted": len(drifted)}
    if drifted:
        return GateResult("drift", False, f"Training data differs from production on: {', '.join(drifted)}.",
                          numbers, list(details))
    return GateResult("drift", True, f"No material drift between training and production on {checked} features.",
                      numbers, list(details))


def trust_gate(model_uri: str, refusal: str | None) -> GateResult:
    """An adopted model loads only as rollout loads any version: skops-saved scikit-learn whose types are on
    the allow-list or in a package the policy trusts by name, or XGBoost's scikit-learn model in its own format."""
    if refusal is not None:
        return GateResult("trust", False, f"Not loaded: {refusal}", {"model_uri": model_uri})
    return GateResult("trust", True, f"{model_uri} loads without code: skops-saved scikit-learn with allow-listed "
                      "types, or an XGBoost model in its own format.", {"model_uri": model_uri})


def skipped(gate: str, why: str) -> GateResult:
    """A gate that did not apply, with the reason recorded."""
    return GateResult(gate, True, f"Skipped: {why}", {"skipped": True})
