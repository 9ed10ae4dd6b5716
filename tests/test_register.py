"""`vasipc register` (issue 11): a model checked as `vasipc check` does, installed as the next
version directory atomically, with a `weights_sha256` that every later load verifies.

The CLI runs as a real child process (`python -m vasipc register ...`, this checkout on
its path); the installed versions are read back by the server and by `vasipc check`.
`install_version`'s number collision is forced deterministically: one install waits on a
named pipe for its weights after it has picked its number, while another takes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, _child_env
from family_models import compute_model
from serve_cli import assert_refused, info, run_serve, spawn

from vasipc.versions import TEMP_PREFIX, install_version

pytestmark = pytest.mark.slow  # a CLI child and a server per test

NUM_CLASSES = 18  # nudenet's 320n.onnx
WAIT_S = 60.0


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vasipc", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", cwd=REPO_ROOT,
                          env=_child_env(), timeout=timeout)


def register(src: str | Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("register", str(src), "--models-root", str(root), "--device", "cpu", *args)


def registered(src: str | Path, root: Path, *args: str) -> dict:
    """Register and return the --json report (the run must succeed)."""
    result = register(src, root, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def model_yaml(directory: Path) -> dict:
    return yaml.safe_load((directory / "model.yaml").read_text())


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_register_twice_installs_versions_1_and_2(tmp_path, nudenet_model):
    root = tmp_path / "models"
    first = register(nudenet_model, root, "--model-id", "det")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(root / "det" / "1")  # text: the installed directory
    report = registered(nudenet_model, root, "--model-id", "det")
    assert (report["model_id"], report["model_version"]) == ("det", "2")
    assert report["directory"] == str(root / "det" / "2")
    assert report["check"]["num_classes"] == NUM_CLASSES  # what `vasipc check` reports

    assert entries(root / "det") == ["1", "2"]  # no temporary directory left
    digest = sha256(nudenet_model)
    for version in ("1", "2"):
        d = root / "det" / version
        assert entries(d) == ["320n.onnx", "model.yaml"]
        assert sha256(d / "320n.onnx") == digest
        assert model_yaml(d) == {
            "model_id": "det", "model_name": "320n", "model_version": version,
            "model_weights": "320n.onnx", "weights_sha256": digest,
            "source": os.path.abspath(nudenet_model)}


def test_register_model_dir_carries_its_keys_and_labels(tmp_path, nudenet_model):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(nudenet_model, src / "320n.onnx")  # the bytes are copied, not the link
    (src / "names.txt").write_text("".join(f"part_{i}\n" for i in range(NUM_CLASSES)))
    (src / "model.yaml").write_text(
        "model_id: nsfw\nmodel_name: NudeNet 320n\nmodel_version: '7.1'\n"
        "confidence_threshold: 0.4\nresource_requirements:\n  cpu_fallback_allowed: true\n"
        "output_schema:\n  class_names_file: names.txt\n")
    root = tmp_path / "models"
    report = registered(src, root)
    installed = root / "nsfw" / "1"
    assert (report["model_id"], report["directory"]) == ("nsfw", str(installed))
    assert entries(installed) == ["320n.onnx", "model.yaml", "names.txt"]
    assert not (installed / "320n.onnx").is_symlink()
    assert (installed / "names.txt").read_text() == (src / "names.txt").read_text()
    doc = model_yaml(installed)
    assert doc["model_version"] == "1"  # the directory's, not the source's 7.1
    assert doc["source"] == str(src)
    assert {k: doc[k] for k in ("model_name", "confidence_threshold", "resource_requirements",
                                "output_schema")} == {
        "model_name": "NudeNet 320n", "confidence_threshold": 0.4,
        "resource_requirements": {"cpu_fallback_allowed": True},
        "output_schema": {"class_names_file": "names.txt"}}

    # the installed version is a model directory the server's loader takes as it is
    check = run_cli("check", str(root / "nsfw"), "--device", "cpu", "--json")
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["classes"] == [f"part_{i}" for i in range(NUM_CLASSES)]
    assert (report["model_version"], report["confidence_threshold"]) == ("1", 0.4)
    assert report["ignored_yaml_keys"] == []  # weights_sha256 and source are known keys


def test_labels_option_is_checked_and_copied(tmp_path, nudenet_model):
    labels = tmp_path / "other.names"
    labels.write_text("".join(f"x{i}\n" for i in range(NUM_CLASSES)))
    report = registered(nudenet_model, tmp_path / "models", "--labels", str(labels))
    installed = Path(report["directory"])
    assert (installed / "other.names").read_bytes() == labels.read_bytes()
    assert model_yaml(installed)["output_schema"] == {"class_names_file": "other.names"}
    assert report["check"]["classes"][:2] == ["x0", "x1"]


def four_channel_onnx(path: Path) -> None:
    from onnx import TensorProto, helper, save

    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4, 64, 64])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output0"])], "four",
                              [image], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def truncated_model(path: Path) -> None:
    compute_model(path, depth=1)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("make, why", [
    (truncated_model, "cannot load"),
    (four_channel_onnx, "no supported family"),
], ids=["truncated", "four-channel"])
def test_a_model_that_fails_the_check_is_not_installed(tmp_path, make, why):
    src = tmp_path / "bad.onnx"
    make(src)
    root = tmp_path / "models"
    err = assert_refused(register(src, root), why, max_lines=1)
    assert err.startswith("vasipc register: error: ")
    assert entries(root) == []


def test_wrong_labels_count_is_not_installed(tmp_path, nudenet_model):
    labels = tmp_path / "five.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    root = tmp_path / "models"
    assert_refused(register(nudenet_model, root, "--labels", str(labels)), "5", max_lines=1)
    assert entries(root) == []


@pytest.mark.parametrize("args, needle", [
    (["--model-id", "bad/id"], "invalid model id"),
    (["--model-id", "x" * 65], "invalid model id"),
    ([], "--model-id"),  # the default, the weights' stem "my model", is no id
], ids=["slash", "too-long", "bad-stem"])
def test_a_bad_model_id_is_refused(tmp_path, nudenet_model, args, needle):
    src = tmp_path / "my model.onnx"
    os.symlink(nudenet_model, src)
    root = tmp_path / "models"
    assert_refused(register(src, root, *args), needle, max_lines=1)
    assert entries(root) == []


def test_command_line_errors(tmp_path, nudenet_model):
    assert_refused(run_cli("register", nudenet_model), "--models-root")
    assert_refused(register(tmp_path / "missing.onnx", tmp_path), "does not exist", max_lines=1)
    versions = tmp_path / "models" / "det"
    (versions / "1").mkdir(parents=True)
    assert_refused(register(versions, tmp_path / "other"), "version directories", max_lines=1)


def test_a_pytorch_file_without_torch_is_refused(tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed: the refusal for a missing torch cannot happen")
    src = tmp_path / "yolo.pt"
    src.write_bytes(b"\x80\x02}q\x00.")  # a pickle; never read without torch
    root = tmp_path / "models"
    assert_refused(register(src, root), "needs torch", "pip install", max_lines=1)
    assert entries(root) == []


def test_an_ultralytics_checkpoint_is_exported_at_registration(tmp_path):
    ultralytics = pytest.importorskip("ultralytics")
    pt = tmp_path / "tiny.pt"
    ultralytics.YOLO("yolov8n.yaml").save(str(pt))  # built from its architecture: no download
    report = registered(pt, tmp_path / "models")
    installed = Path(report["directory"])
    assert (report["model_id"], report["weights"]) == ("tiny", "tiny.onnx")
    assert report["check"]["architecture"] == "yolo"
    assert model_yaml(installed)["weights_sha256"] == sha256(installed / "tiny.onnx")
    assert sorted(os.listdir(tmp_path)) == ["models", "tiny.pt"]  # exported elsewhere


def test_a_pytorch_file_that_is_no_ultralytics_checkpoint_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("ultralytics")
    pt = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 4), pt)  # a module: no input size, no outputs to decode
    root = tmp_path / "models"
    assert_refused(register(pt, root), "not an Ultralytics checkpoint", max_lines=1)
    assert entries(root) == []


def append_byte(d: Path) -> None:
    with open(d / "320n.onnx", "ab") as f:
        f.write(b"\0")


def swap_model(d: Path) -> None:
    compute_model(d / "320n.onnx", depth=1)  # another valid detector under the same name


def malformed_digest(d: Path) -> None:
    doc = model_yaml(d)
    (d / "model.yaml").write_text(yaml.safe_dump({**doc, "weights_sha256": doc["weights_sha256"][:-1]}))


@pytest.mark.parametrize("tamper, needles", [
    (append_byte, ("sha256", "expected")),
    (swap_model, ("sha256", "expected")),
    (malformed_digest, ("weights_sha256", "64 hex digits")),
], ids=["appended-byte", "swapped-model", "malformed-digest"])
def test_weights_that_do_not_match_their_sha256_are_not_served(tmp_path, nudenet_model, tamper,
                                                               needles):
    root = tmp_path / "models"
    installed = Path(registered(nudenet_model, root, "--model-id", "det")["directory"])
    tamper(installed)
    serve = run_serve("--models-root", str(root), "--model-id", "det", "--device", "cpu",
                      "--socket", str(tmp_path / "s.sock"))
    err = assert_refused(serve, *needles, max_lines=1)
    assert str(installed / "320n.onnx") in err or "model.yaml" in err
    assert_refused(run_cli("check", str(root / "det"), "--device", "cpu"), *needles, max_lines=1)


def test_a_watching_server_serves_a_newly_registered_version(tmp_path, nudenet_model,
                                                             server_factory):
    root = tmp_path / "models"
    registered(nudenet_model, root, "--model-id", "det")
    sock = server_factory.socket_path("watch.sock")
    server = spawn(server_factory, ["--models-root", str(root), "--model-id", "det", "--device",
                                    "cpu", "--watch", "--watch-interval", "0.1", "--socket", sock],
                   sock)
    assert info(sock)["model_version"] == "1"
    registered(nudenet_model, root, "--model-id", "det")
    deadline = time.monotonic() + WAIT_S
    while info(sock)["model_version"] != "2":
        assert server.proc.poll() is None, server.stderr_text()
        assert time.monotonic() < deadline, f"version 2 not served:\n{server.stderr_text()}"
        time.sleep(0.05)
    # a reload while the new version was being written found version 1 or 2 whole, never a
    # half-written directory
    assert "reload refused" not in server.stderr_text()
    assert server.stop() == 0


# --- install_version ------------------------------------------------------------------------

def test_install_version_takes_the_next_number_when_another_took_its_own(tmp_path):
    """Install A picks version 2 and waits for its weights (a named pipe); meanwhile install
    B takes 2; A's rename onto B's directory fails and A installs as 3."""
    model_dir = tmp_path / "det"
    (model_dir / "1").mkdir(parents=True)
    weights = tmp_path / "weights.onnx"
    weights.write_bytes(b"B's weights")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    done: dict[str, str | BaseException] = {}

    def install_a() -> None:
        try:
            done["a"] = install_version(str(model_dir), {"w.onnx": str(pipe)}, {"model_name": "A"})
        except BaseException as exc:
            done["a"] = exc

    thread = threading.Thread(target=install_a)
    thread.start()
    try:
        # a write end opens only once A opened the pipe to copy it, after picking its number
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # ENXIO: no reader yet
                assert time.monotonic() < deadline, "install A never opened its weights"
                time.sleep(0.01)
        b = install_version(str(model_dir), {"w.onnx": str(weights)}, {"model_name": "B"})
        os.write(fd, b"A's weights")
        os.close(fd)
    finally:
        thread.join(WAIT_S)
    assert b == str(model_dir / "2")
    assert done["a"] == str(model_dir / "3")
    assert entries(model_dir) == ["1", "2", "3"]
    for version, name in (("2", "B"), ("3", "A")):
        assert model_yaml(model_dir / version) == {"model_name": name, "model_version": version}
        assert (model_dir / version / "w.onnx").read_bytes() == f"{name}'s weights".encode()


def test_install_version_leaves_nothing_when_a_copy_fails(tmp_path):
    model_dir = tmp_path / "det"
    (model_dir / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        install_version(str(model_dir), {"w.onnx": str(tmp_path / "missing.onnx")}, {})
    assert entries(model_dir) == ["1"]
    assert not any(e.startswith(TEMP_PREFIX) for e in os.listdir(tmp_path))  # the temp's place
    with pytest.raises(ValueError, match=r"model\.yaml"):
        install_version(str(model_dir), {"model.yaml": str(tmp_path)}, {})
