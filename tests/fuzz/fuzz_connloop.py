#!/usr/bin/env python3
"""Coverage-guided fuzzing of vasipc._fast.connloop with atheris (libFuzzer), optional.

Each input is one client connection to a running ConnectionLoop (one loop per limit and
pipeline depth, kept across inputs). Its first bytes pick max_message_bytes, the
pipeline depth, how on_message answers (returned; sent from inside the callback; from a
worker thread that answers what is pending in random order; or a mix), where the stream
is cut into writes and whether the client pauses between them; the rest is the byte
stream: raw, or built from (length byte, body) pairs so that long runs of valid frames,
big frames, zero lengths and truncated tails are common. The client sends the stream
and EOF and reads until the loop closes the connection. It must receive exactly what
tests/reference_framing.py predicts for the same stream: each whole body answered, in
order; a zero or oversize length answered with the marker, then the close; a truncated
tail dropped. Any difference, a hang (a 10 s client timeout), a failed or refused
send_response, a loop thread that died, or a crash is a finding.

    pip install atheris
    python tests/fuzz/fuzz_connloop.py -max_len=8192 -runs=100000   # or -max_total_time=600
    python tests/fuzz/fuzz_connloop.py crash-<hash>                 # replay a finding

As is, libFuzzer's coverage comes from the Python reference and this harness's stream
builder only (atheris instruments Python). To guide it by connloop's own branches as well, build it
with clang and -fsanitize=fuzzer-no-link,address (CC=clang, extra flags through CMake)
and run with atheris' asan_with_fuzzer.so in LD_PRELOAD, as atheris' documentation for
native extensions describes; for ASan alone, build with `build.py --sanitize address`
(in a copy of the tree) and preload libasan as the README says. The Hypothesis tests at
the end of test_connloop.py cover the same ground in the normal test run.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import sys
import threading
import time

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from vasipc._fast import connloop, framing  # noqa: F401 - imported here: not instrumented

with atheris.instrument_imports():
    import reference_framing
from connloop_answerer import MODES, Answerer, answer_for, bad_answer_for

PREFIX = struct.Struct(">I")
LONG = 10.0  # no wait in a passing run comes near this
MAX_STREAM = 64 * 1024
# Limits and depths of the loops: tiny ones make most lengths too large; the others sit
# at the loop's first read buffer (16 KiB) and above the size its read buffer shrinks
# back from (64 KiB).
MAX_BYTES = [1, 3, 16, 100, 255, 16384, 70000]
DEPTHS = [1, 2, 64]
# Body sizes of the "big frame" opcode of the built streams.
BIG_SIZES = [16379, 16380, 16383, 16384, 16385, 65532, 65536, 65537, 70000]
PEER_GONE = (BrokenPipeError, ConnectionResetError)


def frame(body: bytes) -> bytes:
    return PREFIX.pack(len(body)) + body


ANSWERER = Answerer()  # one for every loop: `mode` is set per input


class Server:
    def __init__(self, max_bytes: int, depth: int) -> None:
        # Linux's abstract namespace: nothing is left in the filesystem when libFuzzer exits.
        self.path = f"\0vasipc-fuzz-connloop-{os.getpid()}-{max_bytes}-{depth}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.loop = connloop.ConnectionLoop(
            self.listener.fileno(), ANSWERER.on_message, ANSWERER.on_bad_length,
            max_message_bytes=max_bytes, read_timeout=LONG, idle_timeout=LONG,
            write_timeout=LONG, max_connections=100, pipeline_depth=depth)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()


SERVERS: dict[tuple[int, int], Server] = {}


def server_for(max_bytes: int, depth: int) -> Server:
    if (max_bytes, depth) not in SERVERS:
        SERVERS[max_bytes, depth] = Server(max_bytes, depth)
    return SERVERS[max_bytes, depth]


@atheris.instrument_func
def build_stream(ops: bytes) -> bytes:
    """A stream from opcodes: 0 a zero length; 1 four raw bytes (any length, mostly too
    large); 2 a big frame (size from BIG_SIZES); n >= 3 a frame of the next n - 2
    bytes, cut short (a truncated tail) when the input ends first."""
    out = bytearray()
    i = 0
    while i < len(ops):
        op = ops[i]
        i += 1
        if op == 0:
            out += PREFIX.pack(0)
        elif op == 1:
            out += ops[i : i + 4]
            i += 4
        elif op == 2:
            pick = ops[i] if i < len(ops) else 0
            i += 1
            out += frame(bytes([pick]) * BIG_SIZES[pick % len(BIG_SIZES)])
        else:
            body = ops[i : i + op - 2]
            i += op - 2
            out += PREFIX.pack(op - 2) + body
    return bytes(out)


def run_in_thread(target) -> tuple[threading.Thread, list[BaseException]]:
    failure: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # re-raised by the input
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failure


def reference_answers(stream: bytes, max_bytes: int) -> list[bytes]:
    server, peer = socket.socketpair()
    outcome: list[object] = []
    with server, peer:
        def send() -> None:
            try:
                peer.sendall(stream)
                peer.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reader stopped after an error

        reader = reference_framing.MessageReader(server.fileno(), max_bytes)
        writer, _ = run_in_thread(send)
        try:
            while True:
                try:
                    body = reader.read_message(LONG, LONG)
                except reference_framing.ZeroLength:
                    outcome.append(0)
                    break
                except reference_framing.TooLarge as exc:
                    outcome.append(exc.length)
                    break
                except reference_framing.ConnectionClosed:
                    break
                if body is None:
                    break
                outcome.append(bytes(body))
            server.shutdown(socket.SHUT_RD)
        finally:
            reader.close()
            writer.join(LONG)
    return [answer_for(slot, item) if isinstance(item, bytes) else bad_answer_for(slot, item)
            for slot, item in enumerate(outcome)]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def loop_answers(server: Server, chunks: list[bytes], pause: bool) -> list[bytes]:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(LONG)
    with client:
        client.connect(server.path)

        def send() -> None:
            try:
                for chunk in chunks:
                    client.sendall(chunk)
                    if pause:
                        time.sleep(0.0001)
                client.shutdown(socket.SHUT_WR)
            except PEER_GONE:
                pass  # closed after a bad length: the expected end

        sender, failure = run_in_thread(send)
        got: list[bytes] = []
        try:
            while True:
                head = client.recv(4)
                if not head:
                    break
                head += recv_exact(client, 4 - len(head))
                got.append(recv_exact(client, PREFIX.unpack(head)[0]))
        except ConnectionResetError:
            pass  # closed with unread request bytes: every answer came first
        finally:
            sender.join(LONG)
        if failure:
            raise failure[0]
        if sender.is_alive():
            raise AssertionError("the client's sender hung")
    return got


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_bytes = fdp.PickValueInList(MAX_BYTES)
    depth = fdp.PickValueInList(DEPTHS)
    ANSWERER.mode = fdp.PickValueInList(MODES)
    built = fdp.ConsumeBool()
    pause = fdp.ConsumeBool()
    cuts = [fdp.ConsumeIntInRange(0, MAX_STREAM) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    rest = fdp.ConsumeBytes(MAX_STREAM)
    stream = build_stream(rest) if built else rest
    points = sorted({c % len(stream) for c in cuts} | {0, len(stream)}) if stream else []
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]

    server = server_for(max_bytes, depth)
    expected = reference_answers(stream, max_bytes)
    got = loop_answers(server, chunks, pause)
    if got != expected:
        raise AssertionError(
            f"loop answers differ from the reference (max {max_bytes}, depth {depth}, "
            f"mode {ANSWERER.mode}): got {[a[:40] for a in got]!r}, "
            f"expected {[a[:40] for a in expected]!r}")
    if ANSWERER.errors:
        raise AssertionError(f"answerer errors: {ANSWERER.errors}")
    if not server.thread.is_alive():
        raise AssertionError("the loop thread died")
    deadline = time.monotonic() + LONG
    while server.loop.connections:  # the client saw the close; the loop is a step behind
        if time.monotonic() > deadline:
            raise AssertionError(f"{server.loop.connections} connections left open")
        time.sleep(0.0005)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
