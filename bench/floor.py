"""The physical floor: one C client against a C echo server, vasipc and a plain Python server.

    python bench/floor.py [--requests 20000] [--duration 3] [--connections 16] [--repeats 3]

The same C client (bench/c/rt_client.c: per-request clock_gettime, `{"op":"health"}`
round trips, one thread per connection) drives three servers speaking the same framing:
- `c-echo`: bench/c/echo_server.c, a thread per connection that answers every request
  with a fixed health-shaped body without parsing it: what the kernel and a minimal
  server cost, the floor;
- `vasipc`: `python -m vasipc.serve` on nudenet's 320n.onnx, answering `health`;
- `plain`: the thread-per-connection `socketserver` + stdlib json server of bench/ipc.py.
Both C programs are built with `cc -O2` into bench/out/ at run time. Servers are pinned to
`--server-cpus` (default CPU 0), the client to `--client-cpus` (default CPU 1). Per round,
in rotating order: c1 p50/p99 over `--requests` sequential requests, then throughput at
`--connections` connections for `--duration` s. Ratios are taken within a round.
Targets of issue 3: vasipc c1 p50 <= 2x the C floor; c16 throughput >= 3x plain.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile

from _common import (
    PYTHON,
    c_binary,
    machine,
    nudenet_model,
    parse_cpus,
    rt_client,
    server,
    spread,
    vasipc_cmd,
)

IPC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ipc.py")
NAMES = ("c-echo", "vasipc", "plain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="c1 requests per round")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per throughput run")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-cpus", default="0", help="CPUs for the servers (default 0)")
    ap.add_argument("--client-cpus", default="1", help="CPUs for the C client (default 1)")
    args = ap.parse_args()

    server_cpus, client_cpus = parse_cpus(args.server_cpus), parse_cpus(args.client_cpus)
    c_binary("rt_client")
    tmp = tempfile.mkdtemp(prefix="vasipc-floor-")
    socks = {name: os.path.join(tmp, f"{name}.sock") for name in NAMES}
    cmds = {"c-echo": [str(c_binary("echo_server")), socks["c-echo"]],
            "vasipc": vasipc_cmd(nudenet_model(), socks["vasipc"]),
            "plain": [PYTHON, IPC, "--serve-plain", socks["plain"]]}
    print(f"# floor: {machine()}; servers on CPUs {args.server_cpus}, client on CPUs "
          f"{args.client_cpus}", flush=True)
    rows = {name: {"p50": [], "p99": [], "rps": []} for name in NAMES}
    n = args.connections
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        for name in NAMES:
            stack.enter_context(server(cmds[name], socks[name], cpus=server_cpus))
        for rnd in range(args.repeats):
            order = NAMES[rnd % 3:] + NAMES[:rnd % 3]
            for name in order:
                c1 = rt_client(socks[name], 1, args.requests, warmup=1000, cpus=client_cpus)
                cn = rt_client(socks[name], n, 10_000_000, warmup=100, duration=args.duration,
                               cpus=client_cpus)
                r = rows[name]
                r["p50"].append(c1["p50_us"])
                r["p99"].append(c1["p99_us"])
                r["rps"].append(cn["rps"])
                print(f"round {rnd + 1} {name:6s}: c1 p50 {c1['p50_us']:.1f} us, p99 "
                      f"{c1['p99_us']:.1f} us, max {c1['max_us']:.0f} us; c{n} "
                      f"{cn['rps']:,.0f} req/s (p50 {cn['p50_us']:.0f} us, p99 "
                      f"{cn['p99_us']:.0f} us)", flush=True)

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [x / y for x, y in zip(rows[a][key], rows[b][key], strict=True)]

    print("\n| health round trip, C client | c-echo (floor) | vasipc | plain | vasipc / floor "
          "| plain / floor | vasipc / plain |\n|---|---|---|---|---|---|---|")
    for key, label, fmt in (("p50", "c1 p50 (us)", ".1f"), ("p99", "c1 p99 (us)", ".1f"),
                            ("rps", f"c{n} throughput (req/s)", ",.0f")):
        cells = [spread(rows[name][key], fmt) for name in NAMES]
        rats = [spread(ratios(a, b, key), ".2f")
                for a, b in (("vasipc", "c-echo"), ("plain", "c-echo"), ("vasipc", "plain"))]
        print(f"| {label} | {' | '.join(cells)} | {' | '.join(rats)} |")
    p50 = float(sorted(ratios("vasipc", "c-echo", "p50"))[len(rows["vasipc"]["p50"]) // 2])
    rps = float(sorted(ratios("vasipc", "plain", "rps"))[len(rows["vasipc"]["rps"]) // 2])
    print(f"\nmedian (min-max, ±half-range) of {args.repeats} rounds; ratios per round.\n"
          f"issue 3 targets: c1 p50 vasipc / floor = {p50:.2f} (target <= 2: "
          f"{'met' if p50 <= 2 else 'NOT met'}); c{n} throughput vasipc / plain = {rps:.2f} "
          f"(target >= 3: {'met' if rps >= 3 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
