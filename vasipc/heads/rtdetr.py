"""`rtdetr`: Ultralytics RT-DETR exports; the model needs no NMS.

Output 0 is `[B, 300, 4 + nc]` (normalized cx, cy, w, h, then sigmoid class scores: best
class) or `[B, 300, 6]` (normalized cx, cy, w, h, score, class). The input is a plain
stretch resize, so normalized boxes map straight onto the source frame.
"""

from __future__ import annotations

from vasipc._fast.decode import NMS_NONE, SCORE_FIELD, DecodeLayout
from vasipc.heads.base import ModelFacts, class_names_for, known_class_count
from vasipc.heads.detection import DetectionHead
from vasipc.preprocess import Preprocess

ARCHITECTURE = "rtdetr"
TASKS = ("detect",)
PREPROCESS = Preprocess(resize="stretch")


def recognize(facts: ModelFacts) -> bool:
    if facts.meta_task != "detect" or facts.end2end:
        return False
    marks = (facts.meta.get("head", "") + " " + facts.meta.get("description", "")).lower()
    return "rtdetr" in marks.replace("-", "")


def build(facts: ModelFacts, task: str, shapes: list[tuple[int, ...]],
          preprocess: Preprocess) -> DetectionHead:
    out = shapes[0]
    if len(shapes) != 1 or len(out) != 3 or out[2] < 5:
        raise facts.refuse("expected one output [batch, queries, 4 + classes] or [batch, queries, 6]")
    fields, nc = out[2], known_class_count(facts)
    if (nc is not None and fields == 4 + nc) or (nc is None and fields != 6):
        nc = fields - 4
        layout = DecodeLayout(num_fields=fields, num_classes=nc, box_scale=facts.input_size,
                              class_offset=4, nms=NMS_NONE)
    elif fields == 6 and nc is not None:
        layout = DecodeLayout(num_fields=6, num_classes=nc, box_scale=facts.input_size,
                              score_mode=SCORE_FIELD, score_field=4, class_field=5, nms=NMS_NONE)
    else:
        raise facts.refuse(f"{fields} values per query fit neither 4 + {nc} classes nor "
                           "cx, cy, w, h, score, class (6)" if nc is not None else
                           "a [batch, queries, 6] output needs class names for its class count")
    return DetectionHead(architecture=ARCHITECTURE, task=task, nms="model",
                         class_names=class_names_for(facts, nc), preprocess=preprocess,
                         layout=layout)
