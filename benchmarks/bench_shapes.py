"""Shape sweep: forward+backward of each layer family in distprop and PyTorch, same process.

For every shape of every family both frameworks get the same weights (a torch ``state_dict``
loaded into ours) and the same input; one step is forward, ``loss = sum(out * P)`` with a fixed
random projection ``P`` (the loss families use their own loss), and backward. The two sides
alternate step by step, the ratio is ``median(ours) / median(torch)``. The GEMM floor is the
measured time of the matrix products the op needs (forward and backward), each alone with
``np.matmul(..., out=)``; null where a family has none. Threads are set in this process for
NumPy's BLAS (threadpoolctl) and for torch (``torch.set_num_threads``).

Shapes are drawn per family by latin-hypercube sampling of discrete parameter lists (fixed
seed), so each value of each parameter appears about equally often. One JSON line per shape
and thread count on stdout (``--out`` also writes them to a file).

    python benchmarks/bench_shapes.py --threads 1,2                  # full sweep (<= 8 min)
    python benchmarks/bench_shapes.py --quick --family conv,lstm     # a few shapes (< 1 min)
    python benchmarks/bench_shapes.py --family conv --profile 3      # cProfile ours, shape 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

SEED = 14
# Caps on one step's work, so the full sweep at 1 and 2 threads stays within ~8 minutes: the
# batch (then the steps) is halved until steps*batch*hidden^2*layers*dirs <= RNN_WORK, and the
# batch until batch*tokens*d_model <= ATTN_WORK.
RNN_WORK = 2 ** 26
ATTN_WORK = 2 ** 17


@dataclass
class Case:
    """One benchmarked shape: the step of each side and the GEMMs it needs."""

    family: str
    params: dict
    ours: object  # () -> None, one forward+backward
    torch: object
    # products of one step: (repeat, batch, m, k, n) = ``repeat`` batched (batch, m, k) @ (k, n)
    gemms: list = field(default_factory=list)


# ----------------------------------------------------------------------------- sampling


SWEEP = {"quick": False}  # --quick: keep the QUICK_SHAPES smallest points of each full draw


def lhs(space: dict[str, list], n: int, seed: int) -> list[dict]:
    """``n`` points of a latin hypercube over discrete value lists (each value ~ n/len times).

    With ``--quick``, the QUICK_SHAPES points of the full draw with the least work (product of
    their numeric values), so the quick shapes are a subset of the full sweep's.
    """
    rng = np.random.default_rng(seed)
    cols = {}
    for name, values in space.items():
        idx = (np.arange(n) * len(values)) // n
        cols[name] = [values[i] for i in rng.permutation(idx)]
    points = [{k: cols[k][i] for k in space} for i in range(n)]
    if SWEEP["quick"]:
        def size(pt):
            return float(np.prod([v for v in pt.values()
                                  if isinstance(v, int) and not isinstance(v, bool)]))
        keep = sorted(sorted(range(n), key=lambda i: size(points[i]))[:QUICK_SHAPES])
        points = [points[i] for i in keep]
    return points


# ----------------------------------------------------------------------------- helpers


def _np_rng(i: int):
    return np.random.default_rng(1000 + i)


def pair_module(ours, ref):
    """Load the torch module's weights into ours."""
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in ref.state_dict().items()})
    return ours, ref


def projection_steps(ours_fn, torch_fn, ours_params, torch_params, arrays, out_shape, seed,
                     grad_inputs=True):
    """Steps for ``loss = sum(f(*inputs) * P)`` with P fixed, backward to params (and inputs)."""
    import torch

    import distprop as dp

    proj = _np_rng(seed).standard_normal(out_shape).astype(np.float32)
    p_ours, p_torch = dp.tensor(proj), torch.from_numpy(proj)
    xs_ours = [dp.tensor(a, requires_grad=grad_inputs and a.dtype.kind == "f") for a in arrays]
    xs_torch = [torch.from_numpy(a.copy()).requires_grad_(grad_inputs and a.dtype.kind == "f")
                for a in arrays]

    def ours():
        for p in ours_params:
            p.grad = None
        for x in xs_ours:
            x.grad = None
        (ours_fn(*xs_ours) * p_ours).sum().backward()

    def theirs():
        for p in torch_params:
            p.grad = None
        for x in xs_torch:
            x.grad = None
        (torch_fn(*xs_torch) * p_torch).sum().backward()

    return ours, theirs


def module_case(family, params, ours_mod, torch_mod, arrays, seed, gemms, select=None,
                grad_inputs=True):
    """A Case for ``module(*arrays)`` (``select`` picks the output from a tuple result)."""
    ours_mod, torch_mod = pair_module(ours_mod, torch_mod)
    with __import__("torch").no_grad():
        out = torch_mod(*[__import__("torch").from_numpy(a) for a in arrays])
    if select is not None:
        out = select(out)
    sel = select or (lambda o: o)
    ours, theirs = projection_steps(
        lambda *xs: sel(ours_mod(*xs)), lambda *xs: sel(torch_mod(*xs)),
        list(ours_mod.parameters()), list(torch_mod.parameters()), arrays, tuple(out.shape),
        seed, grad_inputs)
    return Case(family, params, ours, theirs, gemms)


def conv_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def conv_gemms(n, c, o, h, w, k, s, p, g, need_dx=True):
    """Forward, weight-grad and input-grad GEMMs of an im2col convolution (per group)."""
    ho, wo = conv_out(h, k, s, p), conv_out(w, k, s, p)
    m, kk, og = n * ho * wo, k * k * c // g, o // g
    out = [(1, g, m, kk, og), (1, g, og, m, kk)]
    if need_dx:
        out.append((1, g, m, og, kk))
    return out


def linear_gemms(m, i, o, need_dx=True):
    out = [(1, 1, m, i, o), (1, 1, o, m, i)]
    if need_dx:
        out.append((1, 1, m, o, i))
    return out


# ----------------------------------------------------------------------------- families


def fam_conv(n_shapes):
    import torch

    import distprop as dp

    space = {"cin": [1, 3, 8, 16, 32, 64], "cout": [16, 32, 64, 128], "px": [8, 16, 32, 64],
             "k": [1, 3, 5], "stride": [1, 2], "groups": [1, 1, 2, 4], "batch": [8, 16, 32]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED)):
        g = pt["groups"] if pt["cin"] % pt["groups"] == 0 and pt["cout"] % pt["groups"] == 0 \
            else 1
        c, o, px, k, s = pt["cin"], pt["cout"], pt["px"], pt["k"], pt["stride"]
        # keep one step under ~60 MFLOP-ish cols: shrink the batch for big images
        n = pt["batch"] if px <= 32 else 8
        p = k // 2
        params = {"batch": n, "cin": c, "cout": o, "px": px, "k": k, "stride": s, "groups": g}
        ref = torch.nn.Conv2d(c, o, k, stride=s, padding=p, groups=g)
        ours = dp.nn.Conv2d(c, o, k, stride=s, padding=p, groups=g)
        x = _np_rng(i).standard_normal((n, c, px, px)).astype(np.float32)
        yield module_case("conv", params, ours, ref, [x], i,
                          conv_gemms(n, c, o, px, px, k, s, p, g))


def _convnet(lib, c, w1, w2, px, k, bn, classes=10):
    nn = lib.nn
    p = k // 2
    layers = [nn.Conv2d(c, w1, k, padding=p)]
    if bn:
        layers.append(nn.BatchNorm2d(w1))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(w1, w2, k, padding=p)]
    if bn:
        layers.append(nn.BatchNorm2d(w2))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
               nn.Linear(w2 * (px // 4) ** 2, classes)]
    return nn.Sequential(*layers)


def fam_convnet(n_shapes):
    import torch

    import distprop as dp

    space = {"cin": [1, 3, 8], "w1": [16, 32, 64], "w2": [32, 64, 128], "px": [16, 28, 32],
             "k": [3, 5], "bn": [False, True], "batch": [16, 32, 64]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED + 1)):
        c, w1, w2, px, k, bn, n = (pt[x] for x in ("cin", "w1", "w2", "px", "k", "bn", "batch"))
        ours, ref = _convnet(dp, c, w1, w2, px, k, bn), _convnet(torch, c, w1, w2, px, k, bn)
        x = _np_rng(i).standard_normal((n, c, px, px)).astype(np.float32)
        gemms = (conv_gemms(n, c, w1, px, px, k, 1, k // 2, 1, need_dx=False)
                 + conv_gemms(n, w1, w2, px // 2, px // 2, k, 1, k // 2, 1)
                 + linear_gemms(n, w2 * (px // 4) ** 2, 10))
        yield module_case("convnet", dict(pt), ours, ref, [x], i, gemms, grad_inputs=False)


def fam_pool(n_shapes):
    import torch

    import distprop as dp

    space = {"kind": ["max", "avg"], "channels": [8, 16, 32, 64], "px": [8, 16, 32, 64],
             "k": [2, 3], "stride": [1, 2], "batch": [8, 16, 32]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED + 2)):
        kind, c, px, k, s = pt["kind"], pt["channels"], pt["px"], pt["k"], pt["stride"]
        n = pt["batch"] if px <= 32 else 8
        cls = "MaxPool2d" if kind == "max" else "AvgPool2d"
        ours, ref = getattr(dp.nn, cls)(k, s), getattr(torch.nn, cls)(k, s)
        x = _np_rng(i).standard_normal((n, c, px, px)).astype(np.float32)
        yield module_case("pool", {**pt, "batch": n}, ours, ref, [x], i, [])


def fam_batchnorm(n_shapes):
    import torch

    import distprop as dp

    space = {"dims": [1, 2, 2], "channels": [8, 16, 32, 64, 128], "px": [4, 8, 16, 32],
             "batch": [8, 16, 32, 64]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED + 3)):
        c, n = pt["channels"], pt["batch"]
        if pt["dims"] == 2:
            shape = (n, c, pt["px"], pt["px"])
            ours, ref = dp.nn.BatchNorm2d(c), torch.nn.BatchNorm2d(c)
        else:
            shape = (n * pt["px"], c)
            ours, ref = dp.nn.BatchNorm1d(c), torch.nn.BatchNorm1d(c)
        x = _np_rng(i).standard_normal(shape).astype(np.float32)
        yield module_case("batchnorm", {**pt, "shape": list(shape)}, ours, ref, [x], i, [])


def fam_activation(n_shapes):
    import torch

    import distprop as dp

    space = {"kind": ["ReLU", "GELU", "Tanh", "Sigmoid", "SiLU", "LeakyReLU"],
             "numel_k": [16, 64, 256, 1024]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED + 4)):
        numel = pt["numel_k"] * 1024
        ours, ref = getattr(dp.nn, pt["kind"])(), getattr(torch.nn, pt["kind"])()
        x = _np_rng(i).standard_normal((numel // 256, 256)).astype(np.float32)
        yield module_case("activation", dict(pt), ours, ref, [x], i, [])


def _rnn_gemms(mode, t, b, i, h, layers, bidir):
    gates = 4 if mode == "lstm" else 3
    dirs = 2 if bidir else 1
    out = []
    for layer in range(layers):
        inp = i if layer == 0 else h * dirs
        for _ in range(dirs):
            out += [(1, 1, t * b, inp, gates * h), (t, 1, b, h, gates * h),  # x proj, steps
                    (t, 1, b, gates * h, h),  # backward per step, dh
                    (1, 1, gates * h, t * b, inp), (1, 1, gates * h, t * b, h),  # dW_ih, dW_hh
                    (1, 1, t * b, gates * h, inp)]  # dx
    return out


def fam_rnn(mode, n_shapes):
    import torch

    import distprop as dp

    space = {"hidden": [64, 128, 256, 512], "steps": [8, 32, 64, 256], "batch": [8, 32, 64, 128],
             "layers": [1, 2], "bidirectional": [False, True], "input": [32, 64, 128]}
    cls = "LSTM" if mode == "lstm" else "GRU"
    for i, pt in enumerate(lhs(space, n_shapes, SEED + (5 if mode == "lstm" else 6))):
        h, t, b, layers, bi, inp = (pt[x] for x in ("hidden", "steps", "batch", "layers",
                                                    "bidirectional", "input"))
        # bound the work of one step (steps x batch x hidden^2), as the grid's corners are huge
        while t * b * h * h * layers * (2 if bi else 1) > RNN_WORK and b > 8:
            b //= 2
        while t * b * h * h * layers * (2 if bi else 1) > RNN_WORK and t > 8:
            t //= 2
        kw = {"num_layers": layers, "bidirectional": bi, "batch_first": True}
        ours, ref = getattr(dp.nn, cls)(inp, h, **kw), getattr(torch.nn, cls)(inp, h, **kw)
        x = _np_rng(i).standard_normal((b, t, inp)).astype(np.float32)
        params = {**pt, "steps": t, "batch": b}
        yield module_case(mode, params, ours, ref, [x], i,
                          _rnn_gemms(mode, t, b, inp, h, layers, bi), select=lambda o: o[0])


def _attn_gemms(b, t, e, heads, ff=None):
    d = e // heads
    fwd = [(1, b * t, e, 3 * e), (b * heads, t, d, t), (b * heads, t, t, d), (1, b * t, e, e)]
    if ff:
        fwd += [(1, b * t, e, ff), (1, b * t, ff, e)]
    out = []
    for bb, m, k, n in fwd:  # forward, and the two backward products of each
        out += [(1, bb, m, k, n), (1, bb, m, n, k), (1, bb, k, m, n)]
    return out


def fam_attention(kind, n_shapes):
    import torch

    import distprop as dp

    space = {"d_model": [64, 128, 256, 512], "tokens": [16, 32, 64, 128, 256],
             "heads": [2, 4, 8], "batch": [4, 8, 16, 32]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED + (7 if kind == "attention" else 8))):
        e, t, heads, b = pt["d_model"], pt["tokens"], pt["heads"], pt["batch"]
        while b * t * e > ATTN_WORK and b > 2:
            b //= 2
        x = _np_rng(i).standard_normal((b, t, e)).astype(np.float32)
        params = {**pt, "batch": b}
        if kind == "attention":
            ours = dp.nn.MultiheadAttention(e, heads, batch_first=True)
            ref = torch.nn.MultiheadAttention(e, heads, batch_first=True)
            ours, ref = pair_module(ours, ref)
            steps = projection_steps(
                lambda x, m=ours: m(x, x, x, need_weights=False)[0],
                lambda x, m=ref: m(x, x, x, need_weights=False)[0],
                list(ours.parameters()), list(ref.parameters()), [x], (b, t, e), i)
            yield Case(kind, params, *steps, _attn_gemms(b, t, e, heads))
        else:
            ff = 4 * e
            kw = {"dim_feedforward": ff, "dropout": 0.0, "batch_first": True}
            ours = dp.nn.TransformerEncoderLayer(e, heads, **kw)
            ref = torch.nn.TransformerEncoderLayer(e, heads, **kw)
            yield module_case(kind, params, ours, ref, [x], i, _attn_gemms(b, t, e, heads, ff))


def fam_embedding(n_shapes):
    import torch

    import distprop as dp

    space = {"vocab": [1000, 10000, 50000], "dim": [32, 64, 128, 256, 512],
             "tokens": [16, 64, 256], "batch": [8, 32, 64]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED + 9)):
        v, d, t, b = pt["vocab"], pt["dim"], pt["tokens"], pt["batch"]
        ours, ref = dp.nn.Embedding(v, d), torch.nn.Embedding(v, d)
        idx = _np_rng(i).integers(0, v, (b, t)).astype(np.int64)
        yield module_case("embedding", dict(pt), ours, ref, [idx], i, [], grad_inputs=False)


LOSSES = {
    "CrossEntropyLoss": "class", "NLLLoss": "class", "MSELoss": "dense", "L1Loss": "dense",
    "SmoothL1Loss": "dense", "HuberLoss": "dense", "BCEWithLogitsLoss": "binary",
    "BCELoss": "prob",
}


def fam_loss(n_shapes):
    import torch

    import distprop as dp

    space = {"loss": list(LOSSES), "batch": [32, 128, 512, 2048], "classes": [10, 100, 1000]}
    for i, pt in enumerate(lhs(space, n_shapes, SEED + 10)):
        name, b, c = pt["loss"], pt["batch"], pt["classes"]
        rng = _np_rng(i)
        x = rng.standard_normal((b, c)).astype(np.float32)
        kind = LOSSES[name]
        if kind == "class":
            y = rng.integers(0, c, b).astype(np.int64)
            if name == "NLLLoss":  # log-probabilities
                x = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float32)
        elif kind == "prob":
            x = (1 / (1 + np.exp(-x))).astype(np.float32)
            y = (rng.random((b, c)) < 0.5).astype(np.float32)
        elif kind == "binary":
            y = (rng.random((b, c)) < 0.5).astype(np.float32)
        else:
            y = rng.standard_normal((b, c)).astype(np.float32)
        f_ours, f_torch = getattr(dp.nn, name)(), getattr(torch.nn, name)()
        xo, yo = dp.tensor(x, requires_grad=True), dp.tensor(y)
        xt, yt = torch.from_numpy(x.copy()).requires_grad_(True), torch.from_numpy(y)

        def ours(xo=xo, yo=yo, f=f_ours):
            xo.grad = None
            f(xo, yo).backward()

        def theirs(xt=xt, yt=yt, f=f_torch):
            xt.grad = None
            f(xt, yt).backward()

        yield Case("loss", dict(pt), ours, theirs, [])


FAMILIES = {
    "conv": (fam_conv, 14), "convnet": (fam_convnet, 8), "pool": (fam_pool, 10),
    "batchnorm": (fam_batchnorm, 10), "activation": (fam_activation, 10),
    "lstm": (lambda n: fam_rnn("lstm", n), 10), "gru": (lambda n: fam_rnn("gru", n), 8),
    "attention": (lambda n: fam_attention("attention", n), 8),
    "transformer": (lambda n: fam_attention("transformer", n), 8),
    "embedding": (fam_embedding, 8), "loss": (fam_loss, 10),
}
QUICK_SHAPES = 3


# ----------------------------------------------------------------------------- timing


def gemm_floor_ms(gemms, repeats: int, clock=time.perf_counter) -> float | None:
    """Sum over the GEMMs of the median time of ``np.matmul(a, b, out=c)`` (float32)."""
    if not gemms:
        return None
    total = 0.0
    rng = np.random.default_rng(0)
    for repeat, batch, m, k, n in gemms:
        a = rng.standard_normal((batch, m, k)).astype(np.float32)
        b = rng.standard_normal((batch, k, n) if batch > 1 else (k, n)).astype(np.float32)
        c = np.empty((batch, m, n), dtype=np.float32)
        if batch == 1:
            a, c = a[0], c[0]
        times = []
        for _ in range(repeats):
            t0 = clock()
            for _ in range(repeat):
                np.matmul(a, b, out=c)
            times.append(clock() - t0)
        total += statistics.median(times)
    return total * 1e3


def time_pair(case: Case, budget_s: float, min_rep: int, max_rep: int, warmup: int = 2,
              clock=time.perf_counter):
    """Warm up, then alternate ours/torch; returns both lists of step times (s)."""
    for _ in range(warmup):
        case.ours()
        case.torch()
    t0 = clock()
    case.ours()
    t1 = clock()
    case.torch()
    t2 = clock()
    reps = int(min(max_rep, max(min_rep, budget_s / max(t2 - t0, 1e-6))))
    ours, theirs = [t1 - t0], [t2 - t1]
    for r in range(reps - 1):
        first, second = (case.ours, case.torch) if r % 2 else (case.torch, case.ours)
        a = clock()
        first()
        b = clock()
        second()
        c = clock()
        if r % 2:
            ours.append(b - a)
            theirs.append(c - b)
        else:
            theirs.append(b - a)
            ours.append(c - b)
    return ours, theirs


def pick_clock(name: str, threads: int):
    """(clock, its name): ``auto`` is this thread's CPU time at 1 thread (all the work of both
    frameworks then runs on the calling thread, so time spent descheduled by other jobs on a
    shared machine is left out) and wall time with more threads."""
    if name == "cpu" or (name == "auto" and threads == 1):
        return time.thread_time, "thread_cpu"
    return time.perf_counter, "wall"


def run_case(case: Case, threads: list[int], budget_s: float, min_rep: int, max_rep: int,
             warmup: int = 2, clock: str = "auto"):
    import torch
    from threadpoolctl import threadpool_limits

    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        with threadpool_limits(nt):
            tick, clock_name = pick_clock(clock, nt)
            ours, theirs = time_pair(case, budget_s, min_rep, max_rep, warmup, tick)
            floor = gemm_floor_ms(case.gemms, max(3, min_rep // 2), tick)
        o, t = statistics.median(ours), statistics.median(theirs)
        rows.append({"family": case.family, **case.params, "threads": nt,
                     "ours_ms": round(o * 1e3, 4), "torch_ms": round(t * 1e3, 4),
                     "ratio": round(o / t, 4), "gemm_floor_ms":
                         None if floor is None else round(floor, 4),
                     "repeats": len(ours), "clock": clock_name})
    return rows


def cases_of(family: str, quick: bool):
    make, n = FAMILIES[family]
    SWEEP["quick"] = quick
    return make(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--family", default="all",
                        help="comma-separated families: " + ",".join(FAMILIES))
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPES} shapes per family")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed steps per shape and thread count")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="auto: this thread's CPU time at 1 thread, wall time above")
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    parser.add_argument("--profile", type=int, default=None, metavar="INDEX",
                        help="cProfile 20 of our steps of shape INDEX of --family to stderr")
    args = parser.parse_args(argv)
    fams = list(FAMILIES) if args.family == "all" else [f.strip() for f in
                                                         args.family.split(",")]
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        parser.error(f"unknown family {bad[0]!r}; choose from {', '.join(FAMILIES)}")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated ints, got {args.threads!r}")
    import torch

    import distprop
    from distprop.bench import runner

    if args.profile is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads[0])
        with threadpool_limits(threads[0]):
            case = list(cases_of(fams[0], args.quick))[args.profile]
            print(json.dumps(case.params), file=sys.stderr)
            for _ in range(3):
                case.ours()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                case.ours()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue(), file=sys.stderr)
        return 0
    budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.5)
    min_rep, max_rep, warmup = (3, 9, 1) if args.quick else (5, 41, 2)
    out = open(args.out, "w") if args.out else None
    env = {"environment": {"python": platform.python_version(), "numpy": np.__version__,
                           "torch": torch.__version__, "distprop": distprop.__version__,
                           "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}}

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit(env)
    start = time.perf_counter()
    for fam in fams:
        for case in cases_of(fam, args.quick):
            for row in run_case(case, threads, budget, min_rep, max_rep, warmup, args.clock):
                emit(row)
    emit({"done": True, "wall_s": round(time.perf_counter() - start, 1),
          "peak_rss_mb_process": runner.peak_rss_mb()})
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
