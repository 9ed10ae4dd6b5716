"""End to end on the benchmark model: infer through the socket vs in-process session.run.

    python bench/e2e.py [--duration 10] [--repeats 3] [--frames 8]

1080p NV12 frame-export directories (the astronaut photo, shifted per frame) in /dev/shm.
Per round, each for `--duration` seconds, closed loop:
- `session.run`: in-process, on the frames already letterboxed (the ceiling);
- `in-process pipeline`: letterbox_into + session.run + decode_yolo, no socket;
- `server c1` / `server cN`: `python -m vasipc.serve` on the same model, infer requests
  from 1 and `--concurrency` client processes (persistent connections).
The in-process session is made as the server makes its own (vasipc.runtime.create_session:
default options, ORT_ENABLE_ALL, default thread counts), so the figures compare like
with like; they never run at the same time.
"""

from __future__ import annotations

import argparse
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
    t_start = time.perf_counter()
    i = 0
    while (t := time.perf_counter()) < t_start + duration:
        fn(items[i % len(items)])
        lat.append(time.perf_counter() - t)
        i += 1
    return Load(len(lat), time.perf_counter() - t_start, np.array(lat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per configuration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()

    shm = tempfile.mkdtemp(prefix="vasipc-bench-", dir="/dev/shm")
    try:
        paths = write_frames(shm, args.frames, WIDTH, HEIGHT)
        payloads = [encode({"frame_reference": p, "frame_metadata": {}, "camera_id": "camera_1",
                            "model_id": "bench", "timestamp": time.time()}) for p in paths]
        frames = [np.fromfile(os.path.join(p, "frame.data"), np.uint8) for p in paths]
        run(args, payloads, frames)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def run(args: argparse.Namespace, payloads: list[bytes], frames: list[np.ndarray]) -> None:
    session = create_session(str(BENCH_MODEL), Device("cpu"), import_onnxruntime())
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    r, nw, nh, left, top = letterbox_geometry(WIDTH, HEIGHT, SIZE, SIZE)

    def preprocess(nv12: np.ndarray) -> np.ndarray:
        x = np.empty((1, 3, SIZE, SIZE), np.float32)
        letterbox_into(nv12, NV12, WIDTH, HEIGHT, WIDTH, x[0], nw, nh, left, top)
        return x

    def session_run(x: np.ndarray) -> np.ndarray:
        return session.run([out_name], {in_name: x})[0]

    def pipeline(nv12: np.ndarray) -> object:
        pred = session_run(preprocess(nv12))
        return decode_yolo(pred[0], 0.25, 0.45, 300, None, r, left, top, WIDTH, HEIGHT)

    tensors = [preprocess(f) for f in frames]
    sock = os.path.join(tempfile.mkdtemp(prefix="vasipc-bench-"), "e2e.sock")
    conc = args.concurrency
    names = ("session.run", "in-process pipeline", "server c1", f"server c{conc}")
    results: dict[str, list[Load]] = {n: [] for n in names}
    print(f"# e2e: {machine()}\n# model {BENCH_MODEL.name}, {WIDTH}x{HEIGHT} NV12 -> "
          f"{SIZE}x{SIZE}, ORT {session.get_providers()[0]}, "
          f"intra_op_num_threads={session.get_session_options().intra_op_num_threads} "
          "(0 = ORT default)", flush=True)
    with server(vasipc_cmd(BENCH_MODEL, sock), sock):
        for rnd in range(args.repeats):
            for name in names:
                if name == "session.run":
                    load = timed_loop(session_run, tensors, args.duration)
                elif name == "in-process pipeline":
                    load = timed_loop(pipeline, frames, args.duration)
                else:
                    load = drive(sock, payloads, 1 if name == "server c1" else conc,
                                 duration=args.duration, warmup=3)
                results[name].append(load)
                print(f"round {rnd + 1} {name:20s} {load.rps:6.2f} req/s  p50 {load.p(50):6.1f} "
                      f"ms  p99 {load.p(99):6.1f} ms  ({load.requests} req)", flush=True)
    report(results, names)


def report(results: dict[str, list[Load]], names: tuple[str, ...]) -> None:
    base = results["session.run"]
    print("\n| configuration | req/s | p50 ms | p99 ms | req/s vs session.run "
          "| p50 vs session.run |\n|---|---|---|---|---|---|")
    for name in names:
        loads = results[name]
        rps_ratio = [a.rps / b.rps for a, b in zip(loads, base, strict=True)]
        p50_ratio = [a.p(50) / b.p(50) for a, b in zip(loads, base, strict=True)]
        print(f"| {name} | {spread([x.rps for x in loads], '.2f')} "
              f"| {spread([x.p(50) for x in loads], '.0f')} "
              f"| {spread([x.p(99) for x in loads], '.0f')} | {spread(rps_ratio, '.2f')} "
              f"| {spread(p50_ratio, '.2f')} |")

    print("\nServer-side timings (response metadata), median over all rounds, ms; "
          "`wire` = client p50 latency - server total_ms p50:\n")
    print("| configuration | " + " | ".join(STAGES) + " | wire |")
    print("|---" * (len(STAGES) + 2) + "|")
    for name in names[2:]:
        meta = [m for load in results[name] for m in load.metadata]
        med = {s: float(np.median([m[s] for m in meta])) for s in STAGES}
        client = float(np.median(np.concatenate([x.latencies_s for x in results[name]]))) * 1e3
        print(f"| {name} | " + " | ".join(f"{med[s]:.2f}" for s in STAGES)
              + f" | {client - med['total_ms']:.2f} |")
    print("\nmedian (min-max, ±half-range) of the rounds; ratios per round.")


if __name__ == "__main__":
    sys.exit(main())
