"""Every model family and task (docs/contract.md 6), on crafted models (tests/family_models.py)
whose outputs are known tensors in each family's exact layout.

`_FamilyBehaviour` runs against the server's heads (vasipc.heads over the compiled core,
on a real ONNX Runtime session) and against the numpy reference of each family's
post-processing (tests/reference_heads.py); then the two are compared answer for answer,
the same answers are checked through a real server socket, and malformed models of each
family are refused at load with one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import reference_heads
import wire
from contract_util import write_dir
from family_models import CASES, IMGSZ, NAMES, Case, save_model, ultralytics_metadata
from family_models import build as build_case
from serve_cli import assert_refused, run_serve

from vasipc import model_yaml
from vasipc.model import ModelError, load_model
from vasipc.runtime import Device
from vasipc.schema import InferConfig

SIZES = [(96, 64), (48, 80), (64, 64)]  # landscape, portrait, the input's own size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


_LOADED: dict[str, Any] = {}


def built(case_name: str, directory: Path) -> tuple[Case, Path]:
    return build_case(case_name, directory / case_name)


def spec_for(path: Path, model_id: str = "m") -> Any:
    source = (model_yaml.from_model_dir(str(path)) if path.is_dir()
              else model_yaml.from_model_file(str(path)))
    return model_yaml.model_spec(source, Device("cpu"), model_id)


def loaded(case_name: str, directory: Path) -> tuple[Case, Any, list[np.ndarray]]:
    """The crafted model loaded as the server loads it, and its outputs for one image."""
    if case_name not in _LOADED:
        case, path = built(case_name, directory)
        model = load_model(spec_for(path), Device("cpu"), 1)
        outs = model.run_batch(model.new_buffer(), 1)
        _LOADED[case_name] = (case, model, outs)
    return _LOADED[case_name]


def config(**kw: Any) -> InferConfig:
    if "classes" in kw:
        kw["classes"] = tuple(kw["classes"])
    return InferConfig(**kw)


class _FamilyBehaviour:
    """What every implementation of the families' post-processing must answer."""

    def answer(self, case_name: str, directory: Path, size: tuple[int, int], **cfg: Any) -> dict:
        raise NotImplementedError

    @pytest.mark.parametrize("size", SIZES)
    @pytest.mark.parametrize("case_name", list(CASES))
    def test_answer_shape(self, case_name: str, size: tuple[int, int], model_dir: Path) -> None:
        case = CASES[case_name]()
        got = self.answer(case_name, model_dir, size)
        if case.task == "classify":
            assert got["detections"] == []
            cls = got["classifications"]
            assert len(cls) == 5
            confs = [c["confidence"] for c in cls]
            assert confs == sorted(confs, reverse=True)
            assert [c["class_id"] for c in cls[:2]] == [3, 7]  # tied: lower id first
            return
        dets = got["detections"]
        assert dets, "every crafted model has detections at the default threshold"
        confs = [d["confidence"] for d in dets]
        assert confs == sorted(confs, reverse=True)
        assert min(confs) >= 0.25
        names = case.names or {}
        for d in dets:
            x0, y0, x1, y1 = d["bbox"]
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
            assert d["class_name"] == names.get(d["class_id"], f"class_{d['class_id']}")
            assert d["track_id"] is None
            if case.task == "segment":
                assert d["mask"]["size"] == [size[1], size[0]]
                assert isinstance(d["mask"]["counts"], str)
            if case.task == "pose":
                k, dims = case.kpt_shape
                assert len(d["keypoints"]) == k
                for x, y, v in d["keypoints"]:
                    assert 0 <= x <= 1 and 0 <= y <= 1
                    assert (v is None) == (dims == 2)
            if case.task == "obb":
                assert len(d["rotated_box"]) == 5 and len(d["polygon"]) == 4
                xs = [p[0] for p in d["polygon"]]
                assert x0 == pytest.approx(max(0.0, min(xs)), abs=2e-6)

    @pytest.mark.parametrize("case_name", [c for c in CASES if c != "yolo-classify"])
    def test_thresholds_classes_and_max_detections(self, case_name: str, model_dir: Path) -> None:
        full = self.answer(case_name, model_dir, (96, 64), confidence_threshold=0.05)["detections"]
        high = self.answer(case_name, model_dir, (96, 64), confidence_threshold=0.6)["detections"]
        assert all(d["confidence"] >= 0.6 for d in high)
        assert len(high) < len(full)
        two = self.answer(case_name, model_dir, (96, 64), max_detections=2)["detections"]
        base = self.answer(case_name, model_dir, (96, 64))["detections"]
        assert two == base[:2]
        assert self.answer(case_name, model_dir, (96, 64), max_detections=0)["detections"] == []
        only = self.answer(case_name, model_dir, (96, 64), classes=[1])["detections"]
        assert all(d["class_id"] == 1 for d in only)
        assert self.answer(case_name, model_dir, (96, 64), classes=[])["detections"] == []

    @pytest.mark.parametrize("case_name", ["end2end-detect", "end2end-obb", "dfine"])
    def test_padding_rows_never_answer(self, case_name: str, model_dir: Path) -> None:
        dets = self.answer(case_name, model_dir, (96, 64), confidence_threshold=0.0)["detections"]
        assert dets and all(d["confidence"] > 0 for d in dets)

    @pytest.mark.parametrize("case_name", ["yolo-segment", "end2end-segment"])
    def test_mask_formats(self, case_name: str, model_dir: Path) -> None:
        rle = self.answer(case_name, model_dir, (96, 64))["detections"]
        poly = self.answer(case_name, model_dir, (96, 64), mask_format="polygon")["detections"]
        none = self.answer(case_name, model_dir, (96, 64), mask_format="none")["detections"]
        assert [d["bbox"] for d in rle] == [d["bbox"] for d in poly] == [d["bbox"] for d in none]
        assert all("mask" not in d and "polygon" not in d for d in none)
        assert all("polygon" in d and "mask" not in d for d in poly)
        for d in poly:
            for x, y in d["polygon"]:
                assert 0 <= x <= 1 and 0 <= y <= 1

    def test_top_k(self, model_dir: Path) -> None:
        one = self.answer("yolo-classify", model_dir, (64, 64), top_k=1)["classifications"]
        every = self.answer("yolo-classify", model_dir, (64, 64), top_k=10)["classifications"]
        assert [c["class_id"] for c in one] == [3]
        assert sorted(c["class_id"] for c in every) == list(range(10))


class TestCompiledHeads(_FamilyBehaviour):
    """vasipc.heads over the compiled core, on the model's real ORT session."""

    def answer(self, case_name, directory, size, **cfg):
        _, model, outs = loaded(case_name, directory)
        geom = model.family.preprocess.placement(size[0], size[1], model.input_width,
                                                 model.input_height)[0]
        return model.head.decode(outs, 0, geom, config(**cfg), model.spec)


class TestReferenceHeads(_FamilyBehaviour):
    """The numpy reference of each family (tests/reference_heads.py)."""

    RESIZE: ClassVar[dict[str, str]] = {"rtdetr": "stretch", "rfdetr": "stretch", "dfine": "stretch",
                                        "yolo-classify": "center_crop"}

    def answer(self, case_name, directory, size, **cfg):
        case, _, outs = loaded(case_name, directory)
        geom = reference_heads.input_geometry(self.RESIZE.get(case.architecture, "letterbox"),
                                              *size, IMGSZ, IMGSZ)
        kw = {"conf": cfg.get("confidence_threshold", 0.25), "iou": cfg.get("nms_iou_threshold", 0.45),
              "max_det": cfg.get("max_detections", 300), "classes": cfg.get("classes"),
              "mask_format": cfg.get("mask_format", "rle"), "top_k": cfg.get("top_k")}
        return reference_heads.answer(case, [o[0] for o in outs], geom, (IMGSZ, IMGSZ), **kw)


def assert_same_answer(got: dict, want: dict, tol: float = 2e-6) -> None:
    """Equal answers; floats within tol, or 1e-6 relative for pixels (float32 arithmetic,
    rounded to 6 decimals on both sides)."""
    def close(a: Any, b: Any, where: str) -> None:
        if isinstance(a, float) or isinstance(b, float):
            assert a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=tol), \
                f"{where}: {a} != {b}"
        elif isinstance(a, list) and isinstance(b, list):
            assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                close(x, y, f"{where}[{i}]")
        elif isinstance(a, dict) and isinstance(b, dict):
            assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
            for k in a:
                close(a[k], b[k], f"{where}.{k}")
        else:
            assert a == b, f"{where}: {a!r} != {b!r}"
    close(got, want, "answer")


CONFIGS = [{}, {"confidence_threshold": 0.1, "nms_iou_threshold": 0.3},
           {"classes": [0, 2], "max_detections": 5}, {"mask_format": "polygon"}, {"top_k": 3}]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("case_name", "cfg"), [
    pytest.param(c, cfg, id=f"{c}-{','.join(cfg) or 'defaults'}")
    for c in CASES for cfg in CONFIGS if "top_k" not in cfg or c == "yolo-classify"])
def test_compiled_equals_reference(case_name: str, size: tuple[int, int], cfg: dict,
                                   model_dir: Path) -> None:
    got = TestCompiledHeads().answer(case_name, model_dir, size, **cfg)
    want = TestReferenceHeads().answer(case_name, model_dir, size, **cfg)
    assert_same_answer(got, want)


def test_geometry_is_the_families(model_dir: Path) -> None:
    for case_name, resize in [("yolo-detect", "letterbox"), ("rtdetr", "stretch"),
                              ("yolo-classify", "center_crop")]:
        _, model, _ = loaded(case_name, model_dir)
        for w, h in [*SIZES, (1920, 1080), (1080, 1920)]:
            got = model.family.preprocess.placement(w, h, IMGSZ, IMGSZ)[0]
            want = reference_heads.input_geometry(resize, w, h, IMGSZ, IMGSZ)
            assert tuple(got) == pytest.approx(tuple(want)), (case_name, w, h)


# --- through a real server ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("case_name", "mode"), [
    *((c, "cpu") for c in CASES),
    # the device path (an ONNX preprocessing graph, here on CPU) places frames as the kernel
    *((c, "graph") for c in ("yolo-segment", "rfdetr", "dfine", "yolo-classify"))])
def test_served_answers_are_the_reference(case_name: str, mode: str, server_factory,
                                          model_dir: Path, shm_dir: Path,
                                          astronaut_rgb: np.ndarray) -> None:
    import cv2

    case, path = built(case_name, model_dir / f"served-{mode}")
    server = (_serve_dir(server_factory, path, "--preprocess", mode) if path.is_dir()
              else server_factory("--preprocess", mode, model=str(path), model_id="m"))
    w, h = 96, 64
    rgb = cv2.resize(astronaut_rgb, (w, h), interpolation=cv2.INTER_AREA)
    frame = write_dir(shm_dir / "f", rgb, "NV12")
    info = wire.roundtrip(server.socket, {"op": "info"})
    assert (info["architecture"], info["task"]) == (case.architecture, case.task)
    assert info["nms"] == ("server" if case.architecture in ("yolo", "yolov5") else "model")
    if case.task == "pose":
        assert info["keypoints"] == {"count": case.kpt_shape[0], "names": None, "skeleton": None}
    cfg = {"mask_format": "polygon"} if case.task == "segment" else {}
    for config_ in ({}, cfg):
        resp = wire.roundtrip(server.socket, wire.infer_request(str(frame), "m", config=config_))
        assert resp["error_code"] is None, resp
        want = TestReferenceHeads().answer(case_name, model_dir, (w, h), **config_)
        got = {k: resp[k] for k in want}
        assert_same_answer(got, want)


def _serve_dir(server_factory, path: Path, *args: str):
    from serve_cli import spawn

    sock = server_factory.socket_path(f"dir_{len(server_factory.servers)}.sock")
    return spawn(server_factory, ["--model-dir", str(path), "--model-id", "m", "--socket", sock,
                                  *args], sock)


def test_infer_config_errors(server_factory, model_dir: Path, shm_dir: Path,
                             astronaut_rgb: np.ndarray) -> None:
    _, path = built("yolo-classify", model_dir / "cfg")
    server = server_factory(model=str(path), model_id="m")
    frame = write_dir(shm_dir / "f", np.ascontiguousarray(astronaut_rgb[:64, :64]), "NV12")
    for bad in ({"mask_format": "bitmap"}, {"mask_format": None}, {"top_k": 0}, {"top_k": 11},
                {"top_k": 2.0}, {"top_k": True}):
        resp = wire.roundtrip(server.socket, wire.infer_request(str(frame), "m", config=bad))
        assert resp["error_code"] == "invalid_request", (bad, resp)
    ok = wire.roundtrip(server.socket, wire.infer_request(str(frame), "m", config={"top_k": 10}))
    assert ok["error_code"] is None and len(ok["classifications"]) == 10


# --- refused at load ------------------------------------------------------------------------------

def _raw(n: int, channels: int) -> np.ndarray:
    return np.zeros((1, channels, n), np.float32)


MALFORMED: dict[str, tuple[list, dict, dict | None, str]] = {
    # name: (outputs, metadata, model.yaml or None, a word the refusal must say)
    "segment-without-protos": ([("output0", _raw(50, 4 + 3 + 32))],
                               ultralytics_metadata("segment"), None, "prototypes"),
    "pose-without-kpt-shape": ([("output0", _raw(50, 4 + 1 + 51))],
                               ultralytics_metadata("pose", names={0: "person"}), None, "kpt_shape"),
    "pose-kpt-shape-wrong": ([("output0", _raw(50, 4 + 1 + 51))],
                             ultralytics_metadata("pose", names={0: "person"}, kpt_shape=[17, 2]),
                             None, "classes"),
    "names-disagree": ([("output0", _raw(50, 4 + 5))], ultralytics_metadata("detect"), None,
                       "classes"),
    "obb-names-disagree": ([("output0", _raw(50, 4 + 3))], ultralytics_metadata("obb"), None,
                           "classes"),
    "end2end-width": ([("output0", np.zeros((1, 300, 7), np.float32))],
                      ultralytics_metadata("detect", end2end=True), None, "values per detection"),
    "end2end-segment-no-protos": ([("output0", np.zeros((1, 300, 38), np.float32))],
                                  ultralytics_metadata("segment", end2end=True), None, "prototypes"),
    "classify-3d": ([("output0", np.zeros((1, 10, 2), np.float32))],
                    ultralytics_metadata("classify", names={i: str(i) for i in range(10)}), None,
                    "[batch, classes]"),
    "yolov5-short": ([("output0", np.zeros((1, 50, 5), np.float32))],
                     {"stride": "32", "names": str(NAMES)}, None, "5 + classes"),
    "rtdetr-fields": ([("output0", np.zeros((1, 300, 9), np.float32))],
                      {**ultralytics_metadata("detect"), "head": "RTDETRDecoder"}, None, "fit neither"),
    "rfdetr-queries": ([("dets", np.zeros((1, 100, 4), np.float32)),
                        ("labels", np.zeros((1, 90, 4), np.float32))], {}, None, "dets"),
    "two-outputs-no-metadata": ([("a", np.zeros((1, 8, 50), np.float32)),
                                 ("b", np.zeros((1, 8, 50), np.float32))], {}, None,
                                "no supported family"),
    "unknown-task": ([("output0", _raw(50, 7))], ultralytics_metadata("depth"), None,
                     "no supported family"),
    "transposed-without-metadata": ([("output0", np.zeros((1, 500, 85), np.float32))], {}, None,
                                    "architecture"),
    "declared-wrong-family": ([("output0", _raw(120, 7))], {}, {"architecture": "yolo-classify"},
                              "[batch, classes]"),
    "declared-task-not-in-family": ([("output0", _raw(120, 7))], {},
                                    {"architecture": "rfdetr", "task": "pose"}, "no task"),
    "declared-bad-preprocess": ([("output0", _raw(120, 7))], {},
                                {"preprocess": {"resize": "fit"}}, "preprocess.resize"),
    "metadata-names-not-ids": ([("output0", _raw(50, 7))],
                               {**ultralytics_metadata("detect"), "names": "{1: 'a', 2: 'b'}"},
                               None, "names"),
}


def _malformed(directory: Path, name: str) -> Path:
    outputs, meta, yaml_doc, _ = MALFORMED[name]
    d = directory / "malformed" / name
    d.mkdir(parents=True, exist_ok=True)
    onnx = save_model(d / f"{name}.onnx", outputs, metadata=meta, dynamic=bool(meta))
    if yaml_doc is None:
        return onnx
    import yaml

    (d / "model.yaml").write_text(yaml.safe_dump({"model_weights": onnx.name, **yaml_doc}))
    return d


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_models_are_refused(name: str, model_dir: Path) -> None:
    path = _malformed(model_dir, name)
    with pytest.raises((ModelError, model_yaml.ModelSourceError)) as info:
        load_model(spec_for(path), Device("cpu"), 1)
    text = str(info.value)
    assert "\n" not in text
    assert MALFORMED[name][3].lower() in text.lower(), text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["segment-without-protos", "pose-without-kpt-shape",
                                  "two-outputs-no-metadata"])
def test_refusal_is_one_line_naming_shapes_task_and_declaration(name: str, model_dir: Path) -> None:
    path = _malformed(model_dir, name)
    err = assert_refused(run_serve("--model", str(path), "--socket", str(model_dir / "x.sock")),
                         "outputs", "architecture:", "model.yaml", max_lines=1)
    outputs, meta, _, _ = MALFORMED[name]
    for oname, value in outputs:
        assert oname in err and str(value.shape[1]) in err, err
    assert (f"metadata task '{meta['task']}'" if meta else "no Ultralytics metadata") in err


# --- vasipc check ---------------------------------------------------------------------------------

def _check(*args: str) -> tuple[int, str, str]:
    import subprocess
    import sys

    from conftest import REPO_ROOT, _child_env

    res = subprocess.run([sys.executable, "-m", "vasipc.check", *args], capture_output=True,
                         text=True, cwd=REPO_ROOT, env=_child_env(), timeout=120)
    return res.returncode, res.stdout, res.stderr


@pytest.mark.slow
def test_check_reports_family_task_and_keypoints(model_dir: Path) -> None:
    import json

    _, pose = built("yolo-pose", model_dir / "check")
    code, out, err = _check(str(pose), "--device", "cpu")
    assert code == 0, err
    assert "family       yolo, task pose, NMS in the server" in out, out
    assert "keypoints    17: unnamed" in out, out
    assert "transform    letterbox (pad 114), RGB, /255" in out, out
    _, cls = built("yolo-classify", model_dir / "check")
    code, out, err = _check(str(cls), "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["architecture"], report["task"], report["nms"]) == ("yolo-classify", "classify", "model")
    assert report["transform"]["resize"] == "center_crop" and report["detections"] == 5  # top 5


@pytest.mark.slow
def test_check_names_what_it_refused(model_dir: Path) -> None:
    path = _malformed(model_dir, "pose-without-kpt-shape")
    code, out, err = _check(str(path), "--device", "cpu")
    assert code == 2 and out == "", (code, out)
    assert_refused((code, err), "kpt_shape", "output0 [batch, 56, 50]", "metadata task 'pose'",
                   "architecture:", max_lines=1)


# --- metadata is data, whatever it holds -------------------------------------------------------------

@pytest.mark.slow
def test_metadata_of_any_shape_is_recognized_or_refused_in_one_line(model_dir: Path) -> None:
    """ONNX metadata values are read with ast.literal_eval: any text in any key gives a
    family or a ModelError line, never another exception (nor code execution)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from vasipc.heads import Declared, ModelFacts, TensorFacts, family_for

    text = st.one_of(st.text(max_size=40), st.sampled_from(
        ["True", "False", "[17, 3]", "[17, 2]", "[320, 320]", "320", "{0: 'a'}", "['a', 'b']",
         "{'nms': True}", "__import__('os').system('false')", "[[1]]", "{1: 'a'}", "1e400", "()"]))
    keys = st.sampled_from(["task", "end2end", "args", "names", "kpt_shape", "kpt_names",
                            "imgsz", "stride", "head", "description"])
    outputs = st.lists(st.tuples(st.sampled_from(["output0", "output1", "dets", "labels"]),
                                 st.lists(st.one_of(st.integers(-1, 400), st.none(),
                                                    st.just("anchors")), min_size=1, max_size=4)),
                       min_size=1, max_size=3)

    @settings(max_examples=400, deadline=None)
    @given(st.dictionaries(keys, text, max_size=6), outputs)
    def recognize(meta: dict, outs: list) -> None:
        facts = ModelFacts("m.onnx", (TensorFacts("images", ("batch", 3, "h", "w"), "tensor(float)"),),
                           tuple(TensorFacts(n, tuple(s), "tensor(float)") for n, s in outs),
                           meta, Declared())
        try:
            family = family_for(facts)
            _ = (facts.input_size, facts.kpt_shape, facts.kpt_names, facts.end2end)
            family.build([tuple(d if isinstance(d, int) and d > 0 else 1 for d in s)
                          for _, s in outs])
        except ModelError as exc:
            assert "\n" not in str(exc)

    recognize()
