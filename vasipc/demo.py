"""End-to-end demo: `python -m vasipc.demo [--model FILE] [--image FILE] [--out PNG] [--keep-server]`.

Starts a real server on nudenet's detector (or `--model`, any family the server serves),
exports a photo as an NV12 frame in /dev/shm the way a video pipeline would, asks for its
answer with `vasipc.Client`, prints it and saves the photo annotated with it: boxes, and
per task masks, keypoints (joined by the skeleton when the model has one), rotated boxes
or the top classes. `--model-path` only prints where the demo's model is, to serve it by
hand (README, "Serving a model").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vasipc import frames
from vasipc.client import Client, InferResult
from vasipc.errors import VasipcError

MODEL_ID = "nudenet-320n"
INSTALL_HINT = "install the demo extra: pip install '.[cpu,demo]'"
SERVER_READY_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 20.0


class DemoError(Exception):
    """A failure worth a short message on stderr and exit code 2."""


class MissingDemoExtra(DemoError):
    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def nudenet_model_path() -> Path:
    """nudenet's 320n.onnx, found without importing nudenet (which loads onnxruntime)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDemoExtra
    path = Path(next(iter(spec.submodule_search_locations))) / "320n.onnx"
    if not path.is_file():
        raise DemoError(f"nudenet is installed but has no {path.name}; {INSTALL_HINT}")
    return path


def load_image(path: str | None) -> np.ndarray:
    """The photo to detect on, RGB uint8: `path` read with PIL, else skimage's astronaut."""
    if path is None:
        try:
            from skimage import data
        except ImportError:
            raise MissingDemoExtra from None
        return data.astronaut()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DemoError(f"cannot read image {path}: {exc}") from None


# --- the server process ----------------------------------------------------------------------

@dataclass
class ServerProcess:
    proc: subprocess.Popen
    socket: str
    stderr_path: Path

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace").strip()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: Path, model_id: str, workdir: Path, *, detached: bool) -> ServerProcess:
    socket_path = str(workdir / "demo.sock")
    stderr_path = workdir / "server.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vasipc.serve", "--model", str(model), "--model-id", model_id,
             "--socket", socket_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=detached)  # a kept server outlives this terminal's Ctrl-C
    server = ServerProcess(proc, socket_path, stderr_path)
    try:
        wait_until_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    with Client(server.socket, timeout=2.0, pool_size=0) as client:
        while True:
            if server.proc.poll() is not None:
                raise DemoError(f"the server exited with code {server.proc.returncode}:\n"
                                f"{server.stderr_text()}")
            if os.path.exists(server.socket):
                with contextlib.suppress(OSError):
                    if client.health().get("ready") is True:
                        return
            if time.monotonic() > deadline:
                raise DemoError(f"the server was not ready after {SERVER_READY_TIMEOUT_S:.0f} s:"
                                f"\n{server.stderr_text()}")
            time.sleep(0.1)


@contextlib.contextmanager
def exported_frame(rgb: np.ndarray) -> Iterator[Path]:
    """`rgb` as an NV12 frame-export directory in /dev/shm, removed afterwards."""
    if not os.path.isdir("/dev/shm"):
        raise DemoError("/dev/shm is missing: the server reads frames from there")
    path = Path(tempfile.mkdtemp(prefix="vasipc-demo-", dir="/dev/shm"))
    try:
        height, width = rgb.shape[:2]
        frames.write_frame_dir(path, frames.rgb_to_nv12(rgb), width=width, height=height,
                               pixel_format="NV12", frame_id=1)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- output ----------------------------------------------------------------------------------

def pixel_box(bbox: tuple[float, float, float, float], width: int,
              height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = bbox
    return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


def print_table(result: InferResult, width: int, height: int) -> None:
    timing = f"({result.metadata.get('total_ms', 0):.1f} ms on {result.metadata.get('device')})"
    if result.classifications is not None:
        print(f"top {len(result.classifications)} classes {timing}")
        for c in result.classifications:
            print(f"{c.class_name:<24} {c.confidence:5.3f}")
        return
    print(f"{len(result.detections)} detections {timing}")
    print(f"{'class':<24} {'conf':>5}  {'x_min':>5} {'y_min':>5} {'x_max':>5} {'y_max':>5}")
    for det in result.detections:
        box = pixel_box(det.bbox, width, height)
        print(f"{det.class_name:<24} {det.confidence:5.2f}  " + " ".join(f"{v:5d}" for v in box))


COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128)]


def save_annotated(rgb: np.ndarray, result: InferResult, frame_size: tuple[int, int],
                   out: str, skeleton: list[list[int]] | None = None) -> None:
    from PIL import Image, ImageDraw

    width, height = frame_size
    canvas = rgb[:height, :width].astype(np.float32)
    for i, det in enumerate(result.detections):  # masks first, blended under the outlines
        if det.mask is not None:
            m = det.mask.to_array()
            canvas[m] = canvas[m] * 0.5 + np.array(COLOURS[i % len(COLOURS)], np.float32) * 0.5
    image = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for i, det in enumerate(result.detections):
        colour = COLOURS[i % len(COLOURS)]
        box = pixel_box(det.bbox, *frame_size)
        if det.rotated_box is not None and det.polygon is not None:
            draw.polygon([(x * width, y * height) for x, y in det.polygon], outline=colour, width=2)
        else:
            draw.rectangle(box, outline=colour, width=2)
            if det.polygon is not None and len(det.polygon) > 1:
                draw.line([(x * width, y * height) for x, y in [*det.polygon, det.polygon[0]]],
                          fill=colour, width=1)
        if det.keypoints is not None:
            points = [(x * width, y * height, v) for x, y, v in det.keypoints]
            for a, b in skeleton or ():
                (xa, ya, va), (xb, yb, vb) = points[a], points[b]
                if (va is None or va >= 0.5) and (vb is None or vb >= 0.5):
                    draw.line([(xa, ya), (xb, yb)], fill=colour, width=2)
            for x, y, v in points:
                if v is None or v >= 0.5:
                    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        label = f"{det.class_name} {det.confidence:.2f}"
        left, top, right, bottom = draw.textbbox((box[0] + 3, box[1] + 2), label)
        draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=colour)
        draw.text((box[0] + 3, box[1] + 2), label, fill=(255, 255, 255))
    for row, c in enumerate(result.classifications or ()):
        draw.text((8, 8 + 14 * row), f"{c.class_name} {c.confidence:.3f}", fill=(255, 255, 255),
                  stroke_width=2, stroke_fill=(0, 0, 0))
    try:
        image.save(out, format="PNG")
    except OSError as exc:
        raise DemoError(f"cannot write {out}: {exc}") from None


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vasipc.demo",
        description="Serve a model (nudenet's detector by default) with vasipc and run it on a photo.")
    parser.add_argument("--model", metavar="FILE",
                        help="ONNX model of any family the server serves (default: nudenet's 320n)")
    parser.add_argument("--image", metavar="FILE",
                        help="photo to detect on (default: skimage's astronaut)")
    parser.add_argument("--out", metavar="PNG", default="vasipc-demo.png",
                        help="where to save the annotated photo (default: %(default)s)")
    parser.add_argument("--keep-server", action="store_true",
                        help="leave the server running afterwards and print its socket")
    parser.add_argument("--model-path", action="store_true",
                        help="print the path of the demo's model (nudenet's 320n.onnx) and exit: "
                             "serve it yourself with python -m vasipc.serve --model PATH")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.model_path:
        print(nudenet_model_path())
        return
    if args.model is not None:
        model = Path(args.model)
        if not model.is_file():
            raise DemoError(f"model file {model} does not exist")
        model_id = "".join(c if c.isalnum() or c in "._-" else "-" for c in model.stem)[:64] or "model"
    else:
        model, model_id = nudenet_model_path(), MODEL_ID
    try:
        import PIL  # noqa: F401  (needed only at the end: fail before starting anything)
    except ImportError:
        raise MissingDemoExtra from None
    rgb = load_image(args.image)
    frame_rgb = frames.crop_even(rgb)  # NV12 needs an even size
    height, width = frame_rgb.shape[:2]
    if width == 0 or height == 0:
        raise DemoError("the image is too small")

    workdir = Path(tempfile.mkdtemp(prefix="vasipc-demo-"))
    server = None
    keep_server = False
    try:
        server = start_server(model, model_id, workdir, detached=args.keep_server)
        with exported_frame(frame_rgb) as frame_dir, \
                Client(server.socket, model_id=model_id) as client:
            result = client.infer(frame_dir, camera_id="demo")
            skeleton = (client.info().get("keypoints") or {}).get("skeleton")
        keep_server = args.keep_server
    except (VasipcError, OSError) as exc:
        died = server is not None and server.proc.poll() is not None
        detail = f"\n{server.stderr_text()}" if died else ""
        raise DemoError(f"inference failed: {exc}{detail}") from None
    finally:
        if not keep_server:
            if server is not None:
                server.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(result, width, height)
    save_annotated(frame_rgb, result, (width, height), args.out, skeleton)
    print(f"annotated image: {args.out}")
    if args.keep_server:
        print(f"server still running: pid {server.proc.pid}, socket {server.socket}, "
              f"log {server.stderr_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except MissingDemoExtra as exc:
        print(exc, file=sys.stderr)
        return 2
    except DemoError as exc:
        print(f"vasipc.demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
