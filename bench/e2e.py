"""End to end on the benchmark model: infer through the socket vs in-process session.run.

    python bench/e2e.py [--duration 10] [--repeats 3] [--frames 8] [--baseline DIR]

1080p NV12 frame-export directories (the astronaut photo, shifted per frame) in /dev/shm.
Per round, each for `--duration` seconds, closed loop:
- `session.run`: in-process, on the frames already letterboxed (the ceiling);
- `in-process pipeline`: letterbox_into + session.run + decode_yolo, no socket;
- `server c1` / `server cN`: `python -m vasipc.serve` on the same model, infer requests
  from 1 and `--concurrency` client processes (persistent connections);
- `baseline c1` / `baseline cN` (with `--baseline DIR`): the same, served by the vasipc
  package in DIR (e.g. `git archive HEAD` plus its built `_fast` modules), so a change
  is compared with its base in the same run;
- `what-if`: session.run with one ORT setting changed (1 intra-op thread; no spinning),
  to show what the server's session options cost on this machine (`--no-what-if` skips).
The in-process session is made as the server makes its own (vasipc.runtime.create_session:
default options, ORT_ENABLE_ALL, default thread counts), so the figures compare like
with like; they never run at the same time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from _common import (
    BENCH_MODEL,
    Load,
    drive,
    encode,
    machine,
    server,
    spread,
    vasipc_cmd,
    write_frames,
)

from vasipc._fast.letterbox import NV12, letterbox_geometry, letterbox_into
from vasipc._fast.yolo import decode_yolo
from vasipc.runtime import Device, create_session, import_onnxruntime

WIDTH, HEIGHT, SIZE = 1920, 1080, 640
STAGES = ("queue_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms")


def timed_loop(fn: Callable[[object], object], items: list, duration: float) -> Load:
    """Call fn on items in turn for `duration` seconds; per-call latencies."""
    fn(items[0])  # warm
    lat = []
    cpu0, t_start = time.process_time(), time.perf_counter()
    i = 0
    while (t := time.perf_counter()) < t_start + duration:
        fn(items[i % len(items)])
        lat.append(time.perf_counter() - t)
        i += 1
    load = Load(len(lat), time.perf_counter() - t_start, np.array(lat))
    load.cpu_per_request_s = (time.process_time() - cpu0) / len(lat)
    return load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per configuration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--baseline", metavar="DIR",
                    help="also serve with the vasipc package found in DIR (before/after)")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the in-process pipeline row")
    ap.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=True,
                    help="also time session.run with 1 intra-op thread / without spinning")
    args = ap.parse_args()

    shm = tempfile.mkdtemp(prefix="vasipc-bench-", dir="/dev/shm")
    try:
        paths = write_frames(shm, args.frames, WIDTH, HEIGHT)
        payloads = [encode({"frame_reference": p, "frame_metadata": {}, "camera_id": "camera_1",
                            "model_id": "bench", "timestamp": time.time()}) for p in paths]
        frames = [np.fromfile(os.path.join(p, "frame.data"), np.uint8) for p in paths]
        run(args, payloads, frames, os.path.join(shm, "e2e.sock"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def what_if_session(ort, threads: int = 0, spinning: bool = True):
    """A session like the server's (vasipc.runtime.create_session) with one setting changed."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(BENCH_MODEL), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def run(args: argparse.Namespace, payloads: list[bytes], frames: list[np.ndarray],
        sock: str) -> None:
    ort = import_onnxruntime()
    session = create_session(str(BENCH_MODEL), Device("cpu"), ort)  # exactly the server's
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    r, nw, nh, left, top = letterbox_geometry(WIDTH, HEIGHT, SIZE, SIZE)
    slot = np.empty((1, 3, SIZE, SIZE), np.float32)

    def preprocess(nv12: np.ndarray, out: np.ndarray) -> np.ndarray:
        letterbox_into(nv12, NV12, WIDTH, HEIGHT, WIDTH, out[0], nw, nh, left, top)
        return out

    def pipeline(nv12: np.ndarray) -> object:
        pred = session.run([out_name], {in_name: preprocess(nv12, slot)})[0]
        return decode_yolo(pred[0], 0.25, 0.45, 300, None, r, left, top, WIDTH, HEIGHT)

    def runs_on(sess) -> Callable[[], Load]:
        return lambda: timed_loop(lambda x: sess.run([out_name], {in_name: x}), tensors, d)

    tensors = [preprocess(f, np.empty_like(slot)) for f in frames]
    d, conc = args.duration, args.concurrency
    configs: dict[str, Callable[[], Load]] = {
        "session.run": runs_on(session),
        "in-process pipeline": lambda: timed_loop(pipeline, frames, d),
        "server c1": lambda: drive(sock, payloads, 1, duration=d, warmup=3, server_pid=pid),
        f"server c{conc}": lambda: drive(sock, payloads, conc, duration=d, warmup=3,
                                         server_pid=pid),
    }
    if args.no_pipeline:
        del configs["in-process pipeline"]
    if args.baseline:
        configs["baseline c1"] = lambda: drive(bsock, payloads, 1, duration=d, warmup=3,
                                               server_pid=bpid)
        configs[f"baseline c{conc}"] = lambda: drive(bsock, payloads, conc, duration=d, warmup=3,
                                                     server_pid=bpid)
    if args.what_if:
        configs["what-if: session.run 1 thread"] = runs_on(what_if_session(ort, threads=1))
        configs["what-if: session.run no spinning"] = runs_on(what_if_session(ort, spinning=False))
    results: dict[str, list[Load]] = {n: [] for n in configs}
    print(f"# e2e: {machine()}\n# model {BENCH_MODEL.name}, {WIDTH}x{HEIGHT} NV12 -> "
          f"{SIZE}x{SIZE}, ORT {ort.__version__} {session.get_providers()[0]}, "
          "default thread settings", flush=True)
    bsock = sock + ".base"
    base_cmd = vasipc_cmd(BENCH_MODEL, bsock)
    if args.baseline:  # the baseline's package first on sys.path
        base_cmd[1:3] = ["-c", f"import sys; sys.path.insert(0, {os.path.abspath(args.baseline)!r}); "
                               "from vasipc.serve import main; main()"]
    with server(vasipc_cmd(BENCH_MODEL, sock), sock) as proc, \
            (server(base_cmd, bsock) if args.baseline else contextlib.nullcontext()) as bproc:
        pid = proc.pid
        bpid = bproc.pid if bproc is not None else None
        for rnd in range(args.repeats):
            for name, measure in configs.items():
                load = measure()
                results[name].append(load)
                print(f"round {rnd + 1} {name:34s} {load.rps:6.2f} req/s  p50 {load.p(50):7.1f} "
                      f"ms  p99 {load.p(99):7.1f} ms  CPU {load.cpu_per_request_s * 1e3:6.1f} "
                      f"ms/req  ({load.requests} req)", flush=True)
    report(results)


def report(results: dict[str, list[Load]]) -> None:
    base = results["session.run"]
    print("\n| configuration | req/s | p50 ms | p99 ms | CPU ms/req | req/s vs session.run "
          "| p50 vs session.run |\n|---|---|---|---|---|---|---|")
    for name, loads in results.items():
        rps_ratio = [a.rps / b.rps for a, b in zip(loads, base, strict=True)]
        p50_ratio = [a.p(50) / b.p(50) for a, b in zip(loads, base, strict=True)]
        print(f"| {name} | {spread([x.rps for x in loads], '.2f')} "
              f"| {spread([x.p(50) for x in loads], '.0f')} "
              f"| {spread([x.p(99) for x in loads], '.0f')} "
              f"| {spread([x.cpu_per_request_s * 1e3 for x in loads], '.0f')} "
              f"| {spread(rps_ratio, '.2f')} "
              f"| {spread(p50_ratio, '.2f')} |")

    print("\nServer-side timings (response metadata), median over all rounds, ms; "
          "`wire` = client p50 latency - server total_ms p50:\n")
    print("| configuration | " + " | ".join(STAGES) + " | wire |")
    print("|---" * (len(STAGES) + 2) + "|")
    for name in (n for n in results if n.startswith(("server", "baseline"))):
        meta = [m for load in results[name] for m in load.metadata]
        med = {s: float(np.median([m[s] for m in meta])) for s in STAGES}
        client = float(np.median(np.concatenate([x.latencies_s for x in results[name]]))) * 1e3
        print(f"| {name} | " + " | ".join(f"{med[s]:.2f}" for s in STAGES)
              + f" | {client - med['total_ms']:.2f} |")
    print("\nmedian (min-max, ±half-range) of the rounds; ratios per round. CPU ms/req: "
          "user + system time of the process that runs the model (the server, or this one "
          "in-process; ORT's threads included) per request.")


if __name__ == "__main__":
    sys.exit(main())
