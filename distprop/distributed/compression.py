"""Half-precision gradient compression: fp16 and bf16 codecs and their MPI sum operations.

A compressed bucket travels as 16-bit words: IEEE half (``fp16``) or bfloat16 (``bf16``, the top
16 bits of a float32, rounded to nearest even). NumPy has no bfloat16 dtype, so bf16 values live
in ``uint16`` arrays and are converted with integer bit operations.

Reduction (MPI path): a user-defined, commutative MPI operation adds two 16-bit vectors by
widening both to float32, adding, and rounding the sum back to 16 bits. The allreduce therefore
moves half the bytes of a float32 allreduce and each partial sum is rounded once to the 16-bit
format (for 2 ranks: one rounding of each input and one of the sum). DDP divides the bucket by
the world size *before* encoding, so the fp16 sum cannot overflow unless an input already did.
A non-finite value stays non-finite (a NaN whose payload lies only in the low 16 bits may become
an infinity in bf16), so the non-finite check after the allreduce still sees it.
"""

from __future__ import annotations

import threading

import numpy as np

from distprop import backend

KINDS = ("fp16", "bf16")

_local = threading.local()


def _workspace(xp, n: int, slot: int):
    """A cached uint32 scratch array of at least ``n`` elements (per thread, per slot)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (xp.__name__, slot)
    arr = cache.get(key)
    if arr is None or arr.size < n:
        arr = xp.empty(max(n, 1), dtype=np.uint32)
        cache[key] = arr
    return arr[:n]


def _bf16_round(bits32, scratch, out16) -> None:
    """out16 = bfloat16 bits of the float32 values whose bits are ``bits32`` (round to nearest
    even); ``scratch`` is a uint32 array of the same size."""
    xp = backend.get_array_module(bits32)
    xp.right_shift(bits32, 16, out=scratch)
    xp.bitwise_and(scratch, 1, out=scratch)
    scratch += 0x7FFF
    scratch += bits32
    xp.right_shift(scratch, 16, out=scratch)
    out16[...] = scratch  # narrowing copy: the value now fits in 16 bits


def encode(src, out16, kind: str) -> None:
    """Write ``src`` (a float array) into the uint16 array ``out16`` as ``kind`` words."""
    xp = backend.get_array_module(src)
    if kind == "fp16":
        out16.view(xp.float16)[...] = src
        return
    if kind != "bf16":
        raise ValueError(f"unknown compression {kind!r}: expected one of {', '.join(KINDS)}")
    n = src.size
    if src.dtype == np.float32 and src.flags.c_contiguous:
        bits = src.view(np.uint32)
    else:
        bits = _workspace(xp, n, 0)
        bits.view(np.float32)[...] = src.reshape(-1)
    _bf16_round(bits, _workspace(xp, n, 1), out16)


def decode(src16, out, kind: str) -> None:
    """Write the ``kind`` words in ``src16`` (uint16) into the float array ``out``."""
    xp = backend.get_array_module(src16)
    if kind == "fp16":
        out[...] = src16.view(xp.float16)
        return
    if kind != "bf16":
        raise ValueError(f"unknown compression {kind!r}: expected one of {', '.join(KINDS)}")
    if out.dtype == np.float32 and out.flags.c_contiguous:
        bits = out.reshape(-1).view(np.uint32)
        bits[...] = src16
        bits <<= 16
        return
    bits = _workspace(xp, src16.size, 0)
    bits[...] = src16
    bits <<= 16
    out.reshape(-1)[...] = bits.view(np.float32)


def _fp16_sum(inbuf, inoutbuf, datatype) -> None:
    a = np.frombuffer(inbuf, dtype=np.float16)
    b = np.frombuffer(inoutbuf, dtype=np.float16)
    np.add(a, b, out=b)


def _bf16_sum(inbuf, inoutbuf, datatype) -> None:
    a = np.frombuffer(inbuf, dtype=np.uint16)
    b = np.frombuffer(inoutbuf, dtype=np.uint16)
    n = a.size
    wa, wb = _workspace(np, n, 2), _workspace(np, n, 3)
    wa[...] = a
    wa <<= 16
    wb[...] = b
    wb <<= 16
    fb = wb.view(np.float32)
    fb += wa.view(np.float32)
    _bf16_round(wb, wa, b)


_MPI_OPS: dict[str, object] = {}


def mpi_sum_op(kind: str):
    """The MPI user-defined (commutative) sum for 16-bit ``kind`` words, created once."""
    op = _MPI_OPS.get(kind)
    if op is None:
        from mpi4py import MPI  # noqa: PLC0415

        fn = {"fp16": _fp16_sum, "bf16": _bf16_sum}[kind]
        op = _MPI_OPS[kind] = MPI.Op.Create(fn, commute=True)
    return op
