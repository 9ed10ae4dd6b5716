"""In-process inference runtimes side by side on the benchmark model (issue 11's groundwork).

    python bench/runtimes.py [--duration 5] [--repeats 3] [--frames 4] [--batches 2,4]

Measures frames/s and the p50 of one run, each layout for `--duration` seconds per round,
all on the same letterboxed 1080p NV12 frames (the astronaut photo, shifted per frame),
rounds repeated so every figure is a median with its spread, ratios to today's layout
taken per round:
- `ort 1x{all}`: ONNX Runtime as the server opens it today (vasipc.backends.onnxruntime.create_session:
  one session, one intra-op thread per usable CPU), runs one after another;
- `ort 1 session, 2 threads x 1`: one session of 1 intra-op thread, 2 Python threads calling
  run at once (inter-op concurrency on one session);
- `ort 2 sessions x 1`: two sessions of 1 intra-op thread, one Python thread each;
- `ort 1x{all} no spinning`: today's layout with session.intra_op.allow_spinning=0;
- `ort 1x{all} batch B`: today's layout on batches of B frames (the model's batch dim is
  dynamic);
- with OpenVINO importable (`pip install openvino`; measurement only, not a dependency):
  the same ONNX file compiled for CPU with the THROUGHPUT hint, fp32 and (if the CPU lists
  BF16 in OPTIMIZATION_CAPABILITIES) bf16, run through an AsyncInferQueue of
  OPTIMAL_NUMBER_OF_INFER_REQUESTS requests; the LATENCY hint with 1 request (for the p50);
  the THROUGHPUT hint on batches of B frames at the best precision.
OpenVINO's outputs are checked against ONNX Runtime's on the same input: fp32 must agree
within 1e-4 (max abs diff of the raw output), bf16's max diff is reported. A p50 in the
THROUGHPUT layouts is the time from submitting a run (once a request is free) to its
completion, with the other requests in flight.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from _common import bench_model, machine, photo, spread

from vasipc._fast.letterbox import NV12, letterbox_geometry, letterbox_into
from vasipc.backends.onnxruntime import create_session, import_onnxruntime
from vasipc.frames import rgb_to_nv12
from vasipc.runtime import Device, usable_cpus

WIDTH, HEIGHT, SIZE = 1920, 1080, 640
FP32_TOLERANCE = 1e-4


@dataclass
class Run:
    """What one layout did in one round: frames done, wall time, per-run latencies (s)."""

    frames: int
    elapsed_s: float
    latencies_s: list[float]

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s

    @property
    def p50_ms(self) -> float:
        return float(np.median(self.latencies_s)) * 1e3


def frames_in(count: int) -> list[np.ndarray]:
    """`count` [1,3,640,640] float32 tensors: 1080p NV12 photos letterboxed by our kernel."""
    _, nw, nh, left, top = letterbox_geometry(WIDTH, HEIGHT, SIZE, SIZE)
    base = photo(WIDTH, HEIGHT)
    out = []
    for i in range(count):
        t = np.empty((1, 3, SIZE, SIZE), np.float32)
        letterbox_into(rgb_to_nv12(np.roll(base, 16 * i, axis=1)), NV12, WIDTH, HEIGHT, WIDTH, t[0], nw, nh,
                       left, top)
        out.append(t)
    return out


def batched(tensors: list[np.ndarray], b: int) -> list[np.ndarray]:
    """The frames grouped b at a time (cyclically), as many batches as frames."""
    return [np.concatenate([tensors[(i + k) % len(tensors)] for k in range(b)])
            for i in range(len(tensors))]


def threaded(run: Callable[[int, np.ndarray], object], inputs: list[np.ndarray], workers: int,
             duration: float) -> Run:
    """`workers` Python threads, worker w calling run(w, x) on the inputs in turn (each run
    releases the GIL) for `duration` s after one warm-up run each."""
    for w in range(workers):
        run(w, inputs[0])
    lat: list[list[float]] = [[] for _ in range(workers)]
    start = threading.Barrier(workers + 1)
    clock = time.perf_counter

    def loop(w: int) -> None:
        start.wait()
        stop, i = clock() + duration, w
        while (t := clock()) < stop:
            run(w, inputs[i % len(inputs)])
            lat[w].append(clock() - t)
            i += 1

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for th in threads:
        th.start()
    start.wait()
    t0 = clock()
    for th in threads:
        th.join()
    runs = [x for w in lat for x in w]
    return Run(len(runs) * inputs[0].shape[0], clock() - t0, runs)


def ort_session(ort, threads: int, spinning: bool = True, path: str | None = None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path or str(bench_model()), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def ort_layouts(ort, tensors: list[np.ndarray], batches: list[int], d: float
                ) -> tuple[dict[str, Callable[[], Run]], Callable[[np.ndarray], np.ndarray]]:
    today = create_session(str(bench_model()), Device("cpu"), ort)  # exactly the server's
    name = today.get_inputs()[0].name
    one = ort_session(ort, 1)
    pair = [ort_session(ort, 1), ort_session(ort, 1)]
    nospin = ort_session(ort, usable_cpus(), spinning=False)
    n = usable_cpus()

    def on(sessions) -> Callable[[int, np.ndarray], object]:
        return lambda w, x: sessions[w].run(None, {name: x})

    layouts = {
        f"ort 1x{n} (today)": lambda: threaded(on([today]), tensors, 1, d),
        "ort 1 session, 2 threads x 1": lambda: threaded(on([one, one]), tensors, 2, d),
        "ort 2 sessions x 1": lambda: threaded(on(pair), tensors, 2, d),
        f"ort 1x{n} no spinning": lambda: threaded(on([nospin]), tensors, 1, d),
    }
    for b in batches:
        inputs = batched(tensors, b)
        layouts[f"ort 1x{n} batch {b}"] = (lambda xs=inputs: threaded(on([today]), xs, 1, d))
    return layouts, lambda x: today.run(None, {name: x})[0]


def ov_queue(compiled, inputs: list[np.ndarray], requests: int, duration: float) -> Run:
    """An AsyncInferQueue of `requests` requests kept full for `duration` s (after one warm
    run per request); latency from submitting a run to its callback."""
    import openvino as ov

    queue = ov.AsyncInferQueue(compiled, requests)
    lat: list[float] = []
    queue.set_callback(lambda _req, t: lat.append(time.perf_counter() - t))
    for _ in range(requests):
        queue.start_async({0: inputs[0]}, time.perf_counter())
    queue.wait_all()
    lat.clear()
    clock = time.perf_counter
    t0, i = clock(), 0
    while clock() < t0 + duration:
        queue.get_idle_request_id()  # wait for a free request, so the clock starts at submit
        queue.start_async({0: inputs[i % len(inputs)]}, clock())
        i += 1
    queue.wait_all()
    return Run(len(lat) * inputs[0].shape[0], clock() - t0, lat)


def ov_layouts(tensors: list[np.ndarray], batches: list[int], d: float,
               reference: Callable[[np.ndarray], np.ndarray]
               ) -> tuple[dict[str, Callable[[], Run]], list[str]]:
    import openvino as ov

    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    precisions = ["f32"] + (["bf16"] if "BF16" in caps else [])
    notes = [f"OpenVINO {ov.__version__}, CPU capabilities {', '.join(caps)}"]
    want = reference(tensors[0])
    layouts: dict[str, Callable[[], Run]] = {}

    def compile_for(hint: str, precision: str, batch: int | None = None):
        model = core.read_model(str(bench_model()))
        if batch:
            model.reshape({model.input(0): [batch, 3, SIZE, SIZE]})
        return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": hint,
                                                 "INFERENCE_PRECISION_HINT": precision})

    for p in precisions:
        tput = compile_for("THROUGHPUT", p)
        nreq = int(tput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        got = tput({0: tensors[0]})[tput.output(0)]
        diff = float(np.max(np.abs(got - want)))
        scores = float(np.max(np.abs(got[:, 4:] - want[:, 4:])))  # rows 0-3 are the boxes
        notes.append(f"{p}: max abs diff to ONNX Runtime {diff:.3g} on the raw output "
                     f"{tuple(want.shape)} ({scores:.3g} on the class scores, whose max is "
                     f"{float(want[:, 4:].max()):.3g}), THROUGHPUT optimal requests {nreq}, "
                     f"streams {tput.get_property('NUM_STREAMS')}")
        if p == "f32" and diff > FP32_TOLERANCE:
            raise SystemExit(f"OpenVINO fp32 differs from ONNX Runtime by {diff} "
                             f"(> {FP32_TOLERANCE})")
        layouts[f"ov THROUGHPUT {p} x{nreq} req"] = (
            lambda c=tput, n=nreq: ov_queue(c, tensors, n, d))
        lat = compile_for("LATENCY", p)
        layouts[f"ov LATENCY {p} x1 req"] = lambda c=lat: ov_queue(c, tensors, 1, d)
    best = precisions[-1]
    for b in batches:
        c = compile_for("THROUGHPUT", best, b)
        nreq = int(c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        inputs = batched(tensors, b)
        layouts[f"ov THROUGHPUT {best} batch {b} x{nreq} req"] = (
            lambda c=c, n=nreq, xs=inputs: ov_queue(c, xs, n, d))
    return layouts, notes


def report(results: dict[str, list[Run]]) -> None:
    base = next(iter(results.values()))
    print("\n| layout | frames/s | / today (per round) | p50 ms per run |\n|---|---|---|---|")
    for name, runs in results.items():
        ratios = [r.fps / b.fps for r, b in zip(runs, base, strict=True)]
        print(f"| {name} | {spread([r.fps for r in runs])} | {spread(ratios, '.2f')} | "
              f"{spread([r.p50_ms for r in runs])} |")
    print("\nmedian (min-max, ±half-range) of the rounds; a batch run's p50 is for the whole "
          "batch, its frames/s counts every frame.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per layout per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=4, help="distinct input frames")
    ap.add_argument("--batches", default="2,4", help="batch sizes besides 1 ('' for none)")
    ap.add_argument("--no-openvino", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    ort = import_onnxruntime()
    tensors = frames_in(args.frames)
    layouts, reference = ort_layouts(ort, tensors, batches, args.duration)
    notes = [f"ONNX Runtime {ort.__version__}"]
    if not args.no_openvino:
        try:
            import openvino  # noqa: F401
        except ImportError:
            notes.append("OpenVINO not importable: its rows are skipped")
        else:
            ov, ov_notes = ov_layouts(tensors, batches, args.duration, reference)
            layouts.update(ov)
            notes += ov_notes
    print(f"# runtimes: {machine()}\n# model {bench_model().name}, {WIDTH}x{HEIGHT} NV12 "
          f"letterboxed to {SIZE}x{SIZE}, {args.frames} frames")
    for note in notes:
        print(f"# {note}", flush=True)
    results: dict[str, list[Run]] = {n: [] for n in layouts}
    for rnd in range(args.repeats):
        for name, measure in layouts.items():
            r = measure()
            results[name].append(r)
            print(f"round {rnd + 1} {name:40s} {r.fps:6.2f} frames/s  p50 {r.p50_ms:7.1f} ms  "
                  f"({len(r.latencies_s)} runs)", flush=True)
    report(results)


if __name__ == "__main__":
    main()
