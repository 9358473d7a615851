"""Fused recurrent layers: one Function per layer and direction, with backpropagation through time.

Each Function runs a whole sequence: the input projection of every time step is ONE GEMM, the
recurrence is one GEMM per step, and the gates are whole-array ops on the ``(batch, gates)`` block
of that step. Backward walks the steps in reverse (full BPTT) inside a single ``backward()`` call,
writing each step's gate gradients into one preallocated ``(T, B, G)`` buffer; the weight, bias
and input gradients then come from three large GEMMs over all steps at once.

Inputs are time-major: ``x`` is ``(T, B, input_size)``; states are ``(B, hidden_size)``.
``lengths`` (host integers, one per batch row) makes a batch variable-length: at a padded step
(``t >= lengths[b]``) row ``b``'s state is carried unchanged, its output is zero and it gets no
gradient, which matches PyTorch's ``pack_padded_sequence`` / ``pad_packed_sequence``. A reverse
direction starts from ``h0`` at each row's last valid step, as with packed sequences.

Sigmoid gates use sigmoid(a) = 0.5 * tanh(a / 2) + 0.5: the 1/2 is folded into the (copied)
weight rows of those gates, which is exact in floating point, so a single ``tanh`` pass covers
every gate of a step.
"""

from __future__ import annotations

import numpy as np

from distprop import cuda_kernels
from distprop.backend import get_array_module
from distprop.ops import _util
from distprop.tensor import Function


def _gate_vectors(xp, hidden: int, kinds: str, dtype):
    """Per-gate-column constants for gates laid out as ``kinds`` ('s' sigmoid, 't' tanh).

    Returns (pre_scale, post_scale, post_shift, is_tanh): the pre-activation scale folded into
    the weights, and the affine map turning tanh values into gate activations.
    """
    host = np.repeat(np.array([k == "t" for k in kinds]), hidden)
    half = np.where(host, 1.0, 0.5).astype(dtype)  # pre-scale 1/2 and post-scale 1/2 coincide
    shift = np.where(host, 0.0, 0.5).astype(dtype)
    return xp.asarray(half), xp.asarray(half), xp.asarray(shift), xp.asarray(host.astype(dtype))



def _hold_padded(seq, t, dh, dc):
    """At a step where some sequences are padding: keep in ``dh``/``dc`` (in place) only the
    rows still running, and return what the padded rows carry past the step unchanged
    ((None, None) when no row is padded at ``t``)."""
    if not seq.has_pad[t]:
        return None, None
    carry = dh * seq.pad[t], dc * seq.pad[t]
    dh *= seq.valid[t]
    dc *= seq.valid[t]
    return carry


class _Sequence:
    """Time-step bookkeeping shared by the cells: order, state slots and padding masks."""

    def __init__(self, xp, steps: int, batch: int, reverse: bool, lengths, dtype):
        self.steps, self.reverse = steps, reverse
        self.order = range(steps - 1, -1, -1) if reverse else range(steps)
        self.valid = self.pad = None
        self.has_pad = [False] * steps
        if lengths is not None:
            lengths = np.asarray(lengths)
            host_valid = np.arange(steps)[:, None] < lengths[None, :]
            self.valid = xp.asarray(host_valid[:, :, None].astype(dtype))
            self.pad = xp.asarray(~host_valid[:, :, None])
            self.has_pad = [bool(lengths.min() <= t) for t in range(steps)]

    def steps_prev_new(self):
        """(t, prev slot, new slot) for each step in processing order."""
        shift = 1 if self.reverse else 0
        return [(t, t + shift, t + 1 - shift) for t in self.order]

    def prev(self, t: int) -> int:
        """Index in the (T+1)-slot state array of the state a step at time t reads."""
        return t + 1 if self.reverse else t

    def new(self, t: int) -> int:
        """Index in the (T+1)-slot state array of the state a step at time t writes."""
        return t if self.reverse else t + 1

    def outputs(self, states):
        """The per-time-step outputs (zero at padded steps) from the (T+1)-slot states."""
        out = states[: self.steps] if self.reverse else states[1:]
        return out if self.valid is None else out * self.valid

    def prev_states(self, states):
        """(T, B, H): the state each time step read."""
        return states[1:] if self.reverse else states[: self.steps]

    def final(self, states):
        return states[0] if self.reverse else states[self.steps]

    def first_slot(self) -> int:
        return self.steps if self.reverse else 0


def _padded_empty(xp, shape, dtype):
    """An uninitialised 2-D array whose rows are 64 bytes longer than ``shape[1]`` when their
    length is a multiple of 1 KiB: such power-of-two strides make the per-step GEMMs' weight
    reads collide in the cache sets (OpenBLAS, H = 256-512: 15-25 % slower per step)."""
    rows, cols = shape
    size = np.dtype(dtype).itemsize
    pad = 64 // size if (cols * size) % 1024 == 0 else 0
    return xp.empty((rows, cols + pad), dtype=dtype)[:, :cols]


def _padded_copy(xp, weight):
    """``weight`` copied into a :func:`_padded_empty` array (the backward's per-step operand)."""
    out = _padded_empty(xp, weight.shape, weight.dtype)
    out[...] = weight
    return out


def _scaled_transpose(xp, weight, scale, block: int = 64):
    """``(weight * scale[:, None]).T`` copied in row blocks into a :func:`_padded_empty` array (a
    plain transposed copy of a (4H, H) float32 matrix runs into cache-set conflicts: ~4x
    slower)."""
    rows = weight.shape[0]
    out = _padded_empty(xp, (weight.shape[1], rows), weight.dtype)
    for j in range(0, rows, block):
        xp.multiply(weight[j:j + block].T, scale[j:j + block], out=out[:, j:j + block])
    return out


def _input_projection(x, weight, bias):
    """(T, B, I) @ weight^T + bias as one GEMM: (T, B, G)."""
    steps, batch, size = x.shape
    gates = (x.reshape(steps * batch, size) @ weight.T).reshape(steps, batch, weight.shape[0])
    if bias is not None:
        gates += bias
    return gates


def _weight_grads(dgates, x, prev_states, w_ih, needs, hh_grad=None):
    """dx, dW_ih, dW_hh, db_ih, db_hh from the (T, B, G) gate gradients, as big GEMMs."""
    steps, batch, size = x.shape
    flat = dgates.reshape(steps * batch, -1)
    flat_hh = flat if hh_grad is None else hh_grad.reshape(steps * batch, -1)
    hidden = prev_states.shape[-1]
    dx = dw_ih = dw_hh = db_ih = db_hh = None
    if needs[0]:
        dx = (flat @ w_ih).reshape(x.shape)
    if needs[1]:
        dw_ih = flat.T @ x.reshape(steps * batch, size)
    if needs[2]:
        dw_hh = flat_hh.T @ prev_states.reshape(steps * batch, hidden)
    if needs[3]:
        db_ih = flat.sum(axis=0)
    if needs[4]:
        db_hh = flat_hh.sum(axis=0) if hh_grad is not None or db_ih is None else db_ih.copy()
    return dx, dw_ih, dw_hh, db_ih, db_hh


def _check(name, x, h0, w_ih, w_hh, gates: int):
    if x.ndim != 3:
        raise ValueError(f"{name}: expected a (T, B, input_size) input, got shape {x.shape}")
    hidden = w_hh.shape[1]
    if w_ih.shape != (gates * hidden, x.shape[2]) or w_hh.shape != (gates * hidden, hidden):
        raise ValueError(
            f"{name}: weights of shapes {w_ih.shape} and {w_hh.shape} do not fit input size "
            f"{x.shape[2]} and hidden size {hidden} with {gates} gate(s)"
        )
    if h0.shape != (x.shape[1], hidden):
        raise ValueError(
            f"{name}: expected an initial state of shape {(x.shape[1], hidden)}, got {h0.shape}"
        )


class RNNLayer(Function):
    """h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act = tanh or relu; BPTT backward."""

    amp_policy = "fp32"  # autocast: recurrences run in float32 (see distprop/amp.py)

    def forward(self, x, h0, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh",
                reverse=False, lengths=None):
        _check("RNN", x, h0, w_ih, w_hh, 1)
        xp = get_array_module(x)
        steps, batch, _ = x.shape
        seq = _Sequence(xp, steps, batch, reverse, lengths, x.dtype)
        bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
        pre = _input_projection(x, w_ih, bias)
        states = xp.empty((steps + 1,) + h0.shape, dtype=x.dtype)
        states[seq.first_slot()] = h0
        w_hh_t = xp.ascontiguousarray(w_hh.T)
        relu = nonlinearity == "relu"
        rec = xp.empty(h0.shape, dtype=x.dtype)
        for t in seq.order:
            h = states[seq.new(t)]
            a = pre[t]
            xp.matmul(states[seq.prev(t)], w_hh_t, out=rec)
            a += rec
            if relu:
                xp.maximum(a, 0, out=h)
            else:
                xp.tanh(a, out=h)
            if seq.has_pad[t]:
                xp.copyto(h, states[seq.prev(t)], where=seq.pad[t])
        self.saved = (x, w_ih, w_hh, states, seq, relu)
        return seq.outputs(states), seq.final(states)

    def backward(self, grad_out, grad_hn):
        x, w_ih, w_hh, states, seq, relu = self.saved
        xp = get_array_module(grad_out)
        if seq.valid is not None:
            grad_out = grad_out * seq.valid
        dpre = xp.empty(grad_out.shape, dtype=grad_out.dtype)
        dh = grad_hn.copy()
        for t in reversed(seq.order):
            dh += grad_out[t]
            carry = None
            if seq.has_pad[t]:
                carry = dh * seq.pad[t]
                dh *= seq.valid[t]
            h = states[seq.new(t)]
            d = dpre[t]
            if relu:
                xp.multiply(dh, h > 0, out=d)
            else:
                xp.multiply(h, h, out=d)
                xp.subtract(1.0, d, out=d)
                d *= dh
            xp.matmul(d, w_hh, out=dh)
            if carry is not None:
                dh += carry
        needs = self.needs_input_grad
        dx, dw_ih, dw_hh, db_ih, db_hh = _weight_grads(
            dpre, x, seq.prev_states(states), w_ih,
            (needs[0], needs[2], needs[3], needs[4], needs[5]),
        )
        return dx, dh, dw_ih, dw_hh, db_ih, db_hh


class LSTMLayer(Function):
    """LSTM (gates i, f, g, o): c_t = f*c_{t-1} + i*g, h_t = o*tanh(c_t); BPTT backward."""

    amp_policy = "fp32"  # autocast: recurrences run in float32 (see distprop/amp.py)

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False,
                lengths=None):
        _check("LSTM", x, h0, w_ih, w_hh, 4)
        if c0.shape != h0.shape:
            raise ValueError(f"LSTM: c0 has shape {c0.shape} but h0 has shape {h0.shape}")
        xp = get_array_module(x)
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        seq = _Sequence(xp, steps, batch, reverse, lengths, x.dtype)
        pre_scale, post_scale, post_shift, is_tanh = _gate_vectors(xp, hidden, "ssts", x.dtype)
        bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
        gates = _input_projection(
            x, w_ih * pre_scale[:, None], None if bias is None else bias * pre_scale
        )
        w_hh_t = _scaled_transpose(xp, w_hh, pre_scale)  # per-step GEMMs prefer it
        hs = xp.empty((steps + 1, batch, hidden), dtype=x.dtype)
        cs = xp.empty_like(hs)
        tanh_c = xp.empty((steps, batch, hidden), dtype=x.dtype)
        hs[seq.first_slot()] = h0
        cs[seq.first_slot()] = c0
        tmp = xp.empty((batch, hidden), dtype=x.dtype)
        rec = xp.empty((batch, 4 * hidden), dtype=x.dtype)
        h1, h2, h3 = hidden, 2 * hidden, 3 * hidden
        kernel = None  # the fused GPU kernel: decided on the first step
        blocks = _util.column_blocks(xp, batch, w_hh_t, rec)
        for t, p, n in seq.steps_prev_new():
            g = gates[t]
            h_prev = hs[p]
            for w_block, rec_block in blocks:
                xp.matmul(h_prev, w_block, out=rec_block)
            g += rec
            c = cs[n]
            if kernel is None:
                kernel = cuda_kernels.lstm_forward_step(g, cs[p], c, tanh_c[t], hs[n]) is not None
            elif kernel:
                cuda_kernels.lstm_forward_step(g, cs[p], c, tanh_c[t], hs[n])
            if not kernel:
                xp.tanh(g, out=g)
                g *= post_scale
                g += post_shift
                xp.multiply(g[:, h1:h2], cs[p], out=c)
                xp.multiply(g[:, :h1], g[:, h2:h3], out=tmp)
                c += tmp
                xp.tanh(c, out=tanh_c[t])
                xp.multiply(g[:, h3:], tanh_c[t], out=hs[n])
            if seq.has_pad[t]:
                xp.copyto(c, cs[p], where=seq.pad[t])
                xp.copyto(hs[n], hs[p], where=seq.pad[t])
        self.saved = (x, w_ih, w_hh, gates, hs, cs, tanh_c, seq, is_tanh, kernel)
        return seq.outputs(hs), seq.final(hs), seq.final(cs)

    def backward(self, grad_out, grad_hn, grad_cn):
        x, w_ih, w_hh, gates, hs, cs, tanh_c, seq, is_tanh, kernel = self.saved
        xp = get_array_module(grad_out)
        if seq.valid is not None:
            grad_out = grad_out * seq.valid
        dgates = xp.empty(gates.shape, dtype=grad_out.dtype)
        dh, dc = grad_hn.copy(), grad_cn.copy()
        w_hh = _padded_copy(xp, w_hh)
        if kernel:
            self._backward_fused(xp, grad_out, gates, cs, tanh_c, seq, w_hh, dgates, dh, dc)
        else:
            self._backward_xp(xp, grad_out, gates, cs, tanh_c, seq, w_hh, dgates, dh, dc,
                              is_tanh)
        needs = self.needs_input_grad
        dx, dw_ih, dw_hh, db_ih, db_hh = _weight_grads(
            dgates, x, seq.prev_states(hs), w_ih,
            (needs[0], needs[3], needs[4], needs[5], needs[6]),
        )
        return dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh

    @staticmethod
    def _backward_xp(xp, grad_out, gates, cs, tanh_c, seq, w_hh, dgates, dh, dc, is_tanh):
        """BPTT, one step at a time on (B, H) / (B, 4H) blocks that stay in cache (precomputing
        the gate factors for all steps at once streams them through memory: slower)."""
        steps, batch, size = gates.shape
        hidden = size // 4
        act = gates.reshape(steps, batch, 4, hidden)
        i, f, g, o = act[:, :, 0], act[:, :, 1], act[:, :, 2], act[:, :, 3]
        d4 = dgates.reshape(steps, batch, 4, hidden)
        d_i, d_f, d_g, d_o = d4[:, :, 0], d4[:, :, 1], d4[:, :, 2], d4[:, :, 3]
        c_prev = seq.prev_states(cs)
        tmp = xp.empty((batch, hidden), dtype=dgates.dtype)
        deriv = xp.empty((batch, size), dtype=dgates.dtype)
        deriv2 = xp.empty_like(deriv)
        blocks = _util.column_blocks(xp, batch, w_hh, dh)
        for t in reversed(seq.order):
            dh += grad_out[t]
            carry_h, carry_c = _hold_padded(seq, t, dh, dc)
            a, d, tc = gates[t], dgates[t], tanh_c[t]
            # h = o * tanh(c): do = dh * tanh(c); dc += dh * o * (1 - tanh(c)^2)
            xp.multiply(dh, tc, out=d_o[t])
            xp.multiply(tc, tc, out=tmp)
            xp.subtract(1.0, tmp, out=tmp)
            tmp *= o[t]
            tmp *= dh
            dc += tmp
            # c = f * c_prev + i * g
            xp.multiply(dc, g[t], out=d_i[t])
            xp.multiply(dc, c_prev[t], out=d_f[t])
            xp.multiply(dc, i[t], out=d_g[t])
            dc *= f[t]
            # activations: sigmoid' = a (1 - a), tanh' = (1 + a)(1 - a)
            xp.subtract(1.0, a, out=deriv)
            xp.add(a, is_tanh, out=deriv2)
            deriv *= deriv2
            d *= deriv
            for w_block, dh_block in blocks:
                xp.matmul(d, w_block, out=dh_block)
            if carry_h is not None:
                dh += carry_h
                dc += carry_c

    @staticmethod
    def _backward_fused(xp, grad_out, gates, cs, tanh_c, seq, w_hh, dgates, dh, dc):
        """BPTT with one fused GPU kernel per step for the gate maths."""
        for t in reversed(seq.order):
            p = seq.prev(t)
            dh += grad_out[t]
            carry_h, carry_c = _hold_padded(seq, t, dh, dc)
            if cuda_kernels.lstm_backward_step(gates[t], tanh_c[t], cs[p], dh, dc,
                                               dgates[t]) is None:
                raise RuntimeError(
                    "LSTM backward: the forward ran the fused GPU kernel but it does not apply "
                    f"to this backward (gradient dtype {dh.dtype}, gates {gates.dtype}, or fused "
                    "kernels switched off in between); run forward and backward alike")
            xp.matmul(dgates[t], w_hh, out=dh)
            if carry_h is not None:
                dh += carry_h
                dc += carry_c


class GRULayer(Function):
    """GRU (gates r, z, n): n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h."""

    amp_policy = "fp32"  # autocast: recurrences run in float32 (see distprop/amp.py)

    def forward(self, x, h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False, lengths=None):
        _check("GRU", x, h0, w_ih, w_hh, 3)
        xp = get_array_module(x)
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        seq = _Sequence(xp, steps, batch, reverse, lengths, x.dtype)
        pre_scale, post_scale, post_shift, _ = _gate_vectors(xp, hidden, "sst", x.dtype)
        h2 = 2 * hidden
        gates = _input_projection(
            x, w_ih * pre_scale[:, None], None if b_ih is None else b_ih * pre_scale
        )
        w_hh_t = _scaled_transpose(xp, w_hh, pre_scale)
        b_hh_s = None if b_hh is None else b_hh * pre_scale
        hs = xp.empty((steps + 1, batch, hidden), dtype=x.dtype)
        hs[seq.first_slot()] = h0
        hidden_n = xp.empty((steps, batch, hidden), dtype=x.dtype)
        rec = xp.empty((batch, 3 * hidden), dtype=x.dtype)
        blocks = _util.column_blocks(xp, batch, w_hh_t, rec)
        for t in seq.order:
            p, n = seq.prev(t), seq.new(t)
            g = gates[t]
            h_prev = hs[p]
            for w_block, rec_block in blocks:
                xp.matmul(h_prev, w_block, out=rec_block)
            if b_hh_s is not None:
                rec += b_hh_s
            h = hs[n]
            if cuda_kernels.gru_forward_step(g, rec, hs[p], hidden_n[t], h) is None:
                rz, cand = g[:, :h2], g[:, h2:]
                rz += rec[:, :h2]
                xp.tanh(rz, out=rz)
                rz *= post_scale[:h2]
                rz += post_shift[:h2]
                hidden_n[t] = rec[:, h2:]
                xp.multiply(rz[:, :hidden], rec[:, h2:], out=rec[:, h2:])
                cand += rec[:, h2:]
                xp.tanh(cand, out=cand)
                xp.subtract(hs[p], cand, out=h)
                h *= rz[:, hidden:]
                h += cand
            if seq.has_pad[t]:
                xp.copyto(h, hs[p], where=seq.pad[t])
        self.saved = (x, w_ih, w_hh, gates, hs, hidden_n, seq)
        return seq.outputs(hs), seq.final(hs)

    def backward(self, grad_out, grad_hn):
        x, w_ih, w_hh, gates, hs, hidden_n, seq = self.saved
        xp = get_array_module(grad_out)
        if seq.valid is not None:
            grad_out = grad_out * seq.valid
        batch, hidden = grad_hn.shape
        h2 = 2 * hidden
        dgx = xp.empty(gates.shape, dtype=grad_out.dtype)
        dgh = xp.empty(gates.shape, dtype=grad_out.dtype)
        dh = grad_hn.copy()
        tmp = xp.empty((batch, hidden), dtype=grad_out.dtype)
        deriv = xp.empty((batch, h2), dtype=grad_out.dtype)
        rec = xp.empty((batch, hidden), dtype=grad_out.dtype)
        w_hh_p = _padded_copy(xp, w_hh)
        blocks = _util.column_blocks(xp, batch, w_hh_p, rec)
        for t in reversed(seq.order):
            p = seq.prev(t)
            dh += grad_out[t]
            carry = None
            if seq.has_pad[t]:
                carry = dh * seq.pad[t]
                dh *= seq.valid[t]
            a, dx_t, dh_t = gates[t], dgx[t], dgh[t]
            if cuda_kernels.gru_backward_step(a, hs[p], hidden_n[t], dh, dx_t, dh_t) is None:
                r, z, cand = a[:, :hidden], a[:, hidden:h2], a[:, h2:]
                dn = dx_t[:, h2:]
                # h' = n + z * (h - n): dz = dh * (h - n), dn = dh * (1 - z), dh_prev = dh * z
                xp.subtract(hs[p], cand, out=tmp)
                xp.multiply(dh, tmp, out=dx_t[:, hidden:h2])
                xp.subtract(1.0, z, out=tmp)
                xp.multiply(dh, tmp, out=dn)
                # n = tanh(gx_n + r * hidden_n): d(pre_n) = dn * (1 - n^2)
                xp.multiply(cand, cand, out=tmp)
                xp.subtract(1.0, tmp, out=tmp)
                dn *= tmp
                xp.multiply(dn, hidden_n[t], out=dx_t[:, :hidden])
                xp.multiply(dn, r, out=dh_t[:, h2:])
                # sigmoid' = a (1 - a) on r and z
                xp.subtract(1.0, a[:, :h2], out=deriv)
                deriv *= a[:, :h2]
                dx_t[:, :h2] *= deriv
                dh_t[:, :h2] = dx_t[:, :h2]
                dh *= z
            for w_block, rec_block in blocks:
                xp.matmul(dh_t, w_block, out=rec_block)
            dh += rec
            if carry is not None:
                dh += carry
        needs = self.needs_input_grad
        dx, dw_ih, dw_hh, db_ih, db_hh = _weight_grads(
            dgx, x, seq.prev_states(hs), w_ih,
            (needs[0], needs[2], needs[3], needs[4], needs[5]),
            hh_grad=dgh,
        )
        return dx, dh, dw_ih, dw_hh, db_ih, db_hh
