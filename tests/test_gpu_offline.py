"""The fused CUDA kernels checked without a GPU (needs ``pip install -e ".[gpu-check]"``).

* every kernel function of :mod:`distprop.cuda_kernels` is launched, with the shapes its call
  site uses, against the stand-in ``cupy`` of tests/cupy_standin.py, which checks each launch
  the way CuPy makes it (argument count, type unification, output shapes, RawKernel arguments
  against the C signature);
* the source CuPy would generate for each of those launches (its own generator, with the
  argument infos and type map CuPy would use) is compiled with NVRTC for sm_80 and sm_90, for
  float32 and float64, with CuPy's compiler options;
* every kernel declared in ``cuda_kernels.KERNELS`` must be launched by the table, and no kernel
  object may be made anywhere else in distprop (so no kernel escapes the check).

Skipped, with the reason, when CuPy or NVRTC is not installed.
"""

from __future__ import annotations

import ast
import pathlib

import cupy_standin
import numpy as np
import pytest

from distprop import cuda_kernels

cupy = pytest.importorskip("cupy", reason="the offline GPU checks need the gpu-check extra: "
                                          "pip install -e '.[gpu-check]'")
try:
    from cupy._core import core
    from cupy.cuda import nvrtc

    nvrtc.getVersion()
except Exception as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"NVRTC is not usable ({type(exc).__name__}: {exc}); install the gpu-check extra",
                allow_module_level=True)

ROOT = pathlib.Path(cuda_kernels.__file__).parent
ARCHS = ("sm_80", "sm_90")
DTYPES = ("float32", "float64")
B, H, STEPS = 3, 5, 2


def _arrays(cp, dtype, *shapes):
    rng = np.random.default_rng(0)
    return [cp.ascontiguousarray(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _optimizers(cp, dtype):
    p, g, a, b, c = _arrays(cp, dtype, *[(37,)] * 5)
    common = dict(lr=0.1, weight_decay=0.01, maximize=False)
    cuda_kernels.sgd(p, g, None, momentum=0.0, dampening=0.0, nesterov=False, first_step=False,
                     **common)
    cuda_kernels.sgd(p, g, a, momentum=0.9, dampening=0.1, nesterov=True, first_step=True,
                     **common)
    adam = dict(step=3, beta1=0.9, beta2=0.999, eps=1e-8, maximize=False,
                decoupled_weight_decay=True, lr=1e-3, weight_decay=0.01)
    cuda_kernels.adam(p[:20], g[:20], a[:20], b[:20], None, amsgrad=False, **adam)
    cuda_kernels.adam(p, g, a, b, c, amsgrad=True, **adam)


def _cross_entropy(cp, dtype):
    # FusedCrossEntropy's forward and backward, as cross_entropy() calls them
    (x,) = _arrays(cp, dtype, (6, 11))
    t = cp.asarray(np.array([0, 3, -100, 10, 2, 1]))
    for reduction in ("mean", "none"):
        fn = cuda_kernels.FusedCrossEntropy()
        fn.needs_input_grad = (True, False)
        out = fn.forward(x, t, ignore_index=-100, reduction=reduction)
        fn.backward(cp.ones(out.shape, dtype=dtype))


def _recurrent(cp, dtype):
    # slices of the (steps, B, k*H) buffers of ops/rnn.py, as its time loop passes them
    gates, hs, cs, tanh_c = _arrays(cp, dtype, (STEPS, B, 4 * H), (STEPS + 1, B, H),
                                    (STEPS + 1, B, H), (STEPS, B, H))
    cuda_kernels.lstm_forward_step(gates[0], cs[0], cs[1], tanh_c[0], hs[1])
    dgates, dh, dc = _arrays(cp, dtype, (STEPS, B, 4 * H), (B, H), (B, H))
    cuda_kernels.lstm_backward_step(gates[1], tanh_c[1], cs[1], dh, dc, dgates[1])
    gates, rec, hidden_n = _arrays(cp, dtype, (STEPS, B, 3 * H), (B, 3 * H), (STEPS, B, H))
    cuda_kernels.gru_forward_step(gates[0], rec, hs[0], hidden_n[0], hs[1])
    dgx, dgh = _arrays(cp, dtype, (STEPS, B, 3 * H), (STEPS, B, 3 * H))
    cuda_kernels.gru_backward_step(gates[1], hs[1], hidden_n[1], dh, dgx[1], dgh[1])


CONV_GEOMETRIES = [  # (x shape, kernel, stride, dilation, padding, groups, fused bias)
    ((2, 3, 9), (3,), (2,), (1,), ((1, 1),), 1, True),
    ((2, 4, 7, 6), (3, 2), (1, 2), (2, 1), ((2, 2), (0, 1)), 2, False),
    ((1, 16, 5, 5), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, True),  # rows layout
]


def _convolution(cp, dtype):
    from distprop.ops.conv import ConvNd

    for shape, kernel, stride, dilation, padding, g, fuse in CONV_GEOMETRIES:
        (x,) = _arrays(cp, dtype, shape)
        out_sp = tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, (lo, hi), k, s, d
                       in zip(shape[2:], padding, kernel, stride, dilation))
        cg = shape[1] // g
        m, kk = shape[0] * int(np.prod(out_sp)), cg * int(np.prod(kernel))
        rows = ConvNd.rows_layout(cg, cg, g)
        ka = kk + 1 if fuse else kk
        buf = cp.empty((m, g, ka) if rows else (g, ka, m), dtype=dtype)
        assert cuda_kernels.im2col(x, buf, rows, out_sp, kernel, stride, dilation, padding,
                                   g) is buf
        gbuf = cp.empty((m, g, kk) if rows else (g, kk, m), dtype=dtype)
        gx = cuda_kernels.col2im(gbuf, shape, rows, out_sp, kernel, stride, dilation, padding, g)
        assert gx.shape == shape and gx.dtype == dtype


CALL_SITES = [_optimizers, _cross_entropy, _recurrent, _convolution]


@pytest.fixture(scope="module")
def launches():
    """Every launch the call-site table makes, per dtype, checked by the stand-in."""
    mp = pytest.MonkeyPatch()
    try:
        found = {}
        for dtype in DTYPES:
            with cupy_standin.installed(mp) as cp:
                for site in CALL_SITES:
                    site(cp, np.dtype(dtype))
                found[dtype] = list(cupy_standin.LAUNCHES)
        return found
    finally:
        mp.undo()


def test_every_declared_kernel_is_launched_for_both_dtypes(launches):
    for dtype, made in launches.items():
        names = {launch["name"] for launch in made}
        declared = {spec.name if spec.kind == "elementwise" else
                    cuda_kernels.raw_function_name(spec.name, dtype)
                    for spec in cuda_kernels.KERNELS.values()}
        assert names == declared, f"{dtype}: never launched {sorted(declared - names)}"


def _kernel_constructors(tree) -> list[int]:
    """Lines naming a CuPy kernel class (on any object), or ``fuse`` on cp/cupy/xp."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and (node.attr in ("ElementwiseKernel", "RawKernel", "ReductionKernel", "RawModule")
                 or node.attr == "fuse" and isinstance(node.value, ast.Name)
                 and node.value.id in ("cp", "cupy", "xp"))]


def test_kernels_are_made_only_by_cuda_kernels_build():
    """A kernel made anywhere else would not be in KERNELS, so neither compiled nor checked."""
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        lines = _kernel_constructors(tree)
        if path.name != "cuda_kernels.py":
            assert not lines, f"{path}: CuPy kernel made outside cuda_kernels.KERNELS: {lines}"
            continue
        build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
        inside = set(_kernel_constructors(build))
        assert lines and set(lines) <= inside, f"kernels made outside build(): {lines}"


@pytest.mark.parametrize("case", [
    ("wrong count", lambda cp, k: k(cp.ones(3))),
    ("T mismatch", lambda cp, k: k(cp.ones(3, np.float32), 1.5, cp.ones(3, np.float64))),
    ("out shape", lambda cp, k: k(cp.ones(3), 1.5, cp.ones(4))),
    ("int param fed a float", lambda cp, k: k(cp.ones(3), 1.5, cp.ones(3), flag=True)),
], ids=lambda c: c[0])
def test_the_stand_in_rejects_what_cupy_rejects(case, monkeypatch):
    with cupy_standin.installed(monkeypatch) as cp:
        kernel = cp.ElementwiseKernel("T x, float64 a", "T y", "y = x * a", "t1")
        flagged = cp.ElementwiseKernel("T x, int32 a", "T y", "y = x * a", "t2")

        def call(*args, flag=False):
            return (flagged if flag else kernel)(*args)

        with pytest.raises(cupy_standin.LaunchError):
            case[1](cp, call)


def test_raw_kernel_python_int_for_an_int_parameter_is_flagged(monkeypatch):
    code = 'extern "C" __global__ void f(const float* x, int n, long long m) {}'
    with cupy_standin.installed(monkeypatch) as cp:
        kernel = cp.RawKernel(code, "f")
        x = cp.ones(4, dtype=np.float32)
        kernel((1,), (32,), (x, np.int32(4), 4))  # fine: int32 scalar, Python int as int64
        with pytest.raises(cupy_standin.LaunchError, match="n is int but CuPy passes int 4"):
            kernel((1,), (32,), (x, 4, 4))
        with pytest.raises(cupy_standin.LaunchError, match="x is float\\* but gets an array"):
            kernel((1,), (32,), (cp.ones(4), np.int32(4), 4))


# --- compiling what CuPy would compile -----------------------------------------------------------

def _elementwise_source(launch, index_32_bits: bool) -> str:
    """The module CuPy's ElementwiseKernel.__call__ generates for this launch."""
    code = cupy_standin.elementwise_code(launch, index_32_bits)[0]
    headers = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
    return headers + code  # what core.compile_with_cache prepends


def _compile(source: str, arch: str, options=()) -> bytes:
    """NVRTC, as cupy.cuda.compiler compiles for a device of ``arch`` (no device needed)."""
    opts = core.assemble_cupy_compiler_options(tuple(options)) + (
        "-ftz=true", f"-arch={arch}", "--device-as-default-execution-space")
    prog = nvrtc.createProgram(source, "kern.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC ({arch}) rejects the kernel:\n{nvrtc.getProgramLog(prog)}\n"
                        f"--- source ---\n{source}")
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_launched_kernel_compiles_with_nvrtc(launches, dtype, arch):
    seen = set()
    for launch in launches[dtype]:
        if launch["kind"] == "raw":
            key = (launch["name"], launch["code"])
            if key not in seen:
                seen.add(key)
                assert _compile(launch["code"], arch, launch["options"])
            continue
        for index_32_bits in (True, False):
            source = _elementwise_source(launch, index_32_bits)
            if source not in seen:
                seen.add(source)
                assert _compile(source, arch)
    assert seen


def test_a_compiler_error_fails_the_check():
    with pytest.raises(pytest.fail.Exception, match="NVRTC .* rejects"):
        _compile('extern "C" __global__ void f(float* x) { x[0] = undefined_name; }', "sm_80")


# --- the GPU branches run on the CPU: kernels as host C++ against the xp path -------------------


def _layer_run(make, x_shape, dtype, loss=None):
    """Forward + backward of a fresh seeded layer on the stand-in device: output, input grad and
    parameter grads, as NumPy arrays."""
    import distprop as dp

    dp.manual_seed(0)
    layer = make(dp).to("cuda").to(dtype)
    x = dp.tensor(np.random.default_rng(1).standard_normal(x_shape).astype(dtype),
                  device="cuda", requires_grad=True)
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * out).sum().backward()
    return [np.array(out.data), np.array(x.grad.data)] + [
        np.array(p.grad.data) for p in layer.parameters()]


def _cross_entropy_run(dtype, reduction):
    import distprop as dp

    rng = np.random.default_rng(2)
    x = dp.tensor((3 * rng.standard_normal((7, 300))).astype(dtype), device="cuda",
                  requires_grad=True)
    t = rng.integers(0, 300, size=7)
    t[::3] = -100
    out = dp.nn.functional.cross_entropy(x, dp.tensor(t, device="cuda"), reduction=reduction)
    out.backward(dp.ones(*out.shape, device="cuda", dtype=dtype))
    return [np.array(out.data), np.array(x.grad.data)]


def _optimizer_run(dtype, name):
    import distprop as dp

    dp.manual_seed(0)
    model = dp.nn.Linear(5, 3).to("cuda").to(dtype)
    opt = {"sgd": lambda p: dp.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                         weight_decay=0.01),
           "adam": lambda p: dp.optim.Adam(p, lr=0.01, weight_decay=0.01),
           "adamw": lambda p: dp.optim.AdamW(p, lr=0.01, amsgrad=True)}[name](model.parameters())
    x = dp.tensor(np.random.default_rng(3).standard_normal((4, 5)).astype(dtype), device="cuda")
    for _ in range(3):
        opt.zero_grad()
        (model(x) ** 2).sum().backward()
        opt.step()
    return [np.array(p.data) for p in model.parameters()]


RUNS = [
    ("lstm", lambda dt: _layer_run(lambda dp: dp.nn.LSTM(4, 6, num_layers=2), (5, 3, 4), dt),
     "distprop_lstm_"),
    ("gru", lambda dt: _layer_run(lambda dp: dp.nn.GRU(4, 6), (5, 3, 4), dt), "distprop_gru_"),
    ("conv1d", lambda dt: _layer_run(lambda dp: dp.nn.Conv1d(3, 4, 3, stride=2, padding=1),
                                     (2, 3, 9), dt), "distprop_im2col_1d"),
    ("conv2d groups", lambda dt: _layer_run(
        lambda dp: dp.nn.Conv2d(4, 6, (3, 2), stride=(1, 2), dilation=(2, 1), padding=2,
                                groups=2), (2, 4, 7, 6), dt), "distprop_col2im_2d"),
    ("conv2d rows", lambda dt: _layer_run(lambda dp: dp.nn.Conv2d(16, 4, 3, padding=1),
                                          (1, 16, 5, 5), dt), "distprop_im2col_2d"),
    ("cross_entropy mean", lambda dt: _cross_entropy_run(dt, "mean"), "distprop_ce_forward"),
    ("cross_entropy none", lambda dt: _cross_entropy_run(dt, "none"), "distprop_ce_backward"),
    ("sgd nesterov", lambda dt: _optimizer_run(dt, "sgd"), "distprop_sgd_momentum"),
    ("adam", lambda dt: _optimizer_run(dt, "adam"), "distprop_adam"),
    ("adamw amsgrad", lambda dt: _optimizer_run(dt, "adamw"), "distprop_adam_amsgrad"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RUNS, ids=[r[0] for r in RUNS])
def test_gpu_branches_on_the_cpu_match_the_xp_path(case, dtype, monkeypatch):
    import host_kernels

    if host_kernels.available():
        pytest.skip(host_kernels.available())
    _, run, kernel = case
    with cupy_standin.installed(monkeypatch, run=True):
        with cuda_kernels.disabled():
            reference = run(np.dtype(dtype))
        assert not cupy_standin.LAUNCHES
        fused = run(np.dtype(dtype))
        names = {launch["name"] for launch in cupy_standin.LAUNCHES}
    assert any(n.startswith(kernel) for n in names), f"{kernel} never launched: {names}"
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == "float32" else dict(rtol=1e-11, atol=1e-13)
    assert len(fused) == len(reference)
    for i, (got, want) in enumerate(zip(fused, reference)):
        np.testing.assert_allclose(got, want, **tol, err_msg=f"result {i}")
