"""Server CPU time per request beyond session.run (tiny model, tiny frames).

    python bench/overhead.py [--requests 20000] [--repeats 3] [--calls 20000] [--server-cpus 0]

Builds the tiny YOLO-shaped detector (`_common.tiny_model`: [1,3,64,64] -> [1,6,16]),
writes a few 64x64 and 320x240 NV12 frame-export directories in /dev/shm and serves the
model with `python -m vasipc.serve --threads 1`. Per round:
- `health` and `infer` (each frame size): `--requests` sequential requests over one
  persistent connection from a spawned client process (`_common.drive`); the figure is
  the SERVER's user + system CPU time (/proc/PID/stat, all threads) before/after, divided
  by the requests served (warm-up included), plus its context switches per request
  (/proc/PID/task/*/status);
- `session.run`: the same model and a letterboxed input in this process, a session made
  as the server makes it (create_session, 1 intra-op thread), `--calls` calls timed with
  time.process_time.
Overhead = server CPU/infer - session.run CPU/call, per round. Then a breakdown: the
server's own per-request steps called in this process (time.process_time over `--calls`
each); what they leave of the overhead is threads, wake-ups and syscalls.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable

import numpy as np
from _common import (
    drive,
    encode,
    machine,
    parse_cpus,
    server,
    spread,
    tiny_model,
    vasipc_cmd,
    write_frames,
)

from vasipc import wirejson
from vasipc.batcher import Batcher
from vasipc.frame_source import FrameOpener, FrameRoots
from vasipc.model import ModelSpec, load_model
from vasipc.runtime import Device
from vasipc.schema import parse_infer, parse_op

SIZES = {"64x64": (64, 64), "320x240": (320, 240)}


def ctx_switches(pid: int) -> dict[str, int]:
    """Voluntary + involuntary context switches of each live thread of the process so far."""
    counts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                counts[tid] = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:  # the thread ended
            pass
    return counts


class SwitchCounter:
    """Context switches of a process's threads during a run, including threads that start
    and end within it (a connection's thread): sampled every 50 ms, so a thread's last
    < 50 ms before it ends are missed."""

    def __init__(self, pid: int) -> None:
        self.pid, self.before, self.latest = pid, ctx_switches(pid), {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            self.latest.update(ctx_switches(self.pid))

    def total(self) -> int:
        self.stop.set()
        self.thread.join()
        self.latest.update(ctx_switches(self.pid))
        return sum(v - self.before.get(tid, 0) for tid, v in self.latest.items())


def cpu_per_call(fn: Callable[[], object], calls: int) -> float:
    """CPU seconds (this process, time.process_time) per call of fn, after 200 warm calls."""
    for _ in range(200):
        fn()
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per server figure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20000, help="in-process calls per figure")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--server-cpus", help="pin the server to these CPUs (taskset), e.g. 0")
    args = ap.parse_args()
    shm = tempfile.mkdtemp(prefix="vasipc-overhead-", dir="/dev/shm")
    try:
        model_path = os.path.join(shm, "tiny.onnx")
        tiny_model(model_path)
        for name in SIZES:
            os.makedirs(os.path.join(shm, name))
        frames = {name: write_frames(os.path.join(shm, name), 4, w, h)
                  for name, (w, h) in SIZES.items()}
        return run(args, shm, model_path, frames)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def infer_msg(path: str) -> dict:
    return {"frame_reference": path, "frame_metadata": {}, "camera_id": "c",
            "model_id": "bench", "timestamp": time.time()}


def run(args: argparse.Namespace, shm: str, model_path: str,
        frames: dict[str, list[str]]) -> int:
    os.makedirs(os.path.join(shm, "s"))
    sock = os.path.join(shm, "s", "overhead.sock")
    spec = ModelSpec(path=model_path, model_id="bench", model_name="tiny", model_version="1",
                     threads=1)
    model = load_model(spec, Device("cpu"), None)  # the server's own loader, 1 thread
    session = model.session
    opener = FrameOpener(FrameRoots([shm]), 8192)
    batcher = types.SimpleNamespace(opener=opener, preprocess_threads=1,  # what _preprocess reads
                                    frame_bytes_read=0)
    x = model.new_input(1)
    req = parse_infer(infer_msg(frames["320x240"][0]), "bench", opener.is_raw_file)
    Batcher._preprocess(batcher, model, req.frame_reference, req.frame_metadata, x[0])  # fills x
    feeds = {model.input_name: x}

    def session_run() -> object:
        return session.run(list(model.output_names), feeds)

    payloads = {"health": [encode({"op": "health"})]}
    payloads.update({f"infer {n}": [encode(infer_msg(p)) for p in paths]
                     for n, paths in frames.items()})
    rows: dict[str, list[float]] = {n: [] for n in [*payloads, "session.run"]}
    ctx: dict[str, list[float]] = {n: [] for n in payloads}
    print(f"# overhead: {machine()}\n# tiny model 64x64 -> [1,6,16], server --threads 1, "
          f"{args.requests} sequential requests per figure, one connection; server CPUs "
          f"{args.server_cpus or 'any'}", flush=True)
    with server([*vasipc_cmd(model_path, sock), "--threads", "1", "--frame-root", shm],
                sock, cpus=parse_cpus(args.server_cpus)) as proc:
        for rnd in range(args.repeats):
            for name, pl in payloads.items():
                switches = SwitchCounter(proc.pid)
                load = drive(sock, pl, 1, requests=args.requests, warmup=200,
                             server_pid=proc.pid)
                served = load.requests + 200
                rows[name].append(load.cpu_per_request_s * 1e6)
                ctx[name].append(switches.total() / served)
                print(f"round {rnd + 1} {name:16s} server CPU {rows[name][-1]:7.1f} µs/req  "
                      f"ctx switches {ctx[name][-1]:4.1f}/req  {load.rps:7.0f} req/s  "
                      f"p50 {load.p(50) * 1e3:6.0f} µs", flush=True)
            rows["session.run"].append(cpu_per_call(session_run, args.calls) * 1e6)
            print(f"round {rnd + 1} session.run      in-process CPU {rows['session.run'][-1]:6.1f}"
                  " µs/call", flush=True)
    report(rows, ctx)
    if not args.no_breakdown:
        breakdown(args, model, batcher, frames, feeds, rows)
    return 0


def report(rows: dict[str, list[float]], ctx: dict[str, list[float]]) -> None:
    base = rows["session.run"]
    print("\n| figure | CPU µs per request | minus session.run (µs) | server ctx switches/req |"
          "\n|---|---|---|---|")
    for name, vals in rows.items():
        over = [v - b for v, b in zip(vals, base, strict=True)]
        over_s = spread(over, ".1f") if name.startswith("infer") else "-"
        cs = spread(ctx[name], ".1f") if name in ctx else "-"
        print(f"| {name} | {spread(vals, '.1f')} | {over_s} | {cs} |")
    print("\nmedian (min-max, ±half-range) of the rounds; the difference is taken per round.")


def breakdown(args, model, batcher, frames, feeds, rows) -> None:
    """The server's per-request steps, one at a time, in this process (1 thread, warm)."""
    n = args.calls
    print("\nBreakdown (in-process, CPU µs per call, the server's own functions):\n\n"
          "| step | 64x64 | 320x240 |\n|---|---|---|")
    steps: dict[str, list[float]] = {}
    for paths in frames.values():
        body = encode(infer_msg(paths[0]))[4:]
        req = parse_infer(infer_msg(paths[0]), "bench", batcher.opener.is_raw_file)
        x = model.new_input(1)
        geom, _ = Batcher._preprocess(batcher, model, req.frame_reference, req.frame_metadata, x[0])
        out = model.run_batch(x, 1)
        dets = model.head.decode(out, 0, geom, req.config, model.spec)["detections"]
        resp = {"model_id": "bench", "camera_id": "c", "frame_id": 0, "detections": dets,
                "metadata": {"preprocess_ms": 0.1, "inference_ms": 0.1, "postprocess_ms": 0.1,
                             "queue_ms": 0.0, "total_ms": 0.3, "batch_size": 1,
                             "model_version": "1", "device": "cpu"},
                "error": None, "error_code": None, "request_id": None}

        def decode(body=body):
            msg = wirejson.loads(body)
            parse_op(msg)
            return parse_infer(msg, "bench", batcher.opener.is_raw_file)

        fns = {
            "decode + validate request (wirejson.loads, parse_op, parse_infer)": decode,
            "open frame + letterbox + close (Batcher._preprocess)":
                lambda req=req, x=x: Batcher._preprocess(batcher, model, req.frame_reference,
                                                         req.frame_metadata, x[0]),
            "  of which: open + close the frame (FrameOpener.open, OpenFrame.close)":
                lambda req=req: batcher.opener.open(req.frame_reference,
                                                    req.frame_metadata).close(),
            "model.run (session.run + contiguous copy)": lambda x=x: model.run_batch(x, 1),
            f"postprocess: head.decode, detection dicts ({len(dets)} detections)":
                lambda req=req, out=out, geom=geom: model.head.decode(out, 0, geom, req.config,
                                                                      model.spec),
            "encode response (wirejson.dumps)": lambda resp=resp: wirejson.dumps(resp),
        }
        for label, fn in fns.items():
            key = label.split(" (")[0] if label.startswith("postprocess") else label
            steps.setdefault(key, []).append(cpu_per_call(fn, n) * 1e6)
    for label, (a, b) in steps.items():
        print(f"| {label} | {a:.1f} | {b:.1f} |")
    beyond = {size: sum(v[i] for k, v in steps.items() if not k.startswith(("model.run", " ")))
              + steps["model.run (session.run + contiguous copy)"][i]
              - float(np.median(rows["session.run"]))
              for i, size in enumerate(frames)}
    server = {size: float(np.median(rows[f"infer {size}"])) - float(np.median(rows["session.run"]))
              for size in frames}
    print("| **sum beyond session.run** | " + " | ".join(f"{beyond[s]:.1f}" for s in frames)
          + " |")
    print("| measured server overhead (median) | " + " | ".join(f"{server[s]:.1f}" for s in frames)
          + " |")
    print("| rest: threads, hand-offs, wake-ups, socket syscalls, health-like floor | "
          + " | ".join(f"{server[s] - beyond[s]:.1f}" for s in frames) + " |")


if __name__ == "__main__":
    sys.exit(main())
