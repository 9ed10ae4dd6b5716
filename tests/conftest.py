"""Shared fixtures: the test model, the test photo, frame directories, server processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vasipc import frames

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_READY_TIMEOUT_S = 60.0


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["onnxruntime", pytest.param("openvino", marks=[
    pytest.mark.slow,
    pytest.mark.skipif(not _has_openvino(), reason="openvino is not installed (extra `openvino`)")])])
def every_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per backend: servers started by it get `VASIPC_BACKEND` (the
    lifecycle and batching guarantees hold on every runtime; the fast subset, `-m "not
    slow"`, runs them on ONNX Runtime only)."""
    monkeypatch.setenv("VASIPC_BACKEND", request.param)
    return request.param


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment for `python -m vasipc...` children: this checkout on the path."""
    return _child_env()


# --- data ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def nudenet_model() -> str:
    """Path of nudenet's 320n.onnx, a trained YOLOv8n detector (skips without nudenet)."""
    nudenet = pytest.importorskip("nudenet")
    path = Path(nudenet.__file__).with_name("320n.onnx")
    if not path.is_file():
        pytest.skip(f"nudenet is installed but {path} is missing")
    return str(path)


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    """skimage's astronaut photo (RGB uint8, even size, read-only)."""
    data = pytest.importorskip("skimage.data")
    rgb = frames.crop_even(data.astronaut())
    rgb.flags.writeable = False
    return rgb


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh directory under /dev/shm (the server's default frame root), removed after."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="vasipc-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def astronaut_frame(shm_dir: Path, astronaut_rgb: np.ndarray) -> Path:
    """The astronaut as an NV12 frame-export directory (frame_id 42) in `shm_dir`."""
    height, width = astronaut_rgb.shape[:2]
    path = shm_dir / "astronaut"
    frames.write_frame_dir(path, frames.rgb_to_nv12(astronaut_rgb), width=width, height=height,
                           pixel_format="NV12", frame_id=42)
    return path


# --- server processes ------------------------------------------------------------------------

class ServerProcess:
    """A `python -m vasipc.serve` child process with its stderr kept in a file."""

    def __init__(self, args: list[str], socket_path: str, stderr_path: Path) -> None:
        self.args = args
        self.socket = socket_path
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr,
                                         cwd=REPO_ROOT, env=_child_env())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = SERVER_READY_TIMEOUT_S) -> None:
        """Wait until the socket answers `health` with ready true; fail with stderr if the
        process dies or the time runs out."""
        from vasipc.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.socket, timeout=2.0, pool_size=0) as client:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited with {self.proc.returncode} before it was "
                                f"ready: {self.args}\n{self.stderr_text()}")
                if os.path.exists(self.socket):
                    try:
                        if client.health().get("ready") is True:
                            return
                    except OSError:
                        pass  # bound but not accepting yet, or restarting
                if time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"server not ready after {timeout} s: {self.args}\n"
                                f"{self.stderr_text()}")
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and return the exit code (the process is killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"server ignored signal {sig} for {timeout} s\n{self.stderr_text()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ServerLauncher:
    """Starts servers in a private short directory (socket paths must stay under 108 bytes)
    and kills whatever is still running at `close()`."""

    def __init__(self, default_model: str) -> None:
        self.default_model = default_model
        self.dir = Path(tempfile.mkdtemp(prefix="vasipc-"))
        self.servers: list[ServerProcess] = []

    def socket_path(self, name: str) -> str:
        return str(self.dir / name)

    def __call__(self, *extra_args: str, model: str | None = None,
                 model_id: str | None = "nudenet-320n", socket: str | None = None,
                 wait: bool = True) -> ServerProcess:
        """Start `python -m vasipc.serve --model M --socket S [--model-id ID] *extra_args`.

        `socket` defaults to a fresh path in the launcher's directory; `wait=False` returns
        at once (for tests of failing starts: then `.proc.wait()`).
        """
        index = len(self.servers)
        socket = socket or self.socket_path(f"vas_model_{index}.sock")
        args = [sys.executable, "-m", "vasipc.serve", "--model", model or self.default_model,
                "--socket", socket]
        if model_id is not None:
            args += ["--model-id", model_id]
        args += list(extra_args)
        server = ServerProcess(args, socket, self.dir / f"server_{index}.stderr")
        self.servers.append(server)
        if wait:
            server.wait_ready()
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def server_factory(nudenet_model: str) -> Iterator[ServerLauncher]:
    """Call it to start a server: `server_factory("--max-batch", "4", socket=...)`.
    Every server it started is killed at teardown."""
    launcher = ServerLauncher(nudenet_model)
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def nudenet_server(nudenet_model: str) -> Iterator[ServerProcess]:
    """One nudenet server (model id "nudenet-320n") shared by the whole session; for tests
    that only need a running server and do not stop or reconfigure it."""
    launcher = ServerLauncher(nudenet_model)
    try:
        yield launcher()
    finally:
        launcher.close()


ZOO = Path(os.environ.get("VASIPC_ZOO") or REPO_ROOT.parent / "shared" / "models" / "zoo")


def zoo_model(name: str) -> Path:
    """`name`.onnx of the model zoo: real Ultralytics 8.4 exports of every task, kept outside
    the project (never shipped: AGPL-3.0) in `VASIPC_ZOO`, else ../shared beside the checkout,
    and used by the zoo conformance tests only; skips, saying so, where it is absent."""
    path = ZOO / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the zoo of real exports lives outside the project: "
                    "VASIPC_ZOO, else ../shared; zoo conformance only)")
    return path


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 640x640 YOLOv8-detect-layout model with real compute cost (random weights, about
    two thirds of a YOLOv8n's cost, meaningless detections), built once per session
    (family_models.compute_model)."""
    from family_models import compute_model

    return str(compute_model(tmp_path_factory.mktemp("bench-model") / "compute-640.onnx"))


@pytest.fixture(scope="session")
def bench_server(bench_model: str) -> Iterator[ServerProcess]:
    """One benchmark-model server (model id "bench", default options) shared by the session:
    slow enough on CPU to fill its queue on demand. Do not stop or reconfigure it."""
    launcher = ServerLauncher(bench_model)
    try:
        yield launcher(model_id="bench")
    finally:
        launcher.close()
