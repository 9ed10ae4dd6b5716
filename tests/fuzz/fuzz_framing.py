#!/usr/bin/env python3
"""Coverage-guided fuzzing of vasipc._fast.framing (json_depth_exceeds) with atheris (libFuzzer), optional.

Each input's first byte picks max_depth (-1 to 14), the rest is the body: the compiled
depth scan and its pure-Python reference (tests/reference_framing.py) must agree, as a
whole and on the buffer types the server hands it (bytes, a memoryview slice). Any
difference, or a crash, is a finding.

    pip install atheris
    python tests/fuzz/fuzz_framing.py -max_len=4096 -runs=200000   # or -max_total_time=60
    python tests/fuzz/fuzz_framing.py crash-<hash>                  # replay a finding

As is, libFuzzer's coverage comes from the Python reference only (atheris instruments
Python). To guide it by the compiled module's own branches as well, build it with
clang and -fsanitize=fuzzer-no-link,address (CC=clang, extra flags through CMake) and
run with atheris' asan_with_fuzzer.so in LD_PRELOAD, as atheris' documentation for
native extensions describes. The Hypothesis test in test_framing.py covers the same
ground in the normal test run.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    import reference_framing

from vasipc._fast import framing


def test_one_input(data: bytes) -> None:
    if not data:
        return
    max_depth = data[0] % 16 - 1
    body = data[1:]
    expected = reference_framing.json_depth_exceeds(body, max_depth)
    for view in (body, memoryview(data)[1:]):
        got = framing.json_depth_exceeds(view, max_depth)
        if got != expected:
            raise AssertionError(f"compiled {got} != reference {expected} "
                                 f"(max_depth {max_depth}, body {body!r})")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
