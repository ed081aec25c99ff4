"""The package's shape: one dependency direction, no import cycle, small modules, one entry per step.

The layering itself is the import-linter contract in pyproject.toml ([tool.importlinter]); these tests run it, show
that it breaks when an upward import appears, and check what a contract cannot say.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinocell"
MAX_MODULE_LINES = 500
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# step -> (package whose `step` module holds the entry, the entry's name)
STEPS = {
    "discover": ("jump", "discover"),
    "shard": ("data", "shard"),
    "train": ("launch", "train"),
    "evaluate": ("eval", "evaluate"),
    "publish": ("publish", "publish"),
}


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(LINT_IMPORTS), str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_layering_contract_is_kept():
    result = _lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_layering_contract_breaks_on_an_upward_import(tmp_path):
    """The contract is not vacuous: a discovery module importing the trainer is caught and named."""
    shutil.copytree(PACKAGE, tmp_path / "dinocell", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layout = tmp_path / "dinocell" / "jump" / "layout.py"
    layout.write_text(layout.read_text() + "\n\ndef _upward():\n    from dinocell.train import step  # noqa\n")
    result = _lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0, result.stdout
    assert "0 kept, 1 broken" in result.stdout
    assert re.search(r"dinocell\.jump\.layout -> dinocell\.train(\.step)? \(l\.", result.stdout), result.stdout


def test_no_import_cycle():
    """No two modules of the package import each other, directly or through others (strongly connected
    components of the import graph, function-level imports included)."""
    import grimp

    graph = grimp.build_graph("dinocell")
    adj = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for module in sorted(adj):
        if module not in index:
            visit(module)
    assert cycles == []


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_config_loads_without_torch():
    code = ("import sys; from dinocell.config import load_config, resolve_config_path; "
            "load_config(resolve_config_path('vits8_jump')); load_config(resolve_config_path('tiny'), ['optim.lr=1e-4']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def _imports_of(path: Path) -> set[tuple[str, str]]:
    """(module, name) pairs of every `from module import name [as alias]` in the file, function bodies included."""
    tree = ast.parse(path.read_text())
    return {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
            for alias in node.names}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_each_step_has_one_entry_for_cli_component_and_demo(step):
    """The CLI subcommand, the KFP component and the in-process demo call the same function: dinocell.<pkg>.step.<fn>."""
    pkg, fn = STEPS[step]
    module = f"dinocell.{pkg}.step"
    component = (ROOT / "components" / f"{step}.py").read_text()
    assert f"from dinocell.{pkg} import step" in component
    assert re.search(rf"\bstep\.{fn}\(", component), f"components/{step}.py does not call {module}.{fn}"
    assert (module, fn) in _imports_of(PACKAGE / "cli.py"), f"dinocell/cli.py does not call {module}.{fn}"
    assert (module, fn) in _imports_of(PACKAGE / "pipeline" / "in_process.py")
    # ... and no second copy of the step's glue lives anywhere else in the package.
    callers = [p for p in PACKAGE.rglob("*.py") if (module, fn) in _imports_of(p)]
    assert {p.relative_to(PACKAGE).as_posix() for p in callers} <= {"cli.py", "pipeline/in_process.py"}
