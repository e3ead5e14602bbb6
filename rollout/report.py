"""Reports and plots: the CV figure of a candidate, and an evaluation's Markdown and effect-over-time PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rollout.cd.decision import Decision, Evidence
from rollout.ci.training import CVResult
from rollout.outcomes import AuditEntry
from rollout.stats.moments import Confusion, Moments

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Look:
    """One evaluation of one challenger: when, the effect estimate and its anytime-valid bounds."""

    ts: datetime
    version: str
    estimate: float | None
    lower: float | None
    upper: float | None
    n: int


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def _count(value: Any) -> str:
    """A number of samples as people count them: 12,546, never 12546.0000."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return f"{value:,.0f}"


def _signed(value: Any) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "n/a"
    return f"{value:+.3f}" if math.isfinite(value) else ("+inf" if value > 0 else "-inf")


def effects_line(stats: Mapping[str, Mapping[str, Any]]) -> str:
    """Each challenger's effect with its bounds and sample size in one line, rounded for reading (a terminal's
    day-by-day log, `rollout history`): `v7 effect +0.048 [+0.039, +0.058], n=12,546`."""
    return "; ".join(
        f"v{v} effect {_signed(s.get('estimate'))} [{_signed(s.get('lower'))}, {_signed(s.get('upper'))}], "
        f"n={int(s['n']):,}" if s.get("n") else f"v{v}: no labelled outcomes yet" for v, s in stats.items())


def evaluation_markdown(decision: dict[str, Any], *, model_name: str, rollout_id: int, mode: str, metric: str,
                        margin: float, champion: str, now: datetime) -> str:
    """The decision, every reason in words, and the numbers behind it, per challenger."""
    action = decision["action"]
    lines = [
        f"# Online evaluation of `{model_name}`, rollout {rollout_id} ({mode})",
        "",
        f"**Decision: {action.upper()}**" + (f" (winner: version {decision['winner']})" if decision.get("winner") else ""),
        f"at {now.isoformat(timespec='minutes')}; champion is version {champion}; primary metric `{metric}`, "
        f"non-inferiority margin {margin:g} (effects are better-is-positive).",
        "",
        "## Reasons",
        "",
        *[f"- {r}" for r in decision["reasons"]],
        "",
        "## Test per challenger",
        "",
        "| version | verdict | effect | lower | upper | n | power | samples still needed | hours to decision | SRM p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for version, s in decision["stats"].items():
        pending = s.get("pending_guardrails") or []
        # The samples and hours are the effect's test's; a pending guardrail needs its own evidence besides
        later = f", then guardrails: {', '.join(pending)}" if pending else ""
        lines.append(
            f"| {version} | {s.get('verdict')} | {_num(s.get('estimate'))} | {_num(s.get('lower'))} | "
            f"{_num(s.get('upper'))} | {_count(s.get('n'))} | {_num(s.get('power'), 2)} | "
            f"{_count(s.get('samples_needed'))}{later} | {_num(s.get('hours_to_decision'), 1)}{'+' if pending else ''} | "
            f"{_num(s.get('srm_p'), 3)} |"
        )
    asked = {v: s for v, s in decision["stats"].items() if s.get("labels_at_random") is not None}
    if asked:
        lines += ["", "## Label requests", "",
                  "Only the labels of requested rows count, each weighted by 1 / its inclusion probability.", "",
                  "| version | labels used | labels at random for the same precision | ratio |", "|---|---|---|---|"]
        for v, s in asked.items():
            at_random, used = s["labels_at_random"], s.get("n") or 0
            known = isinstance(at_random, int | float) and math.isfinite(at_random) and at_random > 0
            lines.append(f"| {v} | {used:,} | {f'{at_random:,.0f}' if known else 'n/a'} | "
                         f"{_num(used / at_random, 2) if known else 'n/a'} |")
    guard_rows = [(v, g) for v, s in decision["stats"].items() for g in s.get("guardrails", [])]
    if guard_rows:
        lines += ["", "## Guardrails", "", "| version | guardrail | status | reason |", "|---|---|---|---|"]
        lines += [f"| {v} | {g.get('name')} | {g.get('status')} | {g.get('reason', '')} |" for v, g in guard_rows]
    if decision.get("bandit_weights"):
        lines += ["", "## Bandit weights", "", "| version | weight |", "|---|---|"]
        lines += [f"| {v} | {w:.3f} |" for v, w in decision["bandit_weights"].items()]
    return "\n".join(lines) + "\n"


def metrics_markdown(evidence: Evidence, metric: str) -> str:
    """Per-version metrics overall, per segment and per day, from the evidence's sufficient statistics."""
    from collections import defaultdict

    # Loss is lower-is-better; for accuracy the 0/1 loss is the error rate, so show accuracy itself.
    def value(m: Moments) -> str:
        if not m.n:
            return "n/a"
        return f"{1 - m.mean:.4f}" if metric == "accuracy" else f"{m.mean:.4f}"

    versions = {evidence.champion: evidence.champion_loss}
    confusions = {evidence.champion: evidence.champion_confusion}
    for ch in evidence.challengers:
        versions[ch.version] = ch.loss
        confusions[ch.version] = ch.confusion
    segments: dict[str, dict[str, Moments]] = defaultdict(dict)
    days: dict[str, dict[str, Moments]] = defaultdict(dict)
    for version, parts in versions.items():
        for (segment, day), m in parts.items():
            segments[version][segment] = segments[version].get(segment, Moments()) + m
            days[version][day] = days[version].get(day, Moments()) + m
    name = metric if metric != "accuracy" else "accuracy"
    if not segments:  # not an empty table: say why there is nothing yet
        return ("## Metrics per version and segment\n\nNo labelled outcomes yet: the metrics appear once labels "
                "arrive for logged predictions.\n")
    classes = any(confusions.get(v) for v in segments)  # precision and recall: a classifier's, else no columns
    lines = ["## Metrics per version and segment", "",
             f"| version | segment | n | {name} |" + (" precision | recall |" if classes else ""),
             "|---|---|---|---|" + ("---|---|" if classes else "")]
    for version, by_segment in segments.items():
        total = sum(by_segment.values(), Moments())
        conf_all = sum(confusions[version].values(), Confusion())
        rows = [("all", total, conf_all)] + [
            (seg or "(none)", m, confusions[version].get(seg, Confusion())) for seg, m in sorted(by_segment.items())
        ]
        for seg, m, conf in rows:
            precision = conf.successes("precision")
            recall = conf.successes("recall")
            p = f"{precision[0] / precision[1]:.4f}" if precision[1] else "n/a"
            r = f"{recall[0] / recall[1]:.4f}" if recall[1] else "n/a"
            lines.append(f"| {version} | {seg} | {m.n} | {value(m)} |" + (f" {p} | {r} |" if classes else ""))
    if evidence.auc:
        lines += ["", "## Ranking quality (online ROC AUC, DeLong 95% interval; reported, not tested)", "",
                  "| version | ROC AUC | interval | labelled rows |", "|---|---|---|---|"]
        for version, (auc, low, high, n) in evidence.auc.items():
            shown = "n/a (both classes needed)" if auc != auc else f"{auc:.4f}"
            interval = "" if auc != auc else f"[{low:.4f}, {high:.4f}]"
            lines.append(f"| {version} | {shown} | {interval} | {n} |")
    all_days = sorted({d for by_day in days.values() for d in by_day})
    if all_days:
        lines += ["", "## Daily metric", "", "| day | " + " | ".join(f"v{v}" for v in days) + " |",
                  "|---|" + "---|" * len(days)]
        for day in all_days:
            lines.append(f"| {day} | " + " | ".join(value(days[v].get(day, Moments())) for v in days) + " |")
    return "\n".join(lines) + "\n"


def difference_plot(looks: Sequence[Look], margin: float, metric: str, path: Path) -> Path:
    """The effect of each challenger over time with its confidence band and the -margin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    shown: list[np.datetime64] = []
    for version in sorted({look.version for look in looks}):
        mine = [lk for lk in looks if lk.version == version and lk.estimate is not None]
        if not mine:
            continue
        ts = [lk.ts for lk in mine]
        est = [float(lk.estimate) for lk in mine if lk.estimate is not None]
        lo = [lk.lower if lk.lower is not None and math.isfinite(lk.lower) else math.nan for lk in mine]
        hi = [lk.upper if lk.upper is not None and math.isfinite(lk.upper) else math.nan for lk in mine]
        times = np.array([t.astimezone(UTC).replace(tzinfo=None) for t in ts], dtype="datetime64[us]")  # UTC
        shown += list(times)
        line = ax.plot(times, np.array(est, dtype=float), marker="o", ms=3, label=f"version {version}")[0]
        ax.fill_between(times, np.array(lo, dtype=float), np.array(hi, dtype=float), alpha=0.2, color=line.get_color())
        if len(times) == 1:  # a band needs two looks to fill: one look's interval as an error bar
            ax.errorbar(times, np.array(est), yerr=np.array([[est[0] - lo[0]], [hi[0] - est[0]]]),
                        color=line.get_color(), capsize=4)
    if shown and min(shown) == max(shown):  # a first look: hours around it, not years
        ax.set_xlim(min(shown) - np.timedelta64(6, "h"), max(shown) + np.timedelta64(6, "h"))  # type: ignore[arg-type]
    ax.axhline(-margin, color="red", ls="--", lw=1, label=f"-margin ({-margin:g})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title=f"Challenger minus champion ({metric}, better-is-positive), anytime-valid band",
           xlabel="evaluation time", ylabel="effect")
    ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_MARKS = {"promote": ("tab:green", "promoted"), "reject": ("tab:red", "rejected"),
          "rollback": ("tab:orange", "rolled back")}


def monitoring_plot(daily: Sequence[tuple[str, str, int, float]], entries: Sequence[AuditEntry], metric: str,
                    path: Path) -> Path | None:
    """The primary metric per day for each version over the model's whole history (every rollout's
    summaries), each promotion, rejection and rollback marked; None when nothing was labelled yet."""
    if not daily:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = metric == "accuracy"  # the summaries keep the error rate: shown as accuracy, higher is better
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for version in sorted({v for _, v, _, _ in daily}, key=lambda v: (len(v), v)):
        points = [(datetime.fromisoformat(d), 1.0 - m if accuracy else m) for d, v, _, m in daily if v == version]
        ax.plot([_days(p[0]) for p in points], [p[1] for p in points], marker="o", markersize=3,
                label=f"v{version}")
    first = datetime.fromisoformat(daily[0][0])
    for entry in entries:
        mark = _MARKS.get(entry.decision)
        when = entry.ts.replace(tzinfo=None)
        if mark is None or when < first:
            continue
        moved = next((m.get("to") for m in entry.alias_moves if m.get("alias") == "champion"), None)
        x = _days(when)
        ax.axvline(x, color=mark[0], linestyle="--", linewidth=1)
        ax.annotate(f"{mark[1]}{f' v{moved}' if moved else ''}", (x, 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color=mark[0])
    ax.xaxis_date()
    ax.set_ylabel(metric if accuracy else f"{metric} (lower is better)")
    ax.set_title(f"{metric} per day, every version, over the rollouts")
    ax.legend(loc="lower left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _days(when: datetime) -> float:
    """Matplotlib's date number (days since 1970-01-01, its default epoch) of a naive UTC time."""
    return (when - datetime(1970, 1, 1)).total_seconds() / 86400.0


def cv_figure(cv: CVResult) -> Figure:
    """Train and validation score per fold, and the boosting loss curve when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if cv.curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0][0]
    folds = np.arange(1, len(cv.val_scores) + 1)
    ax.plot(folds, cv.train_scores, "o-", label="train")
    ax.plot(folds, cv.val_scores, "s-", label="validation")
    ax.set(xlabel="fold", ylabel=cv.metric, title=f"Cross-validation {cv.metric}")
    ax.set_xticks(folds)  # whole folds, never 1.5
    ax.legend()
    if cv.curve:
        ax = axes[0][1]
        ax.plot(cv.curve.train, label="train loss")
        ax.plot(cv.curve.validation, label="validation loss")
        ax.set(xlabel="iteration", ylabel="loss", title="Loss over iterations")
        ax.legend()
    fig.tight_layout()
    return fig


def looks(entries: Sequence[AuditEntry]) -> list[Look]:
    """Every challenger's effect at every evaluation of a rollout, from its audit log entries."""
    return [Look(e.ts, version, s.get("estimate"), s.get("lower"), s.get("upper"), int(s.get("n") or 0))
            for e in entries for version, s in (e.stats.get("stats") or {}).items()]


@dataclass(frozen=True)
class EvaluationReport:
    """An evaluation's report: its Markdown and the files written (Markdown, PNG, JSON)."""

    markdown: str
    markdown_path: Path
    plot_path: Path
    json_path: Path
    monitoring_path: Path | None = None


def write_evaluation(folder: Path, decision: Decision, evidence: Evidence, entries: Sequence[AuditEntry], *, model_name: str,
                     rollout_id: int, mode: str, metric: str, margin: float, champion: str,
                     now: datetime, daily: Sequence[tuple[str, str, int, float]] = (),
                     history: Sequence[AuditEntry] = ()) -> EvaluationReport:
    """Write an evaluation's Markdown (decision, reasons, metrics), its effect plot, the monitoring plot of the
    model's history (`daily`: `OutcomeStore.daily_metric`; `history`: every audit entry) and its JSON."""
    markdown = evaluation_markdown(decision.to_dict(), model_name=model_name, rollout_id=rollout_id, mode=mode,
                                   metric=metric, margin=margin, champion=champion, now=now)
    markdown += "\n" + metrics_markdown(evidence, metric)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M")
    plot = difference_plot(looks(entries), margin, metric, folder / f"effect-{stamp}.png")
    md_path, json_path = folder / f"evaluation-{stamp}.md", folder / f"evaluation-{stamp}.json"
    monitoring = monitoring_plot(daily, history, metric, folder / f"monitoring-{stamp}.png")
    pictures = f"\n![effect over time]({plot.name})\n"
    if monitoring is not None:
        pictures += f"\n## Monitoring\n\n![{metric} per day over the model's history]({monitoring.name})\n"
    md_path.write_text(markdown + pictures)
    json_path.write_text(json.dumps(decision.to_dict(), indent=2))
    return EvaluationReport(markdown, md_path, plot, json_path, monitoring)
