"""Shared helpers for the benchmarks: test frames, servers, a wire client, load, statistics.

Imported by the pytest-benchmark files (pytest puts bench/ on sys.path) and by the scripts
(`python bench/ipc.py` runs with bench/ as sys.path[0]). It puts the repository root on
sys.path so the in-place build of vasipc is importable without installing it.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:  # the kernels' reference data (reference_kernels)
    sys.path.append(str(REPO / "tests"))

PYTHON = sys.executable
# VASIPC_ZOO: a folder of real Ultralytics exports, one per task, named as tests/test_zoo.py
# names them (AGPL-3.0 derivatives: never part of the project); the zoo rows need it
ZOO = Path(os.environ["VASIPC_ZOO"]) if os.environ.get("VASIPC_ZOO") else None
RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160)}
_LENGTH = struct.Struct(">I")


def nudenet_model() -> str:
    """nudenet's 320n.onnx: a small trained YOLOv8n (320x320), cheap to load."""
    import nudenet

    return os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")


# --- models ---------------------------------------------------------------------------------

@functools.cache
def bench_model() -> Path:
    """The benchmark model: `VASIPC_BENCH_MODEL` if set, else the project's own 640x640
    YOLO-layout detector with real compute cost (tests/family_models.py `compute_model`,
    random weights), written into bench/out/ once per process."""
    if os.environ.get("VASIPC_BENCH_MODEL"):
        return Path(os.environ["VASIPC_BENCH_MODEL"])
    from family_models import compute_model

    (BENCH / "out").mkdir(exist_ok=True)
    return compute_model(BENCH / "out" / "compute-640.onnx")


def zoo_models(names: Sequence[str]) -> dict[str, Path]:
    """name -> path of each zoo model (`VASIPC_ZOO`); SystemExit naming what is missing."""
    if ZOO is None:
        sys.exit("the zoo rows need VASIPC_ZOO=DIR: real Ultralytics exports, one per task "
                 "(see bench/README.md)")
    paths = {n: ZOO / f"{n}.onnx" for n in names}
    missing = [n for n, p in paths.items() if not p.is_file()]
    if missing:
        sys.exit(f"missing from {ZOO}: {', '.join(missing)}")
    return paths

def tiny_model(path: str) -> None:
    """A tiny YOLO-shaped detector: input [1,3,64,64] -> Reshape -> MatMul -> Reshape ->
    Sigmoid -> output [1, 4+2, 16] (2 classes, 16 anchors), saved to `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((3 * 64 * 64, 6 * 16)) * 0.01)
                                .astype(np.float32), "w")
    flat = numpy_helper.from_array(np.array([1, 3 * 64 * 64], np.int64), "flat")
    shape = numpy_helper.from_array(np.array([1, 6, 16], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["images", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["r"]),
             helper.make_node("Sigmoid", ["r"], ["output0"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 16])],
        [w, flat, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


# --- frames ----------------------------------------------------------------------------------

def photo(width: int, height: int) -> np.ndarray:
    """scikit-image's astronaut (real photo content), RGB uint8, resized to width x height."""
    import cv2
    from skimage import data

    return cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_LINEAR)


def nv12_photo(width: int, height: int) -> np.ndarray:
    from vasipc.frames import rgb_to_nv12

    return rgb_to_nv12(photo(width, height))


def write_frames(root: str, count: int, width: int, height: int) -> list[str]:
    """`count` NV12 frame-export directories under `root`, the photo shifted a little in each."""
    from vasipc.frames import rgb_to_nv12, write_frame_dir

    base = photo(width, height)
    paths = []
    for i in range(count):
        path = os.path.join(root, f"frame_{i:03d}")
        write_frame_dir(path, rgb_to_nv12(np.roll(base, 16 * i, axis=1)), width=width,
                        height=height, pixel_format="NV12", frame_id=i)
        paths.append(path)
    return paths


# --- statistics ------------------------------------------------------------------------------

def pct(values: Sequence[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def spread(values: Sequence[float], fmt: str = ".3g") -> str:
    """'median (min-max, +-half-range %)' of repeated figures."""
    med = float(np.median(values))
    lo, hi = min(values), max(values)
    half = 100 * (hi - lo) / 2 / med if med else 0.0
    return f"{med:{fmt}} ({lo:{fmt}}-{hi:{fmt}}, ±{half:.0f}%)"


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{model}, {os.cpu_count()} CPUs, load average {load}, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}, Python {sys.version.split()[0]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_cpus(text: str | None) -> set[int] | None:
    """'0,1' or '2-15' -> a CPU set (None stays None): for pinning servers and clients."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


# --- wire --------------------------------------------------------------------------------------

def encode(msg: dict) -> bytes:
    """One framed message: uint32 big-endian length + JSON."""
    body = orjson.dumps(msg)
    return _LENGTH.pack(len(body)) + body


class Conn:
    """A persistent connection, one request outstanding at a time."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def call(self, framed: bytes) -> bytes:
        self.sock.sendall(framed)
        head = self._read(4)
        return self._read(_LENGTH.unpack(head)[0])

    def _read(self, n: int) -> bytes:
        """Exactly n bytes, received into one buffer (a large answer, a segment model's
        masks, is not copied once per chunk)."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise EOFError("server closed the connection")
            got += k
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


# --- servers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def server(cmd: Sequence[str], sock: str, timeout: float = 120.0,
           cpus: set[int] | None = None,
           env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run a server subprocess (pinned to `cpus` if given; with `env` for its environment
    if given) until it answers `health` on `sock`; SIGTERM it on exit."""
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(list(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        try:
            _wait_ready(proc, sock, timeout, log)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen, sock: str, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{tail}")
        try:
            conn = Conn(sock, timeout=5)
            orjson.loads(conn.call(encode({"op": "health"})))
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.args} did not answer on {sock}") from None
            time.sleep(0.1)


def vasipc_cmd(model: str | os.PathLike, sock: str, model_id: str = "bench") -> list[str]:
    return [PYTHON, "-m", "vasipc.serve", "--model", os.fspath(model), "--socket", sock,
            "--model-id", model_id, "--log-level", "WARNING"]


# --- load ------------------------------------------------------------------------------------

@dataclass
class Load:
    """What a closed-loop run measured: requests, wall time, per-request latency (s)."""

    requests: int
    elapsed_s: float
    latencies_s: np.ndarray
    metadata: list[dict] = field(default_factory=list)  # server timings from infer responses
    cpu_per_request_s: float = float("nan")  # CPU time of the server (or this process)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s

    def p(self, q: float) -> float:
        """Latency percentile in ms."""
        return pct(self.latencies_s, q) * 1e3


def _client(path: str, payloads: list[bytes], requests: int | None, duration: float | None,
            warmup: int, cpus: set[int] | None, barrier, results) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    conn = Conn(path)
    for i in range(warmup):
        conn.call(payloads[i % len(payloads)])
    barrier.wait()
    lat: list[float] = []
    meta: list[dict] = []
    clock = time.perf_counter
    t_start = clock()
    stop = t_start + duration if duration is not None else float("inf")
    i = 0
    while (requests is None or i < requests) and (t := clock()) < stop:
        resp = orjson.loads(conn.call(payloads[i % len(payloads)]))
        lat.append(clock() - t)
        if resp.get("error_code") is not None:
            raise RuntimeError(f"error response: {resp}")
        if "metadata" in resp:
            meta.append(resp["metadata"])
        i += 1
    results.put((t_start, clock(), np.array(lat), meta))
    conn.close()


def drive(path: str, payloads: list[bytes], connections: int, *, requests: int | None = None,
          duration: float | None = None, warmup: int = 100, cpus: set[int] | None = None,
          server_pid: int | None = None) -> Load:
    """Closed loop: `connections` client processes (pinned to `cpus` if given), one
    persistent connection each, each sending `payloads` in turn until it has sent
    `requests` or `duration` s have passed. Processes (spawned, so no state leaks in) keep
    the client's GIL out of the figure. With `server_pid`, also the server's CPU time per
    request (warm-up requests counted in)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(connections, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(path, payloads, requests, duration, warmup,
                                               cpus, barrier, results))
             for _ in range(connections)]
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    for p in procs:
        p.start()
    got: list = []
    try:
        while len(got) < connections:
            try:
                got.append(results.get(timeout=1))
            except queue.Empty:
                if any(p.exitcode for p in procs):
                    raise RuntimeError("a client process failed (see its traceback above)"
                                       ) from None
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    latencies = np.concatenate([g[2] for g in got])
    elapsed = max(g[1] for g in got) - min(g[0] for g in got)
    load = Load(len(latencies), elapsed, latencies, [m for g in got for m in g[3]])
    if server_pid:
        served = load.requests + warmup * connections
        load.cpu_per_request_s = (cpu_seconds(server_pid) - cpu0) / served
    return load


# --- C tools (bench/c): the floor of a framed round trip --------------------------------------

C_DIR = BENCH / "c"
OUT = BENCH / "out"


def c_binary(name: str) -> Path:
    """bench/c/NAME.c built with the system compiler (`cc -O2 -pthread`) into
    bench/out/NAME, rebuilt when the source is newer."""
    src, exe = C_DIR / f"{name}.c", OUT / name
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        OUT.mkdir(exist_ok=True)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def rt_client(path: str, connections: int, requests: int, *, warmup: int = 100,
              duration: float = 0.0, cpus: set[int] | None = None) -> dict[str, float]:
    """Run bench/c/rt_client (pinned to `cpus` if given): `connections` connections x
    `requests` `health` round trips (or `duration` s each); its figures as a dict
    (requests, elapsed_s, rps, p50_us, p90_us, p99_us, max_us)."""
    cmd = [str(c_binary("rt_client")), path, str(connections), str(requests), str(warmup),
           str(duration)]
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{cmd} exited {out.returncode}: {out.stderr.strip()}")
    return {k: float(v) for k, v in (kv.split("=") for kv in out.stdout.split())}
