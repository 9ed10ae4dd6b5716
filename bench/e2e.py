"""End to end on the benchmark model: infer through the socket vs in-process session.run.

    python bench/e2e.py [--duration 10] [--repeats 3] [--frames 8] [--baseline DIR]

1080p NV12 frame-export directories (the astronaut photo, shifted per frame) in /dev/shm.
Per round, each for `--duration` seconds, closed loop:
- `session.run`: in-process, on the frames already letterboxed (the ceiling);
- `in-process pipeline`: letterbox_into + session.run + decode_detections, no socket;
- `server c1` / `server cN`: `python -m vasipc.serve` on the same model, infer requests
  from 1 and `--concurrency` client processes (persistent connections);
- `baseline c1` / `baseline cN` (with `--baseline DIR`): the same, served by the vasipc
  package in DIR (e.g. `git archive HEAD` plus its built `_fast` modules), so a change
  is compared with its base in the same run;
- `plain c1` / `plain cN` (with `--plain`): the plain Python design as a baseline server
  (`serve_plain` below: one thread per connection, struct + json, np.fromfile, cv2
  cvtColor / resize / copyMakeBorder, astype / 255 / transpose, session.run under a
  lock, numpy decode + cv2.dnn.NMSBoxesBatched, json.dumps), ratios to vasipc per round;
- `what-if`: session.run with one ORT setting changed (1 intra-op thread; no spinning),
  to show what the server's session options cost on this machine (`--no-what-if` skips).
The in-process session is made as the server makes its own (vasipc.backends.onnxruntime.create_session:
default options, ORT_ENABLE_ALL, default thread counts), so the figures compare like
with like; they never run at the same time.
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
import threading
import time
from collections.abc import Callable

import numpy as np
from _common import (
    PYTHON,
    Load,
    bench_model,
    drive,
    encode,
    machine,
    server,
    spread,
    vasipc_cmd,
    write_frames,
)

from vasipc._fast.decode import DecodeLayout, decode_detections
from vasipc._fast.letterbox import NV12, letterbox_geometry, letterbox_into
from vasipc.backends.onnxruntime import create_session, import_onnxruntime
from vasipc.runtime import Device

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


# --- the plain Python design (--plain): a baseline server ------------------------------------

_META = struct.Struct("<IIQQIIIIQ16x")  # frame.meta (docs/contract.md 5.1)


def plain_decode(pred: np.ndarray, r: float, left: int, top: int, w: int, h: int,
                 conf: float = 0.25, iou: float = 0.45, max_det: int = 300) -> list[dict]:
    import cv2

    p = pred[0].T  # [N, 4 + nc]
    cls = p[:, 4:].argmax(1)
    score = p[np.arange(len(p)), 4 + cls]
    keep = score > conf
    p, cls, score = p[keep], cls[keep], score[keep]
    xywh = np.stack([p[:, 0] - p[:, 2] / 2, p[:, 1] - p[:, 3] / 2, p[:, 2], p[:, 3]], 1)
    idx = np.asarray(cv2.dnn.NMSBoxesBatched(xywh, score, cls, conf, iou), np.int64)
    idx = idx.reshape(-1)[:max_det]
    dets = []
    for i in idx.tolist():
        x, y, bw, bh = xywh[i].tolist()
        x1, y1 = min(max((x - left) / r, 0), w), min(max((y - top) / r, 0), h)
        x2, y2 = min(max((x + bw - left) / r, 0), w), min(max((y + bh - top) / r, 0), h)
        c = int(cls[i])
        dets.append({"class_id": c, "class_name": str(c), "confidence": float(score[i]),
                     "bbox": [x1, y1, x2, y2], "track_id": None})
    return dets


class _PlainHandler(socketserver.StreamRequestHandler):
    session = None
    lock = threading.Lock()
    started = time.monotonic()

    def handle(self) -> None:
        while len(head := self.rfile.read(4)) == 4:
            (n,) = struct.unpack(">I", head)
            msg = json.loads(self.rfile.read(n))
            resp = self.health() if msg.get("op") == "health" else self.infer(msg)
            body = json.dumps(resp).encode()
            self.wfile.write(struct.pack(">I", len(body)) + body)

    def health(self) -> dict:
        return {"op": "health", "status": "ok", "ready": True, "model_id": "bench",
                "uptime_s": round(time.monotonic() - self.started, 3), "in_flight": 0,
                "requests_total": 0}

    def infer(self, msg: dict) -> dict:
        import cv2

        t0 = time.perf_counter()
        ref = msg["frame_reference"]
        with open(os.path.join(ref, "frame.meta"), "rb") as f:
            _, _, frame_id, _, w, h, _, stride, size = _META.unpack(f.read(_META.size))
        data = np.fromfile(os.path.join(ref, "frame.data"), np.uint8, count=size)
        nv12 = data.reshape(h * 3 // 2, stride)[:, :w]
        rgb = cv2.cvtColor(np.ascontiguousarray(nv12), cv2.COLOR_YUV2RGB_NV12)
        r = min(SIZE / w, SIZE / h)
        nw, nh = round(w * r), round(h * r)
        left, top = (SIZE - nw) // 2, (SIZE - nh) // 2
        img = cv2.copyMakeBorder(cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR),
                                 top, SIZE - nh - top, left, SIZE - nw - left,
                                 cv2.BORDER_CONSTANT, value=(114, 114, 114))
        x = np.ascontiguousarray((img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])
        t1 = time.perf_counter()
        sess = self.session
        with self.lock:
            pred = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: x})[0]
        t2 = time.perf_counter()
        dets = plain_decode(pred, r, left, top, w, h)
        t3 = time.perf_counter()
        return {"model_id": msg.get("model_id"), "camera_id": msg.get("camera_id"),
                "frame_id": frame_id, "detections": dets,
                "metadata": {"queue_ms": 0.0, "preprocess_ms": (t1 - t0) * 1e3,
                             "inference_ms": (t2 - t1) * 1e3, "postprocess_ms": (t3 - t2) * 1e3,
                             "total_ms": (time.perf_counter() - t0) * 1e3},
                "error": None, "error_code": None, "request_id": msg.get("request_id")}


class _PlainServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128


def serve_plain(path: str) -> None:
    """The plain design's server on `path`, the benchmark model in a session made as
    vasipc makes its own (create_session, default thread count)."""
    _PlainHandler.session = create_session(str(bench_model()), Device("cpu"), import_onnxruntime())
    with _PlainServer(path, _PlainHandler) as srv:
        srv.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per configuration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--baseline", metavar="DIR",
                    help="also serve with the vasipc package found in DIR (before/after)")
    ap.add_argument("--plain", action="store_true",
                    help="also serve with the plain Python design (a baseline server)")
    ap.add_argument("--serve-plain", metavar="SOCKET", help=argparse.SUPPRESS)
    ap.add_argument("--no-pipeline", action="store_true", help="skip the in-process pipeline row")
    ap.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=True,
                    help="also time session.run with 1 intra-op thread / without spinning")
    args = ap.parse_args()
    if args.serve_plain:
        return serve_plain(args.serve_plain)

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
    """A session like the server's (vasipc.backends.onnxruntime.create_session) with one setting changed."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(bench_model()), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def run(args: argparse.Namespace, payloads: list[bytes], frames: list[np.ndarray],
        sock: str) -> None:
    ort = import_onnxruntime()
    session = create_session(str(bench_model()), Device("cpu"), ort)  # exactly the server's
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    r, nw, nh, left, top = letterbox_geometry(WIDTH, HEIGHT, SIZE, SIZE)
    slot = np.empty((1, 3, SIZE, SIZE), np.float32)

    def preprocess(nv12: np.ndarray, out: np.ndarray) -> np.ndarray:
        letterbox_into(nv12, NV12, WIDTH, HEIGHT, WIDTH, out[0], nw, nh, left, top)
        return out

    fields = session.get_outputs()[0].shape[1]
    layout = DecodeLayout(num_fields=fields, num_classes=fields - 4)  # the raw YOLO layout

    def pipeline(nv12: np.ndarray) -> object:
        pred = session.run([out_name], {in_name: preprocess(nv12, slot)})[0]
        return decode_detections(layout, pred[0].T, 0.25, 0.45, 300, None, r, r, left, top,
                                 WIDTH, HEIGHT)

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
    if args.plain:
        configs["plain c1"] = lambda: drive(psock, payloads, 1, duration=d, warmup=3,
                                            server_pid=ppid)
        configs[f"plain c{conc}"] = lambda: drive(psock, payloads, conc, duration=d, warmup=3,
                                                  server_pid=ppid)
    if args.what_if:
        configs["what-if: session.run 1 thread"] = runs_on(what_if_session(ort, threads=1))
        configs["what-if: session.run no spinning"] = runs_on(what_if_session(ort, spinning=False))
    results: dict[str, list[Load]] = {n: [] for n in configs}
    print(f"# e2e: {machine()}\n# model {bench_model().name}, {WIDTH}x{HEIGHT} NV12 -> "
          f"{SIZE}x{SIZE}, ORT {ort.__version__} {session.get_providers()[0]}, "
          "default thread settings", flush=True)
    bsock = sock + ".base"
    base_cmd = vasipc_cmd(bench_model(), bsock)
    if args.baseline:  # the baseline's package first on sys.path
        base_cmd[1:3] = ["-c", f"import sys; sys.path.insert(0, {os.path.abspath(args.baseline)!r}); "
                               "from vasipc.serve import main; main()"]
    psock = sock + ".plain"
    plain_cmd = [PYTHON, os.path.abspath(__file__), "--serve-plain", psock]
    with server(vasipc_cmd(bench_model(), sock), sock) as proc, \
            (server(base_cmd, bsock) if args.baseline else contextlib.nullcontext()) as bproc, \
            (server(plain_cmd, psock) if args.plain else contextlib.nullcontext()) as pproc:
        pid = proc.pid
        bpid = bproc.pid if bproc is not None else None
        ppid = pproc.pid if pproc is not None else None
        for rnd in range(args.repeats):
            for name, measure in configs.items():
                load = measure()
                results[name].append(load)
                print(f"round {rnd + 1} {name:34s} {load.rps:6.2f} req/s  p50 {load.p(50):7.1f} "
                      f"ms  p99 {load.p(99):7.1f} ms  CPU {load.cpu_per_request_s * 1e3:6.1f} "
                      f"ms/req  ({load.requests} req)", flush=True)
    report(results)
    if args.plain:
        report_plain(results, conc)


def report_plain(results: dict[str, list[Load]], conc: int) -> None:
    """vasipc / plain, per round: throughput, and plain / vasipc latency (higher = better)."""
    print("\n| concurrency | req/s vasipc / plain | p50 plain / vasipc | p99 plain / vasipc |"
          "\n|---|---|---|---|")
    for c in (1, conc):
        ours, plain = results[f"server c{c}"], results[f"plain c{c}"]
        rps = [a.rps / b.rps for a, b in zip(ours, plain, strict=True)]
        p50 = [b.p(50) / a.p(50) for a, b in zip(ours, plain, strict=True)]
        p99 = [b.p(99) / a.p(99) for a, b in zip(ours, plain, strict=True)]
        print(f"| c{c} | {spread(rps, '.2f')} | {spread(p50, '.2f')} | {spread(p99, '.2f')} |")
    print("\nratios per round (same round, same frames), median (min-max, ±half-range).")


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
    for name in (n for n in results if n.startswith(("server", "baseline", "plain"))):
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
