"""Both directions of a bidirectional LSTM layer in one Function (NumPy).

The two directions are independent recurrences of the same length, so they run in one loop over
processing steps with every per-step array stacked as ``(2, batch, features)``: the reverse
direction's buffers are kept in processing order (time reversed). Each NumPy call of a step
then covers both directions, which halves the per-step calls (at small batch their fixed cost,
not the arithmetic, is most of a step). The per-step products are batched matmuls over the two
directions (split into column blocks at small batch, as in :mod:`distprop.ops.rnn`). The gate
maths are those of :class:`distprop.ops.rnn.LSTMLayer`; weight, bias and input gradients are
the same single GEMMs per direction.
"""

from __future__ import annotations

import numpy as np

from distprop.ops import rnn as _rnn
from distprop.ops.rnn import (
    _check,
    _gate_vectors,
    _padded_empty,
    _scaled_transpose,
    _Sequence,
    _weight_grads,
)
from distprop.tensor import Function

# Where one loop pays (1 thread, fwd+bwd of one layer, median ms, fused vs two layers):
# H=64: T=256 B=8 31 vs 43, B=64 24 vs 31; H=128: B=32 57 vs 67, B=8/16 equal. It loses once the
# two directions' per-step working sets no longer share the L2 cache: H=256, B=8 65 vs 54 (two
# 1 MiB recurrent weights), H=64, B=128 58 vs 50.
MAX_HIDDEN, MAX_BATCH = 128, 64


def pays(hidden: int, batch: int) -> bool:
    """Whether a bidirectional LSTM layer of this size should run both directions in one loop."""
    return hidden <= MAX_HIDDEN and batch <= MAX_BATCH


def _stacked_padded(weights):
    """The 2-D ``weights`` stacked into one (n, rows, cols) array with padded rows."""
    rows, cols = weights[0].shape
    probe = _padded_empty(np, (rows, cols), weights[0].dtype)
    out = np.empty((len(weights), rows, probe.strides[0] // probe.itemsize),
                   dtype=weights[0].dtype)[:, :, :cols]
    for dst, w in zip(out, weights):
        dst[...] = w
    return out


def _combined_bias(b_ih, b_hh):
    return b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)


class BiLSTMLayer(Function):
    """A bidirectional LSTM layer: ``(x, h0, c0, h0_rev, c0_rev, w_ih, w_hh, b_ih, b_hh,
    w_ih_rev, w_hh_rev, b_ih_rev, b_hh_rev)`` -> ``(out (T, B, 2H), h_n, c_n, h_n_rev,
    c_n_rev)``, the same results as two :class:`~distprop.ops.rnn.LSTMLayer` and a concat."""

    amp_policy = "fp32"  # autocast: recurrences run in float32 (see distprop/amp.py)

    def forward(self, x, h0, c0, h0_r, c0_r, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r,
                b_hh_r, lengths=None):
        for h, c, wi, wh in ((h0, c0, w_ih, w_hh), (h0_r, c0_r, w_ih_r, w_hh_r)):
            _check("LSTM", x, h, wi, wh, 4)
            if c.shape != h.shape:
                raise ValueError(f"LSTM: c0 has shape {c.shape} but h0 has shape {h.shape}")
        steps, batch, size = x.shape
        hidden = w_hh.shape[1]
        dtype = x.dtype
        fwd = _Sequence(np, steps, batch, False, lengths, dtype)
        pre_scale, post_scale, post_shift, is_tanh = _gate_vectors(np, hidden, "ssts", dtype)
        # processing order: direction 1 sees time reversed
        x_rev = np.ascontiguousarray(x[::-1]).reshape(steps * batch, size)
        gates = np.empty((2, steps, batch, 4 * hidden), dtype=dtype)
        for d, (xs, wi, bias) in enumerate(((x.reshape(steps * batch, size), w_ih,
                                              _combined_bias(b_ih, b_hh)),
                                             (x_rev, w_ih_r, _combined_bias(b_ih_r, b_hh_r)))):
            flat = gates[d].reshape(steps * batch, 4 * hidden)
            np.matmul(xs, (wi * pre_scale[:, None]).T, out=flat)
            if bias is not None:
                flat += bias * pre_scale
        w_t = _stacked_padded([_scaled_transpose(np, w, pre_scale) for w in (w_hh, w_hh_r)])
        hs = np.empty((2, steps + 1, batch, hidden), dtype=dtype)
        cs = np.empty_like(hs)
        tanh_c = np.empty((2, steps, batch, hidden), dtype=dtype)
        hs[0, 0], hs[1, 0], cs[0, 0], cs[1, 0] = h0, h0_r, c0, c0_r
        masks = self._masks(fwd, dtype)
        tmp = np.empty((2, batch, hidden), dtype=dtype)
        rec = np.empty((2, batch, 4 * hidden), dtype=dtype)
        blocks = _rnn._column_blocks(np, batch, w_t, rec)
        h1, h2, h3 = hidden, 2 * hidden, 3 * hidden
        for k in range(steps):
            h_prev = hs[:, k]
            for w_block, rec_block in blocks:
                np.matmul(h_prev, w_block, out=rec_block)
            g = gates[:, k]
            g += rec
            np.tanh(g, out=g)
            g *= post_scale
            g += post_shift
            c = cs[:, k + 1]
            np.multiply(g[..., h1:h2], cs[:, k], out=c)
            np.multiply(g[..., :h1], g[..., h2:h3], out=tmp)
            c += tmp
            tc = tanh_c[:, k]
            np.tanh(c, out=tc)
            np.multiply(g[..., h3:], tc, out=hs[:, k + 1])
            if masks is not None and masks[2][k]:
                np.copyto(c, cs[:, k], where=masks[1][:, k])
                np.copyto(hs[:, k + 1], h_prev, where=masks[1][:, k])
        out = np.empty((steps, batch, 2 * hidden), dtype=dtype)
        out[:, :, :hidden] = hs[0, 1:]
        out[:, :, hidden:] = hs[1, 1:][::-1]
        if fwd.valid is not None:
            out *= fwd.valid
        self.saved = (x, x_rev, (w_ih, w_ih_r), (w_hh, w_hh_r), gates, hs, cs, tanh_c, masks,
                      is_tanh)
        return out, hs[0, steps], cs[0, steps], hs[1, steps], cs[1, steps]

    @staticmethod
    def _masks(fwd, dtype):
        """(valid, pad, has_pad) stacked per direction in processing order, or None."""
        if fwd.valid is None:
            return None
        valid = np.stack([fwd.valid, fwd.valid[::-1]])
        pad = np.stack([fwd.pad, fwd.pad[::-1]])
        steps = fwd.steps
        has_pad = [fwd.has_pad[k] or fwd.has_pad[steps - 1 - k] for k in range(steps)]
        return valid, pad, has_pad

    def backward(self, grad_out, grad_hn, grad_cn, grad_hn_r, grad_cn_r):
        x, x_rev, w_ihs, w_hhs, gates, hs, cs, tanh_c, masks, is_tanh = self.saved
        steps, batch, size = x.shape
        hidden = grad_hn.shape[1]
        dtype = grad_out.dtype
        dout = np.empty((2, steps, batch, hidden), dtype=dtype)
        dout[0] = grad_out[:, :, :hidden]
        dout[1] = grad_out[::-1, :, hidden:]
        if masks is not None:
            dout *= masks[0]
        dgates = np.empty(gates.shape, dtype=dtype)
        dh = np.stack([grad_hn, grad_hn_r])
        dc = np.stack([grad_cn, grad_cn_r])
        w_p = _stacked_padded(list(w_hhs))
        tmp = np.empty((2, batch, hidden), dtype=dtype)
        deriv = np.empty((2, batch, 4 * hidden), dtype=dtype)
        deriv2 = np.empty_like(deriv)
        blocks = _rnn._column_blocks(np, batch, w_p, dh)
        h1, h2, h3 = hidden, 2 * hidden, 3 * hidden
        for k in range(steps - 1, -1, -1):
            dh += dout[:, k]
            carry = None
            if masks is not None and masks[2][k]:
                pad, valid = masks[1][:, k], masks[0][:, k]
                carry = dh * pad, dc * pad
                dh *= valid
                dc *= valid
            a, d, tc = gates[:, k], dgates[:, k], tanh_c[:, k]
            # h = o * tanh(c): do = dh * tanh(c); dc += dh * o * (1 - tanh(c)^2)
            np.multiply(dh, tc, out=d[..., h3:])
            np.multiply(tc, tc, out=tmp)
            np.subtract(1.0, tmp, out=tmp)
            tmp *= a[..., h3:]
            tmp *= dh
            dc += tmp
            # c = f * c_prev + i * g
            np.multiply(dc, a[..., h2:h3], out=d[..., :h1])
            np.multiply(dc, cs[:, k], out=d[..., h1:h2])
            np.multiply(dc, a[..., :h1], out=d[..., h2:h3])
            dc *= a[..., h1:h2]
            # activations: sigmoid' = a (1 - a), tanh' = (1 + a)(1 - a)
            np.subtract(1.0, a, out=deriv)
            np.add(a, is_tanh, out=deriv2)
            deriv *= deriv2
            d *= deriv
            for w_block, dh_block in blocks:
                np.matmul(d, w_block, out=dh_block)
            if carry is not None:
                dh += carry[0]
                dc += carry[1]
        needs = self.needs_input_grad
        grads = []
        dx = None
        for d, xs in enumerate((x, x_rev.reshape(steps, batch, size))):
            first = 5 + 4 * d
            g = _weight_grads(dgates[d], xs, hs[d, :steps], w_ihs[d],
                              (needs[0], *needs[first:first + 4]))
            if g[0] is not None:
                dx = g[0] if dx is None else dx + g[0][::-1]
            grads.append(g[1:])
        return (dx, dh[0], dc[0], dh[1], dc[1], *grads[0], *grads[1])
