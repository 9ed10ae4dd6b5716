"""`yolo-end2end`: Ultralytics NMS-free exports (an end-to-end head, or `nms=True`).

Output 0 is `[B, M, 6 + E]`: x1, y1, x2, y2 in input pixels, score, class, then the
task's extras (32 mask coefficients with prototypes as output 1; K*D keypoints); obb is
`[B, M, 7]`: cx, cy, w, h, score, class, angle. The model did the NMS: the confidence
threshold, `classes` and `max_detections` apply, `nms_iou_threshold` does not; zero-score
padding rows are dropped.
"""

from __future__ import annotations

from vasipc._fast.decode import BOX_CXCYWH, BOX_XYXY, NMS_NONE, SCORE_FIELD, DecodeLayout
from vasipc.heads.base import ModelFacts, class_names_for, known_class_count
from vasipc.heads.detection import DetectionHead, KeypointExtra, MaskExtra, RotatedExtra
from vasipc.heads.yolo import keypoints_of, mask_protos
from vasipc.preprocess import Preprocess

ARCHITECTURE = "yolo-end2end"
TASKS = ("detect", "segment", "pose", "obb")
PREPROCESS = Preprocess()  # letterbox, pad 114, RGB, /255


def recognize(facts: ModelFacts) -> bool:
    return facts.meta_task in TASKS and facts.end2end


def build(facts: ModelFacts, task: str, shapes: list[tuple[int, ...]],
          preprocess: Preprocess) -> DetectionHead:
    out = shapes[0]
    if len(out) != 3:
        raise facts.refuse("expected output 0 [batch, detections, 6 + extras]")
    fields = out[2]
    nc = known_class_count(facts)
    if nc is None:
        raise facts.refuse("an end-to-end model's output does not say its class count: give "
                           "class names (ONNX metadata names, --labels or model.yaml)")
    names = class_names_for(facts, nc)
    extra, keypoints, box, angle, want = None, None, BOX_XYXY, -1, 6
    if task == "segment":
        protos, nm = mask_protos(facts, shapes)
        extra, want = MaskExtra(6, nm, protos), 6 + nm
    elif task == "pose":
        keypoints = keypoints_of(facts)
        want = 6 + keypoints.count * keypoints.dims
        extra = KeypointExtra(6, keypoints)
    elif task == "obb":
        box, angle, want, extra = BOX_CXCYWH, 6, 7, RotatedExtra()
    if task != "segment" and len(shapes) != 1:
        raise facts.refuse(f"an end-to-end {task} model has one output")
    if fields != want:
        raise facts.refuse(f"an end-to-end {task} head has {want} values per detection, "
                           f"this one {fields}")
    layout = DecodeLayout(num_fields=fields, num_classes=nc, box_format=box,
                          score_mode=SCORE_FIELD, score_field=4, class_field=5,
                          angle_field=angle, nms=NMS_NONE)
    return DetectionHead(architecture=ARCHITECTURE, task=task, nms="model",
                         class_names=names, preprocess=preprocess, layout=layout, extra=extra,
                         keypoints=keypoints)
