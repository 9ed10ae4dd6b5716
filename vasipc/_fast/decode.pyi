"""Detection post-processing for one image, every detection layout. See decode.pyx."""

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

BOX_CXCYWH: int
BOX_XYXY: int
SCORE_MAX_CLASS: int
SCORE_OBJ_X_CLASS: int
SCORE_FIELD: int
SCORE_PAIRS: int
NMS_NONE: int
NMS_CLASS: int
NMS_ROTATED: int
MAX_NMS: int

class Decoded(NamedTuple):
    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]
    class_ids: npt.NDArray[np.int32]
    rows: npt.NDArray[np.int32]
    rotated: npt.NDArray[np.float32] | None
    corners: npt.NDArray[np.float32] | None

@disjoint_base
class DecodeLayout:
    def __init__(
        self,
        *,
        num_fields: int,
        num_classes: int,
        box_format: int = ...,
        box_offset: int = 0,
        box_scale: tuple[float, float] = (1.0, 1.0),
        score_mode: int = ...,
        class_offset: int = 4,
        obj_field: int = -1,
        score_field: int = -1,
        class_field: int = -1,
        sigmoid: bool = False,
        angle_field: int = -1,
        nms: int = ...,
        max_nms: int = 30000,
    ) -> None: ...
    @property
    def num_fields(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def box_format(self) -> int: ...
    @property
    def box_offset(self) -> int: ...
    @property
    def box_scale(self) -> tuple[float, float]: ...
    @property
    def score_mode(self) -> int: ...
    @property
    def class_offset(self) -> int: ...
    @property
    def obj_field(self) -> int: ...
    @property
    def score_field(self) -> int: ...
    @property
    def class_field(self) -> int: ...
    @property
    def sigmoid(self) -> bool: ...
    @property
    def angle_field(self) -> int: ...
    @property
    def nms(self) -> int: ...
    @property
    def max_nms(self) -> int: ...

def decode_detections(
    layout: DecodeLayout,
    pred: npt.NDArray[np.float32],
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    class_mask: npt.NDArray[np.uint8] | None,
    scale_x: float,
    scale_y: float,
    pad_left: float,
    pad_top: float,
    src_w: int,
    src_h: int,
) -> Decoded: ...
