"""Input gradient of an undilated convolution as gathers and GEMMs, no scatter-add (NumPy).

The input gradient of ``out[o] = sum_i w[i] * xpad[o*s + i]`` is, for the input positions
``y = q*s + r`` of one phase ``r`` (``0 <= r < s`` per spatial dim), a stride-1 correlation of
the zero-padded output gradient with the taps ``w[r + s*j]`` flipped:
``gx[q*s + r] = sum_j g[q - j] * w[r + s*j]``. So each of the ``prod(stride)`` phases is one
im2col gather of the (small) output gradient, ``(N*Q, T*O/groups)`` per group, and one GEMM with
the phase's taps ``(T*O/groups, C/groups)``, writing its ``(N*Q, C)`` rows straight into
(stride 1) or as one strided copy onto (stride > 1) the channels-last input gradient. That
replaces col2im's ``prod(kernel)`` read-modify-write passes over a zeroed buffer, and the GEMM's
inner dimension is ``T*O/groups`` instead of ``O/groups``.
"""

from __future__ import annotations

import itertools
import math

from distprop.ops._util import gemm
from distprop.ops.workspace import scratch


def _phases(size, k, s, lo, out):
    """Per phase r of one dim: (r, taps T, first window start a, count Q, first input y)."""
    res = []
    for r in range(s):
        taps = len(range(r, k, s))
        q0 = -((r - lo) // s)  # first q with q*s + r - lo >= 0
        q1 = (size - 1 + lo - r) // s  # last q with q*s + r - lo < size
        res.append((r, taps, q0 - taps + 1, q1 - q0 + 1, q0 * s + r - lo))
    return res


def input_grad(xp, grad_cl, wk, x_shape, kernel, stride, padding, groups):
    """(N, C, *sp) input gradient, stored channels-last, of a convolution without dilation.

    ``grad_cl`` is the output gradient viewed (N, *out, O) (any strides); ``wk`` the forward's
    weight in column order ``(g, O/g, *kernel, C/g)``.
    """
    nd = len(kernel)
    n, c = x_shape[:2]
    sp = tuple(x_shape[2:])
    out_sp = tuple(grad_cl.shape[1:1 + nd])
    o = grad_cl.shape[-1]
    g = groups
    og, cg = o // g, c // g
    dims = [_phases(size, k, s, lo, osz)
            for size, k, s, (lo, _), osz in zip(sp, kernel, stride, padding, out_sp)]
    active = [[ph for ph in d if ph[1] > 0 and ph[3] > 0] for d in dims]
    # Zero padding of the output gradient that covers every phase's windows.
    pl = [max([0] + [-a for _, _, a, _, _ in d]) for d in active]
    ph = [max([0] + [a + q + t - 1 - osz for _, t, a, q, _ in d])
          for d, osz in zip(active, out_sp)]
    gpad = scratch(xp, (n, *(osz + lo + hi for osz, lo, hi in zip(out_sp, pl, ph)), o),
                   grad_cl.dtype)
    _zero_border(gpad, pl, out_sp)
    gpad[(slice(None), *(slice(lo, lo + osz) for lo, osz in zip(pl, out_sp)))] = grad_cl
    covered = all(len(d) == len(full) and sum(p[3] for p in d) == size
                  for d, full, size in zip(active, dims, sp))
    gx = (xp.empty if covered else xp.zeros)((n, *sp, c), dtype=grad_cl.dtype)
    wfull = wk.reshape(g, og, *kernel, cg)
    sn, *ssp, so = gpad.strides
    for phase in itertools.product(*active):
        taps = tuple(p[1] for p in phase)
        qs = tuple(p[3] for p in phase)
        rows = n * math.prod(qs)
        kt = math.prod(taps) * og
        start = gpad[(slice(None), *(slice(p[2] + lo, None) for p, lo in zip(phase, pl)))]
        view = xp.lib.stride_tricks.as_strided(
            start, (n, *qs, g, *taps, og), (sn, *ssp, og * so, *ssp, so))
        cols = scratch(xp, (rows, g, kt), gpad.dtype)
        cols.reshape(n, *qs, g, *taps, og)[...] = view
        # taps of this phase, flipped, as (g, T*og, cg) in the cols' (taps, og) order
        sub = wfull[(slice(None), slice(None),
                     *(slice(r + s * (t - 1), r - 1 if r else None, -s)
                       for (r, t, _, _, _), s in zip(phase, stride)))]
        wsub = xp.ascontiguousarray(
            sub.transpose((0, *range(2, 2 + nd), 1, 2 + nd))).reshape(g, kt, cg)
        a = cols.transpose(1, 0, 2)  # (g, rows, kt)
        whole = all(s == 1 for s in stride) and covered
        dest = gx if whole else xp.empty((n, *qs, c), dtype=gx.dtype)
        gemm(a if g > 1 else a[0], wsub if g > 1 else wsub[0],
             out=dest.reshape(rows, g, cg).transpose(1, 0, 2) if g > 1
             else dest.reshape(rows, c))
        del a, cols, view, start  # the scratch buffers are free again for the next phase
        if not whole:
            gx[(slice(None), *(slice(y0, y0 + s * (q - 1) + 1, s) for (_, _, _, q, y0), s in
                               zip(phase, stride)))] = dest
    return gx.transpose((0, nd + 1, *range(1, nd + 1)))


def _zero_border(buf, lo, inner):
    """Zero the spatial border of channels-last ``buf`` (N, *sp, C) around ``inner`` at ``lo``."""
    nd = len(inner)
    for dim in range(nd):
        before = (slice(None),) * (1 + dim)
        if lo[dim]:
            buf[(*before, slice(0, lo[dim]))] = 0
        if buf.shape[1 + dim] > lo[dim] + inner[dim]:
            buf[(*before, slice(lo[dim] + inner[dim], None))] = 0
