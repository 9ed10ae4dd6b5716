"""Null round trip (`health`): vasipc's server vs a plain threaded Python socket server.

    python bench/ipc.py [--requests 10000] [--duration 5] [--connections 16] [--repeats 3]

Both servers run as subprocesses and are driven by the same client (bench/_common.drive:
spawned client processes, one persistent connection each):
- latency at concurrency 1: p50 / p99 over `--requests` sequential requests;
- throughput at `--connections` concurrent connections for `--duration` seconds.
The rounds alternate the servers, so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socketserver
import struct
import sys
import tempfile
import time

from _common import PYTHON, drive, encode, machine, nudenet_model, parse_cpus, server, spread, vasipc_cmd

HEALTH = encode({"op": "health"})


# --- the baseline: one thread per connection, struct + json --------------------------------

class _PlainHandler(socketserver.StreamRequestHandler):
    started = time.monotonic()

    def handle(self) -> None:
        while len(head := self.rfile.read(4)) == 4:
            (n,) = struct.unpack(">I", head)
            json.loads(self.rfile.read(n))
            body = json.dumps({
                "op": "health", "status": "ok", "ready": True, "model_id": "bench",
                "uptime_s": round(time.monotonic() - self.started, 3), "in_flight": 0,
                "requests_total": 0}).encode()
            self.wfile.write(struct.pack(">I", len(body)) + body)


class PlainServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128


def serve_plain(path: str) -> None:
    with PlainServer(path, _PlainHandler) as srv:
        srv.serve_forever()


# --- the run -------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10000, help="concurrency-1 requests")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-cpus", help="pin the servers to these CPUs, e.g. 0,1")
    ap.add_argument("--client-cpus", help="pin the client processes to these CPUs, e.g. 2-15")
    ap.add_argument("--serve-plain", metavar="SOCKET", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_plain:
        return serve_plain(args.serve_plain)

    tmp = tempfile.mkdtemp(prefix="vasipc-bench-")
    socks = {"vasipc": os.path.join(tmp, "vasipc.sock"), "plain": os.path.join(tmp, "plain.sock")}
    cmds = {"vasipc": vasipc_cmd(nudenet_model(), socks["vasipc"]),
            "plain": [PYTHON, os.path.abspath(__file__), "--serve-plain", socks["plain"]]}
    server_cpus, client_cpus = parse_cpus(args.server_cpus), parse_cpus(args.client_cpus)
    print(f"# ipc: {machine()}; server CPUs {args.server_cpus or 'any'}, client CPUs "
          f"{args.client_cpus or 'any'}", flush=True)
    rows: dict[str, dict[str, list[float]]] = {
        name: {"p50": [], "p99": [], "rps": [], "cpu1": [], "cpun": []} for name in socks}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        pids = {name: stack.enter_context(server(cmds[name], socks[name], cpus=server_cpus)).pid
                for name in socks}
        for rnd in range(args.repeats):
            order = list(socks) if rnd % 2 == 0 else list(socks)[::-1]
            for name in order:
                c1 = drive(socks[name], [HEALTH], 1, requests=args.requests, warmup=500,
                           cpus=client_cpus, server_pid=pids[name])
                cn = drive(socks[name], [HEALTH], args.connections, duration=args.duration,
                           cpus=client_cpus, server_pid=pids[name])
                r = rows[name]
                for key, value in (("p50", c1.p(50) * 1e3), ("p99", c1.p(99) * 1e3),
                                   ("rps", cn.rps), ("cpu1", c1.cpu_per_request_s * 1e6),
                                   ("cpun", cn.cpu_per_request_s * 1e6)):
                    r[key].append(value)
                print(f"round {rnd + 1} {name:6s}: c1 p50 {r['p50'][-1]:.1f} us, "
                      f"p99 {r['p99'][-1]:.1f} us, server CPU {r['cpu1'][-1]:.1f} us/req "
                      f"({c1.requests} req); c{args.connections} {cn.rps:,.0f} req/s, "
                      f"server CPU {r['cpun'][-1]:.1f} us/req ({cn.requests} req in "
                      f"{cn.elapsed_s:.1f} s)", flush=True)

    print("\n| health round trip | vasipc | plain threaded | vasipc / plain |\n|---|---|---|---|")
    n = args.connections
    for key, label, fmt in (("p50", "c1 p50 (us)", ".1f"), ("p99", "c1 p99 (us)", ".0f"),
                            ("rps", f"c{n} throughput (req/s)", ",.0f"),
                            ("cpu1", "c1 server CPU per request (us)", ".1f"),
                            ("cpun", f"c{n} server CPU per request (us)", ".1f")):
        v, p = rows["vasipc"][key], rows["plain"][key]
        ratios = [a / b for a, b in zip(v, p, strict=True)]
        print(f"| {label} | {spread(v, fmt)} | {spread(p, fmt)} | {spread(ratios, '.2f')} |")
    print(f"\nmedian (min-max, ±half-range) of {args.repeats} rounds; ratio per round. "
          f"c1: {args.requests} requests per round on one persistent connection. Server CPU: "
          "user + system time of the server process / requests served (warm-up included).")


if __name__ == "__main__":
    sys.exit(main())
