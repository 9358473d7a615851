"""Scaled dot-product attention as one fused op, plus the mask plumbing around it.

Softmax subtracts each row's maximum before exponentiating. A FULLY MASKED row (every key masked
out, so every score is -inf) is defined to give attention weights of zero, an output of zero and
a zero gradient, instead of the NaN a plain softmax would produce (PyTorch's
``scaled_dot_product_attention`` does the same; its ``MultiheadAttention`` with
``need_weights=True`` returns NaN there).
"""

from __future__ import annotations

import math

import numpy as np

from distprop import amp, backend
from distprop.backend import get_array_module
from distprop.ops._util import gemm, unbroadcast
from distprop.tensor import Function, Tensor


def _swap(a):
    return a.swapaxes(-1, -2)


class ScaledDotProductAttention(Function):
    """out = dropout(softmax(q k^T * scale + bias)) v; fully masked rows give 0 (see module doc).

    ``bias`` is an additive float array (``-inf`` where masked) broadcastable to the scores;
    with ``need_weights`` the attention weights (after dropout) are a second, differentiable
    output.
    """

    amp_policy = "lower"  # autocast: see distprop/amp.py

    def forward(self, q, k, v, bias=None, scale=None, dropout_p=0.0, need_weights=False):
        xp = get_array_module(q)
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            raise ValueError(
                f"scaled_dot_product_attention: query {tuple(q.shape)}, key {tuple(k.shape)} and "
                f"value {tuple(v.shape)} do not fit (need query[-1] == key[-1] and "
                f"key[-2] == value[-2])"
            )
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        # The scale goes on q when q is the smaller array (L x E against the L x S scores, so
        # E < S): one pass fewer over the scores, and a contiguous GEMM operand.
        q_first = q.shape[-1] < k.shape[-2]
        if q_first:
            q = q * q.dtype.type(scale)
        probs = gemm(q, _swap(k))
        if not q_first:
            probs *= scale
        if bias is not None:
            probs += bias
        row_max = probs.max(axis=-1, keepdims=True)
        dead = ~xp.isfinite(row_max)
        any_dead = bool(dead.any())
        if any_dead:
            row_max[dead] = 0
        probs -= row_max
        xp.exp(probs, out=probs)
        total = probs.sum(axis=-1, keepdims=True)
        if any_dead:
            total[dead] = 1
        xp.reciprocal(total, out=total)
        probs *= total
        weights = probs
        self.drop = None
        if dropout_p > 0.0:
            keep = 1.0 - dropout_p
            self.drop = backend.bernoulli_mask(probs.shape, keep, probs.dtype,
                                               backend.device_of(probs))
            if keep > 0:
                self.drop *= 1.0 / keep
            weights = probs * self.drop
        self.saved = (q, k, v, probs, weights, scale, q_first)
        out = gemm(weights, v)
        return (out, weights) if need_weights else out

    def backward(self, grad_out, grad_weights=None):
        q, k, v, probs, weights, scale, q_first = self.saved  # q is scaled when q_first
        needs = self.needs_input_grad
        xp = get_array_module(grad_out)
        dv = unbroadcast(gemm(_swap(weights), grad_out), v.shape) if needs[2] else None
        if not (needs[0] or needs[1]):
            return None, None, dv
        dp = gemm(grad_out, _swap(v))
        if grad_weights is not None:
            dp += grad_weights
        if self.drop is not None:
            dp *= self.drop
        # softmax backward: ds = p * (dp - sum(p * dp)); masked entries have p = 0
        dp -= xp.einsum("...ij,...ij->...i", dp, probs)[..., None]
        dp *= probs
        if not q_first:
            dp *= scale
        dq = None
        if needs[0]:
            dq = gemm(dp, k)
            if q_first:
                dq *= scale
            dq = unbroadcast(dq, q.shape)
        dk = unbroadcast(gemm(_swap(dp), q), k.shape) if needs[1] else None
        return dq, dk, dv


class Chunk(Function):
    """outs = a split into ``chunks`` equal pieces along ``dim`` (views); grad: g concatenated."""

    def forward(self, a, chunks, dim=-1):
        d = dim % a.ndim
        if a.shape[d] % chunks:
            raise ValueError(f"chunk: size {a.shape[d]} of dim {dim} is not divisible by {chunks}")
        self.dim, size = d, a.shape[d] // chunks
        index = [slice(None)] * a.ndim
        outs = []
        for i in range(chunks):
            index[d] = slice(i * size, (i + 1) * size)
            outs.append(a[tuple(index)])
        return tuple(outs)

    def backward(self, *grads):
        return get_array_module(grads[0]).concatenate(grads, axis=self.dim)


def _mask_array(mask, name: str):
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        return mask.data
    if hasattr(mask, "shape") and hasattr(mask, "dtype"):
        return mask
    return np.asarray(mask)


def additive_mask(mask, dtype, name: str, true_means_masked: bool, device=None):
    """A bool or float mask as an additive float array of ``dtype`` (``-inf`` where masked).

    Bool masks mean "attend" when True for ``scaled_dot_product_attention`` and "masked out"
    when True for ``MultiheadAttention`` (PyTorch's two conventions): ``true_means_masked`` picks.
    The mask is copied to ``device`` (that of the scores) when it lives elsewhere.
    """
    mask = _mask_array(mask, name)
    if mask is None:
        return None
    if device is not None and backend.device_of(mask) != device:
        mask = backend.to_device(mask, device)
    xp = get_array_module(mask)
    if mask.dtype == np.bool_:
        blocked = mask if true_means_masked else ~mask
        out = xp.zeros(mask.shape, dtype=dtype)
        out[blocked] = -np.inf
        return out
    if mask.dtype.kind != "f":
        raise TypeError(f"{name} must be a bool or floating-point mask, got dtype {mask.dtype}")
    return mask.astype(dtype, copy=False)


def causal_mask(target: int, source: int, dtype, xp=np):
    """Additive (target, source) mask: -inf above the diagonal (position i sees keys <= i)."""
    out = xp.zeros((target, source), dtype=dtype)
    out[xp.triu(xp.ones((target, source), dtype=bool), k=1)] = -np.inf
    return out


def _check_broadcast(bias, scores_shape, name: str):
    if bias is None:
        return
    try:
        np.broadcast_shapes(tuple(bias.shape), tuple(scores_shape))
    except ValueError:
        raise ValueError(
            f"{name} of shape {tuple(bias.shape)} does not broadcast to the attention scores' "
            f"shape {tuple(scores_shape)} (..., L, S)"
        ) from None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """softmax(query key^T * scale + mask) value, as ``torch.nn.functional``'s.

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``.
        value: ``(..., S, Ev)``.
        attn_mask: bool (True = may attend) or additive float mask broadcastable to
            ``(..., L, S)``.
        dropout_p: dropout probability on the attention weights (applied whenever > 0).
        is_causal: mask keys after each query position (top-left aligned); exclusive with
            ``attn_mask``.
        scale: score scale, default ``1 / sqrt(E)``.

    Returns:
        ``(..., L, Ev)``. Rows whose keys are all masked give zeros (and zero gradient).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor")
        if t.ndim < 2:
            raise ValueError(f"scaled_dot_product_attention: {name} must be at least 2-D, "
                             f"got shape {t.shape}")
        if t.dtype.kind != "f":
            raise TypeError(f"scaled_dot_product_attention: {name} must be floating-point, "
                            f"got dtype {t.dtype}")
        if t.dtype != query.dtype and not amp.mixed_ok(t.dtype, query.dtype):
            raise TypeError(f"scaled_dot_product_attention: {name} dtype {t.dtype} differs "
                            f"from query dtype {query.dtype}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: pass either attn_mask or is_causal")
    target, source = query.shape[-2], key.shape[-2]
    bias = additive_mask(attn_mask, query.dtype, "attn_mask", true_means_masked=False,
                         device=query.device)
    if is_causal:
        bias = causal_mask(target, source, query.dtype, get_array_module(query.data))
    scores = np.broadcast_shapes(query.shape[:-2], key.shape[:-2]) + (target, source)
    _check_broadcast(bias, scores, "attn_mask")
    return ScaledDotProductAttention.apply(query, key, value, bias=bias, scale=scale,
                                           dropout_p=float(dropout_p))
