"""In-process `session.run` on one device: the reference the GPU server is compared with.

    python bench/gpu_ref.py --model M.onnx [--device cuda] [--batches 1,16,64] [--seconds 3]

For each batch size: `session.run` with numpy input and output (host copies included) and
the same run through IO binding with input and output on the device (no host copies), as
bench/README.md's reference figures measured them. Prints a table (p50 ms per run, images/s) and
writes it as JSON with `--json`. On `--device cpu` it runs the same code on the CPU
provider (IO binding to 'cpu'), which is how this script is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vasipc.backends.onnxruntime import create_session, cuda_available, import_onnxruntime
from vasipc.runtime import resolve_device


def timed(fn, seconds: float, min_runs: int = 5) -> list[float]:
    fn()  # warm: cuDNN's algorithm search runs per shape
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_runs:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--seconds", type=float, default=3.0, help="per configuration")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    ort = import_onnxruntime()
    device = resolve_device(args.device, cuda_available())
    session = create_session(args.model, device, ort)
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    h, w = (d if isinstance(d, int) else 640 for d in inp.shape[2:4])
    ort_device = "cuda" if device.kind == "cuda" else "cpu"
    rows = []
    print(f"# {args.model} on {device.name} ({session.get_providers()[0]}), input {w}x{h}")
    print("| path | batch | p50 ms | p99 ms | images/s |\n|---|---|---|---|---|")
    for b in (int(v) for v in args.batches.split(",")):
        if isinstance(inp.shape[0], int) and inp.shape[0] not in (b, -1):
            continue  # a static batch dimension
        x = np.full((b, 3, h, w), 114 / 255, np.float32)
        binding = session.io_binding()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, ort_device, device.index)
        binding.bind_ortvalue_input(inp.name, x_dev)
        binding.bind_output(out.name, ort_device, device.index)

        def run_bound(binding=binding):
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        for path, fn in (("numpy in/out", lambda x=x: session.run([out.name], {inp.name: x})),
                         ("IO binding, device tensors", run_bound)):
            t = np.array(timed(fn, args.seconds)) * 1e3
            p50, p99 = np.percentile(t, [50, 99])
            row = {"path": path, "batch": b, "p50_ms": float(p50), "p99_ms": float(p99),
                   "images_per_s": float(b * 1e3 / np.mean(t)), "runs": len(t)}
            rows.append(row)
            print(f"| {path} | {b} | {p50:.2f} | {p99:.2f} | {row['images_per_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.name, "providers": session.get_providers(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
