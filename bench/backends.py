"""The backends through the socket vs in-process, on the benchmark model (issue 11's targets).

    python bench/backends.py [--duration 8] [--repeats 3] [--frames 8] [--int8 MODEL.onnx]

1080p NV12 frame directories (the astronaut photo, shifted per frame) in /dev/shm; every
server answers the same requests, closed loop, `--concurrency` (4) client processes and
then 1, each configuration `--duration` s per round, rounds repeated, ratios per round:
- `today`: `--backend onnxruntime --streams 1`, the server's layout before streams (one
  session with every usable CPU as intra-op threads, one run at a time);
- `onnxruntime`: the default server (auto streams);
- `openvino fp32`, `openvino bf16` (where the CPU lists BF16), `openvino int8` (with
  `--int8`, a QDQ model made by `vasipc quantize`);
and, in the same rounds, the in-process references a user would otherwise write, on the
same frames letterboxed by our kernel: ONNX Runtime's best layout (2 sessions of 1 thread,
2 Python threads; more generally the server's own stream layout), OpenVINO's
AsyncInferQueue of OPTIMAL_NUMBER_OF_INFER_REQUESTS with the THROUGHPUT hint per precision
(the frames/s the socket should approach), and each backend's solo layout one run at a
time (ONNX Runtime with every thread and no spinning, as the server's solo session;
OpenVINO's LATENCY hint: the p50 a concurrency 1 request should approach). The last
table gives the issue's targets per round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from _common import Load, bench_model, drive, encode, machine, server, spread, vasipc_cmd, write_frames
from runtimes import HEIGHT, WIDTH, Run, frames_in, ort_session, ov_queue, threaded

from vasipc.backends.onnxruntime import auto_streams, import_onnxruntime
from vasipc.runtime import Device, usable_cpus

SERVERS = {
    "today": ["--backend", "onnxruntime", "--streams", "1"],
    "onnxruntime": ["--backend", "onnxruntime"],
    "openvino fp32": ["--backend", "openvino", "--precision", "fp32"],
    "openvino bf16": ["--backend", "openvino", "--precision", "bf16"],
    "openvino int8": ["--backend", "openvino"],
}


def in_process(tensors: list, d: float, int8: str | None, has_bf16: bool
               ) -> dict[str, Callable[[], Run]]:
    """The references, named `in-process <backend> <precision> streams|solo`: each
    backend's throughput layout (the server's streams) and its solo layout (one run with
    every thread, what a request alone gets)."""
    import openvino as ov

    ort = import_onnxruntime()
    n = usable_cpus()
    streams = auto_streams(Device("cpu"), n)
    per = max(1, n // streams)
    sessions = [ort_session(ort, per) for _ in range(streams)]
    solo = ort_session(ort, n, spinning=False)  # as the server's solo session
    name = sessions[0].get_inputs()[0].name

    def ort_run(w, x):
        return sessions[w].run(None, {name: x})

    refs: dict[str, Callable[[], Run]] = {
        "in-process onnxruntime fp32 streams": lambda: threaded(ort_run, tensors, streams, d),
        "in-process onnxruntime fp32 solo": lambda: threaded(
            lambda w, x: solo.run(None, {name: x}), tensors, 1, d),
    }
    core = ov.Core()
    models = {"fp32": (str(bench_model()), "f32")}
    if has_bf16:
        models["bf16"] = (str(bench_model()), "bf16")
    if int8:
        models["int8"] = (int8, "f32")
    for label, (path, hint) in models.items():
        def compiled(mode: str, path=path, hint=hint):
            return core.compile_model(path, "CPU", {
                "PERFORMANCE_HINT": mode, "INFERENCE_NUM_THREADS": n,
                "INFERENCE_PRECISION_HINT": hint})
        tput, latency = compiled("THROUGHPUT"), compiled("LATENCY")
        reqs = int(tput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        refs[f"in-process openvino {label} streams"] = (
            lambda c=tput, r=reqs: ov_queue(c, tensors, r, d))
        refs[f"in-process openvino {label} solo"] = lambda c=latency: ov_queue(c, tensors, 1, d)
    return refs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per configuration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--int8", metavar="MODEL", help="a QDQ model of the benchmark model")
    ap.add_argument("--only", help="comma-separated server names to run (default: all)")
    args = ap.parse_args()
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    servers = {k: v for k, v in SERVERS.items()
               if (k != "openvino bf16" or has_bf16) and (k != "openvino int8" or args.int8)
               and (not args.only or k in args.only.split(","))}
    shm = tempfile.mkdtemp(prefix="vasipc-bench-", dir="/dev/shm")
    try:
        paths = write_frames(shm, args.frames, WIDTH, HEIGHT)
        payloads = [encode({"frame_reference": p, "frame_metadata": {}, "camera_id": "camera_1",
                            "model_id": "bench", "timestamp": time.time()}) for p in paths]
        run(args, servers, payloads, frames_in(args.frames), shm, has_bf16)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def run(args, servers: dict[str, list[str]], payloads: list[bytes], tensors: list, shm: str,
        has_bf16: bool) -> None:
    d, conc = args.duration, args.concurrency
    refs = in_process(tensors, d, args.int8, has_bf16)
    results: dict[str, list[float]] = {}
    p50s: dict[str, list[float]] = {}
    print(f"# backends: {machine()}\n# model {bench_model().name}, {WIDTH}x{HEIGHT} NV12, "
          f"c{conc} and c1, {d:g} s each, {args.repeats} rounds", flush=True)
    for rnd in range(args.repeats):
        for name, cli in servers.items():
            sock = os.path.join(shm, f"{len(results)}.sock")
            model = args.int8 if name == "openvino int8" else bench_model()
            cmd = [*vasipc_cmd(model, sock), *cli]
            with server(cmd, sock, timeout=300) as proc:
                for c in (conc, 1):
                    load: Load = drive(sock, payloads, c, duration=d, warmup=3, server_pid=proc.pid)
                    key = f"server {name} c{c}"
                    results.setdefault(key, []).append(load.rps)
                    p50s.setdefault(key, []).append(load.p(50))
                    print(f"round {rnd + 1} {key:34s} {load.rps:6.2f} req/s  p50 "
                          f"{load.p(50):7.1f} ms  p99 {load.p(99):7.1f} ms", flush=True)
        for name, measure in refs.items():
            r = measure()
            results.setdefault(name, []).append(r.fps)
            p50s.setdefault(name, []).append(r.p50_ms)
            print(f"round {rnd + 1} {name:34s} {r.fps:6.2f} frames/s  p50 {r.p50_ms:7.1f} ms",
                  flush=True)
    report(results, p50s, conc)


TARGETS = [  # (what, numerator, denominator, the target): per round
    ("openvino bf16 c4 / today c4", "server openvino bf16 c4", "server today c4", ">= 1.8"),
    ("openvino int8 c4 / today c4", "server openvino int8 c4", "server today c4", ">= 2.2"),
    ("openvino bf16 c4 / its in-process streams", "server openvino bf16 c4",
     "in-process openvino bf16 streams", ">= 0.9"),
    ("openvino int8 c4 / its in-process streams", "server openvino int8 c4",
     "in-process openvino int8 streams", ""),
    ("onnxruntime c4 / its in-process streams", "server onnxruntime c4",
     "in-process onnxruntime fp32 streams", ">= 0.95"),
]
LATENCY = [  # (server c1, the in-process solo layout it runs on)
    ("server onnxruntime c1", "in-process onnxruntime fp32 solo"),
    ("server openvino fp32 c1", "in-process openvino fp32 solo"),
    ("server openvino bf16 c1", "in-process openvino bf16 solo"),
    ("server openvino int8 c1", "in-process openvino int8 solo"),
]


def report(results: dict[str, list[float]], p50s: dict[str, list[float]], conc: int) -> None:
    today = results.get(f"server today c{conc}")
    print(f"\n| configuration | frames/s | / today c{conc} (per round) | p50 ms |\n|---|---|---|---|")
    for name, fps in results.items():
        ratio = (spread([f / t for f, t in zip(fps, today, strict=True)], ".2f")
                 if today else "")
        print(f"| {name} | {spread(fps)} | {ratio} | {spread(p50s[name])} |")
    print("\n| target | per round | median | target |\n|---|---|---|---|")
    for what, num, den, target in TARGETS:
        if num in results and den in results:
            r = [a / b for a, b in zip(results[num], results[den], strict=True)]
            print(f"| {what} | {', '.join(f'{x:.2f}' for x in r)} | {statistics.median(r):.2f} "
                  f"| {target} |")
    for server_c1, solo in LATENCY:
        if server_c1 in p50s and solo in p50s:
            r = [a - b for a, b in zip(p50s[server_c1], p50s[solo], strict=True)]
            print(f"| {server_c1} p50 - {solo} p50 (ms) | {', '.join(f'{x:+.1f}' for x in r)} | "
                  f"{statistics.median(r):+.1f} | <= +1 |")


if __name__ == "__main__":
    main()
