"""The layering DESIGN.md promises, read from the source: flat buffers sit below nn, optim,
placement and distributed; ``distributed/__init__.py`` only re-exports (world state lives in
``distributed/world.py``); and a fresh ``import distprop.distributed`` works on its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PKG = Path(REPO, "distprop")


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("module,may_not_import", [
    ("flat.py", ("distprop.optim", "distprop.nn", "distprop.distributed", "distprop.placement")),
    ("distributed/world.py", ("distprop.distributed.ddp", "distprop.distributed.zero",
                              "distprop.optim", "distprop.nn")),
])
def test_lower_layers_do_not_import_higher_ones(module, may_not_import):
    imported = _imported_modules(PKG / module)
    bad = sorted(m for m in imported if m.startswith(may_not_import))
    assert not bad, f"{module} imports {bad}"


def test_nothing_imports_the_old_flat_module():
    users = [str(p.relative_to(REPO)) for root in ("distprop", "tests", "benchmarks")
             for p in Path(REPO, root).rglob("*.py")
             if any(m == "distprop.optim.flat" or m.startswith("distprop.optim.flat.")
                    for m in _imported_modules(p))]
    assert not users
    assert not (PKG / "optim" / "flat.py").exists()


def test_distributed_init_only_reexports():
    tree = ast.parse((PKG / "distributed" / "__init__.py").read_text())
    body = [n for n in tree.body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # docstring
    kinds = {type(n).__name__ for n in body}
    assert kinds <= {"ImportFrom", "Import", "Assign"}, kinds
    assigned = [t.id for n in body if isinstance(n, ast.Assign) for t in n.targets]
    assert assigned == ["__all__"]


@pytest.mark.parametrize("module", ["distprop.distributed", "distprop.distributed.world",
                                    "distprop.distributed.zero", "distprop.flat",
                                    "distprop.tensor", "distprop.autograd"])
def test_each_module_imports_first(module):
    """No hidden import-order dependency: each one can be the first thing a program imports."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                            text=True, timeout=120, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
