"""`yolov5`: the original YOLOv5 repository's exports (metadata `stride` and `names` only).

Output 0 is `[B, N, 5 + nc]`: cx, cy, w, h in input pixels, objectness, class
probabilities; score = objectness x class probability, best class, per-class NMS here.
"""

from __future__ import annotations

from vasipc._fast.decode import NMS_CLASS, SCORE_OBJ_X_CLASS, DecodeLayout
from vasipc.heads.base import ModelFacts, class_names_for
from vasipc.heads.detection import DetectionHead
from vasipc.preprocess import Preprocess

ARCHITECTURE = "yolov5"
TASKS = ("detect",)
PREPROCESS = Preprocess()  # letterbox, pad 114, RGB, /255


def recognize(facts: ModelFacts) -> bool:
    return facts.meta_task is None and "stride" in facts.meta and "names" in facts.meta


def build(facts: ModelFacts, task: str, shapes: list[tuple[int, ...]],
          preprocess: Preprocess) -> DetectionHead:
    out = shapes[0]
    if len(shapes) != 1 or len(out) != 3 or out[2] < 6:
        raise facts.refuse("expected one output [batch, anchors, 5 + classes]")
    nc = out[2] - 5
    layout = DecodeLayout(num_fields=out[2], num_classes=nc, score_mode=SCORE_OBJ_X_CLASS,
                          obj_field=4, class_offset=5, nms=NMS_CLASS)
    return DetectionHead(architecture=ARCHITECTURE, task=task, nms="server",
                         class_names=class_names_for(facts, nc), preprocess=preprocess,
                         layout=layout)
