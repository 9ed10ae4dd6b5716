"""Every task end to end: the zoo's exports through the socket, throughput side by side.

    python bench/tasks.py [--duration 10] [--repeats 3] [--concurrency 4] [--models a,b]
                          [--width 1920 --height 1080]

Each round serves each model of the zoo (`VASIPC_ZOO`, bench/README.md) in turn (`python -m vasipc.serve`,
default options) and drives it closed loop at `--concurrency` with NV12 frames of the
astronaut photo (`_common.write_frames`, 1920x1080 unless `--width`/`--height`). Printed
per model: requests/s, the server's medians of inference and postprocess ms, results per
answer, and the ratio of its
throughput to the detect model's in the same round (the issue's target: segment >= 0.9x
detect, post-processing never dominating). The yolo11n detect, segment, pose and obb
exports share the backbone, so the ratio is what each task's head and post-processing
cost on top of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

from _common import PYTHON, drive, encode, machine, server, spread, vasipc_cmd, write_frames, zoo_models

# "MODEL@none": the segment model answering with config.mask_format "none" (no mask work:
# what its inference alone allows)
MODELS = ["yolo11n-320-detect", "yolo11n-320-seg", "yolo11n-320-seg@none", "yolo11n-320-pose",
          "yolo11n-320-obb", "yolo26n-320-end2end", "yolo26n-320-seg-end2end", "yolo11n-224-cls"]
BASE = "yolo11n-320-detect"


def request(path: str, mask_format: str | None = None) -> bytes:
    msg = {"frame_reference": path, "frame_metadata": {}, "camera_id": "c",
           "model_id": "bench", "timestamp": 1.0}
    if mask_format is not None:
        msg["config"] = {"mask_format": mask_format}
    return encode(msg)


def answer_stats(sock: str, payload: bytes) -> tuple[dict, int]:
    from _common import Conn

    conn = Conn(sock)
    try:
        resp = json.loads(conn.call(payload))
    finally:
        conn.close()
    results = len(resp.get("classifications") or resp.get("detections") or [])
    return resp["metadata"], results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--models", help="comma-separated zoo model names (default: all)")
    args = ap.parse_args()
    models = args.models.split(",") if args.models else MODELS
    if BASE not in models:
        models.insert(0, BASE)
    zoo = zoo_models([m.split("@")[0] for m in models])
    shm = tempfile.mkdtemp(prefix="vasipc-tasks-", dir="/dev/shm")
    rps: dict[str, list[float]] = {m: [] for m in models}
    ratio: dict[str, list[float]] = {m: [] for m in models}
    stages: dict[str, list[tuple[float, float, int]]] = {m: [] for m in models}
    print(f"# tasks: {machine()}\n# {PYTHON} bench/tasks.py --duration {args.duration} "
          f"--repeats {args.repeats} --concurrency {args.concurrency}; {args.width}x{args.height} "
          "NV12", flush=True)
    try:
        paths = write_frames(shm, args.frames, args.width, args.height)
        sock = os.path.join(shm, "tasks.sock")
        for rnd in range(args.repeats):
            for m in models:
                name, _, mask_format = m.partition("@")
                payloads = [request(p, mask_format or None) for p in paths]
                with server(vasipc_cmd(zoo[name], sock), sock) as proc:
                    load = drive(sock, payloads, args.concurrency, duration=args.duration,
                                 warmup=20, server_pid=proc.pid)
                    md, results = answer_stats(sock, payloads[0])
                rps[m].append(load.rps)
                stages[m].append((md["inference_ms"], md["postprocess_ms"], results))
                ratio[m].append(load.rps / rps[BASE][-1])
                print(f"round {rnd + 1} {m:26s} {load.rps:7.1f} req/s  x{ratio[m][-1]:.3f} of "
                      f"detect  inference {md['inference_ms']:6.1f} ms  postprocess "
                      f"{md['postprocess_ms']:6.2f} ms  {results} results", flush=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    print(f"\n| model | req/s c{args.concurrency} | / detect (same round) | inference ms "
          "| postprocess ms | results |\n|---|---|---|---|---|---|")
    for m in models:
        inf = statistics.median(s[0] for s in stages[m])
        post = statistics.median(s[1] for s in stages[m])
        print(f"| {m} | {spread(rps[m], '.1f')} | {spread(ratio[m], '.3f')} | {inf:.1f} | "
              f"{post:.2f} | {stages[m][-1][2]} |")
    print("\nmedian (min-max, ±half-range) of the rounds; ratios taken per round.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
