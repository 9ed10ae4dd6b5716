"""docs/contract.md section 8 (command line): options and their defaults, bad options, model
sources (--model, --model-dir with model.yaml, --models-root), precedence of settings,
labels. Real server processes; failing starts must be short and traceback-free."""

from __future__ import annotations

import os
import stat
import time
import uuid
from pathlib import Path

import pytest
import wire
from serve_cli import assert_refused, info, run_serve, spawn

MODEL_ID = "nudenet-320n"
NUDENET_CLASSES = 18
OPTIONS = ["--model", "--model-dir", "--models-root", "--model-id", "--socket", "--socket-dir",
           "--socket-mode", "--frame-root", "--device", "--conf", "--iou", "--max-detections",
           "--labels", "--max-message-bytes", "--read-timeout", "--drain-timeout",
           "--max-frame-dim", "--max-batch", "--batch-timeout-us", "--max-queue",
           "--max-connections", "--idle-timeout", "--model-version", "--allow-uid", "--allow-gid"]


def onnx_model(path: Path, kind: str) -> Path:
    """A tiny ONNX model that loads in ONNX Runtime (all but "tiny-yolo" are not YOLO-style
    detectors)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    inits = []
    if kind == "identity-2d":  # a 2-D input and output
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
        inp = helper.make_tensor_value_info("x", f, [1, 8])
        out = helper.make_tensor_value_info("y", f, [1, 8])
    elif kind == "image-to-vector":  # an NCHW image in, a 2-D output (a classifier's shape)
        nodes = [helper.make_node("Flatten", ["x"], ["y"], axis=1)]
        inp = helper.make_tensor_value_info("x", f, [1, 3, 32, 32])
        out = helper.make_tensor_value_info("y", f, [1, 3072])
    elif kind == "four-channels":  # [B, 4, N]: boxes but no class scores
        inits = [helper.make_tensor("shape", TensorProto.INT64, [3], [1, 4, 768])]
        nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
        inp = helper.make_tensor_value_info("x", f, [1, 3, 32, 32])
        out = helper.make_tensor_value_info("y", f, [1, 4, 768])
    elif kind.startswith("tiny-yolo"):  # [B, 3, 32, 32] -> [B, 4 + 2, 512], B static
        b = int(kind.rpartition("-b")[2]) if "-b" in kind else 1
        inits = [helper.make_tensor("shape", TensorProto.INT64, [3], [b, 6, 512])]
        nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
        inp = helper.make_tensor_value_info("x", f, [b, 3, 32, 32])
        out = helper.make_tensor_value_info("y", f, [b, 6, 512])
    else:
        raise ValueError(kind)
    graph = helper.make_graph(nodes, kind, [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def link_model(target: Path, nudenet_model: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(nudenet_model)
    return target


def infer_dets(path: str, model_id: str, frame: Path, **config: object) -> list[dict]:
    msg = wire.infer_request(str(frame), model_id)
    if config:
        msg["config"] = config
    resp = wire.roundtrip(path, msg)
    assert resp["error_code"] is None, resp
    return resp["detections"]


def above(dets: list[dict], threshold: float) -> list[dict]:
    return [d for d in dets if d["confidence"] >= threshold]


def assert_default_conf(path: str, model_id: str, frame: Path, expected: float,
                        other: float) -> None:
    """The server's default confidence threshold is `expected`, observably not `other`:
    what it returns without a config is what a low threshold returns, cut at `expected`."""
    low = infer_dets(path, model_id, frame, confidence_threshold=0.01)
    assert above(low, expected) != above(low, other), (
        f"the astronaut's detections {[d['confidence'] for d in low]} cannot tell "
        f"{expected} from {other}")
    assert infer_dets(path, model_id, frame) == above(low, expected)


# --- help and defaults -----------------------------------------------------------------------

def test_help():
    result = run_serve("--help")
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        assert option in result.stdout, f"{option} missing from --help"


def test_defaults(server_factory, nudenet_model, tmp_path, astronaut_frame, monkeypatch):
    """Only --model: id = the file's stem, socket /tmp/vas_model_{id}.sock mode 0600, model
    name = stem, version "1", CPU with max batch 1, ONNX metadata class names, and --device
    auto on a CPU-only install serves on the CPU without a warning."""
    for var in [k for k in os.environ if k.startswith("VASIPC_")]:
        monkeypatch.delenv(var)
    model_id = unique("vcli")
    model = link_model(tmp_path / f"{model_id}.onnx", nudenet_model)
    path = f"/tmp/vas_model_{model_id}.sock"
    try:
        server = spawn(server_factory, ["--model", str(model)], path)
        got = info(path)
        assert got["model_id"] == model_id and got["model_name"] == model_id
        assert got["model_version"] == "1"
        assert got["socket"] == path
        assert got["max_batch_size"] == 1
        assert got["providers"] == ["CPUExecutionProvider"]
        assert got["task"] == "detect" and got["protocol_version"] == 1
        assert got["input"] == {"width": 320, "height": 320}
        assert len(got["classes"]) == NUDENET_CLASSES and got["classes"][1] == "FACE_FEMALE"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        resp = wire.roundtrip(path, wire.infer_request(str(astronaut_frame), model_id))
        assert resp["error_code"] is None and resp["metadata"]["device"] == "cpu", resp
        assert resp["metadata"]["model_version"] == "1"
        assert server.stop() == 0
        warnings = [ln for ln in server.stderr_text().splitlines() if "WARNING" in ln]
        assert warnings == [], server.stderr_text()
    finally:
        if os.path.lexists(path):
            os.unlink(path)


def test_every_option_accepted_with_its_default(server_factory, astronaut_frame):
    path = server_factory.socket_path("all.sock")
    server = server_factory(
        "--socket-dir", "/tmp", "--socket-mode", "0600", "--frame-root", "/dev/shm",
        "--device", "auto", "--conf", "0.25", "--iou", "0.45", "--max-detections", "300",
        "--max-message-bytes", str(10 * 1024 * 1024), "--read-timeout", "10",
        "--drain-timeout", "10", "--max-frame-dim", "8192", "--max-batch", "1",
        "--batch-timeout-us", "0", "--max-queue", "1024", "--max-connections", "1024",
        "--idle-timeout", "300", socket=path)
    got = info(path)
    assert got["socket"] == path and got["max_batch_size"] == 1 and got["model_id"] == MODEL_ID
    resp = wire.roundtrip(path, wire.infer_request(str(astronaut_frame), MODEL_ID))
    assert resp["error_code"] is None and resp["detections"], resp
    assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize(("static", "max_batch", "expected"), [(1, "4", 1), (2, "4", 2),
                                                               (4, None, 1)])
def test_max_batch_capped_by_static_batch_dimension(server_factory, tmp_path, astronaut_frame,
                                                    static, max_batch, expected):
    """--max-batch is capped by a static batch dimension; a model with a static batch above
    one is still served, one request at a time too."""
    model = onnx_model(tmp_path / "tiny.onnx", f"tiny-yolo-b{static}")
    args = ["--max-batch", max_batch] if max_batch else []
    server = server_factory(*args, model=str(model), model_id="tiny")
    got = info(server.socket)
    assert got["max_batch_size"] == expected
    assert got["input"] == {"width": 32, "height": 32}
    assert got["classes"] == ["class_0", "class_1"]
    resp = wire.roundtrip(server.socket, wire.infer_request(str(astronaut_frame), "tiny"))
    assert resp["error_code"] is None and resp["metadata"]["batch_size"] == 1, resp


def test_device_cpu_gives_no_warning(server_factory):
    server = server_factory("--device", "cpu")
    assert info(server.socket)["providers"] == ["CPUExecutionProvider"]
    assert server.stop() == 0
    assert "WARNING" not in server.stderr_text()


# --- bad command lines -----------------------------------------------------------------------

BAD_OPTIONS = {
    "unknown-flag": ["--bogus"],
    "conf-2": ["--conf", "2"],
    "conf-negative": ["--conf", "-0.1"],
    "conf-nan": ["--conf", "nan"],
    "conf-text": ["--conf", "high"],
    "iou-1.5": ["--iou", "1.5"],
    "max-batch-0": ["--max-batch", "0"],
    "threads-0": ["--threads", "0"],
    "max-batch-float": ["--max-batch", "2.5"],
    "max-detections-negative": ["--max-detections", "-1"],
    "device-tpu": ["--device", "tpu"],
    "device-cpu-index": ["--device", "cpu:1"],
    "device-cuda-x": ["--device", "cuda:x"],
    "socket-mode-999": ["--socket-mode", "999"],
    "socket-mode-too-big": ["--socket-mode", "1777"],
    "socket-mode-text": ["--socket-mode", "rw"],
    "max-message-bytes-0": ["--max-message-bytes", "0"],
    "read-timeout-0": ["--read-timeout", "0"],
    "idle-timeout-negative": ["--idle-timeout", "-5"],
    "drain-timeout-negative": ["--drain-timeout", "-1"],
    "max-frame-dim-0": ["--max-frame-dim", "0"],
    "batch-timeout-negative": ["--batch-timeout-us", "-1"],
    "max-queue-0": ["--max-queue", "0"],
    "max-connections-0": ["--max-connections", "0"],
    "missing-value": ["--conf"],
}


@pytest.mark.slow
@pytest.mark.parametrize("args", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_option_exits_2(nudenet_model, tmp_path, args):
    path = str(tmp_path / "s.sock")
    assert_refused(run_serve("--model", nudenet_model, "--socket", path, *args))
    assert not os.path.lexists(path)


BAD_ENVIRONMENT = {  # variable=value: what the one error line says after it
    "VASIPC_CONF=2": "2 must be <= 1",
    "VASIPC_MAX_BATCH=abc": "invalid value 'abc'",
    "VASIPC_MAX_BATCH=0": "0 must be >= 1",
    "VASIPC_SOCKET_MODE=rw": "invalid octal mode 'rw'",
    "VASIPC_DEVICE=tpu": "invalid device 'tpu'",
    "VASIPC_BACKEND=tflite": "invalid backend 'tflite'",
    "VASIPC_LOG_LEVEL=loud": "invalid choice (choose from DEBUG, INFO, WARNING, ERROR)",
    "VASIPC_LOG_FORMAT=xml": "invalid choice (choose from text, json)",
    "VASIPC_WATCH=maybe": "expected one of 1, true, yes, on, 0, false, no, off",
    "VASIPC_FRAME_ROOT=/dev/shm:/no/such/root": "/no/such/root is not a directory",
}


@pytest.mark.slow
@pytest.mark.parametrize("setting", BAD_ENVIRONMENT)
def test_bad_environment_value_names_the_variable(nudenet_model, tmp_path, monkeypatch, setting):
    """`vasipc.serve: error: VAR=value: why`, one line (no usage: the command line is not
    at fault), exit 2."""
    var, value = setting.split("=", 1)
    monkeypatch.setenv(var, value)
    path = str(tmp_path / "s.sock")
    err = assert_refused(run_serve("--model", nudenet_model, "--socket", path), max_lines=1)
    assert err.startswith(f"vasipc.serve: error: {setting}: "), err
    assert BAD_ENVIRONMENT[setting] in err, err
    assert not os.path.lexists(path)


@pytest.mark.slow
def test_command_line_wins_over_a_bad_environment_value(server_factory, monkeypatch):
    """An environment value the command line overrides is never parsed; an empty one is unset."""
    monkeypatch.setenv("VASIPC_MAX_BATCH", "abc")
    monkeypatch.setenv("VASIPC_WATCH", "maybe")
    monkeypatch.setenv("VASIPC_CONF", "")
    server = server_factory("--max-batch", "2", "--watch")
    assert info(server.socket)["max_batch_size"] == 2


@pytest.mark.slow
def test_model_source_count(nudenet_model, tmp_path):
    sock = ["--socket", str(tmp_path / "s.sock"), "--model-id", "x"]
    assert_refused(run_serve(*sock))
    assert_refused(run_serve("--model", nudenet_model, "--model-dir", str(tmp_path), *sock))
    assert_refused(run_serve("--model", nudenet_model, "--models-root", str(tmp_path), *sock))
    assert_refused(run_serve("--model-dir", str(tmp_path), "--models-root", str(tmp_path), *sock))


def test_models_root_needs_model_id(nudenet_model, tmp_path):
    link_model(tmp_path / "m" / "1" / "m.onnx", nudenet_model)
    assert_refused(run_serve("--models-root", str(tmp_path), "--socket-dir", str(tmp_path)),
                   "model-id")


@pytest.mark.slow
def test_unusable_models_exit_2(tmp_path):
    text = tmp_path / "text.onnx"
    text.write_text("this is not an ONNX model\n" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    unreadable = tmp_path / "dir.onnx"
    unreadable.mkdir()
    cases = [tmp_path / "missing.onnx", text, empty, unreadable,
             onnx_model(tmp_path / "identity.onnx", "identity-2d"),
             onnx_model(tmp_path / "classifier.onnx", "image-to-vector"),
             onnx_model(tmp_path / "boxes-only.onnx", "four-channels")]
    for model in cases:
        path = tmp_path / "s.sock"
        assert_refused(run_serve("--model", str(model), "--model-id", "m", "--socket",
                                 str(path)))
        assert not path.exists(), model


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_device_cuda_without_gpu_exits_2(nudenet_model, tmp_path, device):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    assert_refused(run_serve("--model", nudenet_model, "--device", device,
                             "--socket", str(tmp_path / "s.sock")), "cuda", max_lines=1)


@pytest.mark.slow
def test_missing_labels_or_frame_root_exit_2(nudenet_model, tmp_path):
    sock = ["--model", nudenet_model, "--socket", str(tmp_path / "s.sock")]
    assert_refused(run_serve(*sock, "--labels", str(tmp_path / "nope.txt")))
    assert_refused(run_serve(*sock, "--frame-root", str(tmp_path / "nope")))


# --- model directories -----------------------------------------------------------------------

def write_yaml(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.yaml").write_text(text)
    return directory


@pytest.mark.slow
def test_model_dir_with_model_yaml(server_factory, nudenet_model, tmp_path, astronaut_frame,
                                   monkeypatch):
    """model.yaml gives id, name, version, weights, class names, thresholds; the socket's
    default path follows its model_id; the environment beats the defaults (VASIPC_MAX_BATCH),
    and so does model.yaml (confidence 0.1, not 0.25)."""
    model_id = unique("yaml")
    d = tmp_path / "mdir"
    link_model(d / "weights" / "w.onnx", nudenet_model)
    names = [f"thing_{i}" for i in range(NUDENET_CLASSES)]
    (d / "names.txt").write_text("\n".join(names) + "\n")
    write_yaml(d, f"""
model_id: {model_id}
model_name: Nude Detector
model_version: "3.1"
model_weights: weights/w.onnx
confidence_threshold: 0.1
nms_iou_threshold: 0.5
expected_resolution: [320, 320]
output_schema:
  class_names_file: names.txt
resource_requirements:
  gpu_required: false
  cpu_fallback_allowed: true
""")
    monkeypatch.setenv("VASIPC_MAX_BATCH", "3")
    path = str(tmp_path / f"vas_model_{model_id}.sock")
    server = spawn(server_factory, ["--model-dir", str(d), "--socket-dir",
                                                   str(tmp_path)], path)
    got = info(path)
    assert got["model_id"] == model_id
    assert got["model_name"] == "Nude Detector"
    assert got["model_version"] == "3.1"
    assert got["classes"] == names
    assert got["max_batch_size"] == 3
    assert_default_conf(path, model_id, astronaut_frame, 0.1, 0.25)
    dets = infer_dets(path, model_id, astronaut_frame, confidence_threshold=0.02)
    assert {d["class_name"] for d in dets} <= set(names)
    assert server.stop() == 0


@pytest.mark.slow
def test_model_dir_yaml_without_model_id_uses_file_stem(server_factory, nudenet_model, tmp_path):
    """`--model-id` defaults to model.yaml's model_id, else the ONNX file's stem (not the
    model_name, which need not be a valid id)."""
    d = tmp_path / "noid"
    link_model(d / "detector-v2.onnx", nudenet_model)
    write_yaml(d, "model_name: Nude Detector (v2)\nmodel_weights: detector-v2.onnx\n")
    path = str(tmp_path / "vas_model_detector-v2.sock")
    server = spawn(server_factory, ["--model-dir", str(d), "--socket-dir",
                                                   str(tmp_path)], path)
    got = info(path)
    assert got["model_id"] == "detector-v2" and got["model_name"] == "Nude Detector (v2)"
    assert server.stop() == 0


@pytest.mark.slow
def test_model_dir_without_yaml(server_factory, nudenet_model, tmp_path):
    d = tmp_path / "7"
    link_model(d / "plain.onnx", nudenet_model)
    path = str(tmp_path / "vas_model_plain.sock")
    spawn(server_factory, ["--model-dir", str(d), "--socket-dir", str(tmp_path)],
          path)
    got = info(path)
    assert (got["model_id"], got["model_name"], got["model_version"]) == ("plain", "plain", "7")


@pytest.mark.slow
def test_gpu_required_without_gpu_exits_2(nudenet_model, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    d = tmp_path / "gpu"
    link_model(d / "w.onnx", nudenet_model)
    write_yaml(d, "model_id: gpu-only\nmodel_weights: w.onnx\n"
                  "resource_requirements:\n  gpu_required: true\n"
                  "  cpu_fallback_allowed: false\n")
    assert_refused(run_serve("--model-dir", str(d), "--socket-dir", str(tmp_path)), "gpu")
    assert_refused(run_serve("--model-dir", str(d), "--device", "cpu",
                             "--socket-dir", str(tmp_path)), "gpu")
    assert os.listdir(tmp_path) == ["gpu"]


@pytest.mark.slow
@pytest.mark.parametrize("yaml_text", [
    "model_weights: missing.onnx\n",
    "model_id: [not, a, string]\nmodel_weights: w.onnx\n",
    "model_id: 'bad id'\nmodel_weights: w.onnx\n",
    "confidence_threshold: 7\nmodel_weights: w.onnx\n",
    "model_weights: w.onnx\nkey: [unclosed\n",
    "just a string\n",
], ids=["missing-weights", "id-type", "id-chars", "threshold", "bad-yaml", "not-mapping"])
def test_bad_model_yaml_exits_2(nudenet_model, tmp_path, yaml_text):
    d = tmp_path / "bad"
    link_model(d / "w.onnx", nudenet_model)
    write_yaml(d, yaml_text)
    assert_refused(run_serve("--model-dir", str(d), "--socket-dir", str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == ["bad"]


# --- models root -----------------------------------------------------------------------------

def make_models_root(root: Path, model_id: str, nudenet_model: str) -> None:
    for version in ("1", "2", "10"):
        link_model(root / model_id / version / "model.onnx", nudenet_model)
    (root / model_id / "latest").mkdir()  # not numeric: ignored
    (root / model_id / "99").write_text("a file, not a version directory")


@pytest.mark.slow
@pytest.mark.parametrize(("version", "expected"), [(None, "10"), ("2", "2")])
def test_models_root_versions(server_factory, nudenet_model, tmp_path, astronaut_frame, version,
                              expected):
    root = tmp_path / "root"
    make_models_root(root, "det", nudenet_model)
    path = str(tmp_path / "vas_model_det.sock")
    args = ["--models-root", str(root), "--model-id", "det", "--socket-dir", str(tmp_path)]
    if version:
        args += ["--model-version", version]
    spawn(server_factory, args, path)
    got = info(path)
    assert got["model_id"] == "det" and got["model_version"] == expected
    assert got["model_name"] == "model"
    resp = wire.roundtrip(path, wire.infer_request(str(astronaut_frame), "det"))
    assert resp["metadata"]["model_version"] == expected, resp


@pytest.mark.slow
def test_models_root_bad_version_or_id_exits_2(nudenet_model, tmp_path):
    root = tmp_path / "root"
    make_models_root(root, "det", nudenet_model)
    base = ["--models-root", str(root), "--socket-dir", str(tmp_path)]
    assert_refused(run_serve(*base, "--model-id", "det", "--model-version", "7"))
    assert_refused(run_serve(*base, "--model-id", "other"))
    assert_refused(run_serve(*base, "--model-id", "../root/det"))


# --- precedence and labels -------------------------------------------------------------------

@pytest.mark.slow
def test_precedence_cli_env_yaml(server_factory, nudenet_model, tmp_path, astronaut_frame,
                                 monkeypatch):
    """Command line over environment (--max-batch 2 over VASIPC_MAX_BATCH=3), environment
    over model.yaml (VASIPC_CONF=0.5 over 0.9, VASIPC_LABELS over class_names_file,
    VASIPC_MODEL_ID over model_id)."""
    d = tmp_path / "prec"
    link_model(d / "w.onnx", nudenet_model)
    (d / "yaml_names.txt").write_text("".join(f"yaml_{i}\n" for i in range(NUDENET_CLASSES)))
    env_names = tmp_path / "env_names.txt"
    env_names.write_text("".join(f"env_{i}\n" for i in range(NUDENET_CLASSES)))
    write_yaml(d, "model_id: prec\nmodel_weights: w.onnx\nconfidence_threshold: 0.9\n"
                  "output_schema:\n  class_names_file: yaml_names.txt\n")
    monkeypatch.setenv("VASIPC_MAX_BATCH", "3")
    monkeypatch.setenv("VASIPC_CONF", "0.5")
    monkeypatch.setenv("VASIPC_LABELS", str(env_names))
    monkeypatch.setenv("VASIPC_MODEL_ID", "prec-env")
    path = str(tmp_path / "vas_model_prec-env.sock")
    spawn(server_factory, ["--model-dir", str(d), "--max-batch", "2",
                                          "--socket-dir", str(tmp_path)], path)
    got = info(path)
    assert got["model_id"] == "prec-env"
    assert got["max_batch_size"] == 2
    assert got["classes"] == [f"env_{i}" for i in range(NUDENET_CLASSES)]
    assert_default_conf(path, "prec-env", astronaut_frame, 0.5, 0.9)


@pytest.mark.slow
def test_cli_conf_over_environment(server_factory, astronaut_frame, monkeypatch):
    monkeypatch.setenv("VASIPC_CONF", "0.5")
    server = server_factory("--conf", "0.1")
    assert_default_conf(server.socket, MODEL_ID, astronaut_frame, 0.1, 0.5)


@pytest.mark.slow
def test_labels_rename_classes(server_factory, tmp_path, astronaut_frame, monkeypatch):
    """--labels (over VASIPC_LABELS) names the classes in info and in detections."""
    labels = tmp_path / "labels.txt"
    names = [f"label {i}" for i in range(NUDENET_CLASSES)]
    labels.write_text("\n".join(names) + "\n")
    env_labels = tmp_path / "env.txt"
    env_labels.write_text("".join(f"env_{i}\n" for i in range(NUDENET_CLASSES)))
    monkeypatch.setenv("VASIPC_LABELS", str(env_labels))
    server = server_factory("--labels", str(labels))
    assert info(server.socket)["classes"] == names
    dets = infer_dets(server.socket, MODEL_ID, astronaut_frame, confidence_threshold=0.05)
    assert dets
    for d in dets:
        assert d["class_name"] == names[d["class_id"]], d


def _thread_count(pid: int) -> int:
    """Threads of an idle server: the least of a few samples, since the thread of a
    just-closed connection (the readiness probe's) may still be exiting."""
    counts = []
    for _ in range(20):
        counts.append(len(os.listdir(f"/proc/{pid}/task")))
        time.sleep(0.05)
    return min(counts)


@pytest.mark.slow
def test_threads_sets_the_onnx_runtime_pool(server_factory):
    """--threads N gives ONNX Runtime N intra-op threads (N-1 pool threads beside the
    caller) on one stream; its own default would count the machine's cores, not the
    usable ones."""
    one = server_factory("--threads", "1", "--streams", "1", "--backend", "onnxruntime")
    four = server_factory("--threads", "4", "--streams", "1", "--backend", "onnxruntime")
    assert _thread_count(four.pid) - _thread_count(one.pid) == 3
