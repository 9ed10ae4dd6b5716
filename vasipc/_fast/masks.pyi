"""Instance masks of a segmentation head for one image: COCO RLE or polygon. See masks.pyx."""

import numpy as np
import numpy.typing as npt

MASK_RLE: int
MASK_POLYGON: int

def segment_masks(
    protos: npt.NDArray[np.float32],
    coeffs: npt.NDArray[np.float32],
    boxes: npt.NDArray[np.float32],
    src_w: int,
    src_h: int,
    mask_format: int,
) -> list[str] | list[npt.NDArray[np.float32]]: ...
