"""Half-precision gradient compression: fp16 and bf16 codecs and their float32 sum.

A compressed bucket travels as 16-bit words: IEEE half (``fp16``) or bfloat16 (``bf16``, the top
16 bits of a float32, rounded to nearest even). NumPy has no bfloat16 dtype, so bf16 values live
in ``uint16`` arrays. Both conversions are done in whole-array NumPy passes (NumPy's own float16
casts take a slow per-element path, 8-90 ms/MB here, worst on the tiny values gradients are full
of): bf16 with integer bit operations, fp16 by letting the float unit round (Maratyszcza's
method, ~17 passes), chunk by chunk so the scratch arrays stay in cache; the NaN check is one max
reduction and the NaN fix-up runs only for a chunk that has one. CuPy uses its native casts.
The results are bit-identical to a correctly rounded cast (``astype(float16)``,
``torch.bfloat16``); tests/test_codec.py checks them against torch.

Reduction (MPI path, ``MPICommunicator.iallreduce`` of 16-bit words): no user-defined MPI
operation (its per-message Python callback, two decodes and one encode per call, was the cost
that made compression lose on fast links). Each rank receives every rank's copy of its own chunk
(alltoall), ``sum_words`` widens them to float32, adds them in rank order and rounds once, and
an allgather returns the summed chunks. The allreduce moves half the bytes of a float32 one; for
2 ranks the result is bit-identical to the former operation (one rounding of each input and one
of the sum); for more ranks the sum is rounded once, not once per step, and is the same on every
rank.
DDP divides the bucket by the world size *before* encoding, so the fp16 sum cannot overflow
unless an input already did. Infinities and NaNs stay what they are, so the non-finite check
after the allreduce sees them. fp16 decoding is a lookup in a 64K-entry table (256 KiB).
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from distprop import backend

KINDS = ("fp16", "bf16")  # the codecs below (registry.COMPRESSIONS names their hooks)
_CHUNK = 1 << 15  # elements per chunk of the NumPy kernels (128 KiB per uint32 scratch array)

_HIGH = 1 if sys.byteorder == "little" else 0  # the uint16 half of a uint32 with the sign bit
_local = threading.local()


def _scratch(slot: int, dtype=np.uint32) -> np.ndarray:
    """A per-thread scratch array of ``_CHUNK`` elements."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (slot, np.dtype(dtype).str)
    arr = cache.get(key)
    if arr is None:
        arr = cache[key] = np.empty(_CHUNK, dtype=dtype)
    return arr


# -- float32 bits <-> 16-bit words, on one NumPy chunk ----------------------------------------


def _bf16_from_bits(bits, out16, tmp, a) -> None:
    """out16 = bfloat16 of the float32 values with bits ``bits`` (round to nearest even; a NaN
    stays a (quiet) NaN)."""
    np.right_shift(bits, 16, out=tmp)
    tmp &= 1
    tmp += 0x7FFF
    tmp += bits
    tmp >>= 16
    np.add(bits, bits, out=a)  # without the sign
    if a.max() > 0xFF000000:  # a NaN (rare): keep it (rounding could carry it into infinity)
        np.copyto(tmp, (bits >> 16) | 0x0040, where=a > 0xFF000000)
    out16[...] = tmp  # narrowing copy: the value now fits in 16 bits


_TO_INF = np.float32(2.0 ** 112)  # |x| >= 65520 (rounds past the largest half) -> infinity
_TO_HALF = np.float32(2.0 ** -110)  # with _TO_INF: x * 4, the exponent offset the bias undoes


def _fp16_from_bits(bits, out16, f, s, b, r) -> None:
    """out16 = IEEE half of the float32 values with bits ``bits``, rounded to nearest even.

    M. Maratyszcza's fp16_ieee_from_fp32_value (FP16 library), in NumPy passes: the float unit
    does the rounding. Adding 2**(e - 11) (e: the input's exponent, at least the half's
    smallest normal one) to |x| * 4 leaves exactly the half's 11 significant bits in the float32
    mantissa, rounded to nearest even, subnormal halves included; the half's exponent and
    mantissa are then read off the sum's bits. Overflow becomes infinity through the first
    scaling, NaN is set apart. uint32 arithmetic wraps modulo 2**32."""
    fu = f.view(np.uint32)
    np.bitwise_and(bits, 0x7FFFFFFF, out=fu)  # |x|, and float32 subnormals (they round to 0
    np.maximum(fu, np.uint32(0x00800000), out=fu)  # anyway) raised to the smallest normal:
    f *= _TO_INF  # a subnormal operand costs a microcode assist per element in a multiply
    f *= _TO_HALF
    np.add(bits, bits, out=s)  # the bits without the sign, exponent at the top
    np.bitwise_and(s, 0xFF000000, out=b)
    np.maximum(b, np.uint32(0x71000000), out=b)
    b >>= 1
    b += 0x07800000
    f += b.view(np.float32)
    fb = f.view(np.uint32)
    np.right_shift(fb, 13, out=r)
    r &= 0x7C00
    fb &= 0x0FFF
    r += fb
    if s.max() > 0xFF000000:  # a NaN (rare)
        np.copyto(r, np.uint32(0x7E00), where=s > 0xFF000000)
    out16[...] = r  # narrowing copy: the value now fits in 15 bits
    sign = b.view(np.uint16)[:r.size]
    np.bitwise_and(bits.view(np.uint16)[_HIGH::2], 0x8000, out=sign)  # the sign bits
    out16 |= sign


def _select(dst, cond01, value, tmp) -> None:
    """dst = value where cond01 == 1 else dst (cond01 is 0/1 uint32), without branches: masked
    NumPy loops mispredict on the random patterns gradients produce."""
    np.subtract(value, dst, out=tmp)
    tmp *= cond01
    dst += tmp


def _bits_from_fp16(h16, out, h, t, f) -> None:
    """out (uint32) = float32 bits of the IEEE halves ``h16`` (exact, branch-free)."""
    h[...] = h16
    np.bitwise_and(h, 0x7FFF, out=out)
    out <<= 13
    out += 0x38000000  # normal halves: rebias the exponent by (127 - 15) << 23
    np.bitwise_and(h, 0x7C00, out=t)  # infinity / NaN (exponent all ones): rebias once more
    t += 0x0400
    t >>= 15
    t *= 0x38000000
    out += t
    np.bitwise_and(h, 0x03FF, out=t)  # zero / subnormal: mantissa * 2**-24, exactly
    f[...] = t
    f *= np.float32(2.0 ** -24)
    np.bitwise_and(h, 0x7C00, out=t)
    t -= 1
    t >>= 31  # 1 where the exponent field is zero
    _select(out, t, f.view(np.uint32), h)
    h[...] = h16
    h &= 0x8000
    h <<= 16
    out |= h


def _encode_chunk(src, out16, kind: str) -> None:
    m = src.size
    if src.dtype != np.float32:
        src32 = _scratch(0, np.float32)[:m]
        src32[...] = src
        src = src32
    bits = src.view(np.uint32)
    if kind == "bf16":
        _bf16_from_bits(bits, out16, _scratch(1)[:m], _scratch(2)[:m])
    else:
        with np.errstate(all="ignore"):  # the scaling overflows to infinity on purpose
            _fp16_from_bits(bits, out16, _scratch(1, np.float32)[:m], _scratch(2)[:m],
                            _scratch(3)[:m], _scratch(4)[:m])


_FP16_TABLE: list = []  # [float32 bits of all 65536 halves], built on first use


def _fp16_table() -> np.ndarray:
    """The float32 bit pattern of every IEEE half, indexed by its 16-bit word (256 KiB)."""
    if not _FP16_TABLE:
        words = np.arange(65536, dtype=np.uint32).astype(np.uint16)
        table = np.empty(65536, np.uint32)
        for s in range(0, 65536, _CHUNK):
            _bits_from_fp16(words[s:s + _CHUNK], table[s:s + _CHUNK], _scratch(1),
                            _scratch(2), _scratch(3, np.float32))
        _FP16_TABLE.append(table)
    return _FP16_TABLE[0]


def _decode_chunk(src16, out, kind: str) -> None:
    m = src16.size
    direct = out.dtype == np.float32
    bits = out.view(np.uint32) if direct else _scratch(0)[:m]
    if kind == "bf16":
        bits[...] = src16
        bits <<= 16
    else:  # a table lookup: faster than the bit arithmetic of _bits_from_fp16
        np.take(_fp16_table(), src16, out=bits)
    if not direct:
        with np.errstate(invalid="ignore"):  # signalling NaNs widen to quiet ones
            out[...] = bits.view(np.float32)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown compression {kind!r}: expected one of {', '.join(KINDS)}")


def encode(src, out16, kind: str) -> None:
    """Write ``src`` (a float array) into the uint16 array ``out16`` as ``kind`` words."""
    _check_kind(kind)
    xp = backend.get_array_module(src)
    if xp is not np:
        _encode_device(xp, src, out16, kind)
        return
    src, flat = np.ascontiguousarray(src).reshape(-1), out16.reshape(-1)
    for s in range(0, src.size, _CHUNK):
        _encode_chunk(src[s:s + _CHUNK], flat[s:s + _CHUNK], kind)


def decode(src16, out, kind: str) -> None:
    """Write the ``kind`` words in ``src16`` (uint16) into the float array ``out``."""
    _check_kind(kind)
    xp = backend.get_array_module(src16)
    if xp is not np:
        _decode_device(xp, src16, out, kind)
        return
    if not out.flags.c_contiguous:
        tmp = np.empty(out.shape, dtype=out.dtype)
        decode(src16, tmp, kind)
        out[...] = tmp
        return
    flat, dst = src16.reshape(-1), out.reshape(-1)
    for s in range(0, flat.size, _CHUNK):
        _decode_chunk(flat[s:s + _CHUNK], dst[s:s + _CHUNK], kind)


def _encode_device(xp, src, out16, kind: str) -> None:
    if kind == "fp16":
        out16.view(xp.float16)[...] = src
        return
    bits = src.astype(xp.float32).reshape(-1).view(xp.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    words = (bits + rounding) >> 16
    words = xp.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x0040, words)
    out16.reshape(-1)[...] = words.astype(xp.uint16)


def _decode_device(xp, src16, out, kind: str) -> None:
    if kind == "fp16":
        out[...] = src16.view(xp.float16)
        return
    out.reshape(-1)[...] = (src16.reshape(-1).astype(xp.uint32) << 16).view(xp.float32)


# -- the 16-bit sum ----------------------------------------------------------------------------


def sum_words(parts, out16, kind: str) -> None:
    """out16 = round16(float(parts[0]) + float(parts[1]) + ...): the 16-bit ``kind`` word
    arrays in ``parts`` (equal sizes) widened to float32, added in list order and rounded once;
    chunk by chunk in cache-sized scratch arrays. ``out16`` may be one of ``parts``."""
    _check_kind(kind)
    acc_all, part_all = _scratch(5, np.float32), _scratch(6, np.float32)
    for s in range(0, out16.size, _CHUNK):
        e = min(s + _CHUNK, out16.size)
        acc, part = acc_all[:e - s], part_all[:e - s]
        _decode_chunk(parts[0][s:e], acc, kind)
        for p in parts[1:]:
            _decode_chunk(p[s:e], part, kind)
            acc += part
        _encode_chunk(acc, out16[s:e], kind)
