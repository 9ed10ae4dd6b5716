"""Load generator for a running vasipc model server: `python -m vasipc.bench --socket PATH`.

Two ways to load it:
- closed loop (`--concurrency C`, the default with C=1): C workers, each sends a request,
  waits for the answer, sends the next; latency runs from send to answer.
- open loop (`--cameras N --fps F`): N cameras each emit F frames a second (fixed interval,
  or `--poisson` arrivals) whatever the server does; a pool of `--connections` workers
  sends them. Latency runs from each frame's *scheduled* time, so time spent waiting for a
  free connection or a slow server counts (no coordinated omission).

Like a video pipeline, every camera keeps a small ring of frame-export directories in
/dev/shm (`--ring` slots) and rewrites the next slot atomically
(vasipc.frames.write_frame_dir) before each request. The rings are removed on every way
out: the end of a run, an error, Ctrl-C, SIGTERM or SIGHUP (the frame writers are stopped
first, so none writes into a removed ring).
Prints throughput, error counts by `error_code`, latency percentiles and the server's
stage timings (medians of the responses' `metadata`); `--json FILE` writes them too.
`--sweep 1,2,4,8,16` repeats a closed-loop run per concurrency; `--plot FILE.png` draws
p50/p90/p99 against concurrency (needs matplotlib: `pip install 'vasipc[plot]'`).

Pure Python + numpy. Exit status: 0 when the run completed (error responses included:
they are counted, not fatal), 1 when the server cannot be reached or goes away during the
run (the run stops there and reports what it measured), 2 for a bad command line, 128 +
the signal's number when interrupted (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import queue
import random
import secrets
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vasipc.client import Client
from vasipc.frames import (
    FORMAT_NAMES,
    YUV420_FORMATS,
    encode_frame,
    parse_format,
    write_frame_dir,
)

PROG = "python -m vasipc.bench"
STAGES = ("queue_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms")
DEFAULT_SWEEP = (1, 2, 4, 8, 16)


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class Interrupted(BaseException):
    """A stopping signal (SIGINT, SIGTERM, SIGHUP) arrived: raised in the main thread, so
    the rings are removed on the way out; like KeyboardInterrupt, not an Exception."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Held:
    """While `active`, a stopping signal is kept in `pending` instead of raised."""

    active = False
    pending: int | None = None


def _interrupt(signum: int, _frame: object) -> None:
    # One is enough: later signals are ignored, they would cut the removal of the rings short.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _Held.active:
        _Held.pending = signum
        return
    raise Interrupted(signum)


def _remove_rings(gate: WriteGate, root: str) -> None:
    """Stop the writers, then remove the rings. Called with _Held.active set: a signal
    arriving meanwhile is raised once they are gone."""
    try:
        gate.close()
        shutil.rmtree(root, ignore_errors=True)
    finally:
        _Held.active = False
        if (signum := _Held.pending) is not None:
            _Held.pending = None
            raise Interrupted(signum)


# --- frames ----------------------------------------------------------------------------------

def _resize_nearest(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    rows = (np.arange(height) * rgb.shape[0] // height).clip(0, rgb.shape[0] - 1)
    cols = (np.arange(width) * rgb.shape[1] // width).clip(0, rgb.shape[1] - 1)
    return np.ascontiguousarray(rgb[rows][:, cols])


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1)
    return rgb.astype(np.uint8)


def load_image(path: str | None) -> tuple[np.ndarray, str]:
    """An RGB uint8 image and where it came from: `path` (.npy, or any format Pillow or
    OpenCV reads, whichever is installed), else skimage's astronaut, else a gradient."""
    if path:
        rgb = np.load(path) if path.endswith(".npy") else _read_image_file(path)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] < 3:
            raise UsageError(f"--image {path}: expected an 8-bit RGB image")
        return np.ascontiguousarray(rgb[:, :, :3]), path
    try:
        from skimage import data
    except ImportError:
        return _gradient(640, 480), "synthetic gradient"
    return data.astronaut(), "skimage astronaut"


def _read_image_file(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UsageError(f"--image {path}: no such file")
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except OSError as exc:
            raise UsageError(f"--image {path}: {exc}") from None
    try:
        import cv2
    except ImportError:
        raise UsageError(f"--image {path}: reading it needs Pillow or OpenCV "
                         "(or pass a .npy RGB array)") from None
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise UsageError(f"--image {path}: OpenCV cannot read it")
    return bgr[:, :, ::-1]


def make_variants(rgb: np.ndarray, width: int, height: int, pixel_format: str,
                  count: int) -> list[np.ndarray]:
    """`count` encoded frames: the image resized, shifted a little in each (so each ring
    slot holds different pixels, as a moving scene would)."""
    base = _resize_nearest(rgb, width, height)
    return [encode_frame(np.roll(base, 16 * i, axis=1), pixel_format) for i in range(count)]


class RingsClosed(Exception):
    """The run is over: its rings are being removed, no frame may be written."""


class WriteGate:
    """Lets frame writes through until `close()`, which waits for those under way: after
    it, no thread writes into the rings, so removing them leaves nothing behind."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writing = 0
        self._closed = False

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            if self._closed:
                raise RingsClosed
            self._writing += 1
        try:
            yield
        finally:
            with self._cond:
                self._writing -= 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._writing == 0)


class Camera:
    """One camera's ring of frame-export directories under `root`."""

    def __init__(self, root: str, index: int, cfg: Config, variants: list[np.ndarray],
                 gate: WriteGate) -> None:
        self.camera_id = f"bench-cam{index}"
        self.dir = os.path.join(root, self.camera_id)
        self.cfg = cfg
        self.variants = variants
        self.gate = gate
        self.seq = 0
        self.lock = threading.Lock()

    def next_frame(self) -> str:
        """Write the next frame into its ring slot (atomically) and return its path;
        RingsClosed once the run is being cleaned up."""
        with self.lock:
            seq = self.seq
            self.seq += 1
        path = os.path.join(self.dir, f"slot_{seq % self.cfg.ring:02d}")
        with self.gate.write():
            write_frame_dir(path, self.variants[seq % len(self.variants)],
                            width=self.cfg.width, height=self.cfg.height,
                            pixel_format=self.cfg.pixel_format, frame_id=seq)
        return path


# --- configuration and results ---------------------------------------------------------------

@dataclass
class Config:
    socket: str
    concurrency: int | None
    cameras: int | None
    fps: float | None
    poisson: bool
    connections: int
    duration: float | None
    requests: int | None
    width: int
    height: int
    pixel_format: str
    ring: int
    timeout: float
    deadline_ms: float | None
    request_config: dict[str, Any] | None  # the requests' `config` (mask_format, top_k, ...)
    warmup: int
    frame_dir: str
    progress: bool

    @property
    def open_loop(self) -> bool:
        return self.cameras is not None

    def describe(self) -> str:
        if self.open_loop:
            load = (f"open loop, {self.cameras} camera(s) x {self.fps:g} fps "
                    f"({'Poisson' if self.poisson else 'fixed interval'}), "
                    f"{self.connections} connection(s)")
        else:
            load = f"closed loop, concurrency {self.concurrency}"
        stop = " or ".join(filter(None, [self.duration and f"{self.duration:g} s",
                                         self.requests and f"{self.requests} requests"]))
        return f"{load}, {self.width}x{self.height} {self.pixel_format}, {stop}"


@dataclass
class Sample:
    latency_s: float
    error_code: str | None
    metadata: dict[str, Any] | None
    lag_s: float = 0.0  # open loop: how late the generator queued it after its schedule
    wait_s: float = 0.0  # open loop: schedule -> a worker took it (no free connection)


@dataclass
class Result:
    config: dict[str, Any]
    model_id: str
    elapsed_s: float
    samples: list[Sample] = field(default_factory=list)
    scheduled: int = 0  # open loop: frames the cameras emitted
    server_lost: str | None = None  # why the run stopped early, when the server went away

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.error_code is None]
        errors = Counter(s.error_code for s in self.samples if s.error_code is not None)
        lat = np.array([s.latency_s for s in ok], dtype=np.float64) * 1e3
        out: dict[str, Any] = {
            "config": self.config,
            "model_id": self.model_id,
            "elapsed_s": round(self.elapsed_s, 4),
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": dict(sorted(errors.items())),
            "error_rate": (len(self.samples) - len(ok)) / len(self.samples) if self.samples
                          else 0.0,
            "server_lost": self.server_lost,
            "throughput_rps": len(self.samples) / self.elapsed_s if self.elapsed_s else 0.0,
            "ok_rps": len(ok) / self.elapsed_s if self.elapsed_s else 0.0,
            "latency_ms": _percentiles(lat),
            "server_ms": _stage_medians([s.metadata for s in ok if s.metadata]),
        }
        if self.config.get("open_loop"):
            lag = np.array([s.lag_s for s in self.samples], dtype=np.float64) * 1e3
            out["scheduled"] = self.scheduled
            out["offered_rps"] = self.config["cameras"] * self.config["fps"]
            out["generator_lag_ms"] = _percentiles(lag)
            out["client_wait_ms"] = _percentiles(
                np.array([s.wait_s for s in self.samples], dtype=np.float64) * 1e3)
        return out


def _percentiles(values_ms: np.ndarray) -> dict[str, float | None]:
    if not len(values_ms):
        return {k: None for k in ("p50", "p90", "p99", "max", "mean")}
    p50, p90, p99 = np.percentile(values_ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(values_ms.max()), "mean": float(values_ms.mean())}


def _stage_medians(metas: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in (*STAGES, "batch_size"):
        vals = [m[key] for m in metas if isinstance(m.get(key), int | float)]
        out[key] = float(np.median(vals)) if vals else None
    sizes = [m["batch_size"] for m in metas if isinstance(m.get("batch_size"), int)]
    # the mean a request saw (a batch of 8 counts 8 times): what batching buys per request
    out["batch_size_mean"] = float(np.mean(sizes)) if sizes else None
    return out


# --- running ---------------------------------------------------------------------------------

class _Progress:
    """`\\r` progress line on stderr, refreshed by a daemon thread."""

    def __init__(self, enabled: bool, samples: list[Sample], duration: float | None,
                 requests: int | None) -> None:
        self.enabled, self.samples = enabled, samples
        self.duration, self.requests = duration, requests
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.t0 = time.monotonic()
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self._draw()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self.t0
        done = len(self.samples)
        fracs = [elapsed / self.duration if self.duration else 0.0,
                 done / self.requests if self.requests else 0.0]
        frac = min(1.0, max(fracs))
        errors = sum(1 for s in self.samples[:done] if s.error_code is not None)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        sys.stderr.write(f"\r[{bar}] {100 * frac:3.0f}% {done} req, "
                         f"{done / elapsed if elapsed else 0:,.1f} req/s, {errors} errors ")
        sys.stderr.flush()


class StopSignal:
    """Ends a run early when the server goes away; the first failure says why."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.server_lost: str | None = None
        self._lock = threading.Lock()

    def lose_server(self, why: str) -> None:
        with self._lock:
            if self.server_lost is None:
                self.server_lost = why
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def _call(client: Client, camera: Camera, cfg: Config, model_id: str,
          stop: StopSignal) -> Sample:
    """Write a frame, send it, time it. A timeout is an error code (a slow server); a
    connection that fails (the client has retried a pooled one already) means the server
    is gone: that ends the run."""
    path = camera.next_frame()
    message: dict[str, Any] = {"op": "infer", "frame_reference": path, "frame_metadata": {},
                               "camera_id": camera.camera_id, "model_id": model_id,
                               "timestamp": time.time()}
    if cfg.deadline_ms is not None:
        message["deadline_ms"] = cfg.deadline_ms
    if cfg.request_config is not None:
        message["config"] = cfg.request_config
    t = time.perf_counter()
    try:
        resp = client.request(message, cfg.timeout)
    except TimeoutError:
        return Sample(time.perf_counter() - t, "client_timeout", None)
    except (ConnectionError, OSError) as exc:
        stop.lose_server(str(exc))
        return Sample(time.perf_counter() - t, "client_connection", None)
    code = resp.get("error_code")
    return Sample(time.perf_counter() - t, None if code is None else str(code),
                  resp.get("metadata"))


def run_closed(cfg: Config, model_id: str, cameras: list[Camera]) -> Result:
    samples: list[Sample] = []
    budget = _Budget(cfg.requests)
    stop = StopSignal()
    with Client(cfg.socket, timeout=cfg.timeout, pool_size=cfg.concurrency,
                model_id=model_id) as client:
        start = threading.Barrier(cfg.concurrency + 1)

        def worker(camera: Camera) -> None:
            with contextlib.suppress(RingsClosed):  # the run was interrupted
                for _ in range(cfg.warmup):
                    _call(client, camera, cfg, model_id, stop)
                start.wait()
                while not stop.is_set() and time.perf_counter() < deadline[0] and budget.take():
                    samples.append(_call(client, camera, cfg, model_id, stop))

        deadline = [math.inf]
        threads = [threading.Thread(target=worker, args=(cameras[i],), daemon=True)
                   for i in range(cfg.concurrency)]
        for th in threads:
            th.start()
        start.wait()
        t0 = time.perf_counter()
        deadline[0] = t0 + (cfg.duration or math.inf)
        with _Progress(cfg.progress, samples, cfg.duration, cfg.requests):
            for th in threads:
                th.join()
        elapsed = time.perf_counter() - t0
    return Result(_config_dict(cfg), model_id, elapsed, samples, server_lost=stop.server_lost)


def run_open(cfg: Config, model_id: str, cameras: list[Camera]) -> Result:
    """Cameras emit frames on schedule into a queue; `connections` workers send them."""
    samples: list[Sample] = []
    budget = _Budget(cfg.requests)
    work: queue.Queue[tuple[float, float, Camera] | None] = queue.Queue()
    rng = random.Random(12345)
    interval = 1.0 / cfg.fps
    stop = StopSignal()
    with Client(cfg.socket, timeout=cfg.timeout, pool_size=cfg.connections,
                model_id=model_id) as client:
        for camera in cameras[:cfg.connections]:  # warm the connections and the model
            for _ in range(cfg.warmup):
                _call(client, camera, cfg, model_id, stop)

        def worker() -> None:
            while (item := work.get()) is not None:
                if stop.is_set():
                    continue  # the server is gone: what is queued is not sent
                scheduled, queued, camera = item
                wait = time.perf_counter() - scheduled
                try:
                    s = _call(client, camera, cfg, model_id, stop)
                except RingsClosed:  # the run was interrupted
                    return
                # latency from the schedule: queueing for a free worker counts
                s.latency_s = time.perf_counter() - scheduled
                s.lag_s, s.wait_s = queued - scheduled, wait
                samples.append(s)

        workers = [threading.Thread(target=worker, daemon=True)
                   for _ in range(cfg.connections)]
        for th in workers:
            th.start()
        t0 = time.perf_counter()
        end = t0 + (cfg.duration or math.inf)
        # one scheduler for all cameras: a heap of (next time, camera index); cameras start
        # spread over one interval so they do not all fire at once
        heap = [(t0 + interval * i / len(cameras), i) for i in range(len(cameras))]
        heapq.heapify(heap)
        scheduled = 0
        with _Progress(cfg.progress, samples, cfg.duration, cfg.requests):
            while heap and not stop.is_set():
                when, i = heapq.heappop(heap)
                if when >= end or not budget.take():
                    break
                if (wait := when - time.perf_counter()) > 0 and stop.event.wait(wait):
                    break
                work.put((when, time.perf_counter(), cameras[i]))
                scheduled += 1
                step = rng.expovariate(cfg.fps) if cfg.poisson else interval
                heapq.heappush(heap, (when + step, i))
            for _ in workers:
                work.put(None)
            for th in workers:
                th.join()
        elapsed = time.perf_counter() - t0
    return Result(_config_dict(cfg), model_id, elapsed, samples, scheduled,
                  server_lost=stop.server_lost)


class _Budget:
    """A shared request budget (None: unlimited)."""

    def __init__(self, total: int | None) -> None:
        self.left = total
        self.lock = threading.Lock()

    def take(self) -> bool:
        if self.left is None:
            return True
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


def _config_dict(cfg: Config) -> dict[str, Any]:
    d = {k: v for k, v in vars(cfg).items() if k not in ("progress", "frame_dir")}
    d["open_loop"] = cfg.open_loop
    return d


def run(cfg: Config, model_id: str, variants: list[np.ndarray]) -> Result:
    """One run; its frame directories live under a fresh directory, removed however the
    run ends (an Interrupted included), after the writers have stopped."""
    # The name is chosen before the directory exists, so no signal can fall between its
    # creation and the cleanup that knows it.
    root = os.path.join(cfg.frame_dir, f"vasipc-bench-{os.getpid()}-{secrets.token_hex(4)}")
    gate = WriteGate()
    try:
        os.mkdir(root, 0o700)
        count = cfg.cameras if cfg.open_loop else cfg.concurrency
        cameras = [Camera(root, i, cfg, variants, gate) for i in range(count)]
        print(f"-- {cfg.describe()}; frames in {root}", flush=True)
        return run_open(cfg, model_id, cameras) if cfg.open_loop else \
            run_closed(cfg, model_id, cameras)
    finally:
        try:
            # From here a signal waits for the removal; one raised before this store has
            # made later ones ignored, and the removal below still runs.
            _Held.active = True
        finally:
            _remove_rings(gate, root)


# --- reporting -------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def report(summary: dict[str, Any], out=sys.stdout) -> None:
    lat, srv = summary["latency_ms"], summary["server_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    failed = summary["requests"] - summary["ok"]
    outcome = (f"{summary['ok']} ok, {failed} errors = {100 * summary['error_rate']:.1f}%"
               if failed else f"{summary['ok']} ok")
    lines = [
        f"requests:   {summary['requests']} in {summary['elapsed_s']:.2f} s ({outcome})"
        + (", the server was lost" if summary["server_lost"] else ""),
        f"throughput: {summary['throughput_rps']:.1f} req/s ({summary['ok_rps']:.1f} ok/s)",
        f"errors:     {errors}",
        f"latency ms: p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  "
        f"max {_ms(lat['max'])}  (ok responses"
        + (", from scheduled send time)" if "offered_rps" in summary else ")"),
        f"server ms (medians): queue {_ms(srv['queue_ms'])}  preprocess "
        f"{_ms(srv['preprocess_ms'])}  inference {_ms(srv['inference_ms'])}  postprocess "
        f"{_ms(srv['postprocess_ms'])}  total {_ms(srv['total_ms'])}  batch size "
        + ("-" if srv["batch_size"] is None
           else f"{srv['batch_size']:g} (mean {srv['batch_size_mean']:.2f})"),
    ]
    if "offered_rps" in summary:
        lag, wait = summary["generator_lag_ms"], summary["client_wait_ms"]
        lines.insert(2, f"offered:    {summary['offered_rps']:.1f} req/s, "
                        f"{summary['scheduled']} frames scheduled; waiting for a free "
                        f"connection p50 {_ms(wait['p50'])} p99 {_ms(wait['p99'])} ms; "
                        f"generator lag p99 {_ms(lag['p99'])} ms")
    print("\n".join(lines), file=out, flush=True)


def plot(summaries: list[dict[str, Any]], path: str, title: str) -> Any:
    """Latency percentiles and throughput against concurrency, saved to `path`; returns
    the matplotlib Figure (closed: its axes can still be read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [s["config"]["concurrency"] for s in summaries]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(conc, [s["latency_ms"][q] or np.nan for s in summaries], style, label=q)
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(conc, [s["throughput_rps"] for s in summaries], "k.-", alpha=0.4,
             label="throughput")
    ax2.set_ylabel("throughput (req/s)")
    ax2.set_ylim(bottom=0)  # from zero: a few % of wobble must not look like a collapse
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [*("p50", "p90", "p99"), "throughput"], loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


# --- command line ----------------------------------------------------------------------------

def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _sweep(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected concurrencies >= 1, got {text!r}")
    return sorted(set(values))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one short line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="the server's Unix socket")
    load = ap.add_argument_group("load (closed loop by default)")
    load.add_argument("--concurrency", "-c", type=_positive(int),
                      help="closed loop: requests in flight (default 1)")
    load.add_argument("--cameras", type=_positive(int), help="open loop: number of cameras")
    load.add_argument("--fps", type=_positive(float), help="open loop: frames/s per camera")
    load.add_argument("--poisson", action="store_true",
                      help="open loop: Poisson arrivals instead of a fixed interval")
    load.add_argument("--connections", type=_positive(int),
                      help="open loop: sending workers/connections (default 2 x cameras, "
                           "at most 64)")
    load.add_argument("--duration", type=_positive(float),
                      help="seconds to run (default 10 unless --requests)")
    load.add_argument("--requests", "-n", type=_positive(int), help="requests to send")
    load.add_argument("--warmup", type=int, default=2,
                      help="untimed requests per connection first (default 2)")
    load.add_argument("--deadline-ms", type=_positive(float), help="send this deadline_ms")
    load.add_argument("--config", metavar="JSON",
                      help='the requests\' config object, e.g. \'{"mask_format": "polygon"}\' '
                           "for a segment model or '{\"top_k\": 1}' for a classifier")
    load.add_argument("--timeout", type=_positive(float), default=30.0,
                      help="client timeout per request, s (default 30)")
    frames = ap.add_argument_group("frames")
    frames.add_argument("--width", type=_positive(int), default=1920)
    frames.add_argument("--height", type=_positive(int), default=1080)
    frames.add_argument("--format", dest="pixel_format", default="NV12",
                        help="NV12 (default) or another pixel format of docs/contract.md "
                             "5.3 (FFmpeg's and GStreamer's names too)")
    frames.add_argument("--image", help="source picture (.npy, or PNG/JPEG with Pillow or "
                                        "OpenCV); default skimage's astronaut or a gradient")
    frames.add_argument("--ring", type=_positive(int), default=8,
                        help="frame slots per camera, rewritten in turn (default 8)")
    frames.add_argument("--frame-dir", default="/dev/shm",
                        help="where the frame directories go (default /dev/shm; must be "
                             "under the server's --frame-root)")
    out = ap.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the results as JSON")
    out.add_argument("--sweep", type=_sweep, metavar="C1,C2,...",
                     help="closed loop: one run per concurrency")
    out.add_argument("--plot", metavar="FILE.png",
                     help="sweep concurrency (default 1,2,4,8,16) and plot p50/p90/p99")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    return ap


def parse_config(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        if (a.cameras is None) != (a.fps is None):
            raise UsageError("open loop needs both --cameras and --fps")
        if a.cameras is not None and a.concurrency is not None:
            raise UsageError("--concurrency (closed loop) and --cameras/--fps (open loop) "
                             "exclude each other")
        if (a.sweep or a.plot) and a.cameras is not None:
            raise UsageError("--sweep/--plot sweep closed-loop concurrency; drop --cameras")
        if a.poisson and a.cameras is None:
            raise UsageError("--poisson is for open loop (--cameras/--fps)")
        if a.connections is not None and a.cameras is None:
            raise UsageError("--connections is for open loop; closed loop uses --concurrency")
        if a.warmup < 0:
            raise UsageError("--warmup must be >= 0")
        try:
            code = parse_format(a.pixel_format)
        except ValueError as exc:
            raise UsageError(f"--format: {exc}") from None
        fmt = FORMAT_NAMES[code]
        if code in YUV420_FORMATS and (a.width % 2 or a.height % 2):
            raise UsageError(f"{fmt} needs an even --width and --height")
        request_config = None
        if a.config is not None:
            try:
                request_config = json.loads(a.config)
            except ValueError:
                raise UsageError(f"--config is not JSON: {a.config}") from None
            if not isinstance(request_config, dict):
                raise UsageError("--config must be a JSON object")
        if not os.path.isdir(a.frame_dir):
            raise UsageError(f"--frame-dir {a.frame_dir} is not a directory")
        if a.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("--plot needs matplotlib: pip install 'vasipc[plot]'") from None
            a.sweep = a.sweep or list(DEFAULT_SWEEP)
    except UsageError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    cameras = a.cameras
    cfg = Config(
        socket=a.socket, concurrency=None if cameras else (a.concurrency or 1),
        cameras=cameras, fps=a.fps, poisson=a.poisson,
        connections=a.connections or (min(64, 2 * cameras) if cameras else 0),
        duration=a.duration if a.duration or a.requests else 10.0, requests=a.requests,
        width=a.width, height=a.height, pixel_format=fmt, ring=a.ring, timeout=a.timeout,
        deadline_ms=a.deadline_ms, request_config=request_config, warmup=a.warmup,
        frame_dir=a.frame_dir,
        progress=not a.quiet and sys.stderr.isatty())
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    # A signal raises Interrupted in this thread, so every `finally` on the way out runs
    # (the rings' removal). A signal the caller ignores (nohup, a background job) stays so.
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _interrupt)
    try:
        return _measure(cfg, args)
    except Interrupted as exc:
        print(f"{PROG}: interrupted by {exc}; its frames are removed", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _measure(cfg: Config, args: argparse.Namespace) -> int:
    try:
        rgb, source = load_image(args.image)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        with Client(cfg.socket, timeout=min(cfg.timeout, 10.0), pool_size=0) as probe:
            info = probe.info()
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: cannot query {cfg.socket}: {exc}", file=sys.stderr)
        return 1
    model_id = str(info.get("model_id"))
    slots = cfg.ring
    variants = make_variants(rgb, cfg.width, cfg.height, cfg.pixel_format, min(slots, 4))
    print(f"vasipc bench: {cfg.socket}, model {model_id} "
          f"({info.get('architecture', '?')} {info.get('task', '?')}, "
          f"{', '.join(info.get('providers') or []) or '?'}, max batch "
          f"{info.get('max_batch_size', '?')}); image: {source}", flush=True)

    summaries: list[dict[str, Any]] = []
    for conc in args.sweep or [None]:
        if conc is not None:
            cfg.concurrency = conc
        summary = run(cfg, model_id, variants).summary()
        summary["source_image"] = source
        report(summary)
        summaries.append(summary)
        if summary["server_lost"]:
            break
    if args.sweep:
        print("\n| concurrency | req/s | p50 ms | p90 ms | p99 ms | errors |\n"
              "|---|---|---|---|---|---|")
        for s in summaries:
            lat = s["latency_ms"]
            print(f"| {s['config']['concurrency']} | {s['throughput_rps']:.1f} | "
                  f"{_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | "
                  f"{sum(s['errors'].values())} |")
    if args.json:
        doc = {"runs": summaries} if args.sweep else summaries[0]
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    if lost := summaries[-1]["server_lost"]:
        print(f"{PROG}: error: lost the server on {cfg.socket} after "
              f"{summaries[-1]['requests']} requests, run stopped: {lost}", file=sys.stderr)
        return 1
    if args.plot:
        plot(summaries, args.plot, f"{model_id} on {cfg.socket}: {cfg.width}x{cfg.height} "
                                   f"{cfg.pixel_format}, closed loop")
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
