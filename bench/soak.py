"""Memory/fd soak: many infer requests against a real server on a tiny model.

    python bench/soak.py [--requests 100000] [--connections 4] [--every 5000]

Builds a tiny YOLO-shaped detector with `onnx` (input [1,3,64,64] -> Reshape -> MatMul ->
Reshape -> Sigmoid -> output [1, 4+2, 16]), serves it with `python -m vasipc.serve`,
writes a few small NV12 frame-export directories in /dev/shm, and drives `--requests`
infer requests over `--connections` persistent connections. Every `--every` requests it
samples the server's VmRSS, open fds and mappings of /dev/shm files. Verdict: RSS flat
within +-10 MB after the first sample (warm-up), no frame mapping left, fds back to the
idle count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

from _common import Conn, encode, machine, server, tiny_model, vasipc_cmd, write_frames


def sample(pid: int, shm: str) -> tuple[float, int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for line in f if shm in line)
    return rss, fds, maps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--every", type=int, default=5000)
    args = ap.parse_args()
    shm = tempfile.mkdtemp(prefix="vasipc-soak-", dir="/dev/shm")
    try:
        model = os.path.join(shm, "tiny.onnx")
        tiny_model(model)
        paths = write_frames(shm, 4, 320, 240)
        sock = os.path.join(shm, "soak.sock")
        payloads = [encode({"frame_reference": p, "frame_metadata": {}, "camera_id": "c",
                            "model_id": "bench", "timestamp": time.time()}) for p in paths]
        print(f"# soak: {machine()}\n# {args.requests} requests, {args.connections} connections, "
              "tiny 64x64 model, 320x240 NV12 frames", flush=True)
        with server([*vasipc_cmd(model, sock), "--threads", "1"], sock) as proc:
            idle = sample(proc.pid, shm)
            rows = run(args, sock, payloads, proc.pid, shm)
            time.sleep(0.5)
            end = sample(proc.pid, shm)
        return report(rows, idle, end)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def run(args, sock, payloads, pid, shm) -> list[tuple]:
    lock = threading.Lock()
    done = [0]
    errors: list[bytes] = []
    rows: list[tuple] = []
    t0 = time.perf_counter()

    def client(k: int) -> None:
        conn = Conn(sock)
        i = k
        while True:
            with lock:
                if done[0] >= args.requests:
                    break
                done[0] += 1
                n = done[0]
            resp = conn.call(payloads[i % len(payloads)])
            i += 1
            if b'"error_code":null' not in resp:
                errors.append(resp)
            if n % args.every == 0:
                rss, fds, maps = sample(pid, shm)
                with lock:
                    rows.append((n, time.perf_counter() - t0, rss, fds, maps))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"{len(errors)} error responses, first: {errors[0][:300]!r}")
    return sorted(rows)


def report(rows, idle, end) -> int:
    print("\n| requests | s | VmRSS MB | open fds | /dev/shm mappings |\n|---|---|---|---|---|")
    print(f"| idle | 0 | {idle[0]:.1f} | {idle[1]} | {idle[2]} |")
    for n, t, rss, fds, maps in rows:
        print(f"| {n} | {t:.0f} | {rss:.1f} | {fds} | {maps} |")
    print(f"| after | - | {end[0]:.1f} | {end[1]} | {end[2]} |")
    rss = [r[2] for r in rows]
    flat = max(rss) - min(rss) <= 20 and abs(rss[-1] - rss[0]) <= 10 if rss else False
    clean = end[2] == 0 and end[1] <= idle[1]
    print(f"\nRSS after warm-up {rss[0]:.1f} -> {rss[-1]:.1f} MB (range {min(rss):.1f}-"
          f"{max(rss):.1f}): {'flat' if flat else 'NOT flat'} (±10 MB); after the responses: "
          f"{end[2]} frame mappings, {end[1]} fds vs {idle[1]} idle: "
          f"{'clean' if clean else 'LEAK'}")
    return 0 if flat and clean else 1


if __name__ == "__main__":
    sys.exit(main())
