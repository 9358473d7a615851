"""Parsing and formatting of the quantities the bench CLI takes: sizes, rank lists, bandwidths."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes in ``"64"``, ``"1KB"``, ``"4MiB"``, ``"1.5GB"`` (K/M/G/T are powers of 1024)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}: expected a number with an optional unit "
                         "B, KB, MB, GB (e.g. 1KB, 256MB)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if value < 1:
        raise ValueError(f"size {text!r} is smaller than one byte")
    return int(value)


def format_size(n: float) -> str:
    """``1024`` -> ``"1KB"``, ``3 * 2**20`` -> ``"3MB"``."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{int(n)}B"


def _geometric(lo: float, hi: float, factor: int) -> list[int]:
    if factor < 2:
        raise ValueError(f"range factor must be >= 2, got {factor}")
    out, v = [], lo
    while v <= hi:
        out.append(int(v))
        v *= factor
    return out


def parse_sizes(text: str, factor: int = 2) -> list[int]:
    """``"1KB..256MB"`` (every ``factor``-fold step from low to high) or ``"1KB,1MB,64MB"``."""
    text = str(text).strip()
    if ".." in text:
        lo_text, _, hi_text = text.partition("..")
        lo, hi = parse_size(lo_text), parse_size(hi_text)
        if lo > hi:
            raise ValueError(f"size range {text!r} runs backwards")
        return _geometric(lo, hi, factor)
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` or ``"8..4096"`` (powers of two from low to high) -> sorted unique counts."""
    text = str(text).strip()
    try:
        if ".." in text:
            lo_text, _, hi_text = text.partition("..")
            lo, hi = int(lo_text), int(hi_text)
            if lo < 1 or lo > hi:
                raise ValueError
            ranks = _geometric(lo, hi, 2)
        else:
            ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"cannot parse rank counts {text!r}: expected e.g. 1,2,4 or 8..4096") from None
    if not ranks or min(ranks) < 1:
        raise ValueError(f"rank counts must be positive integers, got {text!r}")
    return sorted(set(ranks))


_BW_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(bps|bit/s|b/s|B/s|Bps)\s*$")
_BW_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(text: str) -> float:
    """Bytes per second in ``"100Gbps"``, ``"100Gb/s"`` (bits) or ``"12.5GB/s"``, ``"25GBps"``
    (bytes). Network prefixes are decimal (1 Gbps = 1e9 bit/s)."""
    m = _BW_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse bandwidth {text!r}: expected e.g. 100Gbps or 12.5GB/s")
    value = float(m.group(1)) * _BW_SCALE[m.group(2).lower()]
    unit = m.group(3)
    is_bytes = unit in ("B/s", "Bps")
    if value <= 0:
        raise ValueError(f"bandwidth must be positive, got {text!r}")
    return value if is_bytes else value / 8.0
