"""Preprocess one frame into one slot of the model's input tensor. See letterbox.pyx."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

NV12: int
I420: int
BGR24: int
RGB24: int
NV21: int
BGRA: int
BGRX: int
RGBA: int
RGBX: int
GRAY8: int
FORMAT_CODES: dict[str, int]

class FrameBusError(Exception): ...

def min_stride(fmt: int, width: int) -> int: ...
def frame_nbytes(fmt: int, width: int, height: int, stride: int) -> int: ...
def letterbox_geometry(
    src_w: int, src_h: int, dst_w: int, dst_h: int
) -> tuple[float, int, int, int, int]: ...
def letterbox_into(
    src: Buffer,
    fmt: int,
    width: int,
    height: int,
    stride: int,
    out: npt.NDArray[np.float32],
    new_w: int,
    new_h: int,
    left: int,
    top: int,
    *,
    threads: int = 1,
    bgr: bool = False,
    pad_value: int = 114,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    antialias: bool = False,
) -> None: ...
def copy_frame_guarded(src: Buffer, dst_address: int, nbytes: int) -> None: ...
