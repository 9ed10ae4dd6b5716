"""`vasipc quantize` (issue 11): INT8 post-training quantization of a model's highest
version, installed as the next version with its agreement report.

The CLI runs as a real child process (`python -m vasipc quantize ...`, this checkout on
its path) on nudenet's trained 320n in a ROOT/ID/1 layout, calibrated on a few frames in
every form FRAMES_DIR takes: frame-export directories (NV12, BGR24), a raw I420 file
with its FILE.json metadata and a PNG. The int8 version is read back with `onnx` and
served by `vasipc check`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, _child_env

from vasipc import frames

pytestmark = pytest.mark.slow  # calibration and INT8 servers: tens of seconds a test

MODEL_ID = "nude"
REPORT_KEYS = {"frames", "float_detections", "int8_detections", "matched", "mean_iou",
               "max_score_drift", "mean_score_drift"}


def run_cli(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vasipc", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", cwd=REPO_ROOT,
                          env=_child_env(), timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, text: str) -> None:
    """Exit code 2, one line on stderr (no traceback) that says `text`."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vasipc quantize: error: "), result.stderr
    assert text in lines[0]


def write_calibration(directory: Path, rgb: np.ndarray) -> None:
    """Four frames: NV12 and BGR24 frame-export directories, a raw I420 file with its
    metadata, a PNG (the astronaut, mirrored and cropped for variety), and a stray file."""
    h, w = rgb.shape[:2]
    mirrored = np.ascontiguousarray(rgb[:, ::-1])
    frames.write_frame_dir(directory / "cam1" / "000001", frames.rgb_to_nv12(rgb), width=w,
                           height=h, pixel_format="NV12", frame_id=1)
    frames.write_frame_dir(directory / "cam1" / "000002", frames.encode_frame(mirrored, "BGR24"),
                           width=w, height=h, pixel_format="BGR24", frame_id=2)
    crop = frames.crop_even(np.ascontiguousarray(rgb[h // 8:, : w * 3 // 4]))
    frames.write_raw_frame(directory / "ring.i420", frames.rgb_to_i420(crop))
    (directory / "ring.i420.json").write_text(json.dumps(
        {"width": crop.shape[1], "height": crop.shape[0], "format": "I420"}))
    cv2 = pytest.importorskip("cv2")
    assert cv2.imwrite(str(directory / "photo.png"), np.ascontiguousarray(rgb[h // 4:, :, ::-1]))
    (directory / "notes.txt").write_text("not a frame\n")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, nudenet_model, astronaut_rgb) -> dict:
    """ROOT/nude/1 (nudenet 320n with a model.yaml), quantized once for the module."""
    base = tmp_path_factory.mktemp("quantize")
    source = base / "models" / MODEL_ID / "1"
    source.mkdir(parents=True)
    shutil.copy(nudenet_model, source / "320n.onnx")
    (source / "model.yaml").write_text("model_name: NudeNet 320n\nconfidence_threshold: 0.3\n")
    calibration = base / "frames"
    write_calibration(calibration, astronaut_rgb)
    result = run_cli("quantize", str(source.parent), "--calibration", str(calibration), "--json")
    assert result.returncode == 0, result.stderr
    return {"root": source.parent, "source": source, "calibration": calibration,
            "report": json.loads(result.stdout)}


def test_quantize_installs_the_next_version_with_a_qdq_model(quantized):
    import onnx

    new = quantized["root"] / "2"
    assert quantized["report"]["directory"] == str(new)
    assert sorted(p.name for p in quantized["root"].iterdir()) == ["1", "2"]  # nothing left over
    assert sorted(p.name for p in new.iterdir()) == ["model.onnx", "model.yaml"]
    graph = onnx.load(str(new / "model.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 50
    assert sum(n.op_type == "Conv" for n in graph.node) == 64  # still there, in QDQ form
    made_by = {out: n for n in graph.node for out in n.output}
    decode = next(n for n in graph.node if n.name == "/model.22/Sigmoid")  # the class scores
    assert made_by[decode.input[0]].op_type != "DequantizeLinear"  # computed in float
    assert all(n.op_type != "QuantizeLinear" for n in graph.node if decode.output[0] in n.input)


def test_model_yaml_records_source_precision_and_agreement(quantized):
    doc = yaml.safe_load((quantized["root"] / "2" / "model.yaml").read_text())
    source_weights = quantized["source"] / "320n.onnx"
    assert doc["model_name"] == "NudeNet 320n" and doc["confidence_threshold"] == 0.3  # carried
    assert doc["model_version"] == "2" and doc["model_weights"] == "model.onnx"
    assert doc["precision"] == "int8"
    assert doc["source"] == {"version": "1", "path": str(quantized["source"]),
                             "weights_sha256": hashlib.sha256(source_weights.read_bytes()).hexdigest()}
    assert doc["weights_sha256"] == hashlib.sha256(
        (quantized["root"] / "2" / "model.onnx").read_bytes()).hexdigest()
    report = doc["quantization_report"]
    assert set(report) == REPORT_KEYS
    assert report["frames"] == 4  # the stray text file is not a frame
    assert report["float_detections"] >= 1  # the astronaut's face, at least
    assert 0 < report["matched"] <= min(report["float_detections"], report["int8_detections"])
    assert 0.5 <= report["mean_iou"] <= 1  # matches have IoU >= 0.5
    assert 0 <= report["mean_score_drift"] <= report["max_score_drift"] <= 1
    assert quantized["report"]["quantization_report"] == report
    assert quantized["report"]["calibration"]["frames"] == [
        "cam1/000001", "cam1/000002", "photo.png", "ring.i420"]


def test_the_int8_version_serves(quantized):
    result = run_cli("check", str(quantized["root"]), "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout)
    assert check["model_version"] == "2"
    assert check["weights"] == str(quantized["root"] / "2" / "model.onnx")
    assert check["ignored_yaml_keys"] == []  # precision, source, quantization_report are known


def test_an_already_quantized_source_is_refused(quantized):
    result = run_cli("quantize", str(quantized["root"]), "--calibration",
                     str(quantized["calibration"]))
    assert_refused(result, "already quantized")
    # the int8 weights alone (no model.yaml saying so) are recognized by their graph
    lone = quantized["root"].parent / "lone" / "1"
    lone.mkdir(parents=True)
    shutil.copy(quantized["root"] / "2" / "model.onnx", lone / "model.onnx")
    result = run_cli("quantize", str(lone.parent), "--calibration", str(quantized["calibration"]))
    assert_refused(result, "already quantized")
    assert sorted(p.name for p in lone.parent.iterdir()) == ["1"]


def test_no_usable_frames_is_refused(quantized, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here\n")
    result = run_cli("quantize", str(quantized["root"]), "--model-version", "1",
                     "--calibration", str(empty))
    assert_refused(result, "no usable calibration frames")
    broken = tmp_path / "broken"
    (broken / "f").mkdir(parents=True)
    (broken / "f" / "frame.meta").write_bytes(b"\0" * 10)  # a torn header
    result = run_cli("quantize", str(quantized["root"]), "--model-version", "1",
                     "--calibration", str(broken))
    assert_refused(result, "no usable calibration frames")
    assert sorted(p.name for p in quantized["root"].iterdir()) == ["1", "2"]


def test_a_model_dir_without_versions_is_refused(quantized, tmp_path):
    result = run_cli("quantize", str(quantized["source"]), "--calibration",
                     str(quantized["calibration"]))
    assert_refused(result, "is not a directory of numeric versions")
    result = run_cli("quantize", str(quantized["root"]))  # --calibration is required
    assert result.returncode == 2 and "--calibration" in result.stderr


def test_a_watching_server_serves_the_int8_version(tmp_path, nudenet_model, astronaut_rgb,
                                                   server_factory):
    """`vasipc quantize` beside a `--watch` server: the server reloads once, onto version 2
    at int8 (on OpenVINO where it is installed: auto's runtime for a quantized model), and
    answers as before."""
    from serve_cli import info, spawn

    root = tmp_path / "models"
    (root / MODEL_ID / "1").mkdir(parents=True)
    shutil.copy(nudenet_model, root / MODEL_ID / "1" / "320n.onnx")
    calibration = tmp_path / "frames"
    write_calibration(calibration, astronaut_rgb)
    sock = server_factory.socket_path("q.sock")
    server = spawn(server_factory, ["--models-root", str(root), "--model-id", MODEL_ID,
                                    "--watch", "--watch-interval", "0.1", "--socket", sock], sock)
    before = info(sock)
    assert (before["model_version"], before["precision"]) == ("1", "fp32")
    result = run_cli("quantize", str(root / MODEL_ID), "--calibration", str(calibration))
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 120
    while info(sock)["model_version"] != "2":
        assert server.proc.poll() is None, server.stderr_text()
        assert time.monotonic() < deadline, f"version 2 not served:\n{server.stderr_text()}"
        time.sleep(0.05)
    after = info(sock)
    assert after["precision"] == "int8"
    try:
        import openvino  # noqa: F401
        assert after["backend"] == "openvino"
    except ImportError:
        assert after["backend"] == "onnxruntime"
    assert server.stderr_text().count("reloaded") == 1, server.stderr_text()
    assert server.stop() == 0
