"""The head seam: what a model family tells the server (docs/contract.md section 6).

A family module recognizes its exports from `ModelFacts` (inputs, outputs, ONNX metadata,
model.yaml declarations), checks the outputs of a probe run and builds a `Head`; the
batcher hands each image's outputs to `Head.decode` and knows nothing else of the family.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from vasipc.errors import ModelError
from vasipc.preprocess import Geometry, Preprocess
from vasipc.schema import InferConfig, class_index

ARCHITECTURES = ("yolo", "yolo-end2end", "yolo-classify", "yolov5", "rtdetr", "rfdetr", "dfine")
TASKS = ("detect", "segment", "pose", "obb", "classify")


def parse_literal(text: str | None) -> Any:
    """A Python literal from ONNX metadata (Ultralytics writes dicts and lists with str());
    never eval: None when it is not a literal."""
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


@dataclass(frozen=True, slots=True)
class TensorFacts:
    name: str
    shape: tuple  # ints, or names / None for dynamic dimensions
    type: str     # "tensor(float)", ...

    def describe(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name} [{dims}]"


@dataclass(frozen=True)
class Declared:
    """What model.yaml (or the command line) says about the model; wins over detection."""

    architecture: str | None = None
    task: str | None = None
    class_names: tuple[str, ...] | None = None
    class_names_source: str | None = None
    keypoint_names: tuple[str, ...] | None = None
    skeleton: tuple[tuple[int, int], ...] | None = None
    preprocess: dict | None = None  # model.yaml `preprocess:`, checked against the family's


@dataclass(frozen=True)
class ModelFacts:
    """Everything known about a model before a family reads its outputs."""

    path: str
    inputs: tuple[TensorFacts, ...]
    outputs: tuple[TensorFacts, ...]
    meta: dict[str, str]
    declared: Declared = field(default_factory=Declared)

    def describe(self) -> str:
        ins = ", ".join(t.describe() for t in self.inputs)
        outs = ", ".join(t.describe() for t in self.outputs)
        return f"inputs {ins}; outputs {outs}"

    @cached_property
    def meta_task(self) -> str | None:
        return self.meta.get("task") or None

    @cached_property
    def args(self) -> dict:
        args = parse_literal(self.meta.get("args"))
        return args if isinstance(args, dict) else {}

    @cached_property
    def end2end(self) -> bool:
        """Ultralytics' NMS-free exports: an end-to-end head, or `nms=True` at export."""
        return self.meta.get("end2end", "").strip().lower() == "true" or self.args.get("nms") is True

    @cached_property
    def metadata_names(self) -> tuple[str, ...] | None:
        """ONNX metadata `names` by class id; ModelError unless ids are exactly 0..n-1."""
        raw = self.meta.get("names")
        if raw is None:
            return None
        names = parse_literal(raw)
        if isinstance(names, list):
            names = dict(enumerate(names))
        if not isinstance(names, dict) or not names or not all(type(k) is int for k in names) \
                or sorted(names) != list(range(len(names))):
            raise ModelError(f"{self.path}: ONNX metadata names is not a list or a dict of "
                             "class ids 0..n-1")
        return tuple(str(names[i]) for i in range(len(names)))

    @cached_property
    def kpt_shape(self) -> tuple[int, int] | None:
        ks = parse_literal(self.meta.get("kpt_shape"))
        if (isinstance(ks, (list, tuple)) and len(ks) == 2 and all(type(v) is int for v in ks)
                and ks[0] > 0 and ks[1] in (2, 3)):
            return ks[0], ks[1]
        return None

    @cached_property
    def kpt_names(self) -> tuple[str, ...] | None:
        names = parse_literal(self.meta.get("kpt_names"))
        if isinstance(names, dict):  # Ultralytics: {class_id: [names of its keypoints]}
            names = names.get(0)
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return tuple(names)
        return None

    @cached_property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the image input: its static dimensions, else the metadata
        `imgsz` ([h, w] or one int), else 640 x 640."""
        h, w = self.image_input().shape[2:]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return w, h
        imgsz = parse_literal(self.meta.get("imgsz"))
        if type(imgsz) is int:
            imgsz = [imgsz, imgsz]
        if isinstance(imgsz, (list, tuple)) and len(imgsz) == 2 and all(
                type(v) is int and v > 0 for v in imgsz):
            return imgsz[1], imgsz[0]
        return 640, 640

    def image_input(self) -> TensorFacts:
        """The NCHW image input: the only 4-D one."""
        images = [t for t in self.inputs if len(t.shape) == 4]
        if len(images) != 1:
            raise self.refuse("expected one NCHW image input")
        return images[0]

    def refuse(self, why: str) -> ModelError:
        """The one line a model is refused with at load: why, what was found, and how to
        declare a supported family that recognition missed."""
        task = f"; metadata task {self.meta_task!r}" if self.meta_task else "; no Ultralytics metadata"
        return ModelError(
            f"{self.path}: cannot serve this model ({why}): {self.describe()}{task}; if it is "
            f"one of the supported families, declare it in model.yaml: "
            f"architecture: {'|'.join(ARCHITECTURES)} and task: {'|'.join(TASKS)}")


def class_names_for(facts: ModelFacts, nc: int) -> tuple[str, ...]:
    """The labels file / model.yaml names, else the ONNX metadata's, else class_{id}; a
    count other than the model's classes is refused wherever the names come from (a names
    list for another model would name every detection wrongly)."""
    given = facts.declared.class_names
    if given is not None:
        if len(given) != nc:
            raise facts.refuse(f"{facts.declared.class_names_source or 'the class names'} has "
                               f"{len(given)} class names but the model has {nc} classes")
        return given
    names = facts.metadata_names
    if names is not None:
        if len(names) != nc:
            raise facts.refuse(f"its metadata names {len(names)} classes, its outputs {nc}")
        return names
    return tuple(f"class_{i}" for i in range(nc))


def known_class_count(facts: ModelFacts) -> int | None:
    """The class count from names alone (for layouts that do not encode it)."""
    if facts.declared.class_names is not None:
        return len(facts.declared.class_names)
    names = facts.metadata_names
    return None if names is None else len(names)


def round6_scalar(y: float) -> float:
    """`np.round(x, 6)` of a float64 x, given y = x * 1e6: rint(y) / 1e6, the sign of a zero
    kept. Raises ValueError / OverflowError for NaN / inf."""
    r = round(y)  # round half to even, as rint
    return r / 1e6 if r else y * 0.0


def round6(values: np.ndarray) -> list:
    """`np.round(x, 6)` as nested lists of Python floats (x * 1e6, rint, / 1e6: exactly
    what np.round does)."""
    out = np.asarray(values, dtype=np.float64) * 1e6
    np.rint(out, out=out)
    out /= 1e6
    return out.tolist()


@dataclass(frozen=True, slots=True)
class Keypoints:
    count: int
    dims: int  # 2: x, y; 3: x, y, visibility
    names: tuple[str, ...] | None
    skeleton: tuple[tuple[int, int], ...] | None

    def info(self) -> dict:
        return {"count": self.count, "names": None if self.names is None else list(self.names),
                "skeleton": None if self.skeleton is None else [list(e) for e in self.skeleton]}


class Head:
    """One model's decoding: set up once at load, then `decode` per image (any thread)."""

    architecture: str
    task: str
    nms: str  # "server": NMS here; "model": the graph did it (or needs none)
    class_names: tuple[str, ...]
    preprocess: Preprocess
    keypoints: Keypoints | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def class_ids(self) -> dict[str, tuple[int, ...]]:
        """Class name -> its ids, for requests that name the classes they keep."""
        return class_index(self.class_names)

    def decode(self, outputs: Sequence[np.ndarray], i: int, geom: Geometry, cfg: InferConfig,
               defaults: Any) -> dict:
        """Image i of the batch's outputs -> the response's result fields (`detections`,
        and `classifications` for classifiers). `defaults`: the ModelSpec's thresholds."""
        raise NotImplementedError

    def info(self) -> dict:
        info = {"architecture": self.architecture, "task": self.task, "nms": self.nms}
        if self.keypoints is not None:
            info["keypoints"] = self.keypoints.info()
        return info
