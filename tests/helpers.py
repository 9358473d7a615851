"""Shared test tools: finite differences, PyTorch oracle plumbing, mpiexec runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import distprop as dp

REPO = Path(__file__).resolve().parents[1]


def numeric_grad(f, arrays, index, eps=1e-6):
    """Central-difference gradient of scalar f(*arrays) with respect to arrays[index]."""
    x = arrays[index]
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        plus = f(*arrays)
        x[i] = old - eps
        minus = f(*arrays)
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
        it.iternext()
    return grad


def gradcheck(fn, *arrays, eps=1e-6, atol=1e-7, rtol=1e-5, seed=0):
    """Check autograd against float64 central differences.

    ``fn`` maps Tensors to a Tensor; the check differentiates sum(fn(...) * w) for a fixed random
    ``w`` so every output element matters.
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    rng = np.random.default_rng(seed)
    out0 = fn(*[dp.tensor(a) for a in arrays])
    weights = rng.standard_normal(out0.shape)

    def scalar(*arrs):
        with dp.no_grad():
            out = fn(*[dp.tensor(a) for a in arrs])
        return float((out.numpy() * weights).sum())

    tensors = [dp.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(dp.tensor(weights))
    for i, t in enumerate(tensors):
        expected = numeric_grad(scalar, arrays, i, eps)
        got = t.grad.numpy() if t.grad is not None else np.zeros_like(expected)
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol,
                                   err_msg=f"gradient of input {i}")


def torch_state(module):
    """A torch module's state_dict as NumPy arrays."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def copy_torch_to_dp(torch_module, dp_module):
    dp_module.load_state_dict(torch_state(torch_module))


def run_mpi(script: str, nprocs: int = 2, timeout: float = 120, env=None, args=()):
    """Run a Python snippet under ``mpiexec -n nprocs``; returns the CompletedProcess."""
    code = textwrap.dedent(script)
    mpiexec = mpiexec_path()
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "PYTHONUNBUFFERED": "1"})
    if env:
        full_env.update(env)
    cmd = [mpiexec, "-n", str(nprocs), sys.executable, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(REPO))


def mpiexec_path() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    import shutil

    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("mpiexec not found: pip install mpich (the 'mpich' extra)")
    return found


def recurrent_layer_gradcheck(mode: str, hidden: int, reverse: bool, lengths) -> None:
    """float64 finite differences of one LSTM/GRU layer Function (3 steps, batch 2, input 2)
    over its inputs, initial states and all weights and biases."""
    from distprop.ops.rnn import GRULayer, LSTMLayer

    rng = np.random.default_rng(0)
    steps, batch, size = 3, 2, 2
    gates = (4 if mode == "lstm" else 3) * hidden
    arrays = [rng.standard_normal((steps, batch, size)), rng.standard_normal((batch, hidden))]
    if mode == "lstm":
        arrays.append(rng.standard_normal((batch, hidden)))
    arrays += [rng.standard_normal((gates, size)) * 0.3, rng.standard_normal((gates, hidden)) * 0.3,
               rng.standard_normal(gates) * 0.3, rng.standard_normal(gates) * 0.3]
    layer = LSTMLayer if mode == "lstm" else GRULayer
    lens = None if lengths is None else np.array(lengths)

    def fn(*tensors):
        outs = layer.apply(*tensors, reverse=reverse, lengths=lens)
        return dp.cat([o.reshape(-1) for o in outs])

    gradcheck(fn, *arrays)
