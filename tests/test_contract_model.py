"""docs/contract.md section 6: model processing. The server's detections are compared with an
independent reference pipeline written here (OpenCV colour conversion, resize and border,
ONNX Runtime, numpy decode, OpenCV NMS), on a real photo, in every pixel format and both
frame forms; plus class names, input size and the classes filter."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import wire
from contract_util import FORMATS, assert_ok, infer, write_dir, write_raw

from vasipc import frames

cv2 = pytest.importorskip("cv2")
ort = pytest.importorskip("onnxruntime")

FACE_FEMALE = 1
BOX_TOL = 0.01
CONF_TOL = 0.02


# --- the reference pipeline --------------------------------------------------------------------

def decode_frame(data: np.ndarray, fmt: str, w: int, h: int) -> np.ndarray:
    """Packed frame bytes -> RGB uint8, with OpenCV (BT.601 limited range for YUV)."""
    yuv = {"NV12": cv2.COLOR_YUV2RGB_NV12, "NV21": cv2.COLOR_YUV2RGB_NV21,
           "I420": cv2.COLOR_YUV2RGB_I420}
    if fmt in yuv:
        return cv2.cvtColor(data.reshape(h * 3 // 2, w), yuv[fmt])
    four = {"BGRA": cv2.COLOR_BGRA2RGB, "BGRx": cv2.COLOR_BGRA2RGB, "RGBA": cv2.COLOR_RGBA2RGB,
            "RGBx": cv2.COLOR_RGBA2RGB}
    if fmt in four:
        return cv2.cvtColor(data.reshape(h, w, 4), four[fmt])
    if fmt == "GRAY8":
        return cv2.cvtColor(data.reshape(h, w), cv2.COLOR_GRAY2RGB)
    if fmt == "BGR24":
        return cv2.cvtColor(data.reshape(h, w, 3), cv2.COLOR_BGR2RGB)
    return data.reshape(h, w, 3).copy()


@dataclass
class Letterbox:
    tensor: np.ndarray
    r: float
    left: int
    top: int


def letterbox(rgb: np.ndarray, in_w: int, in_h: int) -> Letterbox:
    h, w = rgb.shape[:2]
    r = min(in_w / w, in_h / h)
    nw, nh = round(w * r), round(h * r)
    img = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    left, top = round((in_w - nw) / 2 - 0.1), round((in_h - nh) / 2 - 0.1)
    img = cv2.copyMakeBorder(img, top, in_h - nh - top, left, in_w - nw - left,
                             cv2.BORDER_CONSTANT, value=(114, 114, 114))
    x = img.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255)
    return Letterbox(np.ascontiguousarray(x), r, left, top)


class Reference:
    def __init__(self, model_path: str) -> None:
        self.session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def raw(self, lb: Letterbox) -> np.ndarray:
        return self.session.run(None, {self.input_name: lb.tensor})[0][0]  # [4+nc, N]

    def detect(self, rgb: np.ndarray, in_size: int, conf: float = 0.25, iou: float = 0.45,
               max_det: int = 300, classes: list[int] | None = None,
               rescore: bool = False) -> list[dict]:
        """Detections as docs/contract.md 6 defines them; `rescore` instead takes the best of the
        listed classes (not the contract's semantics: for telling the two apart)."""
        lb = letterbox(rgb, in_size, in_size)
        pred = self.raw(lb).T.astype(np.float64)
        scores = pred[:, 4:]
        if rescore:
            scores = np.where(np.isin(np.arange(scores.shape[1]), classes), scores, 0.0)
        cls = scores.argmax(1)
        best = scores.max(1)
        keep = best >= np.float32(conf)
        if classes is not None:
            keep &= np.isin(cls, classes)
        xywh, best, cls = pred[keep, :4], best[keep], cls[keep]
        if not len(best):
            return []
        xy = xywh[:, :2] - xywh[:, 2:] / 2
        rects = [tuple(map(float, (x, y, bw, bh))) for (x, y), (bw, bh) in
                 zip(xy, xywh[:, 2:], strict=True)]
        # score_threshold 0: the threshold is applied above (>=; OpenCV's is >)
        idx = np.asarray(cv2.dnn.NMSBoxesBatched(rects, best.tolist(), cls.tolist(),
                                                 0.0, float(iou))).reshape(-1)
        idx = sorted(idx.tolist(), key=lambda i: -best[i])[:max_det]
        h, w = rgb.shape[:2]
        out = []
        for i in idx:
            x1, y1, bw, bh = rects[i]
            box = np.array([x1, y1, x1 + bw, y1 + bh])
            box[[0, 2]] = np.clip((box[[0, 2]] - lb.left) / lb.r, 0, w) / w
            box[[1, 3]] = np.clip((box[[1, 3]] - lb.top) / lb.r, 0, h) / h
            out.append({"class_id": int(cls[i]), "confidence": float(best[i]),
                        "bbox": box.tolist()})
        return out


def unmatched(a: list[dict], b: list[dict], min_conf: float) -> list[dict]:
    """Detections of `a` with confidence >= min_conf that have no counterpart in `b` (same
    class, every bbox coordinate within BOX_TOL, confidence within CONF_TOL)."""
    free = list(b)
    missing = []
    for d in a:
        if d["confidence"] < min_conf:
            continue
        match = next((e for e in free if e["class_id"] == d["class_id"]
                      and abs(e["confidence"] - d["confidence"]) <= CONF_TOL
                      and np.allclose(e["bbox"], d["bbox"], atol=BOX_TOL, rtol=0)), None)
        if match is None:
            missing.append(d)
        else:
            free.remove(match)
    return missing


def assert_same_detections(server: list[dict], ref: list[dict], conf: float) -> None:
    """Both ways, ignoring detections within CONF_TOL of the threshold (they may cross it)."""
    margin = conf + CONF_TOL
    assert not unmatched(ref, server, margin), (
        f"reference detections the server lacks: {unmatched(ref, server, margin)}\n"
        f"server: {server}")
    assert not unmatched(server, ref, margin), (
        f"server detections the reference lacks: {unmatched(server, ref, margin)}\n"
        f"reference: {ref}")


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sock(nudenet_server) -> str:
    return nudenet_server.socket


@pytest.fixture(scope="module")
def reference(nudenet_model) -> Reference:
    return Reference(nudenet_model)


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vasipc-model-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def photo(astronaut_rgb) -> np.ndarray:
    """The astronaut cropped to a non-square size, so the letterbox pads (top and bottom)."""
    return np.ascontiguousarray(astronaut_rgb[:, 16:496 + 16][:400])  # 480 x 400


def as_seen(rgb: np.ndarray, fmt: str) -> np.ndarray:
    """The RGB picture a reader of `fmt` gets from our encoding of `rgb`."""
    h, w = rgb.shape[:2]
    return decode_frame(frames.encode_frame(rgb, fmt), fmt, w, h)


def write_frame(root: Path, rgb: np.ndarray, fmt: str, form: str) -> tuple[Path, dict]:
    w = rgb.shape[1]
    if form == "dir":
        return write_dir(root / f"{fmt}-dir", rgb, fmt, frame_id=1), {}
    stride = frames.packed_stride(w, fmt) + 48  # padded rows
    path = root / f"{fmt}.raw"
    md = write_raw(path, rgb, fmt, stride=stride, offset=4096 + 24)
    return path, md


# --- correctness -------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["dir", "raw"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_detections_match_the_reference(sock, reference, root, photo, fmt, form):
    path, md = write_frame(root, photo, fmt, form)
    server = assert_ok(infer(sock, path, md))
    ref = reference.detect(as_seen(photo, fmt), 320)
    assert FACE_FEMALE in [d["class_id"] for d in ref]
    assert FACE_FEMALE in [d["class_id"] for d in server], server
    assert_same_detections(server, ref, 0.25)


def test_detections_match_the_reference_at_a_low_threshold(sock, reference, root, photo):
    """Many overlapping candidates: NMS and max_detections are exercised too."""
    path, md = write_frame(root, photo, "RGB24", "raw")
    for conf, iou, max_det in ((0.05, 0.45, 300), (0.02, 0.7, 300), (0.05, 0.2, 5)):
        server = assert_ok(infer(sock, path, md, config={
            "confidence_threshold": conf, "nms_iou_threshold": iou, "max_detections": max_det}))
        ref = reference.detect(photo, 320, conf=conf, iou=iou, max_det=max_det)
        assert len(server) > 3
        if max_det < 300:
            assert len(server) == max_det
            # the top detections agree, none may be "near the threshold" here
            for s, r in zip(server, ref, strict=True):
                assert s["class_id"] == r["class_id"]
                assert s["confidence"] == pytest.approx(r["confidence"], abs=CONF_TOL)
        else:
            assert_same_detections(server, ref, conf)


@pytest.mark.slow
def test_wide_and_tall_frames(sock, reference, root, astronaut_rgb):
    """Letterbox padding on either axis, odd new sizes, frames smaller than the input."""
    cases = {"wide": astronaut_rgb[100:300], "tall": astronaut_rgb[:, 150:350],
             "small": astronaut_rgb[::4, ::4], "odd": astronaut_rgb[:510, :302]}
    for name, pic in cases.items():
        pic = np.ascontiguousarray(pic)
        path = root / f"shape-{name}"
        md = write_raw(path, pic, "RGB24")
        server = assert_ok(infer(sock, path, md, config={"confidence_threshold": 0.1}))
        ref = reference.detect(pic, 320, conf=0.1)
        assert_same_detections(server, ref, 0.1)


def test_server_letterbox_matches_the_reference_tensor(photo):
    """The tolerance of docs/contract.md 6 on the tensor itself: the server's letterbox (its
    compiled core, called directly: the tensor never crosses the wire) vs. OpenCV's."""
    letterbox_mod = pytest.importorskip("vasipc._fast.letterbox")
    for fmt in FORMATS:
        h, w = photo.shape[:2]
        data = frames.encode_frame(photo, fmt)
        geom = letterbox_mod.letterbox_geometry(w, h, 320, 320)
        r, nw, nh, left, top = geom
        ref = letterbox(as_seen(photo, fmt), 320, 320)
        assert (left, top) == (ref.left, ref.top)
        assert r == pytest.approx(ref.r)
        out = np.empty((3, 320, 320), np.float32)
        letterbox_mod.letterbox_into(data, frames.PIXEL_FORMATS[fmt], w, h,
                                     frames.packed_stride(w, fmt), out, nw, nh, left, top)
        diff = np.abs(out - ref.tensor[0])
        assert diff.mean() <= 2 / 255, (fmt, diff.mean())
        assert np.quantile(diff, 0.999) <= 8 / 255, fmt


# --- the benchmark model (static 640 input, random weights) --------------------------------------

@pytest.mark.slow
def test_benchmark_model_matches_the_reference(bench_server, bench_model, root, photo):
    info = wire.roundtrip(bench_server.socket, {"op": "info"})
    assert info["input"] == {"width": 640, "height": 640}
    assert len(info["classes"]) == 80 and info["classes"][0] == "person"
    ref_model = Reference(bench_model)
    # random weights: class scores are tiny, so the threshold goes down to reach some
    raw = ref_model.raw(letterbox(photo, 640, 640))
    conf = float(np.quantile(raw[4:].max(0), 0.995))
    path, md = write_frame(root, photo, "BGR24", "raw")
    server = assert_ok(infer(bench_server.socket, path, md, model_id="bench",
                             config={"confidence_threshold": conf}))
    ref = ref_model.detect(photo, 640, conf=conf)
    assert ref and server
    # scores this small: compare classes and boxes, confidences by relative size
    assert len(server) == pytest.approx(len(ref), abs=max(2, len(ref) // 10))
    for d in server[:10]:
        match = [e for e in ref if e["class_id"] == d["class_id"]
                 and np.allclose(e["bbox"], d["bbox"], atol=BOX_TOL, rtol=0)]
        assert match, (d, ref[:10])


# --- class names and input size ----------------------------------------------------------------

def test_class_names_from_onnx_metadata(sock, root, photo):
    info = wire.roundtrip(sock, {"op": "info"})
    assert len(info["classes"]) == 18 and info["classes"][FACE_FEMALE] == "FACE_FEMALE"
    path, md = write_frame(root, photo, "NV12", "dir")
    for d in assert_ok(infer(sock, path, md)):
        assert d["class_name"] == info["classes"][d["class_id"]]


@pytest.mark.slow
def test_class_names_from_labels_file(server_factory, tmp_path, root, photo):
    labels = tmp_path / "labels.txt"
    names = [f"label-{i}" for i in range(18)]
    labels.write_text("\n".join(names) + "\n")
    server = server_factory("--labels", str(labels))
    info = wire.roundtrip(server.socket, {"op": "info"})
    assert info["classes"] == names
    path, md = write_frame(root, photo, "NV12", "dir")
    dets = assert_ok(infer(server.socket, path, md))
    assert "label-1" in [d["class_name"] for d in dets]
    assert all(d["class_name"] == f"label-{d['class_id']}" for d in dets)


@pytest.fixture(scope="module")
def bare_model(nudenet_model) -> Iterator[str]:
    """nudenet's 320n.onnx without its metadata `names` and `imgsz` (spatial dims dynamic)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(nudenet_model)
    kept = [p for p in model.metadata_props if p.key not in ("names", "imgsz")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    d = Path(tempfile.mkdtemp(prefix="vasipc-bare-"))
    (d / "7").mkdir()
    path = d / "7" / "bare.onnx"  # in a version directory: model_version "7"
    onnx.save(model, str(path))
    try:
        yield str(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_class_id_names_and_640_input_without_metadata(server_factory, bare_model, reference,
                                                       root, photo):
    server = server_factory(model=bare_model, model_id="bare")
    info = wire.roundtrip(server.socket, {"op": "info"})
    assert info["classes"] == [f"class_{i}" for i in range(18)]
    assert info["input"] == {"width": 640, "height": 640}  # dynamic dims, no imgsz
    assert info["model_name"] == "bare" and info["model_version"] == "7"
    path, md = write_frame(root, photo, "RGB24", "dir")
    resp = infer(server.socket, path, md, model_id="bare")
    assert resp["metadata"]["model_version"] == "7"
    dets = assert_ok(resp)
    assert all(d["class_name"] == f"class_{d['class_id']}" for d in dets)
    # and it really runs at 640: the reference at 640 agrees (same weights as nudenet)
    assert_same_detections(dets, reference.detect(photo, 640), 0.25)


@pytest.mark.slow
def test_input_size_from_imgsz_metadata(sock, reference, root, photo):
    """nudenet's spatial dims are dynamic; its metadata imgsz [320, 320] decides."""
    assert wire.roundtrip(sock, {"op": "info"})["input"] == {"width": 320, "height": 320}
    path, md = write_frame(root, photo, "RGB24", "dir")
    server = assert_ok(infer(sock, path, md, config={"confidence_threshold": 0.1}))
    at_640 = reference.detect(photo, 640, conf=0.1)
    at_320 = reference.detect(photo, 320, conf=0.1)
    assert_same_detections(server, at_320, 0.1)
    assert unmatched(at_640, server, 0.12) or unmatched(server, at_640, 0.12)


# --- config.classes is applied before NMS (and before max_detections) ----------------------------

@pytest.mark.slow
def test_classes_filter_keeps_best_class_candidates(sock, reference, root, photo):
    path, md = write_frame(root, photo, "RGB24", "raw")
    conf = 0.05
    everything = reference.detect(photo, 320, conf=conf)
    present = sorted({d["class_id"] for d in everything})
    assert len(present) >= 2
    for cid in present:
        server = assert_ok(infer(sock, path, md, config={"confidence_threshold": conf,
                                                         "classes": [cid]}))
        ref = reference.detect(photo, 320, conf=conf, classes=[cid])
        assert server and {d["class_id"] for d in server} == {cid}
        assert_same_detections(server, ref, conf)
        # before max_detections: the best of this class, even when other classes rank higher
        top = assert_ok(infer(sock, path, md, config={
            "confidence_threshold": conf, "classes": [cid], "max_detections": 1}))
        assert len(top) == 1 and top[0]["class_id"] == cid
        assert top[0]["confidence"] == pytest.approx(server[0]["confidence"], abs=1e-6)


# --- a model with a known output: decode, NMS, filters and unletterbox checked exactly ------------

# anchors (cx, cy, w, h in input pixels; scores of classes alpha, beta, gamma)
ANCHORS = [
    ((32, 24, 32, 16), (0.9, 0.5, 0.0)),   # 0: alpha 0.9 (beta 0.5 is a runner-up only)
    ((33, 24, 32, 16), (0.8, 0.0, 0.0)),   # 1: alpha, IoU ~0.94 with 0: suppressed at 0.45
    ((33, 24, 32, 16), (0.0, 0.0, 0.7)),   # 2: gamma at the same place: NMS is per class
    ((10, 14, 8, 8), (0.1, 0.6, 0.0)),     # 3: beta 0.6
    ((60, 44, 20, 20), (0.3, 0.0, 0.0)),   # 4: alpha 0.3, running past the frame: clipped
    ((16, 30, 4, 4), (0.2, 0.24, 0.1)),    # 5: beta 0.24, under the default threshold
]
IN_W, IN_H = 64, 48          # the model's static input
SRC_W, SRC_H = 128, 64       # the frame: r = 0.5, resized 64x32, left 0, top round(7.9) = 8


def _expected_bbox(anchor: int) -> list[float]:
    """docs/contract.md 4/6 by hand: unletterbox, clip to the source frame, normalize."""
    (cx, cy, w, h), _ = ANCHORS[anchor]
    r = min(IN_W / SRC_W, IN_H / SRC_H)
    left, top = round((IN_W - SRC_W * r) / 2 - 0.1), round((IN_H - SRC_H * r) / 2 - 0.1)
    x1, x2 = [min(max((x - left) / r, 0), SRC_W) / SRC_W for x in (cx - w / 2, cx + w / 2)]
    y1, y2 = [min(max((y - top) / r, 0), SRC_H) / SRC_H for y in (cy - h / 2, cy + h / 2)]
    return [x1, y1, x2, y2]


def _known_output_model(path: Path) -> None:
    """A static 64x48 model whose output is ANCHORS whatever the image (plus 0 * its mean,
    so the output stays an input-dependent computation), with names and a misleading
    imgsz in its metadata (static dims win)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    out = np.zeros((1, 4 + 3, len(ANCHORS)), np.float32)
    for i, (box, scores) in enumerate(ANCHORS):
        out[0, :4, i] = box
        out[0, 4:, i] = scores
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=1),  # [1, 1, 1, 1]
        helper.make_node("Reshape", ["mean", "one"], ["mean1"]),           # [1, 1, 1]
        helper.make_node("Mul", ["mean1", "zero"], ["nothing"]),
        helper.make_node("Add", ["table", "nothing"], ["output0"]),
    ]
    inits = [helper.make_tensor("one", TensorProto.INT64, [3], [1, 1, 1]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("table", TensorProto.FLOAT, list(out.shape),
                                out.reshape(-1).tolist())]
    graph = helper.make_graph(
        nodes, "known_output",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, IN_H, IN_W])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(out.shape))],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": "{0: 'alpha', 1: 'beta', 2: 'gamma'}",
                                   "imgsz": "[320, 320]"})
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def known(nudenet_model, root) -> Iterator[tuple[str, Path]]:
    """(socket, frame) of a server of the known-output model, and a 128x64 frame."""
    from conftest import ServerLauncher

    d = Path(tempfile.mkdtemp(prefix="vasipc-known-"))
    launcher = ServerLauncher(nudenet_model)
    try:
        _known_output_model(d / "known.onnx")
        server = launcher(model=str(d / "known.onnx"), model_id="known")
        frame = write_dir(root / "known-frame", np.full((SRC_H, SRC_W, 3), 50, np.uint8),
                          "RGB24", frame_id=3)
        yield server.socket, frame
    finally:
        launcher.close()
        shutil.rmtree(d, ignore_errors=True)


def _known(known: tuple[str, Path], **config: object) -> list[tuple]:
    sock, frame = known
    dets = assert_ok(infer(sock, frame, model_id="known", config=config))
    return [(d["class_id"], d["class_name"], d["confidence"], d["bbox"]) for d in dets]


def _anchors(*ids: int) -> list[tuple]:
    names = ("alpha", "beta", "gamma")
    rows = []
    for i in ids:
        scores = ANCHORS[i][1]
        c = int(np.argmax(scores))
        rows.append((c, names[c], pytest.approx(scores[c], abs=1e-6),
                     pytest.approx(_expected_bbox(i), abs=1e-5)))
    return rows


def test_known_output_model_info(known):
    info = wire.roundtrip(known[0], {"op": "info"})
    assert info["input"] == {"width": IN_W, "height": IN_H}  # static dims, not imgsz
    assert info["classes"] == ["alpha", "beta", "gamma"]


def test_known_output_default_decode(known):
    assert _known(known) == _anchors(0, 2, 3, 4)
    assert _expected_bbox(4)[2:] == [1.0, 1.0]  # the clipped one


@pytest.mark.parametrize(("config", "anchors"), [
    ({"nms_iou_threshold": 1.0}, (0, 1, 2, 3, 4)),      # nothing overlaps "more than 1"
    ({"nms_iou_threshold": 0.95}, (0, 1, 2, 3, 4)),     # IoU(0, 1) ~0.94 is not > 0.95
    ({"nms_iou_threshold": 0.9}, (0, 2, 3, 4)),
    ({"confidence_threshold": 0.2}, (0, 2, 3, 4, 5)),
    ({"confidence_threshold": 0.24}, (0, 2, 3, 4, 5)),  # >= threshold is kept
    ({"confidence_threshold": 0.7}, (0, 2)),
    ({"confidence_threshold": 0.95}, ()),
    ({"max_detections": 2}, (0, 2)),
    ({"classes": [1]}, (3,)),                  # best class only: anchor 0's beta 0.5 is not
    ({"classes": [1], "confidence_threshold": 0.2}, (3, 5)),
    ({"classes": [1], "max_detections": 1}, (3,)),       # filtered before max_detections
    ({"classes": [2, 1], "max_detections": 2}, (2, 3)),
    ({"classes": [0, 7, 99]}, (0, 4)),
    ({"classes": []}, ()),
    ({"classes": ["beta"]}, (3,)),             # by name, as info.classes lists them
    ({"classes": ["gamma", 1], "max_detections": 2}, (2, 3)),  # names and ids mixed
    ({"classes": ["alpha", 0, "alpha", 99]}, (0, 4)),
])
def test_known_output_config(known, config, anchors):
    assert _known(known, **config) == _anchors(*anchors)


@pytest.mark.parametrize(("classes", "named"), [
    (["delta"], 'no class named "delta"'),
    (["Beta"], 'no class named "Beta"'),           # names are exact
    ([0, "beta", ""], 'config.classes[2]: no class named ""'),
    ([1, True], "config.classes[1] must be a class id (an integer >= 0) or a class name, not true"),
    ([0, -1], "config.classes[1] must be a class id"),
    (["beta", None], "not null"),
])
def test_known_output_bad_class_is_named(known, classes, named):
    sock, frame = known
    resp = infer(sock, frame, model_id="known", config={"classes": classes})
    assert resp["error_code"] == "invalid_request" and named in resp["error"], resp


def test_class_index_keeps_every_id_of_a_repeated_name():
    from vasipc.schema import class_index

    assert class_index(("car", "person", "car")) == {"car": (0, 2), "person": (1,)}


def test_known_output_raw_frame_with_padding(known, root):
    """The same through a raw file: geometry from frame_metadata, rows padded, offset."""
    sock, _ = known
    path = root / "known.raw"
    md = write_raw(path, np.full((SRC_H, SRC_W, 3), 50, np.uint8), "NV12",
                   stride=SRC_W + 16, offset=999)
    dets = assert_ok(infer(sock, path, md, model_id="known"))
    assert [(d["class_id"], d["class_name"], d["confidence"], d["bbox"]) for d in dets] == \
        _anchors(0, 2, 3, 4)
