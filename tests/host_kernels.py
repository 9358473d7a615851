"""Run CuPy kernels on the CPU: the source CuPy would hand to NVRTC, compiled as host C++.

Used by the stand-in ``cupy`` (tests/cupy_standin.py) in its ``run`` mode. The kernel source is
exactly CuPy's (its own generator for ElementwiseKernel, the raw source for RawKernel) with
CuPy's ``carray.cuh``; a small prelude maps the CUDA keywords to host C++ (``__device__`` to
nothing, ``__shared__`` to ``static``, ``threadIdx``/``blockIdx`` to thread-local variables) and a
generated wrapper builds the ``CArray``/``CIndexer`` arguments from NumPy buffers. Elementwise
kernels run as one thread looping over the index range (``CUPY_FOR``); a raw kernel runs block by
block with one host thread per CUDA thread and a ``std::barrier`` for ``__syncthreads()``, so
block reductions run as written.

Needs g++ (C++20); compiled modules are cached under the temp directory, keyed by the source,
the flags and the CuPy version.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

PRELUDE = r"""
#include <cassert>
#include <cstring>
#include <cstddef>
#include <math.h>
#include <thread>
#include <barrier>
#include <vector>
struct _dim3 { unsigned int x = 0, y = 0, z = 0; };
static thread_local _dim3 threadIdx, blockIdx;
static _dim3 blockDim, gridDim;
static std::barrier<>* _block_barrier = nullptr;
static inline void __syncthreads() { if (_block_barrier) _block_barrier->arrive_and_wait(); }
static inline unsigned int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline unsigned long long __popcll(unsigned long long x) { return __builtin_popcountll(x); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#include <cupy/carray.cuh>
"""

_loaded: dict[str, ctypes.CDLL] = {}


def available() -> str | None:
    """None when host kernels can run here, else why not."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    return None


def _include_options() -> list[str]:
    from cupy._core import core

    base = core._get_header_dir_path()
    cccl = os.path.join(base, "cupy", "_cccl")
    return [f"-I{base}"] + [f"-I{os.path.join(cccl, d)}" for d in ("libcudacxx", "thrust", "cub")]


_FLAGS = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread"]


def _library(source: str) -> ctypes.CDLL:
    import cupy  # its headers are part of what is compiled

    ident = "\n".join([cupy.__version__, *_FLAGS, *_include_options(), source])
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    lib = _loaded.get(key)
    if lib is not None:
        return lib
    folder = os.path.join(tempfile.gettempdir(), "distprop-host-kernels")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{key}.so")
    if not os.path.exists(path):
        src = os.path.join(folder, f"{key}.cpp")
        with open(src, "w") as f:
            f.write(source)
        tmp = f"{path}.{os.getpid()}"
        done = subprocess.run(["g++", *_FLAGS, *_include_options(), src, "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"host C++ compile failed:\n{done.stderr[-4000:]}\n{source}")
        os.replace(tmp, path)
    lib = _loaded[key] = ctypes.CDLL(path)
    return lib


def _split_params(text: str) -> list[str]:
    """Top-level comma split of a C parameter list (template arguments keep their commas)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _signature(code: str, name: str) -> list[tuple[str, str]]:
    m = re.search(r'extern\s+"C"\s+__global__\s+void\s+' + re.escape(name) + r"\s*\(([^{]*)\)\s*{",
                  code)
    assert m, f"no kernel {name} in the source"
    params = []
    for p in _split_params(m.group(1)):
        p = " ".join(p.split())
        ctype, pname = p.rsplit(" ", 1)
        while pname.startswith("*"):
            ctype, pname = ctype + "*", pname[1:]
        params.append((ctype.replace("const ", "").strip(), pname))
    return params


def _pointer(a) -> int:
    return a.__array_interface__["data"][0]


def run_elementwise(code: str, name: str, args: list, dims: list[list[int]]) -> None:
    """Run an ElementwiseKernel's generated ``code`` over ``args`` (arrays as laid out for the
    kernel, scalars as 0-d arrays of their C type); ``dims[k]`` is shape + strides of array
    argument k, or the shape of the indexer (last)."""
    params = _signature(code, name)
    calls, flat, offsets = [], [], []
    for k, ((ctype, _), d) in enumerate(zip(params, dims)):
        offsets.append(len(flat))
        flat.extend(d)
        if ctype.startswith("CArray<"):
            nd = len(d) // 2
            calls.append(f"{ctype}(({ctype[7:ctype.index(',')]}*)p[{k}], d + {offsets[-1]}, "
                         f"d + {offsets[-1] + nd})")
        elif ctype.startswith("CIndexer<"):
            calls.append(f"{ctype}(d + {offsets[-1]})")
        else:
            calls.append(f"*({ctype}*)p[{k}]")
    wrapper = (f'\nextern "C" void distprop_host_run(void** p, const long long* d) {{\n'
               f"  blockIdx.x = threadIdx.x = 0; blockDim.x = gridDim.x = 1;\n"
               f"  {name}({', '.join(calls)});\n}}\n")
    lib = _library(PRELUDE + code + wrapper)
    ptrs = (ctypes.c_void_p * len(args))(*[_pointer(a) for a in args])
    shape = (ctypes.c_longlong * max(1, len(flat)))(*flat)
    lib.distprop_host_run(ptrs, shape)


def run_raw(code: str, name: str, grid, block, args) -> None:
    """Run a RawKernel block by block, one host thread per CUDA thread."""
    params = _signature(code, name)
    calls = []
    for k, (ctype, _) in enumerate(params):
        calls.append(f"({ctype})p[{k}]" if ctype.endswith("*") else f"*({ctype}*)p[{k}]")
    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    wrapper = f"""
extern "C" void distprop_host_run(void** p, const long long* g) {{
  gridDim = {{(unsigned)g[0], (unsigned)g[1], (unsigned)g[2]}};
  blockDim = {{(unsigned)g[3], (unsigned)g[4], (unsigned)g[5]}};
  const long long threads = g[3] * g[4] * g[5];
  for (unsigned bz = 0; bz < gridDim.z; ++bz)
  for (unsigned by = 0; by < gridDim.y; ++by)
  for (unsigned bx = 0; bx < gridDim.x; ++bx) {{
    std::barrier<> bar(threads);
    _block_barrier = &bar;
    std::vector<std::thread> team;
    for (long long t = 0; t < threads; ++t) {{
      team.emplace_back([=]() {{
        blockIdx = {{bx, by, bz}};
        threadIdx = {{(unsigned)(t % g[3]), (unsigned)(t / g[3] % g[4]),
                     (unsigned)(t / (g[3] * g[4]))}};
        {name}({', '.join(calls)});
      }});
    }}
    for (auto& th : team) th.join();
    _block_barrier = nullptr;
  }}
}}
"""
    lib = _library(PRELUDE + code + wrapper)
    values = [a if isinstance(a, np.ndarray) else np.array(a) for a in args]
    ptrs = (ctypes.c_void_p * len(values))(*[_pointer(v) for v in values])
    launch = (ctypes.c_longlong * 6)(*grid, *block)
    lib.distprop_host_run(ptrs, launch)
