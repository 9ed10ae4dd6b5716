"""`yolo-classify`: Ultralytics classifiers; output `[B, nc]` probabilities (softmax in the
graph). The answer is the top `config.top_k` classes (default 5), no detections.
Input: shorter side to the input size, centre crop, /255."""

from __future__ import annotations

import numpy as np

from vasipc.heads.base import Head, ModelFacts, class_names_for
from vasipc.preprocess import Preprocess

ARCHITECTURE = "yolo-classify"
TASKS = ("classify",)
PREPROCESS = Preprocess(resize="center_crop", filter="antialias")
DEFAULT_TOP_K = 5


def recognize(facts: ModelFacts) -> bool:
    return facts.meta_task == "classify"


class ClassifyHead(Head):
    architecture, task, nms = ARCHITECTURE, "classify", "model"

    def __init__(self, class_names: tuple[str, ...], preprocess: Preprocess) -> None:
        self.class_names = class_names
        self.preprocess = preprocess

    def decode(self, outputs, i, geom, cfg, defaults) -> dict:
        probs = outputs[0][i]
        k = min(cfg.top_k or DEFAULT_TOP_K, len(probs))
        # stable on the negated scores: ties keep the lower class id first
        top = np.argsort(-probs, kind="stable")[:k]
        conf = np.rint(probs[top].astype(np.float64) * 1e6) / 1e6
        names = self.class_names
        return {"detections": [], "classifications": [
            {"class_id": c, "class_name": names[c], "confidence": p}
            for c, p in zip(top.tolist(), conf.tolist(), strict=True)]}


def build(facts: ModelFacts, task: str, shapes: list[tuple[int, ...]],
          preprocess: Preprocess) -> ClassifyHead:
    if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][1] < 1:
        raise facts.refuse("a classifier has one output [batch, classes]")
    return ClassifyHead(class_names_for(facts, shapes[0][1]), preprocess)
