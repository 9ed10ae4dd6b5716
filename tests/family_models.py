"""Tiny ONNX models of every family, built with onnx.helper, whose outputs are crafted
tensors in the family's exact layout (and metadata strings exactly as the exporters write
them), so a test knows what the server must answer without trained weights.

Each output is a constant broadcast to the batch (`Expand` by the image input's batch
dimension); D-FINE's boxes are scaled by its `orig_target_sizes` input, as its graph does.
`CASES` names one model per family and task; `build(case, dir)` writes it.

`compute_model(path)` is the other kind: a YOLOv8-detect-layout model with real compute
cost (a convolution stack with fixed random weights, about a YOLOv8n's order of cost) for
the tests and benchmarks that need requests to take time (queueing, deadlines, drain).
`python tests/family_models.py OUT.onnx` writes it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMGSZ = 64  # the crafted models' input: 64 x 64 (prototypes 16 x 16)
NC = 3
NAMES = {0: "person", 1: "car", 2: "dog"}


def ultralytics_metadata(task: str, *, end2end: bool = False, nms: bool | None = None,
                         names: dict | None = None, kpt_shape: list | None = None,
                         imgsz: int = IMGSZ, head: str = "Detect") -> dict[str, str]:
    """Metadata as Ultralytics 8.4's exporter writes it (str() of Python values)."""
    meta = {
        "description": f"Ultralytics YOLO11n-{task} model ", "author": "Ultralytics",
        "date": "2026-12-07T22:04:55.490201+00:00", "version": "8.4.190",
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com", "stride": "32", "task": task, "batch": "1",
        "imgsz": str([imgsz, imgsz]), "names": str(names if names is not None else NAMES),
        "channels": "3", "end2end": str(end2end), "head": head,
        "args": str({"data": None, "batch": 1, "fraction": 1.0, "quantize": None, "nms": nms,
                     "dynamic": True, "simplify": True, "opset": 17}),
    }
    if kpt_shape is not None:
        meta["kpt_shape"] = str(kpt_shape)
    return meta


def save_model(path: Path, outputs: list[tuple[str, np.ndarray]], *,
               metadata: dict[str, str] | None = None, dynamic: bool = True,
               sizes_input: bool = False, size: int = IMGSZ) -> Path:
    """A model whose outputs are `outputs` (each [1, ...]) for every image of the batch.

    dynamic: the image input is [batch, 3, height, width] (the size from `imgsz`), else
    [batch, 3, size, size]. sizes_input: a second input `orig_target_sizes` [batch, 2]
    int64, and an output named "boxes" is multiplied by (w, h, w, h) of it (D-FINE)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hw = ["height", "width"] if dynamic else [size, size]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, *hw])]
    nodes = [helper.make_node("Shape", ["images"], ["image_shape"]),
             helper.make_node("Slice", ["image_shape", "zero", "one"], ["batch_dim"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    if sizes_input:
        inputs.append(helper.make_tensor_value_info("orig_target_sizes", TensorProto.INT64,
                                                    ["batch", 2]))
        nodes += [helper.make_node("Cast", ["orig_target_sizes"], ["sizes_f"], to=TensorProto.FLOAT),
                  helper.make_node("Concat", ["sizes_f", "sizes_f"], ["whwh"], axis=1),
                  helper.make_node("Unsqueeze", ["whwh", "one"], ["whwh_q"])]
    outs = []
    for name, value in outputs:
        const = f"{name}_value"
        inits += [numpy_helper.from_array(value, const),
                  numpy_helper.from_array(np.array(value.shape[1:], np.int64), f"{name}_rest")]
        nodes += [helper.make_node("Concat", ["batch_dim", f"{name}_rest"], [f"{name}_shape"], axis=0)]
        if sizes_input and name == "boxes":
            nodes += [helper.make_node("Expand", [const, f"{name}_shape"], ["boxes_norm"]),
                      helper.make_node("Mul", ["boxes_norm", "whwh_q"], [name])]
        else:
            nodes.append(helper.make_node("Expand", [const, f"{name}_shape"], [name]))
        elem = TensorProto.INT64 if value.dtype == np.int64 else TensorProto.FLOAT
        outs.append(helper.make_tensor_value_info(name, elem, ["batch", *value.shape[1:]]))
    graph = helper.make_graph(nodes, "crafted", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- crafted tensors --------------------------------------------------------------------------

def _boxes(rng: np.random.Generator, n: int, size: float = IMGSZ) -> np.ndarray:
    """n boxes (cx, cy, w, h) in input pixels, clustered so that NMS has work to do."""
    centres = rng.uniform(0.2 * size, 0.8 * size, (4, 2))
    c = centres[rng.integers(0, 4, n)] + rng.normal(0, 2.0, (n, 2))
    wh = rng.uniform(0.15 * size, 0.5 * size, (n, 2))
    return np.concatenate([c, wh], axis=1).astype(np.float32)


def _scores(rng: np.random.Generator, n: int, nc: int) -> np.ndarray:
    """Class scores in [0, 1): most low, a few above the default threshold."""
    s = rng.uniform(0, 0.2, (n, nc))
    hot = rng.choice(n, max(1, n // 4), replace=False)
    s[hot, rng.integers(0, nc, len(hot))] = rng.uniform(0.3, 0.95, len(hot))
    return s.astype(np.float32)


def _keypoints(rng: np.random.Generator, boxes: np.ndarray, k: int, d: int) -> np.ndarray:
    """k keypoints per row inside (and a few outside) its box; visibility in [0, 1]."""
    n = len(boxes)
    xy = boxes[:, None, :2] + rng.uniform(-0.7, 0.7, (n, k, 2)) * boxes[:, None, 2:]
    if d == 2:
        return xy.reshape(n, k * 2).astype(np.float32)
    vis = rng.uniform(0, 1, (n, k, 1))
    return np.concatenate([xy, vis], axis=2).reshape(n, k * 3).astype(np.float32)


def _protos(rng: np.random.Generator, nm: int = 32, size: int = IMGSZ // 4) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    basis = [np.sin((i % 5 + 1) * math.pi * xx + i) * np.cos((i // 5 + 1) * math.pi * yy)
             for i in range(nm)]
    return (np.stack(basis) + rng.normal(0, 0.05, (nm, size, size))).astype(np.float32)


def _xyxy(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)


def _end2end_rows(rng: np.random.Generator, m: int, live: int, nc: int, extras: int = 0,
                  obb: bool = False) -> np.ndarray:
    """[m, 6 + extras] rows (obb: [m, 7]), the first `live` ones real, score descending,
    the rest zero padding (as end-to-end exports pad)."""
    rows = np.zeros((m, 7 if obb else 6 + extras), np.float32)
    b = _boxes(rng, live)
    scores = np.sort(rng.uniform(0.1, 0.95, live))[::-1]
    classes = rng.integers(0, nc, live)
    if obb:
        rows[:live, :4] = b
        rows[:live, 6] = rng.uniform(-math.pi / 4, 3 * math.pi / 4, live)
    else:
        rows[:live, :4] = _xyxy(b)
    rows[:live, 4] = scores
    rows[:live, 5] = classes
    if extras:
        rows[:live, 6:] = rng.normal(0, 1, (live, extras))
    return rows


@dataclass
class Case:
    """One crafted model: its outputs, metadata and what it is."""

    architecture: str
    task: str
    outputs: list[tuple[str, np.ndarray]]
    metadata: dict[str, str] = field(default_factory=dict)
    names: dict | None = None          # class names the model answers with
    kpt_shape: tuple[int, int] | None = None
    sizes_input: bool = False
    dynamic: bool = True
    model_yaml: dict | None = None     # declarations for files without metadata

    def build(self, directory: Path, name: str) -> Path:
        """The model (and its model.yaml when it has one) in `directory`; returns the
        .onnx path, or the directory when there is a model.yaml."""
        directory.mkdir(parents=True, exist_ok=True)
        path = save_model(directory / f"{name}.onnx", self.outputs, metadata=self.metadata,
                          dynamic=self.dynamic, sizes_input=self.sizes_input)
        if self.model_yaml is None:
            return path
        import yaml

        (directory / "model.yaml").write_text(yaml.safe_dump({"model_weights": path.name,
                                                              **self.model_yaml}))
        return directory


def _cases() -> dict[str, Callable[[], Case]]:
    def yolo_detect() -> Case:
        rng = np.random.default_rng(1)
        n = 120
        pred = np.concatenate([_boxes(rng, n), _scores(rng, n, NC)], axis=1).T[None]
        return Case("yolo", "detect", [("output0", np.ascontiguousarray(pred))],
                    ultralytics_metadata("detect"), NAMES)

    def yolo_segment() -> Case:
        rng = np.random.default_rng(2)
        n = 120
        rows = np.concatenate([_boxes(rng, n), _scores(rng, n, NC),
                               rng.normal(0, 1, (n, 32)).astype(np.float32)], axis=1)
        return Case("yolo", "segment", [("output0", np.ascontiguousarray(rows.T[None])),
                                        ("output1", _protos(rng)[None])],
                    ultralytics_metadata("segment", head="Segment"), NAMES)

    def yolo_pose(dims: int = 3) -> Callable[[], Case]:
        def make() -> Case:
            rng = np.random.default_rng(3 + dims)
            n = 120
            b = _boxes(rng, n)
            rows = np.concatenate([b, _scores(rng, n, 1), _keypoints(rng, b, 17, dims)], axis=1)
            return Case("yolo", "pose", [("output0", np.ascontiguousarray(rows.T[None]))],
                        ultralytics_metadata("pose", names={0: "person"}, kpt_shape=[17, dims],
                                             head="Pose"), {0: "person"}, kpt_shape=(17, dims))
        return make

    def yolo_obb() -> Case:
        rng = np.random.default_rng(6)
        n = 150
        angle = rng.uniform(-math.pi / 4, 3 * math.pi / 4, (n, 1)).astype(np.float32)
        rows = np.concatenate([_boxes(rng, n), _scores(rng, n, NC), angle], axis=1)
        return Case("yolo", "obb", [("output0", np.ascontiguousarray(rows.T[None]))],
                    ultralytics_metadata("obb", head="OBB"), NAMES)

    def e2e(task: str, nms_export: bool = False) -> Callable[[], Case]:
        def make() -> Case:
            rng = np.random.default_rng(7 + len(task))
            names, kpt, extras, outputs = NAMES, None, 0, []
            if task == "segment":
                extras = 32
            elif task == "pose":
                names, kpt, extras = {0: "person"}, (17, 3), 51
            rows = _end2end_rows(rng, 300, 40, len(names), extras, obb=task == "obb")
            if task == "pose":
                b = np.concatenate([(rows[:40, :2] + rows[:40, 2:4]) / 2,
                                    rows[:40, 2:4] - rows[:40, :2]], axis=1)
                rows[:40, 6:] = _keypoints(rng, b, 17, 3)
            outputs.append(("output0", rows[None]))
            if task == "segment":
                outputs.append(("output1", _protos(rng)[None]))
            meta = ultralytics_metadata(task, end2end=not nms_export, nms=nms_export or False,
                                        names=names, kpt_shape=None if kpt is None else list(kpt))
            return Case("yolo-end2end", task, outputs, meta, names, kpt_shape=kpt)
        return make

    def classify() -> Case:
        rng = np.random.default_rng(11)
        logits = rng.normal(0, 2, 10)
        logits[[3, 7]] = 4.0  # a tie: the lower class id first
        probs = np.exp(logits) / np.exp(logits).sum()
        names = {i: f"class_{i}" for i in range(10)}
        return Case("yolo-classify", "classify", [("output0", probs.astype(np.float32)[None])],
                    ultralytics_metadata("classify", names=names, head="Classify"), names)

    def yolov5() -> Case:
        rng = np.random.default_rng(12)
        n = 150
        obj = rng.uniform(0.3, 1.0, (n, 1)).astype(np.float32)
        rows = np.concatenate([_boxes(rng, n), obj, _scores(rng, n, NC) + 0.1], axis=1)
        return Case("yolov5", "detect", [("output0", rows[None])],
                    {"stride": "32", "names": str(NAMES)}, NAMES, dynamic=False)

    def rtdetr(fields: int) -> Callable[[], Case]:
        def make() -> Case:
            rng = np.random.default_rng(13 + fields)
            q = 300
            b = _boxes(rng, q) / IMGSZ
            if fields == 6:
                s = _scores(rng, q, NC)
                rows = np.concatenate([b, s.max(1, keepdims=True), s.argmax(1)[:, None]], axis=1)
                return Case("rtdetr", "detect", [("output0", rows.astype(np.float32)[None])],
                            {}, NAMES, dynamic=False,
                            model_yaml={"architecture": "rtdetr", "output_schema": {
                                "class_names_file": "names.txt"}})
            rows = np.concatenate([b, _scores(rng, q, NC)], axis=1).astype(np.float32)
            meta = ultralytics_metadata("detect", head="RTDETRDecoder")
            meta["description"] = "Ultralytics rtdetr-l model "
            return Case("rtdetr", "detect", [("output0", rows[None])], meta, NAMES)
        return make

    def rfdetr() -> Case:
        rng = np.random.default_rng(15)
        q, c = 100, NC + 1
        dets = (_boxes(rng, q) / IMGSZ).astype(np.float32)
        logits = rng.normal(-4, 1.5, (q, c)).astype(np.float32)
        logits[rng.choice(q, 20, replace=False), rng.integers(0, c, 20)] = 2.0
        return Case("rfdetr", "detect", [("dets", dets[None]), ("labels", logits[None])], {},
                    None, dynamic=False)  # no names anywhere: class_{id}

    def dfine() -> Case:
        rng = np.random.default_rng(16)
        q = 300
        boxes = _xyxy(_boxes(rng, q)) / IMGSZ
        scores = rng.uniform(0, 0.6, q).astype(np.float32)
        labels = rng.integers(0, NC, q).astype(np.int64)
        return Case("dfine", "detect", [("labels", labels[None]),
                                        ("boxes", boxes.astype(np.float32)[None]),
                                        ("scores", scores[None])],
                    {}, NAMES, sizes_input=True, dynamic=False,
                    model_yaml={"output_schema": {"class_names_file": "names.txt"}})

    return {
        "yolo-detect": yolo_detect, "yolo-segment": yolo_segment, "yolo-pose": yolo_pose(3),
        "yolo-pose-xy": yolo_pose(2), "yolo-obb": yolo_obb,
        "end2end-detect": e2e("detect"), "end2end-nms-export": e2e("detect", nms_export=True),
        "end2end-segment": e2e("segment"), "end2end-pose": e2e("pose"), "end2end-obb": e2e("obb"),
        "yolo-classify": classify, "yolov5": yolov5, "rtdetr": rtdetr(4 + NC),
        "rtdetr-score-class": rtdetr(6), "rfdetr": rfdetr, "dfine": dfine,
    }


CASES = _cases()


def build(case_name: str, directory: Path) -> tuple[Case, Path]:
    """The case and the path to serve (an .onnx file, or a model directory with its
    model.yaml and names file)."""
    case = CASES[case_name]()
    path = case.build(directory, case_name)
    if case.model_yaml is not None and case.names is not None:
        (directory / "names.txt").write_text("".join(f"{case.names[i]}\n" for i in range(len(case.names))))
    return case, path


# --- a model with real compute cost -------------------------------------------------------------

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")


def compute_model(path: Path, *, imgsz: int = 640, depth: int = 12, width: int = 64) -> Path:
    """A YOLOv8-detect-layout model (input `images` [batch, 3, imgsz, imgsz], output
    `output0` [batch, 84, N] with N = 8400 at 640, COCO names, Ultralytics metadata) whose
    answer is computed from the image: three stride-2 convolutions, `depth` 3x3 convolutions
    of `width` channels at stride 8 (where most of the cost is), two more stride-2 ones, and
    a 1x1 head at strides 8, 16 and 32, as YOLO's. Fixed random weights (He-scaled, so
    activations neither vanish nor explode); the head's sigmoid maps boxes into the input
    (centres inside it, sides 3-33% of it) and class scores low (1e-4 to 1e-3, like a
    random-weight YOLOv8n's): a test that wants detections lowers the threshold.
    At depth 12 a run costs about two thirds of a YOLOv8n-640's on ONNX Runtime's CPU
    provider (bench/RESULTS.md; 100-200 ms on a shared 2-core machine): slow enough for
    requests to queue behind it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(640)
    rows = 4 + len(COCO_NAMES)
    nodes, inits = [], []

    def conv(x: str, name: str, cin: int, cout: int, *, k: int = 3, stride: int = 1,
             relu: bool = True) -> str:
        w = rng.standard_normal((cout, cin, k, k)) * math.sqrt(2.0 / (cin * k * k))
        inits.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}.w"),
                      numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")])
        y = f"{name}.conv" if relu else name
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [y], [name]))
        return name

    x = conv("images", "stem", 3, 16, stride=2)
    x = conv(x, "down1", 16, 32, stride=2)
    x = conv(x, "down2", 32, width, stride=2)
    for i in range(depth):
        x = conv(x, f"body{i}", width, width)
    heads = [conv(x, "head8", width, rows, k=1, relu=False)]
    x = conv(x, "down3", width, 2 * width, stride=2)
    heads.append(conv(x, "head16", 2 * width, rows, k=1, relu=False))
    x = conv(x, "down4", 2 * width, 4 * width, stride=2)
    heads.append(conv(x, "head32", 4 * width, rows, k=1, relu=False))

    shift_in, scale, shift_out = (np.zeros((1, rows, 1), np.float32) for _ in range(3))
    shift_in[0, 4:] = -9.0                                # class scores: sigmoid(x - 9)
    scale[0, :2], scale[0, 2:4], scale[0, 4:] = imgsz, 0.3 * imgsz, 1.0
    shift_out[0, 2:4] = 0.03 * imgsz
    inits += [numpy_helper.from_array(np.array([0, rows, -1], np.int64), "flat"),
              numpy_helper.from_array(shift_in, "shift_in"), numpy_helper.from_array(scale, "scale"),
              numpy_helper.from_array(shift_out, "shift_out")]
    nodes += [helper.make_node("Reshape", [h, "flat"], [f"{h}.flat"]) for h in heads]
    nodes += [helper.make_node("Concat", [f"{h}.flat" for h in heads], ["raw"], axis=2),
              helper.make_node("Add", ["raw", "shift_in"], ["logits"]),
              helper.make_node("Sigmoid", ["logits"], ["unit"]),
              helper.make_node("Mul", ["unit", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "shift_out"], ["output0"])]
    anchors = sum((imgsz // stride) ** 2 for stride in (8, 16, 32))
    graph = helper.make_graph(
        nodes, "compute",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", rows, anchors])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ultralytics_metadata("detect", names=dict(enumerate(COCO_NAMES)), imgsz=imgsz)
    meta["description"] = "vasipc compute model: random weights, real cost, meaningless detections"
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/family_models.py OUT.onnx  (writes compute_model there)")
    print(compute_model(Path(sys.argv[1])))
