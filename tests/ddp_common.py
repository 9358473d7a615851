"""Model, data and training-loop helpers shared by the multi-rank test scripts.

The scripts that ``tests/test_ddp.py`` runs under ``mpiexec`` start with ``from ddp_common
import *`` (the tests directory is on their path), so every script builds models and trains the
same way, and a one-process reference run on the global batch is one function call.
"""

from __future__ import annotations

import math
import sys

import numpy as np

import distprop as dp
from distprop import distributed as dist
from distprop import nn
from distprop.distributed import DistributedDataParallel as DDP

__all__ = ["DDP", "comm", "dist", "dp", "make_data", "make_opt", "mlp", "nn", "np", "rank",
           "reference", "say", "train", "world"]

comm = dist.init()
rank, world = comm.rank, comm.size


def say(*parts) -> None:
    """Print one line prefixed with the rank, in a single write (lines of ranks don't mix)."""
    sys.stdout.write(" ".join([f"rank {rank}:", *map(str, parts)]) + "\n")
    sys.stdout.flush()


def mlp(seed: int = 0, dtype=np.float64, hidden: int = 16, unused: bool = False) -> nn.Module:
    """Linear(6, hidden) - Tanh - Linear(hidden, 3), plus an unused Linear when asked."""
    dp.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    if unused:
        model.add_module("spare", nn.Linear(3, 3))
        model = _SkipLast(model)
    return model.to(dtype)


class _SkipLast(nn.Module):
    """Runs all children of ``seq`` but the last one (which stays unused)."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        for name, layer in self.seq.named_children():
            if name != "spare":
                x = layer(x)
        return x


def make_data(n: int = 48, seed: int = 1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(dtype)
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2], np.cos(x[:, 3] + x[:, 4])], 1).astype(dtype)
    return x, y


def make_opt(kind: str, params, lr: float = 0.05):
    params = list(params)
    if kind == "sgd":
        return dp.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "adam":
        return dp.optim.Adam(params, lr=lr * 0.2)
    raise ValueError(kind)


def clip_(params, max_norm: float) -> float:
    """Clip the global gradient norm (nn.utils.clip_grad_norm_ when it exists)."""
    params = [p for p in params if p.grad is not None]
    if hasattr(nn.utils, "clip_grad_norm_"):
        return float(nn.utils.clip_grad_norm_(params, max_norm))
    norm = math.sqrt(sum(float((p.grad.data ** 2).sum()) for p in params))
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for p in params:
            p.grad.data[...] *= scale
    return norm


def _loss(model, x, y, scale: float = 1.0):
    out = model(dp.tensor(x))
    return ((out - dp.tensor(y)) ** 2).mean() * scale


def train(model, x, y, steps: int = 10, batch: int = 12, opt: str = "sgd", ddp_kwargs=None,
          accum: int = 1, clip: float | None = None, ranks=None):
    """Train ``steps`` steps on global batches of ``batch`` rows of (x, y).

    With ``ddp_kwargs`` (a dict) the model is wrapped in DDP and this rank trains on its
    contiguous 1/world share of each global batch, in ``accum`` micro-batches (all but the last
    under ``no_sync``). Without it, one process trains on the whole global batch. Returns the
    (possibly wrapped) model and the optimizer.
    """
    n_ranks, me = (world, rank) if ranks is None else ranks
    net = DDP(model, **ddp_kwargs) if ddp_kwargs is not None else model
    if ddp_kwargs is None:
        n_ranks, me = 1, 0
    optimizer = make_opt(opt, net.parameters())
    per_rank = batch // n_ranks
    micro = per_rank // accum
    for step in range(steps):
        start = (step * batch) % len(x)
        xb, yb = x[start:start + batch], y[start:start + batch]
        xb, yb = xb[me * per_rank:(me + 1) * per_rank], yb[me * per_rank:(me + 1) * per_rank]
        optimizer.zero_grad()
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            last = m == accum - 1
            if ddp_kwargs is not None and not last:
                with net.no_sync():
                    _loss(net, xb[sl], yb[sl], 1.0 / accum).backward()
            else:
                _loss(net, xb[sl], yb[sl], 1.0 / accum).backward()
        if clip is not None:
            clip_(net.parameters(), clip)
        optimizer.step()
    return net, optimizer


def reference(steps=10, batch=12, opt="sgd", clip=None, seed=0, dtype=np.float64, data_n=48):
    """Parameters after one process trains on the full global batches."""
    model = mlp(seed, dtype)
    x, y = make_data(data_n, dtype=dtype)
    train(model, x, y, steps, batch, opt, clip=clip)
    return [p.data.copy() for p in model.parameters()]


def max_diff(params, ref) -> float:
    return max(float(np.abs(p.data - r).max()) for p, r in zip(params, ref))


__all__.append("max_diff")
sys.stdout.reconfigure(line_buffering=True)
