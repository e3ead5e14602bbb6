"""The one-way layering of docs/architecture.md, checked on every import statement (top level or inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> top-level packages it must never import
FORBIDDEN = {
    "rollout": {"prefect", "fastapi", "starlette", "uvicorn", "httpx", "typer", "rich", "serving", "tasks", "flows",
                "cli"},
    "tasks": {"serving", "flows", "cli", "fastapi", "typer", "rich"},
    "flows": {"serving", "cli", "fastapi", "typer", "rich"},
    "serving": {"prefect", "tasks", "flows", "cli", "typer", "rich"},
}
# The one crossing: the batch-scoring flow runs the serving layer's batch mode (routing, child-process
# challengers, the log rows), which pulls in no web framework (checked below).
ALLOWED = {"flows/batch_scoring.py": {"serving"}}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_against_the_layering(package: str) -> None:
    broken = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package]
                                               - ALLOWED.get(str(p.relative_to(ROOT)), set()))
              for p in sorted((ROOT / package).rglob("*.py"))}
    assert {k: v for k, v in broken.items() if v} == {}


def test_mlflow_and_great_expectations_stay_behind_their_adapters() -> None:
    allowed = {"mlflow": {"rollout/registry.py"}, "great_expectations": {"rollout/ci/validation.py"}}
    for library, modules in allowed.items():
        users = {str(p.relative_to(ROOT)) for p in (ROOT / "rollout").rglob("*.py") if library in _imports(p)}
        assert users <= modules, f"{library} imported by {sorted(users - modules)}"


def test_the_batch_mode_pulls_in_no_web_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, serving.batch; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'httpx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr

