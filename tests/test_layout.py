"""The layout as a contract: the import layering (import-linter), the module paths that
must stay strings, and the size of the functions in pipelines/."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.common import entrypoints

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("pipelines", "models", "meta", "deploy")


def test_every_module_path_kept_as_a_string_imports():
    for module in (entrypoints.CLI, entrypoints.WORKER, entrypoints.SHARD_READER):
        importlib.import_module(module)
    path, _, name = entrypoints.FLOW.partition(":")
    assert (REPO / path).is_file(), entrypoints.FLOW
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert getattr(module, name).name == "metadistill"


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)}, timeout=120)


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    """The packages and their contracts, copied so that a test can break them."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold(tree_copy):
    proc = _lint(tree_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("where, line, contract", [
    ("models/mlp.py", "import pipelines.orchestrate.flow", "models/ and meta/ are pure torch"),
    ("pipelines/engine/loop.py", "from pipelines.students import kd", "every import points down the layers"),
    ("deploy/serve.py", "from pipelines.engine import loop", "deploy/ needs models/ and the registry"),
    ("pipelines/data/prepared.py", "import mlflow", "only pipelines.tracking imports mlflow"),
])
def test_a_forbidden_import_breaks_its_contract(tree_copy, where, line, contract):
    path = tree_copy / where
    path.write_text(path.read_text() + f"\n{line}  # deliberately forbidden\n")
    proc = _lint(tree_copy)
    assert proc.returncode != 0
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout, proc.stdout


def test_no_function_in_pipelines_reaches_60_lines():
    long = []
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def test_each_package_says_what_it_owns_and_may_import():
    for init in sorted((REPO / "pipelines").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Owns" in doc and "May import" in doc, f"{init.relative_to(REPO)}: {doc[:80]!r}"


def test_a_deployment_made_before_the_packages_layout_is_refused_with_the_mend():
    from pipelines.orchestrate.schedule import ScheduleError, check_entrypoint

    check_entrypoint(entrypoints.FLOW, "nightly")  # today's entrypoint passes
    with pytest.raises(ScheduleError, match="re-create it with `metadistill schedule --name nightly"):
        check_entrypoint("pipelines/flow.py:metadistill_flow", "nightly")
