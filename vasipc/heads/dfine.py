"""`dfine`: D-FINE, DEIM and RT-DETRv2 exports; the model needs no NMS.

Inputs `images` and `orig_target_sizes [B, 2]` (width, height: we give the input's own
size, so boxes come back in input pixels); outputs `labels [B, 300]`, `boxes [B, 300, 4]`
(x1, y1, x2, y2) and `scores [B, 300]`. Input: stretch resize, /255.
"""

from __future__ import annotations

import numpy as np

from vasipc._fast.decode import BOX_XYXY, NMS_NONE, SCORE_FIELD, DecodeLayout
from vasipc.heads.base import ModelFacts, class_names_for, known_class_count
from vasipc.heads.detection import DetectionHead
from vasipc.preprocess import Preprocess

ARCHITECTURE = "dfine"
TASKS = ("detect",)
PREPROCESS = Preprocess(resize="stretch")
SIZES_INPUT = "orig_target_sizes"
OUTPUTS = ("boxes", "scores", "labels")


def recognize(facts: ModelFacts) -> bool:
    return (any(t.name == SIZES_INPUT for t in facts.inputs)
            and sorted(t.name for t in facts.outputs) == sorted(OUTPUTS))


def extra_inputs(facts: ModelFacts, size: int) -> dict[str, np.ndarray]:
    sizes = [t for t in facts.inputs if len(t.shape) == 2]
    if len(sizes) != 1 or len(facts.inputs) != 2:
        raise facts.refuse(f"expected inputs images and {SIZES_INPUT} [batch, 2]")
    return {sizes[0].name: np.tile(np.array(facts.input_size, np.int64), (size, 1))}


class DfineHead(DetectionHead):
    def __init__(self, *, order: tuple[int, int, int], **kw) -> None:
        super().__init__(**kw)
        self.order = order  # indices of boxes, scores, labels

    def rows(self, outputs, i):
        b, s, c = self.order
        rows = np.empty((outputs[s].shape[1], 6), np.float32)
        rows[:, :4] = outputs[b][i]
        rows[:, 4] = outputs[s][i]
        rows[:, 5] = outputs[c][i]
        return rows


def build(facts: ModelFacts, task: str, shapes: list[tuple[int, ...]],
          preprocess: Preprocess) -> DetectionHead:
    names = [t.name for t in facts.outputs]
    if sorted(names) != sorted(OUTPUTS):
        raise facts.refuse("expected outputs labels [batch, queries], boxes [batch, queries, 4], "
                           "scores [batch, queries]")
    b, s, c = (names.index(n) for n in OUTPUTS)
    q = shapes[s][1] if len(shapes[s]) == 2 else -1
    if shapes[b] != (shapes[b][0], q, 4) or shapes[c] != shapes[s]:
        raise facts.refuse("expected outputs labels [batch, queries], boxes [batch, queries, 4], "
                           "scores [batch, queries]")
    nc = known_class_count(facts)
    if nc is None:
        raise facts.refuse("a D-FINE model's outputs do not say its class count: give class "
                           "names (--labels or model.yaml output_schema.class_names_file)")
    layout = DecodeLayout(num_fields=6, num_classes=nc, box_format=BOX_XYXY,
                          score_mode=SCORE_FIELD, score_field=4, class_field=5, nms=NMS_NONE)
    return DfineHead(architecture=ARCHITECTURE, task=task, nms="model",
                     class_names=class_names_for(facts, nc), preprocess=preprocess,
                     layout=layout, order=(b, s, c))
