"""`yolo`: Ultralytics raw heads (v5u, v8, v9, 11, 12, 26 without end-to-end): NMS here.

Output 0 is `[B, 4 + nc + extras, N]`, channels first: cx, cy, w, h in input pixels, the
class scores, then per task 32 mask coefficients (segment, with prototypes `[B, 32,
H/4, W/4]` as output 1), K*D keypoints (pose) or the angle in radians (obb). Detect,
segment and pose use per-class NMS; obb Ultralytics' rotated ProbIoU NMS.
"""

from __future__ import annotations

from vasipc._fast.decode import NMS_CLASS, NMS_ROTATED, DecodeLayout
from vasipc.heads.base import Keypoints, ModelFacts, class_names_for, known_class_count
from vasipc.heads.detection import DetectionHead, KeypointExtra, MaskExtra, RotatedExtra
from vasipc.preprocess import Preprocess

ARCHITECTURE = "yolo"
TASKS = ("detect", "segment", "pose", "obb")
PREPROCESS = Preprocess()  # letterbox, pad 114, RGB, /255


def recognize(facts: ModelFacts) -> bool:
    """Ultralytics metadata of a non-end-to-end model, or no `task` in the metadata and one
    3-D output (the raw YOLOv8 detect layout is the default for a file that says nothing)."""
    if facts.meta_task is not None:
        return not facts.end2end and facts.meta_task in TASKS
    return len(facts.outputs) == 1 and len(facts.outputs[0].shape) == 3


def keypoints_of(facts: ModelFacts) -> Keypoints:
    shape = facts.kpt_shape
    if shape is None:
        raise facts.refuse("a pose model needs kpt_shape [K, 2|3] in its metadata")
    names = facts.declared.keypoint_names or facts.kpt_names
    if names is not None and len(names) != shape[0]:
        raise facts.refuse(f"{len(names)} keypoint names for {shape[0]} keypoints")
    skeleton = facts.declared.skeleton
    if skeleton is not None and any(not (0 <= a < shape[0] and 0 <= b < shape[0]) for a, b in skeleton):
        raise facts.refuse(f"a skeleton edge names a keypoint outside 0..{shape[0] - 1}")
    return Keypoints(shape[0], shape[1], names, skeleton)


def mask_protos(facts: ModelFacts, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(index of the prototypes output [B, nm, mh, mw], nm) of a segment model."""
    protos = [j for j, s in enumerate(shapes) if len(s) == 4]
    if len(shapes) != 2 or len(protos) != 1 or protos[0] == 0:
        raise facts.refuse("a segment model needs its mask prototypes [B, 32, H/4, W/4] as a "
                           "second output")
    return protos[0], shapes[protos[0]][1]


class YoloHead(DetectionHead):
    def rows(self, outputs, i):
        return outputs[0][i].T  # [channels, N] -> a strided [N, channels] view, no copy


def build(facts: ModelFacts, task: str, shapes: list[tuple[int, ...]],
          preprocess: Preprocess) -> YoloHead:
    out = shapes[0]
    if len(out) != 3:
        raise facts.refuse("expected output 0 [batch, 4 + classes (+ extras), anchors]")
    channels = out[1]
    extra, keypoints, nms, angle = None, None, NMS_CLASS, -1
    if task == "detect":
        if len(shapes) != 1:
            raise facts.refuse("a detect model has one output")
        nc = channels - 4
    elif task == "segment":
        protos, nm = mask_protos(facts, shapes)
        nc = channels - 4 - nm
        extra = MaskExtra(4 + nc, nm, protos)
    elif task == "pose":
        keypoints = keypoints_of(facts)
        nc = channels - 4 - keypoints.count * keypoints.dims
        extra = KeypointExtra(4 + nc, keypoints)
    else:  # obb
        nc = channels - 5
        angle, nms, extra = channels - 1, NMS_ROTATED, RotatedExtra()
    # A file that names neither its task nor its classes, with fewer anchors than
    # channels, is more likely [batch, anchors, fields] (YOLOv5's) than a raw YOLO head.
    unsure = facts.meta_task is None and known_class_count(facts) is None and out[2] < channels
    if nc < 1 or (task == "detect" and unsure):
        raise facts.refuse(f"{channels} output channels leave {nc} classes for a {task} head "
                           "[batch, 4 + classes (+ extras), anchors]")
    names = class_names_for(facts, nc)
    layout = DecodeLayout(num_fields=channels, num_classes=nc, class_offset=4,
                          angle_field=angle, nms=nms)
    return YoloHead(architecture=ARCHITECTURE, task=task, nms="server",
                    class_names=names, preprocess=preprocess, layout=layout, extra=extra,
                    keypoints=keypoints)
