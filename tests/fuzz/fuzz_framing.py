#!/usr/bin/env python3
"""Coverage-guided fuzzing of vasipc._fast.framing with atheris (libFuzzer), optional.

Each input is one connection's byte stream: its first byte picks max_message_bytes,
the rest goes through a socketpair, then EOF. The compiled reader and the pure-Python
reference (tests/reference_framing.py) must make the same of it, and
json_depth_exceeds must agree with its reference on every body. Any difference, or a
crash, is a finding.

    pip install atheris
    python tests/fuzz/fuzz_framing.py -max_len=4096 -runs=200000   # or -max_total_time=60
    python tests/fuzz/fuzz_framing.py crash-<hash>                  # replay a finding

As is, libFuzzer's coverage comes from the Python reference only (atheris instruments
Python). To guide it by the compiled module's own branches as well, build it with
clang and -fsanitize=fuzzer-no-link,address (CC=clang, extra flags through CMake) and
run with atheris' asan_with_fuzzer.so in LD_PRELOAD, as atheris' documentation for
native extensions describes. The Hypothesis tests in test_framing.py cover the same
ground in the normal test run.
"""

from __future__ import annotations

import os
import socket
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    import reference_framing

from vasipc._fast import framing

# The whole stream is written before reading: keep it inside the socket buffer.
MAX_STREAM = 32 * 1024


def outcomes(impl, stream: bytes, max_bytes: int) -> list[object]:
    server, peer = socket.socketpair()
    with server, peer:
        peer.sendall(stream)
        peer.shutdown(socket.SHUT_WR)
        reader = impl.MessageReader(server.fileno(), max_bytes)
        seen: list[object] = []
        try:
            while True:
                try:
                    body = reader.read_message(5.0, 5.0)
                except framing.FramingError as exc:
                    seen.append((type(exc).__name__, getattr(exc, "length", None)))
                    return seen
                if body is None:
                    seen.append(None)
                    return seen
                data = bytes(body)
                depth = framing.json_depth_exceeds(data, 3)
                assert depth == reference_framing.json_depth_exceeds(data, 3), data
                seen.append(data)
        finally:
            if hasattr(reader, "close"):
                reader.close()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    max_bytes = 1 + data[0]
    stream = data[1 : 1 + MAX_STREAM]
    compiled = outcomes(framing, stream, max_bytes)
    reference = outcomes(reference_framing, stream, max_bytes)
    if compiled != reference:
        raise AssertionError(f"compiled {compiled!r} != reference {reference!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
