"""The fp16/bf16 codec (distprop.distributed.compression) against torch's casts, value by value.

``x.to(torch.float16)`` and ``x.to(torch.bfloat16)`` round to nearest even; the codec must give
the same 16-bit word for every float32 that is not a NaN (NaN stays a quiet NaN of the same
sign). A named table covers the edges (ties, subnormal halves, overflow, infinities, signed
zeros, float32 subnormals); a sweep over the whole float32 bit space (a fixed stride) and chunk
boundaries cover the rest. ``decode`` is checked against torch for all 65536 words in
tests/test_distributed.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from distprop.distributed import compression

torch = pytest.importorskip("torch")

TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}


def torch_words(x: np.ndarray, kind: str) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(TORCH[kind]) \
        .view(torch.int16).numpy().view(np.uint16)


def f32(bits: int) -> float:
    return float(np.array([bits], np.uint32).view(np.float32)[0])


HALF_MIN_SUB = 2.0 ** -24
EDGES = [  # (name, float32 value) - each checked for fp16 and bf16, and negated
    ("zero", 0.0),
    ("one", 1.0),
    ("fp16 tie to even (down)", 1.0 + 2.0 ** -11),
    ("fp16 tie to even (up)", 1.0 + 3 * 2.0 ** -11),
    ("fp16 just above a tie", f32(0x3F801001)),
    ("fp16 just below a tie", f32(0x3F800FFF)),
    ("bf16 tie to even (down)", 1.0 + 2.0 ** -8),
    ("bf16 tie to even (up)", 1.0 + 3 * 2.0 ** -8),
    ("bf16 just above a tie", f32(0x3F808001)),
    ("bf16 carry into the exponent", f32(0x3FFFFFFF)),
    ("largest half", 65504.0),
    ("rounds down to the largest half", 65519.99),
    ("rounds up to fp16 infinity", 65520.0),
    ("large", 1e30),
    ("largest float32", f32(0x7F7FFFFF)),
    ("bf16 rounds up to infinity", f32(0x7F7FFFFF)),
    ("infinity", float("inf")),
    ("smallest normal half", 2.0 ** -14),
    ("just below the smallest normal half", f32(0x387FFFFF)),
    ("largest subnormal half", 2.0 ** -14 - HALF_MIN_SUB),
    ("smallest subnormal half", HALF_MIN_SUB),
    ("half of the smallest subnormal half (tie to 0)", HALF_MIN_SUB / 2),
    ("just above half of it (rounds up)", f32(0x33000001)),
    ("3/2 of the smallest subnormal (tie to 2)", 1.5 * HALF_MIN_SUB),
    ("subnormal tie to even", 5.5 * HALF_MIN_SUB),
    ("below every half", 1e-30),
    ("float32 subnormal", f32(0x00000001)),
    ("largest float32 subnormal", f32(0x007FFFFF)),
    ("smallest float32 normal", f32(0x00800000)),
    ("typical gradient", 3.14159e-4),
    ("tiny gradient", -7.2e-6),
]


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
@pytest.mark.parametrize("name, value", EDGES, ids=[name for name, _ in EDGES])
def test_encode_matches_torch(name, value, kind):
    x = np.array([value, -value], np.float32)
    words = np.empty(2, np.uint16)
    compression.encode(x, words, kind)
    expected = torch_words(x, kind)
    assert [hex(w) for w in words] == [hex(w) for w in expected], name


NANS = [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FBFFFFF, 0xFFC00000, 0xFF800001, 0x7F80FFFF]


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
@pytest.mark.parametrize("bits", NANS, ids=[hex(b) for b in NANS])
def test_a_nan_stays_a_quiet_nan_of_its_sign(bits, kind):
    x = np.array([bits], np.uint32).view(np.float32)
    words = np.empty(1, np.uint16)
    compression.encode(x, words, kind)
    exponent, quiet = (0x7C00, 0x0200) if kind == "fp16" else (0x7F80, 0x0040)
    w = int(words[0])
    assert w & exponent == exponent and w & quiet, hex(w)
    assert (w >> 15) == (bits >> 31), hex(w)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_encode_matches_torch_across_the_float32_bit_space(kind):
    """Every 4099th float32 bit pattern (all exponents, both signs; about a million values)."""
    bits = np.arange(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    keep = ~np.isnan(x)
    words = np.empty(x.size, np.uint16)
    compression.encode(x, words, kind)
    np.testing.assert_array_equal(words[keep], torch_words(x[keep], kind))


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
@pytest.mark.parametrize("size", [1, compression._CHUNK - 1, compression._CHUNK + 3])
def test_chunk_boundaries_and_float64_input(kind, size):
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size) * 10.0 ** rng.uniform(-9, 5, size)
    words, words32 = np.empty(size, np.uint16), np.empty(size, np.uint16)
    compression.encode(x, words, kind)  # float64 in: via float32, as documented
    compression.encode(x.astype(np.float32), words32, kind)
    np.testing.assert_array_equal(words, words32)
    np.testing.assert_array_equal(words, torch_words(x.astype(np.float32), kind))
    back = np.empty(size, np.float32)
    compression.decode(words, back, kind)
    expected = torch.from_numpy(x.astype(np.float32)).to(TORCH[kind]).float().numpy()
    np.testing.assert_array_equal(back, expected)
