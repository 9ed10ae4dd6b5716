"""`rfdetr`: Roboflow RF-DETR exports; the model needs no NMS.

Outputs `dets [B, Q, 4]` (normalized cx, cy, w, h) and `labels [B, Q, C]` (class logits,
every column a class id). As RF-DETR's own post-processing: sigmoid, then the top
`max_detections` over all query x class scores (a query may answer for two classes).
Input: stretch resize, ImageNet mean and std.
"""

from __future__ import annotations

import numpy as np

from vasipc._fast.decode import NMS_NONE, SCORE_PAIRS, DecodeLayout
from vasipc.heads.base import ModelFacts, class_names_for
from vasipc.heads.detection import DetectionHead
from vasipc.preprocess import IMAGENET, Preprocess

ARCHITECTURE = "rfdetr"
TASKS = ("detect",)
PREPROCESS = IMAGENET  # stretch, RGB, (x/255 - mean) / std


def _outputs(facts: ModelFacts) -> tuple[int, int] | None:
    """(index of dets, index of labels) by name."""
    names = [t.name for t in facts.outputs]
    if len(names) == 2 and "dets" in names and "labels" in names:
        return names.index("dets"), names.index("labels")
    return None


def recognize(facts: ModelFacts) -> bool:
    return facts.meta_task is None and _outputs(facts) is not None


class RfdetrHead(DetectionHead):
    def __init__(self, *, dets: int, labels: int, **kw) -> None:
        super().__init__(**kw)
        self.dets, self.labels = dets, labels

    def rows(self, outputs, i):
        return np.concatenate((outputs[self.dets][i], outputs[self.labels][i]), axis=1)


def build(facts: ModelFacts, task: str, shapes: list[tuple[int, ...]],
          preprocess: Preprocess) -> DetectionHead:
    which = _outputs(facts) or ((0, 1) if len(shapes) == 2 else None)
    if which is None:
        raise facts.refuse("expected outputs dets [batch, queries, 4] and labels [batch, queries, classes]")
    d, lab = shapes[which[0]], shapes[which[1]]
    if len(d) != 3 or d[2] != 4 or len(lab) != 3 or lab[1] != d[1] or lab[2] < 1:
        raise facts.refuse("expected outputs dets [batch, queries, 4] and labels [batch, queries, classes]")
    nc = lab[2]
    layout = DecodeLayout(num_fields=4 + nc, num_classes=nc, box_scale=facts.input_size,
                          score_mode=SCORE_PAIRS, class_offset=4, sigmoid=True, nms=NMS_NONE)
    return RfdetrHead(architecture=ARCHITECTURE, task=task, nms="model",
                      class_names=class_names_for(facts, nc), preprocess=preprocess,
                      layout=layout, dets=which[0], labels=which[1])
