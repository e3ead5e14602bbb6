"""The `rollout` command: run the flows, serve, simulate traffic, inspect and roll back."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rollout.config import ConfigError, Policy, load_policy

app = typer.Typer(help="Safe, boring ML model rollouts as Prefect workflows.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()

CONFIG = typer.Option("rollout.yaml", "--config", "-c", help="Policy file.")


def _policy(config: str) -> Policy:
    try:
        return load_policy(config)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def gate_table(results: list[Any]) -> Table:
    table = Table(title="CI gates")
    table.add_column("gate")
    table.add_column("verdict")
    table.add_column("reason", overflow="fold")
    for r in results:
        table.add_row(r.gate, "[green]pass[/green]" if r.passed else "[red]FAIL[/red]", r.reason)
    return table


@app.command("check-config")
def check_config(config: str = CONFIG) -> None:
    """Validate a policy file and print it with every default filled in."""
    policy = _policy(config)
    console.print_json(json.dumps(policy.model_dump(mode="json")))


@app.command("config-reference")
def config_reference() -> None:
    """Print every policy field with its type, default and meaning."""
    from rollout.config import Policy as Root

    def walk(model: Any, prefix: str) -> None:
        for name, field in model.model_fields.items():
            if name == "base_dir":
                continue
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                console.print(f"[bold]{prefix}{name}[/bold]: {ann.__doc__ or ''}".rstrip())
                walk(ann, f"{prefix}{name}.")
            else:
                default = field.get_default(call_default_factory=True)
                console.print(f"  {prefix}{name} = {default!r}  # {field.description or ''}")

    walk(Root, "")


@app.command()
def ci(
    config: str = CONFIG,
    data_source: str = typer.Option(None, help="Override data.source."),
    drift: float = typer.Option(None, help="Override data.example.drift."),
    seed: int = typer.Option(None, help="Override data.example.seed."),
    estimator: str = typer.Option(None, help="Override estimator.name."),
) -> None:
    """Run the ci-pipeline flow: validate, train with CV, gate, stress, register @challenger."""
    from flows.ci_pipeline import CIParameters, ci_pipeline
    from rollout.gates import GateFailed

    _policy(config)
    params = CIParameters(data_source=data_source, example_drift=drift, example_seed=seed, estimator=estimator)
    try:
        outcome = ci_pipeline(config=config, params=params)
    except GateFailed as exc:
        results = exc.outcome.gates if exc.outcome else [exc.result]
        console.print(gate_table(results))
        console.print(f"[red]ci-pipeline stopped: {exc}[/red]\nNothing was registered.")
        raise typer.Exit(1) from None
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(gate_table(outcome.gates))
    console.print(f"[green]registered version {outcome.version}[/green] as "
                  + ", ".join("@" + a for a in outcome.aliases) + f"; reports in {outcome.reports_dir}")


def main() -> None:  # pragma: no cover - console entry for `python -m rollout.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
