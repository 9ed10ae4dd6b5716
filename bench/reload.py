"""Hot reload under load: latency and errors with and without SIGHUP reloads.

    python bench/reload.py [--duration 20] [--every 2] [--repeats 2] [--concurrency 4]

Serves nudenet's 320n.onnx from a model directory (`--model-dir`, `--max-batch 4`),
drives it closed-loop with `--concurrency` connections on 1080p NV12 photo frames for
`--duration` s, once steady and once with a SIGHUP every `--every` s (each a full load +
warm-up of a new session beside the serving one), alternating, `--repeats` rounds. Any
error response fails the run (the reload must drop nothing). Prints requests, req/s and
latency percentiles per run, and the reloads the server logged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from _common import PYTHON, REPO, drive, encode, machine, nudenet_model, spread, write_frames


def run_once(model_dir: str, sock: str, payloads: list[bytes], args: argparse.Namespace,
             reload_every: float | None) -> tuple[object, int]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([PYTHON, "-m", "vasipc.serve", "--model-dir", model_dir,
                                 "--socket", sock, "--max-batch", "4"], cwd=REPO, stdout=log,
                                stderr=log)
        try:
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    raise RuntimeError("the server exited before serving")
                time.sleep(0.05)
            stop = threading.Event()

            def hup() -> None:
                while not stop.wait(reload_every):
                    proc.send_signal(signal.SIGHUP)

            if reload_every:
                threading.Thread(target=hup, daemon=True).start()
            try:
                load = drive(sock, payloads, args.concurrency, duration=args.duration, warmup=10)
            finally:
                stop.set()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        return load, log.read().decode(errors="replace").count("reloaded (SIGHUP)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between SIGHUPs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    shm = tempfile.mkdtemp(prefix="vasipc-reload-", dir="/dev/shm")
    try:
        model_dir = os.path.join(shm, "det")
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "model.yaml"), "w") as f:
            f.write(f"model_id: det\nmodel_weights: {nudenet_model()}\nmodel_version: '1'\n")
        paths = write_frames(shm, 8, 1920, 1080)
        payloads = [encode({"frame_reference": p, "frame_metadata": {}, "camera_id": "c",
                            "model_id": "det", "timestamp": time.time()}) for p in paths]
        sock = os.path.join(shm, "reload.sock")
        print(f"# reload: {machine()}\n# nudenet 320n, --max-batch 4, c{args.concurrency}, "
              f"1080p NV12, {args.duration:g} s a run, SIGHUP every {args.every:g} s", flush=True)
        rows: dict[str, list] = {"steady": [], "reload": []}
        for r in range(1, args.repeats + 1):
            for mode in ("steady", "reload"):
                load, reloads = run_once(model_dir, sock, payloads, args,
                                         args.every if mode == "reload" else None)
                rows[mode].append(load)
                print(f"round {r} {mode:6}: {load.requests} requests, {load.rps:.1f} req/s, "
                      f"p50 {load.p(50):.1f} p90 {load.p(90):.1f} p99 {load.p(99):.1f} "
                      f"max {load.p(100):.1f} ms, reloads {reloads}, errors 0", flush=True)
        print("\n| | steady | reload | reload / steady |\n|---|---|---|---|")
        for name, get in (("req/s", lambda ld: ld.rps), ("p50 (ms)", lambda ld: ld.p(50)),
                          ("p99 (ms)", lambda ld: ld.p(99))):
            s = [get(ld) for ld in rows["steady"]]
            u = [get(ld) for ld in rows["reload"]]
            print(f"| {name} | {spread(s)} | {spread(u)} | "
                  f"{spread([b / a for a, b in zip(s, u, strict=True)])} |")
        return 0
    finally:
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
