"""The package's shape: layered imports with no cycle, modules of a readable size, one home per artifact name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gs_ray.core import layout

from conftest import REPO

PACKAGE = REPO / "gs_ray"
MAX_MODULE_LINES = 400
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: imports only go down the layers, and no package has a cycle."""
    lint = Path(sys.executable).with_name("lint-imports")
    found = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stdout[-4000:] + found.stderr[-2000:]
    assert "2 kept, 0 broken" in found.stdout


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_module_is_at_most_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it"


def _internal_imports_inside_functions(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("gs_ray"):
                    found.append(f"{path.relative_to(REPO)}:{inner.lineno} {inner.module}")
    return found


def test_package_imports_are_at_module_level():
    inside = [hit for path in MODULES for hit in _internal_imports_inside_functions(path)]
    assert not inside, "package-internal imports inside functions:\n" + "\n".join(inside)


ARTIFACT_NAMES = [value for name, value in vars(layout).items()
                  if name.endswith(("_FILE", "_PLOT")) and isinstance(value, str)]


@pytest.mark.parametrize("artifact", ARTIFACT_NAMES)
def test_artifact_name_is_spelled_only_in_layout(artifact):
    literal = re.compile(rf"[\"']{re.escape(artifact)}[\"']")
    spelled = [str(path.relative_to(REPO)) for path in MODULES
               if path != PACKAGE / "core" / "layout.py" and literal.search(path.read_text())]
    assert not spelled, f"{artifact!r} is spelled outside gs_ray/core/layout.py in: {', '.join(spelled)}"


def test_every_artifact_name_is_checked():
    assert {"assignments.parquet", "experts.json", "evaluation.json", "spectrum.json"} <= set(ARTIFACT_NAMES)
