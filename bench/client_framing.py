"""The client's cost per request: its Python framing vs the compiled framing, side by side.

    python bench/client_framing.py [--requests 5000] [--repeats 5] [--server-cpus 0] [--client-cpus 1]

One `python -m vasipc.serve` on the tiny detector (`_common.tiny_model`), pinned to
`--server-cpus`; this process (pinned to `--client-cpus`) makes `--requests` sequential
round trips over one persistent connection, per round and in rotating order, with:
- `python`: `vasipc.client._Connection.exchange`, what `Client` runs (socket.sendall,
  recv_into a buffer of the prefix's length, wirejson.loads);
- `compiled`: `vasipc._fast.framing.send_message` + `MessageReader.read_message` on the
  same socket's fd, then wirejson.loads of the body.
Requests are `health` (a 60-byte answer) and `info` (the model's description, ~1 KB).
Figures per round: the client thread's CPU time per request (time.thread_time) and the
wall round trip p50; the table gives medians over rounds and compiled/python ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from _common import machine, parse_cpus, server, spread, tiny_model, vasipc_cmd

from vasipc import wirejson
from vasipc._fast import framing
from vasipc.client import _Connection, _encode

IMPLS = ("python", "compiled")
OPS = ("health", "info")


def python_call(path: str) -> tuple[Callable[[bytes], dict], Callable[[], None]]:
    conn = _Connection(path, time.monotonic() + 60)
    return (lambda frame: conn.exchange(frame, time.monotonic() + 60)), conn.close


def compiled_call(path: str) -> tuple[Callable[[bytes], dict], Callable[[], None]]:
    conn = _Connection(path, time.monotonic() + 60)
    conn.sock.settimeout(None)
    fd = conn.sock.fileno()
    reader = framing.MessageReader(fd, 256 * 1024 * 1024)

    def call(frame: bytes) -> dict:
        framing.send_message(fd, memoryview(frame)[4:], 60.0)
        return wirejson.loads(reader.read_message(60.0, 60.0))

    return call, conn.close


def measure(make, path: str, frame: bytes, requests: int) -> tuple[float, float]:
    """(client CPU µs per request, wall p50 µs) over `requests` round trips."""
    call, close = make(path)
    try:
        for _ in range(200):
            call(frame)
        walls = []
        cpu0 = time.thread_time()
        for _ in range(requests):
            t = time.perf_counter()
            call(frame)
            walls.append(time.perf_counter() - t)
        cpu = time.thread_time() - cpu0
    finally:
        close()
    return cpu / requests * 1e6, statistics.median(walls) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--client-cpus", default="1")
    args = ap.parse_args()
    client_cpus = parse_cpus(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    makers = {"python": python_call, "compiled": compiled_call}
    tmp = tempfile.mkdtemp(prefix="vasipc-client-framing-")
    try:
        model, sock = os.path.join(tmp, "tiny.onnx"), os.path.join(tmp, "s.sock")
        tiny_model(model)
        cpu: dict = {(impl, op): [] for impl in IMPLS for op in OPS}
        wall: dict = {(impl, op): [] for impl in IMPLS for op in OPS}
        with server(vasipc_cmd(model, sock), sock, cpus=parse_cpus(args.server_cpus)):
            for r in range(args.repeats):
                order = IMPLS if r % 2 == 0 else IMPLS[::-1]
                for op in OPS:
                    frame = _encode({"op": op})
                    for impl in order:
                        c, w = measure(makers[impl], sock, frame, args.requests)
                        cpu[impl, op].append(c)
                        wall[impl, op].append(w)
        print(machine())
        print(f"{args.requests} requests x {args.repeats} rounds; median (min-max, ±half-range)")
        print("| op | framing | client CPU / request µs | round trip p50 µs | CPU ratio compiled/python |")
        print("|---|---|---|---|---|")
        for op in OPS:
            ratios = [c / p for c, p in zip(cpu["compiled", op], cpu["python", op], strict=True)]
            for impl in IMPLS:
                ratio = spread(ratios, ".2f") if impl == "compiled" else ""
                print(f"| {op} | {impl} | {spread(cpu[impl, op])} | {spread(wall[impl, op])} | {ratio} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
