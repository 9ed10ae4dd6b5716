"""Hands the memory the C allocator holds free back to the system, once in a while.

A server answering a stream of short requests from several threads (the I/O thread, the
batcher's workers) frees what it allocates, yet glibc's heaps keep growing slowly under
that churn: a chunk still in use near the top of a heap keeps the free pages below it
from being returned, so RSS creeps up with in-use bytes flat (bench/RESULTS.md, issue
12: +0.4-0.5 MB per million messages of connection churn). `malloc_trim(0)` returns the
free pages of every heap. `HeapTrimmer.maybe_trim`, called from the server's main loop,
runs it at most once per interval; where the C library has no `malloc_trim` (not glibc)
it does nothing.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

TRIM_INTERVAL_S = 30.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim from the process's own C library, or None where there is none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """`maybe_trim` returns the allocator's free pages to the system once `interval_s` has
    passed since the last time (or since it was made)."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._trim = _malloc_trim()
        self._interval = interval_s
        self._clock = clock
        self._due = clock() + interval_s

    @property
    def available(self) -> bool:
        """Whether this C library can trim (glibc)."""
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed; whether it did."""
        now = self._clock()
        if self._trim is None or now < self._due:
            return False
        self._due = now + self._interval
        self._trim(0)
        return True
