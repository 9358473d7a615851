"""The process heap (glibc): keep freed memory for the next step instead of handing it back.

A training step allocates and frees the same large temporaries every step (activations, their
gradients, column matrices). By default glibc serves allocations above its mmap threshold
(128 KiB, raised as big blocks are freed, at most to 32 MiB) with fresh pages, and hands the top
of its heap back to the system once more than twice that is free. So every step pays again, in
page faults, for memory the last step had already touched: on the 2-core VM the benchmarks run
on, 5 K minor faults (12 ms, a quarter of the step) per step of the zoo cnn and 12 K (28 ms, a
quarter too) per step of the zoo transformer, against PyTorch's 3 K and 2 K.

At import, distprop raises both thresholds with ``mallopt``: allocations up to
:data:`MMAP_THRESHOLD` come from the heap, and up to :data:`TRIM_THRESHOLD` of free heap stays
with the process. After the first step a training loop then takes no page faults at all. The
cost: resident memory stays near its high-water mark instead of shrinking after a peak (the
peak itself grew by 1-2 MB on the zoo models, ``benchmarks/results/heap.md``).

Left alone: ``DISTPROP_MALLOC=system``; thresholds the user set in the environment
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_`` or their ``glibc.malloc`` tunables); C libraries other than glibc. An
allocator preloaded in glibc's place (jemalloc, tcmalloc) does not read glibc's settings, so
they cost nothing there.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 256 << 20  # bytes: larger blocks still get pages of their own
TRIM_THRESHOLD = 1 << 30  # bytes of free heap kept before any is handed back

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold",
                  "glibc.malloc.top_pad", "glibc.malloc.mmap_max")
CHOICES = ("keep", "system")

#: What :func:`keep_freed_memory` did in this process, in words (``distprop info`` shows it).
state = "not applied yet"


def _glibc():
    """The C library when it is glibc (it exports ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(environ=None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process, unless told not to (see the
    module docstring). Returns whether the thresholds were set; :data:`state` says why not.

    Raises:
        ValueError: ``DISTPROP_MALLOC`` is neither ``keep`` nor ``system``.
    """
    global state
    env = os.environ if environ is None else environ
    choice = env.get("DISTPROP_MALLOC", "keep").strip().lower() or "keep"
    if choice not in CHOICES:
        raise ValueError(f"DISTPROP_MALLOC must be one of {', '.join(CHOICES)}, got "
                         f"{env['DISTPROP_MALLOC']!r}")
    if choice == "system":
        state = "glibc defaults (DISTPROP_MALLOC=system)"
        return False
    mine = [name for name in _USER_SETTINGS if name in env]
    tunables = [item.split("=")[0].strip() for item in env.get("GLIBC_TUNABLES", "").split(":")]
    if any(name in _USER_TUNABLES for name in tunables):
        mine.append("GLIBC_TUNABLES")
    if mine:
        state = f"the environment's malloc settings ({', '.join(mine)})"
        return False
    libc = _glibc()
    if libc is None:
        state = "not glibc: the C library's own policy"
        return False
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        state = "glibc refused the thresholds: its defaults"
        return False
    state = (f"freed memory kept (glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim "
             f"threshold {TRIM_THRESHOLD >> 20} MiB)")
    return True
