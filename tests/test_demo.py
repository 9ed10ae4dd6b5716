"""`python -m vasipc.demo`: a real server, a real photo, an annotated PNG."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import pytest
from conftest import REPO_ROOT, ServerProcess


@pytest.fixture
def run_demo(child_env, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vasipc.demo", *args], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path, env=child_env)
    return run


@pytest.mark.slow
def test_demo_detects_on_the_astronaut(run_demo, tmp_path, nudenet_model, astronaut_rgb):
    pil_image = pytest.importorskip("PIL.Image")
    out = tmp_path / "demo.png"
    done = run_demo("--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "FACE_FEMALE" in done.stdout
    with pil_image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == (astronaut_rgb.shape[1], astronaut_rgb.shape[0])


def test_demo_bad_option_exits_2(run_demo):
    done = run_demo("--no-such-option")
    assert done.returncode == 2 and "usage" in done.stderr


def test_demo_unreadable_image_exits_2(run_demo, tmp_path, nudenet_model):
    bogus = tmp_path / "not-an-image.png"
    bogus.write_text("hello")
    done = run_demo("--image", str(bogus), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2
    assert "cannot read image" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("case_name", "needle"), [("yolo-segment", "detections"),
                                                   ("yolo-pose", "detections"),
                                                   ("yolo-obb", "detections"),
                                                   ("yolo-classify", "top 5 classes")])
def test_demo_any_family(run_demo, tmp_path, case_name, needle, astronaut_rgb):
    """--model FILE serves any family; masks, keypoints and rotated boxes are drawn (the
    PNG differs from the photo where they are), classes are listed."""
    import numpy as np
    from family_models import build

    pil_image = pytest.importorskip("PIL.Image")
    _, model = build(case_name, tmp_path / "model")
    out = tmp_path / "demo.png"
    done = run_demo("--model", str(model), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert needle in done.stdout
    with pil_image.open(out) as png:
        drawn = np.asarray(png.convert("RGB"))
    assert drawn.shape == astronaut_rgb.shape
    changed = (drawn != astronaut_rgb).any(axis=2).mean()
    assert changed > (0.2 if case_name == "yolo-segment" else 0.001), changed


def test_demo_missing_model_exits_2(run_demo, tmp_path):
    done = run_demo("--model", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_path_prints_the_demos_model(run_demo, nudenet_model):
    done = run_demo("--model-path")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{nudenet_model}\n"


def readme_client_example() -> str:
    """The README's Python block under "## Client"."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("\n## Client\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_serving_after_the_demo(run_demo, child_env, tmp_path, shm_dir, astronaut_rgb):
    """README "Serving a model" then "Client", as a user who has only run the demo does it:
    the demo's model served by the command shown (its id, 320n, from the file's stem, names
    the socket vas_model_320n.sock; --socket-dir stands in for /tmp), then the client example
    run as written on a real photo, only its socket and frame paths moved to this test's."""
    pil_image = pytest.importorskip("PIL.Image")
    model = run_demo("--model-path").stdout.strip()
    with tempfile.TemporaryDirectory(prefix="vasipc-") as sockets:  # short: sun_path is 108 bytes
        server = ServerProcess([sys.executable, "-m", "vasipc.serve", "--model", model,
                                "--socket-dir", sockets], f"{sockets}/vas_model_320n.sock",
                               tmp_path / "server.stderr")
        try:
            server.wait_ready()
            code = readme_client_example()
            for written, here in (("/tmp/vas_model_320n.sock", server.socket),
                                  ('discover("/tmp")', f'discover("{sockets}")'),
                                  ("/dev/shm/cam1/f42", str(shm_dir / "cam1" / "f42"))):
                assert written in code, written
                code = code.replace(written, here)
            pil_image.fromarray(astronaut_rgb).save(tmp_path / "photo.jpg", quality=95)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=120, cwd=tmp_path, env=child_env)
        finally:
            server.stop()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("FACE_FEMALE ") for line in lines), done.stdout
    assert "ok 320n" in lines
    assert f"{server.socket} 320n" in lines
