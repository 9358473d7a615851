"""``dp.nn.utils``: parameter vectors, clipping, penalties and gradient diagnostics."""

from __future__ import annotations

import math
from collections.abc import Iterable

from distprop import backend
from distprop.nn.clip import clip_grad_norm_, clip_grad_value_, get_total_norm  # noqa: F401
from distprop.nn.penalty import l1_penalty, l2_penalty  # noqa: F401
from distprop.tensor import Tensor


def parameters_to_vector(parameters: Iterable[Tensor]) -> Tensor:
    """Concatenate the parameters into one 1-D tensor (a copy)."""
    params = list(parameters)
    if not params:
        raise ValueError("parameters_to_vector() got an empty parameter list")
    xp = backend.get_array_module(params[0].data)
    return Tensor._wrap(xp.concatenate([p.data.reshape(-1) for p in params]))


def vector_to_parameters(vec: Tensor, parameters: Iterable[Tensor]) -> None:
    """Copy consecutive slices of ``vec`` into the parameters, in place."""
    params = list(parameters)
    total = sum(p.numel() for p in params)
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ValueError(
            f"vector_to_parameters: expected a 1-D vector of {total} elements, got shape "
            f"{vec.shape}"
        )
    offset = 0
    for p in params:
        n = p.numel()
        p.data[...] = vec.data[offset : offset + n].reshape(p.shape)
        offset += n


def grad_norms(model) -> dict[str, float]:
    """The L2 norm of each parameter's gradient, by name (parameters without a grad are skipped).

    Args:
        model: a Module (names from ``named_parameters()``), or an iterable of
            ``(name, parameter)`` pairs or of parameters (named by position).

    Returns:
        ``{name: norm}`` in registration order, as Python floats (one device-to-host copy).
    """
    if hasattr(model, "named_parameters"):
        pairs = list(model.named_parameters())
    else:
        items = list(model)
        pairs = [it if isinstance(it, tuple) else (str(i), it) for i, it in enumerate(items)]
    named = [(name, p.grad.data) for name, p in pairs if p.grad is not None]
    if not named:
        return {}
    xp = backend.get_array_module(named[0][1])
    squares = xp.stack([xp.vdot(g.ravel(), g.ravel()).real.astype(xp.float64) for _, g in named])
    norms = backend.to_host(xp.sqrt(squares))
    return {name: float(n) for (name, _), n in zip(named, norms)}


def classify_grad_norms(norms: dict[str, float], vanishing: float = 1e-7,
                        exploding: float = 1e3) -> dict:
    """Sort gradient norms into the vanishing/exploding diagnostics a trainer can warn about.

    Args:
        norms: ``{name: norm}`` from :func:`grad_norms`.
        vanishing: norms below this count as vanishing.
        exploding: norms above this count as exploding.

    Returns:
        ``{"vanishing": [names], "exploding": [names], "nonfinite": [names],
        "total_norm": float}``; ``total_norm`` is the global L2 norm (NaN if any is non-finite).
    """
    if not 0 <= vanishing < exploding:
        raise ValueError(
            f"classify_grad_norms: need 0 <= vanishing < exploding, got {vanishing} and "
            f"{exploding}"
        )
    report: dict = {"vanishing": [], "exploding": [], "nonfinite": []}
    total = 0.0
    for name, value in norms.items():
        if not math.isfinite(value):
            report["nonfinite"].append(name)
        elif value < vanishing:
            report["vanishing"].append(name)
        elif value > exploding:
            report["exploding"].append(name)
        total += value * value
    report["total_norm"] = math.sqrt(total) if math.isfinite(total) else float("nan")
    return report
