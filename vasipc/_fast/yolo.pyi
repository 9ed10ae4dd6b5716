"""YOLOv8 decode + per-class NMS for one image. See yolo.pyx."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def decode_yolo(
    pred: npt.NDArray[np.float32],
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    classes: Sequence[int] | npt.NDArray[np.integer] | None,
    scale: float,
    pad_left: float,
    pad_top: float,
    src_w: int,
    src_h: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int32]]: ...
