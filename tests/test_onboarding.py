"""Onboarding a model (issue 5 item 1, docs/contract.md 8): model.yaml validation and `vasipc check`.

Every invalid model directory is refused with exit code 2 and its own one-line message,
the same through `python -m vasipc.serve --model-dir` and `python -m vasipc.check` (real
subprocesses); a valid one is reported by `vasipc check` (text and --json), including the
version layout DIR/ID/<n>/. The original format's rough edges: output_schema.classes is
checked against the model, directories that are not versions and keys the server does not
use are named (check's notes, the server's log), never silently dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, _child_env
from serve_cli import assert_refused, run_serve
from test_contract_cli import link_model, onnx_model, write_yaml

from vasipc import model_yaml as my
from vasipc.runtime import Device

NUDENET_CLASSES = 18
W = "model_weights: w.onnx\n"
# nudenet's ONNX metadata names, by class id
NUDENET_NAMES = [
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED"]


def schema_classes(value: object, names_file: str | None = None) -> str:
    """model.yaml text: the weights and output_schema.classes (and class_names_file)."""
    return W + "output_schema:\n  classes: " + json.dumps(value) + "\n" + (
        f"  class_names_file: {names_file}\n" if names_file else "")


def renamed(i: int, name: str) -> list[str]:
    return [name if j == i else n for j, n in enumerate(NUDENET_NAMES)]


def run_check(*args: str, module: str = "vasipc.check") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", cwd=REPO_ROOT,
                          env=_child_env(), timeout=120)


def error_line(stderr: str) -> str:
    """The message after `PROG: error: ` (the server and check differ only in PROG)."""
    line = stderr.strip().splitlines()[-1]
    assert ": error: " in line, stderr
    return line.split(": error: ", 1)[1]


def names(n: int, prefix: str = "n") -> str:
    return "".join(f"{prefix}{i}\n" for i in range(n))


def has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# id: (model.yaml text, other files in the model directory (None: a directory), extra
# arguments ({d}: the model directory), what the one error line must say)
INVALID = {
    "weights-missing": ("model_weights: nope.onnx\n", {}, [],
                        ["model_weights", "nope.onnx does not exist"]),
    "weights-directory": ("model_weights: wdir.onnx\n", {"wdir.onnx": None}, [],
                          ["model_weights", "wdir.onnx is a directory"]),
    "weights-key-missing-two-onnx": ("model_name: x\n", {"other.onnx": "x"}, [],
                                     ["model_weights is missing", "exactly one .onnx"]),
    "weights-wrong-type": ("model_weights: [w.onnx]\n", {}, [],
                           ["model_weights must be a file path", "['w.onnx']"]),
    "gpu-contradiction": (W + "resource_requirements:\n  gpu_required: true\n"
                              "  cpu_fallback_allowed: true\n", {}, [],
                          ["gpu_required and cpu_fallback_allowed contradict"]),
    "gpu-flag-type": (W + "resource_requirements:\n  gpu_required: 'false'\n", {}, [],
                      ["resource_requirements.gpu_required must be true or false", "'false'"]),
    "resources-not-mapping": (W + "resource_requirements: gpu\n", {}, [],
                              ["resource_requirements must be a mapping"]),
    "conf-above-1": (W + "confidence_threshold: 1.5\n", {}, [],
                     ["confidence_threshold must be a number in [0, 1]", "1.5"]),
    "conf-below-0": (W + "confidence_threshold: -0.1\n", {}, [],
                     ["confidence_threshold must be a number in [0, 1]", "-0.1"]),
    "conf-nan": (W + "confidence_threshold: .nan\n", {}, [],
                 ["confidence_threshold must be a number in [0, 1]", "nan"]),
    "conf-text": (W + "confidence_threshold: high\n", {}, [],
                  ["confidence_threshold must be a number in [0, 1]", "'high'"]),
    "iou-above-1": (W + "nms_iou_threshold: 2\n", {}, [],
                    ["nms_iou_threshold must be a number in [0, 1]", "got 2"]),
    "iou-below-0": (W + "nms_iou_threshold: -1\n", {}, [],
                    ["nms_iou_threshold must be a number in [0, 1]", "got -1"]),
    "resolution-scalar": (W + "expected_resolution: 320\n", {}, [],
                          ["expected_resolution must be [width, height]", "got 320"]),
    "resolution-three": (W + "expected_resolution: [320, 320, 3]\n", {}, [],
                         ["expected_resolution must be [width, height]"]),
    "resolution-strings": (W + "expected_resolution: ['320', '320']\n", {}, [],
                           ["expected_resolution must be [width, height]"]),
    "resolution-mismatch": (W + "expected_resolution: [640, 480]\n", {}, [],
                            ["expected_resolution [640, 480] does not match the model's "
                             "input size 320x320"]),
    "version-list": (W + "model_version: [1, 2]\n", {}, [],
                     ["model_version must be a non-empty string"]),
    "version-empty": (W + "model_version: ''\n", {}, [],
                      ["model_version must be a non-empty string"]),
    "name-mapping": (W + "model_name: {a: 1}\n", {}, [], ["model_name must be a non-empty string"]),
    "id-chars": (W + "model_id: 'bad id'\n", {}, [], ["model_id must be 1-64 characters"]),
    "schema-not-mapping": (W + "output_schema: names.txt\n", {}, [],
                           ["output_schema must be a mapping"]),
    "names-file-type": (W + "output_schema:\n  class_names_file: 3\n", {}, [],
                        ["output_schema.class_names_file must be a file path"]),
    "names-file-missing": (W + "output_schema:\n  class_names_file: none.txt\n", {}, [],
                           ["cannot read output_schema.class_names_file", "none.txt"]),
    "names-file-empty": (W + "output_schema:\n  class_names_file: names.txt\n",
                         {"names.txt": "\n\n"}, [],
                         ["output_schema.class_names_file", "names.txt is empty"]),
    "names-file-blank-line": (W + "output_schema:\n  class_names_file: names.txt\n",
                              {"names.txt": "a\n\nb\n"}, [], ["names.txt: line 2 is blank"]),
    "names-file-count": (W + "output_schema:\n  class_names_file: names.txt\n",
                         {"names.txt": names(17)}, [],
                         ["output_schema.class_names_file", "names.txt has 17 class names",
                          "has 18 classes"]),
    "classes-count": (schema_classes(17), {}, [],
                      ["model.yaml output_schema.classes says 17 classes but the model has 18"]),
    "classes-names-count": (schema_classes(["a", "b"]), {}, [],
                            ["model.yaml output_schema.classes has 2 class names",
                             "has 18 classes"]),
    "classes-names-metadata": (schema_classes(renamed(12, "FACE_M")), {}, [],
                               ["output_schema.classes does not match the model's ONNX "
                                "metadata: class 12 is 'FACE_M' in model.yaml, 'FACE_MALE' there"]),
    "classes-names-file": (schema_classes(NUDENET_NAMES, "names.txt"), {"names.txt": names(18)},
                           [], ["output_schema.classes does not match output_schema."
                                "class_names_file", "class 0 is 'FEMALE_GENITALIA_COVERED' in "
                                "model.yaml, 'n0' there"]),
    "classes-count-with-labels": (schema_classes(NUDENET_NAMES[:17]), {"labels.txt": names(18)},
                                  ["--labels", "{d}/labels.txt"],
                                  ["output_schema.classes says 17 classes but the model has 18"]),
    "classes-type": (schema_classes(["a", 3]), {}, [],
                     ["output_schema.classes must be the class count or the class names",
                      "['a', 3]"]),
    "classes-zero": (schema_classes(0), {}, [], ["output_schema.classes must be", "got 0"]),
    "classes-bool": (schema_classes(True), {}, [], ["output_schema.classes must be", "got True"]),
    "labels-count": (W, {"labels.txt": names(19)}, ["--labels", "{d}/labels.txt"],
                     ["labels file", "labels.txt has 19 class names", "has 18 classes"]),
    "labels-count-over-yaml": (W + "output_schema:\n  class_names_file: names.txt\n",
                               {"names.txt": names(18), "labels.txt": names(2)},
                               ["--labels", "{d}/labels.txt"],
                               ["labels file", "labels.txt has 2 class names"]),
    "labels-not-utf8": (W, {"labels.txt": b"\xff\xfe\x00bad\n"}, ["--labels", "{d}/labels.txt"],
                        ["labels file", "is not UTF-8 text"]),
    "yaml-syntax": (W + "key: [unclosed\n", {}, [], ["is not valid YAML"]),
    "yaml-not-mapping": ("just a string\n", {}, [], ["model.yaml must be a mapping", "'just a string'"]),
    "yaml-empty": ("", {}, [], ["model.yaml must be a mapping", "got nothing"]),
    "yaml-not-utf8": (None, {"model.yaml": b"model_name: \xff\n"}, [], ["is not UTF-8 text"]),
}


def make_dir(tmp_path: Path, nudenet_model: str, yaml_text: str | None,
             files: dict[str, str | bytes | None]) -> Path:
    d = tmp_path / "m"
    link_model(d / "w.onnx", nudenet_model)
    for name, content in files.items():
        if content is None:
            (d / name).mkdir()
        elif isinstance(content, bytes):
            (d / name).write_bytes(content)
        else:
            (d / name).write_text(content)
    if yaml_text is not None:
        write_yaml(d, yaml_text)
    return d


@pytest.mark.slow
@pytest.mark.parametrize(("yaml_text", "files", "extra", "needles"), INVALID.values(),
                         ids=INVALID.keys())
def test_invalid_model_dir_refused_by_serve_and_check(nudenet_model, tmp_path, yaml_text, files,
                                                      extra, needles):
    d = make_dir(tmp_path, nudenet_model, yaml_text, files)
    extra = [a.format(d=d) for a in extra]
    served = run_serve("--model-dir", str(d), "--socket-dir", str(tmp_path), *extra)
    assert_refused(served, *needles, max_lines=1)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no socket was bound
    checked = run_check(str(d), *extra)
    assert_refused(checked, *needles, max_lines=1)
    assert checked.stdout == ""
    assert error_line(checked.stderr) == error_line(served.stderr)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_weights_refused(nudenet_model, tmp_path):
    d = tmp_path / "m"
    (d).mkdir()
    (d / "w.onnx").write_bytes(Path(nudenet_model).read_bytes())
    (d / "w.onnx").chmod(0)
    write_yaml(d, W)
    for result in (run_serve("--model-dir", str(d), "--socket-dir", str(tmp_path)),
                   run_check(str(d))):
        assert_refused(result, "w.onnx is not readable", max_lines=1)


@pytest.mark.slow
def test_cpu_fallback_not_allowed(nudenet_model, tmp_path):
    """gpu_required: false with cpu_fallback_allowed: false: --device auto finding no GPU
    does not fall back to CPU; an explicit --device cpu runs it there."""
    if has_cuda():
        pytest.skip("this machine has CUDA: auto does not fall back")
    d = make_dir(tmp_path, nudenet_model, W + "resource_requirements:\n  gpu_required: false\n"
                                              "  cpu_fallback_allowed: false\n", {})
    for result in (run_serve("--model-dir", str(d), "--socket-dir", str(tmp_path)),
                   run_check(str(d))):
        assert_refused(result, "cpu_fallback_allowed: false", "--device cpu", max_lines=1)
    ok = run_check(str(d), "--device", "cpu")
    assert ok.returncode == 0, ok.stderr


# --- vasipc check on valid models ------------------------------------------------------------

def test_check_reports_model(nudenet_model, tmp_path):
    """`python -m vasipc check DIR` on a directory with one .onnx file: the model's input
    size, its 18 classes (ONNX metadata names), providers, device, timings, ok."""
    d = make_dir(tmp_path, nudenet_model, None, {})
    result = run_check("check", str(d), "--device", "cpu", module="vasipc")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = dict(line.split(None, 1) for line in out.splitlines() if " " in line)
    assert rows["model"] == "w (name w, version 1)"
    assert rows["input"] == "320x320"
    assert rows["family"] == "yolo, task detect, NMS in the server"
    assert rows["transform"] == "letterbox (pad 114), RGB, /255"
    assert rows["classes"].startswith("18: FEMALE_GENITALIA_COVERED, FACE_FEMALE, ")
    assert rows["providers"] == "CPUExecutionProvider"
    assert rows["runtime"].startswith("onnxruntime ") and ", precision fp32, " in rows["runtime"]
    assert rows["device"] == "cpu"
    assert rows["weights"] == str(d / "w.onnx")
    assert "1 warmed (max batch 1)" in out and "median of 5" in out
    assert "on a synthetic 1280x720 NV12 frame" in out
    assert out.rstrip().endswith("ok")
    assert result.stderr == ""


def test_check_json_full_model_yaml(nudenet_model, tmp_path):
    """--json: every model.yaml key lands where it should; the class names file is named;
    an unknown key is reported, not refused."""
    d = make_dir(tmp_path, nudenet_model, """
model_id: nude-det
model_name: Nude Detector
model_version: 1.10
model_weights: w.onnx
confidence_threshold: 0.3
nms_iou_threshold: 0.6
expected_resolution: [320, 320]
output_schema:
  class_names_file: names.txt
resource_requirements:
  gpu_required: false
  cpu_fallback_allowed: true
confidence_treshold: 0.9
""".replace("  class_names_file: names.txt\n", "  class_names_file: names.txt\n  format: yolov8\n")
       .replace("  cpu_fallback_allowed: true\n", "  cpu_fallback_allowed: true\n  gpu_memory_mb: 512\n"),
       {"names.txt": names(NUDENET_CLASSES, "thing_")})
    result = run_check(str(d), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert (r["model_id"], r["model_name"], r["model_version"]) == ("nude-det", "Nude Detector",
                                                                    "1.10")
    assert r["weights"] == str(d / "w.onnx")
    assert r["input"] == {"width": 320, "height": 320}
    assert r["num_classes"] == NUDENET_CLASSES
    assert r["classes"] == [f"thing_{i}" for i in range(NUDENET_CLASSES)]
    assert r["class_names_source"] == f"output_schema.class_names_file {d / 'names.txt'}"
    assert (r["confidence_threshold"], r["nms_iou_threshold"], r["max_detections"]) == (0.3, 0.6, 300)
    assert r["providers"] == ["CPUExecutionProvider"] and r["device"] == "cpu"
    assert r["batch_sizes"] == [1] and r["max_batch"] == 1 and r["preprocess"] == "cpu"
    assert r["load_ms"] > 0 and r["run_ms"] > 0 and r["runs"] == 5
    assert r["run_ms"] >= r["stages_ms"]["inference"] > 0
    assert isinstance(r["detections"], int)
    # the keys of the format's sections too: the original format's that the server does not use
    assert r["ignored_yaml_keys"] == ["confidence_treshold", "output_schema.format",
                                      "resource_requirements.gpu_memory_mb"]
    assert r["ignored_version_dirs"] == []


def test_ignored_keys_named_by_check_text_and_server_log(server_factory, nudenet_model, tmp_path):
    from serve_cli import info, spawn

    d = make_dir(tmp_path, nudenet_model, W + "model_id: keys\nthreshold: 0.5\noutput_schema:\n"
                                              "  num_classes: 18\n", {})
    result = run_check(str(d), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "note         model.yaml keys not used: output_schema.num_classes, threshold\n" in result.stdout
    path = str(tmp_path / "vas_model_keys.sock")
    server = spawn(server_factory, ["--model-dir", str(d), "--socket-dir", str(tmp_path),
                                    "--device", "cpu"], path)
    assert info(path)["model_id"] == "keys"
    assert server.stop() == 0
    warnings = [ln for ln in server.stderr_text().splitlines() if " WARNING " in ln]
    assert len(warnings) == 1 and warnings[0].endswith(
        "model.yaml keys not in the onboarding format, ignored: output_schema.num_classes, "
        "threshold"), server.stderr_text()


@pytest.mark.parametrize(("yaml_text", "labels", "classes", "source"), [
    (schema_classes(18), None, NUDENET_NAMES, None),
    (schema_classes(NUDENET_NAMES), None, NUDENET_NAMES, "model.yaml output_schema.classes"),
    (schema_classes(renamed(17, "n17"), "names.txt"), None, renamed(17, "n17"),
     "output_schema.class_names_file {d}/names.txt"),
    (schema_classes(NUDENET_NAMES), "labels.txt", [f"n{i}" for i in range(18)],
     "labels file {d}/labels.txt"),  # --labels renames: only the count is checked
], ids=["count", "names-as-metadata", "names-as-file", "labels-rename"])
def test_output_schema_classes_that_agree(nudenet_model, tmp_path, yaml_text, labels, classes,
                                          source):
    d = make_dir(tmp_path, nudenet_model, yaml_text,
                 {"names.txt": "".join(f"{n}\n" for n in renamed(17, "n17")),
                  "labels.txt": names(18)})
    result = run_check(str(d), "--json", "--device", "cpu",
                       *(["--labels", str(d / labels)] if labels else []))
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["classes"] == classes
    assert r["class_names_source"] == (source.format(d=d) if source else None)


def test_register_labels_over_output_schema_class_names(nudenet_model, tmp_path):
    """`vasipc register --labels` renames the classes: the installed model.yaml keeps
    output_schema.classes as a count (its names would contradict the labels at every load)."""
    d = make_dir(tmp_path, nudenet_model, schema_classes(NUDENET_NAMES), {"labels.txt": names(18)})
    root = tmp_path / "models"
    result = run_check("register", str(d), "--models-root", str(root), "--model-id", "reg",
                       "--labels", str(d / "labels.txt"), "--device", "cpu", module="vasipc")
    assert result.returncode == 0, result.stderr
    assert my.written_doc(str(root / "reg" / "1"))["output_schema"] == {
        "classes": 18, "class_names_file": "labels.txt"}
    result = run_check(str(root / "reg"), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["classes"] == [f"n{i}" for i in range(18)]


def test_output_schema_classes_name_a_model_without_names(tmp_path):
    """A model whose metadata names no classes (class_{id} otherwise) takes model.yaml's."""
    d = tmp_path / "tiny"
    d.mkdir()
    onnx_model(d / "tiny.onnx", "tiny-yolo-b1")
    write_yaml(d, "output_schema:\n  classes: [cat, dog]\n")
    result = run_check(str(d), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["classes"] == ["cat", "dog"]
    write_yaml(d, "output_schema:\n  classes: [cat, dog, cow]\n")
    assert_refused(run_check(str(d)), "output_schema.classes has 3 class names", max_lines=1)


def test_check_labels_override(nudenet_model, tmp_path):
    d = make_dir(tmp_path, nudenet_model, None, {})
    labels = tmp_path / "labels.txt"
    labels.write_text("\ufeff" + names(NUDENET_CLASSES, "lab_"))  # a BOM is not a name
    result = run_check(str(d), "--json", "--device", "cpu", "--labels", str(labels))
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["classes"][0] == "lab_0" and r["classes"][-1] == "lab_17"
    assert r["class_names_source"] == f"labels file {labels}"


def make_versions(base: Path, nudenet_model: str) -> None:
    for version in ("1", "2", "10"):
        link_model(base / version / "model.onnx", nudenet_model)
    (base / "latest").mkdir()  # not numeric: ignored
    (base / "\u00b2").mkdir()  # "²": str.isdigit() says yes, int() says no: ignored
    (base / "99").write_text("a file, not a version directory")


@pytest.mark.slow
@pytest.mark.parametrize(("version", "expected"), [(None, "10"), ("2", "2")])
def test_check_version_layout(nudenet_model, tmp_path, version, expected):
    base = tmp_path / "det"
    make_versions(base, nudenet_model)
    args = [str(base), "--json", "--device", "cpu"]
    if version:
        args += ["--model-version", version]
    result = run_check(*args)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["model_id"] == "det" and r["model_version"] == expected
    assert r["weights"] == str(base / expected / "model.onnx")
    assert r["ignored_version_dirs"] == ["latest", "\u00b2"]  # files ("99") are not listed


def test_check_notes_directories_that_are_not_versions(nudenet_model, tmp_path):
    base = tmp_path / "det"
    make_versions(base, nudenet_model)
    result = run_check(str(base), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert ("note         only numeric directory names are versions; not versions: latest, "
            "\u00b2\n") in result.stdout


def test_versions_directory_without_numeric_versions_says_why(nudenet_model, tmp_path):
    """ROOT/ID with v1/ and latest/ but no numeric version: serve and check both say that only
    numeric names count."""
    base = tmp_path / "root" / "det"
    link_model(base / "v1" / "model.onnx", nudenet_model)
    (base / "latest").mkdir()
    needles = ["has no model.yaml and not exactly one .onnx file (nor a numeric version "
               "directory: only numeric directory names are versions, not latest, v1)"]
    served = run_serve("--models-root", str(tmp_path / "root"), "--model-id", "det",
                       "--socket-dir", str(tmp_path))
    assert_refused(served, *needles, max_lines=1)
    checked = run_check(str(base))
    assert_refused(checked, *needles, max_lines=1)
    assert error_line(checked.stderr) == error_line(served.stderr)
    assert_refused(run_check(str(base), "--model-version", "v1"),
                   "has no version v1 (no version directories; only numeric directory names "
                   "are versions, not latest, v1)", max_lines=1)


def test_serve_version_layout_ignores_non_ascii_digits(server_factory, nudenet_model, tmp_path):
    """The server picks the same highest version (a "²" directory once crashed it)."""
    from serve_cli import info, spawn

    make_versions(tmp_path / "root" / "det", nudenet_model)
    path = str(tmp_path / "vas_model_det.sock")
    server = spawn(server_factory, ["--models-root", str(tmp_path / "root"), "--model-id", "det",
                                    "--socket-dir", str(tmp_path), "--device", "cpu"], path)
    assert info(path)["model_version"] == "10"
    assert server.stop() == 0  # the log notes what is not a version, once, not as a warning
    noted = [ln for ln in server.stderr_text().splitlines() if "not versions" in ln]
    assert len(noted) == 1 and " INFO " in noted[0], server.stderr_text()
    assert noted[0].endswith("only numeric directory names are versions; not versions: latest, \u00b2")


def test_check_bad_version_and_usage(nudenet_model, tmp_path):
    base = tmp_path / "det"
    make_versions(base, nudenet_model)
    assert_refused(run_check(str(base), "--model-version", "7"),
                   "has no version 7 (versions 1, 2, 10; only numeric directory names are "
                   "versions, not latest, \u00b2)", max_lines=1)
    assert_refused(run_check(str(tmp_path / "nothing")), "does not exist", max_lines=1)
    assert_refused(run_check(str(base / "1" / "model.onnx"), "--model-version", "1"),
                   "--model-version needs a directory", max_lines=1)
    assert_refused(run_check(str(base), "--device", "tpu"), "usage:")
    assert_refused(run_check(), "usage:")
    assert_refused(run_check("frobnicate", module="vasipc"), "unknown command")


# --- model_yaml in process -------------------------------------------------------------------

def test_numbers_keep_their_written_text(nudenet_model, tmp_path):
    """YAML reads 1.10 as 1.1 and 010 as 8: a version or name is what the file says."""
    d = make_dir(tmp_path, nudenet_model, W + "model_version: 1.10\nmodel_name: 010\n", {})
    src = my.from_model_dir(str(d))
    assert (src.model_version, src.model_name) == ("1.10", "010")
    write_yaml(d, W + "base: &b {model_version: 2.50}\n<<: *b\n")  # a merge key: no raw text
    assert my.from_model_dir(str(d)).model_version == "2.5"


def test_model_spec_precedence(nudenet_model, tmp_path):
    """Command line over model.yaml over ModelSpec's defaults; gpu_required refuses CPU."""
    d = make_dir(tmp_path, nudenet_model, W + "confidence_threshold: 0.4\n", {})
    src = my.from_model_dir(str(d))
    cpu = Device("cpu")
    spec = my.model_spec(src, cpu, "x")
    assert (spec.confidence_threshold, spec.nms_iou_threshold, spec.max_detections) == (0.4, 0.45, 300)
    spec = my.model_spec(src, cpu, "x", conf=0.1, iou=0.2, max_detections=5, threads=2)
    assert (spec.confidence_threshold, spec.nms_iou_threshold, spec.max_detections,
            spec.threads) == (0.1, 0.2, 5, 2)
    assert spec.class_names is None and spec.class_names_source is None
    gpu = my.ModelSource(weights=src.weights, model_id=None, model_name="m", model_version="1",
                         gpu_required=True, cpu_fallback_allowed=False)
    with pytest.raises(my.ModelSourceError, match="gpu_required"):
        my.model_spec(gpu, cpu, "x", device_arg="cpu")
    assert my.model_spec(gpu, Device("cuda"), "x").path == src.weights
