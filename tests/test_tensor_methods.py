"""Tensor's operators and math methods: the declarations type checkers read
(distprop/tensor_methods.py) match the table distprop.ops binds at import, and mypy (when
installed) types ``dp.tensor(...) + 1`` and friends as Tensor."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distprop as dp
from distprop import ops
from distprop.tensor import Tensor

from helpers import REPO


def _declared() -> list[str]:
    """Names declared in TensorMethods' ``if TYPE_CHECKING:`` block."""
    tree = ast.parse(Path(REPO, "distprop", "tensor_methods.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TensorMethods")
    block = next(n for n in cls.body if isinstance(n, ast.If))
    return [n.name for n in block.body if isinstance(n, ast.FunctionDef)]


def test_declarations_match_the_bound_table():
    declared = _declared()
    assert len(declared) == len(set(declared)), "a method is declared twice"
    assert set(declared) - {"__hash__"} == set(ops.TENSOR_METHODS)
    for name, fn in ops.TENSOR_METHODS.items():
        assert Tensor.__dict__[name] is fn, name  # the ops function, not a declaration
    assert Tensor.__hash__ is object.__hash__
    assert not hasattr(dp.tensor([1.0]), "__dict__")  # __slots__ still hold through the base


# Each expression and the type mypy must reveal for it (one mypy run for the table).
REVEALED = [
    ("x + 1", "distprop.tensor.Tensor"),
    ("2.0 * x", "distprop.tensor.Tensor"),
    ("x @ x", "distprop.tensor.Tensor"),
    ("-x", "distprop.tensor.Tensor"),
    ("x[0]", "distprop.tensor.Tensor"),
    ("x.sum(dim=0).relu()", "distprop.tensor.Tensor"),
    ("x == 1", "distprop.tensor.Tensor"),
]


def test_mypy_sees_the_operators(tmp_path):
    pytest.importorskip("mypy")
    lines = ["import distprop as dp", "x = dp.tensor([1.0])"]
    lines += [f"reveal_type({expr})" for expr, _ in REVEALED]
    snippet = tmp_path / "snippet.py"
    snippet.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
         "--cache-dir", str(tmp_path / "cache"), str(snippet)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        env={**os.environ, "MYPYPATH": str(REPO)})
    out = result.stdout
    for line, (expr, revealed) in enumerate(REVEALED, start=3):
        assert f'snippet.py:{line}: note: Revealed type is "{revealed}"' in out, (expr, out)
    assert result.returncode == 0, out + result.stderr
