"""Real Ultralytics 8.4 exports of every task (the zoo: `VASIPC_ZOO`, else
../shared/models/zoo/ beside the checkout; random weights that still give a few to a few
hundred results) through a real server socket, against the
numpy reference: preprocessing as each family wants it (OpenCV's resize; PIL's for the
classifier, as Ultralytics' torchvision transforms do), ONNX Runtime in-process,
tests/reference_heads.py post-processing; the ONNX reader's metadata as ONNX Runtime's;
ONNX Runtime and OpenVINO fp32 servers agreeing on each (within 2e-4: random weights
amplify float32 rounding, tests/test_backends.py); and the classifier's top 5 on a 2x
frame as Ultralytics 8.4 itself answered. Skipped, with the reason, where the zoo is absent
(it is for tests, never shipped: `conftest.zoo_model`)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import reference_heads
import wire
from conftest import zoo_model
from contract_util import write_dir
from test_backends import assert_fp32_backends_agree
from test_families import assert_same_answer

from vasipc.onnx_file import read_summary

cv2 = pytest.importorskip("cv2")
ort = pytest.importorskip("onnxruntime")

MODELS = ["yolo11n-320-detect", "yolo11n-320-nms", "yolo26n-320-end2end", "yolo11n-320-seg",
          "yolo26n-320-seg-end2end", "yolo11n-320-pose", "yolo26n-320-pose-end2end",
          "yolo11n-320-obb", "yolo11n-224-cls"]
ARCHITECTURE = {"yolo11n-320-nms": "yolo-end2end", "yolo26n-320-end2end": "yolo-end2end",
                "yolo26n-320-seg-end2end": "yolo-end2end",
                "yolo26n-320-pose-end2end": "yolo-end2end", "yolo11n-224-cls": "yolo-classify"}
# the exports both fp32 backends are compared on
BACKEND_MODELS = ["yolo11n-320-detect", "yolo11n-320-nms", "yolo26n-320-end2end",
                  "yolo11n-320-seg", "yolo11n-320-pose", "yolo11n-320-obb", "yolo11n-224-cls"]


@dataclass
class ZooCase:
    architecture: str
    task: str
    names: dict
    kpt_shape: tuple[int, int] | None
    size: int


def zoo_case(name: str, session) -> ZooCase:
    meta = session.get_modelmeta().custom_metadata_map
    kpt = ast.literal_eval(meta["kpt_shape"]) if "kpt_shape" in meta else None
    return ZooCase(ARCHITECTURE.get(name, "yolo"), meta["task"], ast.literal_eval(meta["names"]),
                   None if kpt is None else tuple(kpt), ast.literal_eval(meta["imgsz"])[0])


def reference_input(rgb: np.ndarray, geom: reference_heads.Geom, size: int,
                    pil: bool = False) -> np.ndarray:
    """The family's input tensor: resize to the placement (OpenCV's INTER_LINEAR, or with
    pil PIL's Image.resize(BILINEAR), torchvision's Resize on a PIL image), then pad (114)
    or crop, /255, NCHW."""
    h, w = rgb.shape[:2]
    nw, nh = round(w * geom.scale_x), round(h * geom.scale_y)
    if pil:
        image = pytest.importorskip("PIL.Image")
        img = np.asarray(image.fromarray(rgb).resize((nw, nh), image.BILINEAR))
    else:
        img = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), 114, np.uint8)
    left, top = int(geom.pad_left), int(geom.pad_top)
    src = img[max(0, -top):max(0, -top) + size, max(0, -left):max(0, -left) + size]
    canvas[max(0, top):max(0, top) + src.shape[0], max(0, left):max(0, left) + src.shape[1]] = src
    return np.ascontiguousarray(canvas.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255))


def frames_for(rgb: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The model's own input size (any implementation reproduces its input exactly), an
    exact 2x pixel-replicated upscale of it, and a 16:9 crop (letterboxed)."""
    own = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return {"own-size": own, "2x": np.repeat(np.repeat(own, 2, axis=0), 2, axis=1),
            "16:9": np.ascontiguousarray(rgb[64:352, :512])}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_through_the_socket(name: str, server_factory, shm_dir: Path,
                                      astronaut_rgb: np.ndarray) -> None:
    path = zoo_model(name)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert read_summary(str(path)).metadata == dict(session.get_modelmeta().custom_metadata_map)
    case = zoo_case(name, session)
    server = server_factory(model=str(path), model_id="zoo")
    info = wire.roundtrip(server.socket, {"op": "info"})
    assert (info["architecture"], info["task"]) == (case.architecture, case.task)
    resize = "center_crop" if case.task == "classify" else "letterbox"
    answered = 0
    for label, rgb in frames_for(astronaut_rgb, case.size).items():
        frame = write_dir(shm_dir / label.replace(":", "x"), rgb, "RGB24")
        h, w = rgb.shape[:2]
        geom = reference_heads.input_geometry(resize, w, h, case.size, case.size)
        x = reference_input(rgb, geom, case.size, pil=case.task == "classify")
        outs = session.run(None, {"images": x})
        want = reference_heads.answer(case, [o[0] for o in outs], geom, (case.size, case.size))
        resp = wire.roundtrip(server.socket, wire.infer_request(str(frame), "zoo"))
        assert resp["error_code"] is None, resp
        assert_same_answer({k: resp[k] for k in want}, want)
        answered += len(want.get("classifications") or want["detections"])
    assert answered > 0, "the zoo models give results on real frames"


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKEND_MODELS)
def test_zoo_fp32_backends_agree_within_2e4(name: str, server_factory, shm_dir: Path,
                                            astronaut_rgb: np.ndarray) -> None:
    path = zoo_model(name)
    frame = write_dir(shm_dir / "astronaut", astronaut_rgb)
    assert_fp32_backends_agree(server_factory, str(path), frame, 2e-4)


def test_classifier_top5_is_ultralytics_on_a_2x_frame(astronaut_rgb: np.ndarray) -> None:
    """The 2x pixel-replicated upscale of a 224x224 astronaut: Ultralytics 8.4 (PIL's
    antialiased resize to 224) ranks [723, 980, 437, 15, 955] (measured with
    bench/ultralytics_oracle.py's venv: ultralytics 8.4.190, Pillow 13.0); OpenCV's
    INTER_LINEAR would give [140, 15, 723, 602, 437]. In-process: the loaded model's own
    preprocessing (centre crop, antialias) and session."""
    from vasipc._fast.letterbox import RGB24, letterbox_into
    from vasipc.model import ModelSpec, load_model
    from vasipc.runtime import Device

    path = zoo_model("yolo11n-224-cls")
    model = load_model(ModelSpec(str(path), "zoo", "zoo", "1"), Device("cpu"), 1)
    pre = model.family.preprocess
    own = cv2.resize(np.ascontiguousarray(astronaut_rgb), (224, 224), interpolation=cv2.INTER_AREA)
    frame = np.ascontiguousarray(np.repeat(np.repeat(own, 2, axis=0), 2, axis=1))
    x = np.empty((1, 3, 224, 224), np.float32)
    _, placement = pre.placement(448, 448, 224, 224)
    letterbox_into(frame, RGB24, 448, 448, 3 * 448, x[0], *placement,
                   antialias=pre.filter == "antialias")
    probs = model.run_batch(x, 1)[0][0]
    assert np.argsort(-probs, kind="stable")[:5].tolist() == [723, 980, 437, 15, 955]
