"""How a model family wants its input: resize mode and filter, pad, channel order, mean/std
(issue 10).

A :class:`Preprocess` says how a frame becomes a model's input tensor; the compiled kernel
(``_fast.letterbox.letterbox_into``) does the work for every mode, and the GPU graph
(``preprocess_graph``) takes the same object. Modes:

- ``letterbox`` (``yolo*``, ``yolov5``): Ultralytics' ``LetterBox`` (``letterbox_geometry``):
  scaled to fit, centred, the rest ``pad_value`` (114).
- ``stretch`` (``rtdetr``, ``rfdetr``, ``dfine``): resized to the input size exactly.
- ``center_crop`` (``yolo-classify``): Ultralytics' ``classify_transforms``
  (``ultralytics/data/augment.py``): torchvision ``Resize(size)``, the shorter side to the
  input size and the longer ``int(size * long / short)``, then ``CenterCrop(size)`` at
  torchvision's offsets ``int(round((resized - size) / 2.0))``. For a non-square input
  Ultralytics passes ``(h, w)`` to ``Resize``, which stretches (the crop then cuts
  nothing): so does this mode.

Filters (``filter``): ``bilinear`` is OpenCV's INTER_LINEAR (``cv2.resize``), what
Ultralytics' detectors use. ``antialias`` is PIL's ``Image.resize(size, BILINEAR)``, what
torchvision's ``Resize`` does to the PIL image Ultralytics' classifiers get
(``ClassificationPredictor.preprocess``: ``Image.fromarray`` of the RGB frame): a triangle
filter widened by the downscale factor, so a downscale averages over the whole footprint
where INTER_LINEAR samples 2x2 pixels. The kernel reproduces it bit for bit (Pillow 13.0,
as installed with Ultralytics 8.4; Pillow <= 12.2 always ran the horizontal pass first,
which changes some values by 1/255 when the height shrinks by more than twice the
width), of the RGB uint8 frame the colour conversion gives.

Values: ``(v / 255 - mean[c]) / std[c]`` per plane ``c`` of the model input, in
``channel_order`` (mean and std are given in that plane order); the pad value goes through
the same formula. The defaults (mean 0, std 1, RGB, pad 114) give today's letterbox
tensor bit for bit.

:class:`Geometry` maps source pixels to input pixels (``input = source * scale + pad``),
for decoding boxes back to the frame.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from vasipc._fast.letterbox import letterbox_geometry, letterbox_into

if TYPE_CHECKING:
    from vasipc.frame_source import OpenFrame

RESIZE_MODES = ("letterbox", "stretch", "center_crop")
CHANNEL_ORDERS = ("rgb", "bgr")
FILTERS = ("bilinear", "antialias")
KEYS = ("resize", "filter", "pad_value", "channel_order", "mean", "std")


class Geometry(NamedTuple):
    """Where the source frame lies in the model input: input pixel = source pixel * scale
    + pad, per axis (pad negative for a centre crop: the crop offset)."""

    scale_x: float
    scale_y: float
    pad_left: float
    pad_top: float
    src_w: int
    src_h: int


def _triple(key: str, value: Any) -> tuple[tuple[float, float, float] | None, str | None]:
    """(the value as 3 finite floats, None) or (None, the problem)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return None, f"preprocess.{key}: expected a list of 3 numbers, got {value!r}"
    if len(value) != 3:
        return None, f"preprocess.{key}: expected 3 numbers (one per channel), got {len(value)}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None, f"preprocess.{key}: expected numbers, got {list(value)!r}"
    floats = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in floats):
        return None, f"preprocess.{key}: values must be finite, got {list(floats)!r}"
    return (floats[0], floats[1], floats[2]), None


def _problems(resize: Any, filter: Any, pad_value: Any, channel_order: Any, mean: Any,
              std: Any) -> list[str]:
    """One line per invalid value (empty when all are valid)."""
    problems = []
    if resize not in RESIZE_MODES:
        problems.append(f"preprocess.resize: expected one of {', '.join(RESIZE_MODES)}, "
                        f"got {resize!r}")
    if filter not in FILTERS:
        problems.append(f"preprocess.filter: expected bilinear or antialias, got {filter!r}")
    if (not isinstance(pad_value, int) or isinstance(pad_value, bool)
            or not 0 <= pad_value <= 255):
        problems.append(f"preprocess.pad_value: expected an integer in 0..255, got {pad_value!r}")
    if channel_order not in CHANNEL_ORDERS:
        problems.append(f"preprocess.channel_order: expected rgb or bgr, got {channel_order!r}")
    _, problem = _triple("mean", mean)
    if problem:
        problems.append(problem)
    values, problem = _triple("std", std)
    if problem:
        problems.append(problem)
    elif values is not None and not all(v > 0 for v in values):
        problems.append(f"preprocess.std: values must be > 0, got {list(values)!r}")
    return problems


@dataclass(frozen=True, slots=True)
class Preprocess:
    """One family's preprocessing (see the module doc). Invalid values raise ValueError,
    one line per problem."""

    resize: str = "letterbox"
    pad_value: int = 114
    channel_order: str = "rgb"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    filter: str = "bilinear"  # last: positional construction keeps its meaning

    def __post_init__(self) -> None:
        problems = _problems(self.resize, self.filter, self.pad_value, self.channel_order,
                             self.mean, self.std)
        if problems:
            raise ValueError("\n".join(problems))
        # Stored as tuples of floats, so equal settings compare (and hash) equal.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def from_mapping(cls, d: Mapping, base: Preprocess) -> Preprocess:
        """`base` (the family's default) with the keys of a model.yaml ``preprocess:``
        mapping applied. ValueError, one line per unknown key or bad value."""
        if not isinstance(d, Mapping):
            raise ValueError(f"preprocess: expected a mapping of {', '.join(KEYS)}, "
                             f"got {type(d).__name__}")
        problems = [f"preprocess.{key}: unknown key (expected {', '.join(KEYS)})"
                    for key in d if key not in KEYS]
        values = {key: getattr(base, key) for key in KEYS}
        values.update((key, value) for key, value in d.items() if key in KEYS)
        for key in ("channel_order", "filter"):
            if isinstance(values[key], str):
                values[key] = values[key].lower()
        problems += _problems(**values)
        if problems:
            raise ValueError("\n".join(problems))
        return cls(**values)

    def placement(self, src_w: int, src_h: int, dst_w: int, dst_h: int
                  ) -> tuple[Geometry, tuple[int, int, int, int]]:
        """(geometry, (new_w, new_h, left, top)): the frame resized to new_w x new_h with
        its top-left corner at (left, top) of the dst_w x dst_h input. ValueError for a
        size below 1."""
        return _placement(self.resize, src_w, src_h, dst_w, dst_h)

    def into(self, frame: OpenFrame, out: np.ndarray, threads: int = 1) -> Geometry:
        """Run the kernel for an open frame (`vasipc.frame_source.OpenFrame`: .view,
        .pixel_format, .width, .height, .stride) into one [3, H, W] float32 slot; returns
        the geometry. FrameBusError (the file truncated while read) propagates."""
        geometry, (new_w, new_h, left, top) = self.placement(
            frame.width, frame.height, out.shape[2], out.shape[1])
        letterbox_into(frame.view, frame.pixel_format, frame.width, frame.height, frame.stride,
                       out, new_w, new_h, left, top, threads=threads,
                       bgr=self.channel_order == "bgr", pad_value=self.pad_value,
                       mean=self.mean, std=self.std, antialias=self.filter == "antialias")
        return geometry

    @property
    def pad_pixel(self) -> np.ndarray:
        """float32 [3]: the value each input plane's padding holds (what a batch buffer's
        unused slots should be filled with)."""
        inv_std = np.array([1.0 / s for s in self.std], np.float32)
        return (np.float32(self.pad_value) / np.float32(255)
                - np.array(self.mean, np.float32)) * inv_std

    def describe(self) -> dict[str, Any]:
        """JSON-able, for `info` and `vasipc check`."""
        return {"resize": self.resize, "filter": self.filter, "pad_value": self.pad_value,
                "channel_order": self.channel_order, "mean": list(self.mean),
                "std": list(self.std)}


@functools.lru_cache(maxsize=256)
def _placement(resize: str, src_w: int, src_h: int, dst_w: int, dst_h: int
               ) -> tuple[Geometry, tuple[int, int, int, int]]:
    # Cached: a camera's frames all have one size, and this runs per request.
    if min(src_w, src_h, dst_w, dst_h) < 1:
        raise ValueError(f"sizes must be positive: {src_w}x{src_h} -> {dst_w}x{dst_h}")
    if resize == "letterbox":
        r, new_w, new_h, left, top = letterbox_geometry(src_w, src_h, dst_w, dst_h)
        return Geometry(r, r, left, top, src_w, src_h), (new_w, new_h, left, top)
    if resize == "center_crop" and dst_w == dst_h:
        # torchvision Resize(size): the shorter side to size, the longer truncated
        size = dst_w
        if src_w <= src_h:
            new_w, new_h = size, int(size * src_h / src_w)
        else:
            new_w, new_h = int(size * src_w / src_h), size
        # torchvision CenterCrop: offsets int(round((resized - crop) / 2.0)), Python round
        left, top = -round((new_w - dst_w) / 2.0), -round((new_h - dst_h) / 2.0)
        return (Geometry(new_w / src_w, new_h / src_h, left, top, src_w, src_h),
                (new_w, new_h, left, top))
    # stretch; and centre crop to a non-square input, where Ultralytics' Resize((h, w))
    # stretches and its CenterCrop cuts nothing
    return Geometry(dst_w / src_w, dst_h / src_h, 0, 0, src_w, src_h), (dst_w, dst_h, 0, 0)


LETTERBOX = Preprocess()  # yolo*, yolov5; today's tensor
IMAGENET = Preprocess(resize="stretch", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
