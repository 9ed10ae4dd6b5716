"""Smoke test of an installed vasipc, run by .ci/run's wheel stage in a clean venv outside the checkout.

    python smoke_installed.py MODEL.onnx

Checks what a user who ran `pip install vasipc-*.whl` gets: the package imports from
site-packages (not from a source tree) with the version its metadata states,
`vasipc-serve` serves MODEL on a socket, one `infer` on a real NV12 frame written with
`vasipc.frames` is answered through `vasipc.Client`, `vasipc check MODEL` passes, and
SIGTERM stops the server with exit code 0.
Prints one line per step; any failure is an exception (exit 1).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import vasipc
from vasipc import frames

CHECKOUT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def console_script(name: str) -> str:
    """The installed entry point beside this interpreter (as `pip install` put it there)."""
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        raise SystemExit(f"smoke: {path} is missing: the wheel did not install its console scripts")
    return str(path)


def test_image(width: int = 640, height: int = 480) -> np.ndarray:
    """An RGB frame with structure for the letterbox and the detector (gradients, a block)."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack(np.broadcast_arrays(x + 0 * y, y + 0 * x, (x + y) / 2), axis=-1)
    rgb[height // 4: height // 2, width // 3: width // 2] = (220, 40, 40)
    return rgb.astype(np.uint8)


def wait_ready(proc: subprocess.Popen, client: vasipc.Client, socket_path: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"smoke: the server exited with {proc.returncode}:\n{log.read_text()}")
        if os.path.exists(socket_path):
            try:
                if client.health().get("ready") is True:
                    return
            except OSError:
                pass  # bound but not yet answering
        if time.monotonic() > deadline:
            raise SystemExit(f"smoke: no ready server after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()}")
        time.sleep(0.2)


def main() -> None:
    model = Path(sys.argv[1]).resolve()
    installed = Path(vasipc.__file__).resolve()
    if installed.is_relative_to(CHECKOUT) or "site-packages" not in installed.parts:
        raise SystemExit(f"smoke: vasipc was imported from {installed}, not from an installed wheel")
    version = importlib.metadata.version("vasipc")
    if version != vasipc.__version__:
        raise SystemExit(f"smoke: the metadata says {version}, vasipc.__version__ {vasipc.__version__}")
    print(f"smoke: vasipc {version} from {installed.parent}")

    work = Path(tempfile.mkdtemp(prefix="vasipc-smoke-"))
    frame_dir = Path(tempfile.mkdtemp(prefix="vasipc-smoke-", dir="/dev/shm")) / "frame"
    socket_path = str(work / "smoke.sock")
    log = work / "server.log"
    proc = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [console_script("vasipc-serve"), "--model", str(model), "--model-id", "smoke",
                 "--socket", socket_path, "--device", "cpu"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        with vasipc.Client(socket_path, timeout=30.0) as client:
            wait_ready(proc, client, socket_path, log)
            info = client.info()
            print(f"smoke: serving {info['model_id']} on {info['device']}")

            rgb = test_image()
            frames.write_frame_dir(frame_dir, frames.rgb_to_nv12(rgb), width=rgb.shape[1],
                                   height=rgb.shape[0], pixel_format="NV12")
            result = client.infer(frame_dir, camera_id="smoke")
            if result.model_id != "smoke":
                raise SystemExit(f"smoke: infer answered for model {result.model_id!r}")
            print(f"smoke: infer answered with {len(result.detections)} detections "
                  f"in {result.metadata['total_ms']:.1f} ms")

        check = subprocess.run([console_script("vasipc"), "check", str(model), "--device", "cpu"],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        if check.returncode != 0:
            raise SystemExit(f"smoke: vasipc check exited {check.returncode}:\n{check.stdout}{check.stderr}")
        print("smoke: vasipc check passed")

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT_S)
        if code != 0:
            raise SystemExit(f"smoke: the server exited {code} on SIGTERM:\n{log.read_text()}")
        print("smoke: SIGTERM, exit code 0")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(frame_dir.parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
