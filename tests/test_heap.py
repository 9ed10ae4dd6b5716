"""vasipc.heap: the server's periodic malloc_trim (RSS under churn, bench/RESULTS.md issue 12)."""

from __future__ import annotations

import platform

import pytest

from vasipc.heap import HeapTrimmer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trims_once_per_interval() -> None:
    clock = Clock()
    heap = HeapTrimmer(interval_s=30.0, clock=clock)
    assert heap.available
    assert not heap.maybe_trim()  # not before the first interval has passed
    clock.now += 29.9
    assert not heap.maybe_trim()
    clock.now += 0.1
    assert heap.maybe_trim()
    assert not heap.maybe_trim()  # the next one is an interval later
    clock.now += 30.0
    assert heap.maybe_trim()
