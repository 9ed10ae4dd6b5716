"""The fused preprocessing kernel (vasipc._fast.letterbox, docs/contract.md 5.3 and 6) and
vasipc.preprocess on a real photo.

`_LetterboxBehaviour` runs against the compiled kernel and the numpy reference
(tests/reference_kernels.py): both must match an independent OpenCV pipeline
(cvtColor -> resize INTER_LINEAR -> crop / copyMakeBorder -> /255 -> normalize -> CHW) in
every pixel format (NV21 through COLOR_YUV2RGB_NV21, the 4-byte ones with garbage alpha
through COLOR_BGRA2RGB / RGBA2RGB, GRAY8 through COLOR_GRAY2RGB), with padded strides,
frames inside bigger buffers, tiny and huge frames, wide and tall pictures, square and
non-square models; for every resize mode (letterbox, stretch, centre crop: negative
offsets, an image larger than the output), RGB
and BGR planes, mean/std and pad values; and the antialias filter equal to PIL's
Image.resize(BILINEAR) of the OpenCV-decoded frame bit for bit (the classifiers'
torchvision Resize): up and down, odd sizes, crops, both of Pillow's pass orders, every
format. Then what only the compiled kernel promises:
bit-identical to the reference, the SIGBUS guard (a frame file truncated under its mapping
raises FrameBusError and the process lives on), any buffer as source. Last,
vasipc.preprocess: each mode's placement in exact numbers, model.yaml validation, and
Preprocess.into on a real frame file.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import reference_kernels

from vasipc._fast import letterbox
from vasipc.frame_source import FrameOpener, FrameRoots
from vasipc.frames import write_frame_dir
from vasipc.preprocess import IMAGENET, Geometry, Preprocess
from vasipc.schema import FrameMetadata

cv2 = pytest.importorskip("cv2")

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"NV12": 0, "I420": 1, "BGR24": 2, "RGB24": 3, "NV21": 4, "BGRA": 5, "BGRx": 6,
           "RGBA": 7, "RGBx": 8, "GRAY8": 9}
# The 4-byte formats: (OpenCV's conversion to RGB, whether the channels are B, G, R).
FOUR_BYTE = {"BGRA": (cv2.COLOR_BGRA2RGB, True), "BGRx": (cv2.COLOR_BGRA2RGB, True),
             "RGBA": (cv2.COLOR_RGBA2RGB, False), "RGBx": (cv2.COLOR_RGBA2RGB, False)}
PAD = np.float32(114) / np.float32(255)


# --- frames: a real photo in each pixel format, laid out as a producer would ---------------

@functools.cache
def photo(width: int, height: int, crop: str = "full") -> np.ndarray:
    """skimage's astronaut (RGB, 512x512), optionally cropped wide or tall, resized to
    width x height (INTER_AREA: a real picture at any size)."""
    data = pytest.importorskip("skimage.data")
    rgb = data.astronaut()
    if crop == "wide":
        rgb = rgb[96:352]          # 512 x 256
    elif crop == "tall":
        rgb = rgb[:, 128:384]      # 256 x 512
    if rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    rgb = np.ascontiguousarray(rgb)
    rgb.flags.writeable = False
    return rgb


def rgb_to_yuv420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 limited range, chroma averaged over each 2x2 block: Y (h, w), U, V (h/2, w/2)."""
    r, g, b = (rgb[..., k].astype(np.float32) for k in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def block_mean(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    def u8(c: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(c), 0, 255).astype(np.uint8)

    return u8(y), u8(block_mean(u)), u8(block_mean(v))


@dataclass
class Frame:
    src: object            # what letterbox_into reads: the frame's first byte is src's first
    fmt: int
    width: int
    height: int
    stride: int
    rgb_opencv: np.ndarray  # the frame's pixels as OpenCV decodes them (cvtColor)


def _strided(plane: np.ndarray, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of `stride` bytes: the plane's bytes, then garbage."""
    rows = rng.integers(0, 256, (plane.shape[0], stride), dtype=np.uint8)
    rows[:, :plane.shape[1]] = plane
    return rows.ravel()


def make_frame(rgb: np.ndarray, fmt: int, stride_pad: int = 0, offset: int = 0,
               seed: int = 0) -> Frame:
    """The photo as a frame of format fmt with stride = packed + stride_pad (garbage in the
    padding, and in the alpha or padding byte of 4-byte pixels), placed at `offset` inside
    a bigger buffer full of garbage. GRAY8: OpenCV's COLOR_RGB2GRAY of the photo."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    name = {code: name for name, code in FORMATS.items()}[fmt]
    if name in ("NV12", "NV21", "I420"):
        y, u, v = rgb_to_yuv420(rgb)
        stride = w + stride_pad
        if name in ("NV12", "NV21"):
            pairs = np.stack([u, v] if name == "NV12" else [v, u], axis=-1).reshape(h // 2, w)
            planes = [_strided(y, stride, rng), _strided(pairs, stride, rng)]
            code = cv2.COLOR_YUV2RGB_NV12 if name == "NV12" else cv2.COLOR_YUV2RGB_NV21
            decoded = cv2.cvtColor(np.vstack([y, pairs]), code)
        else:
            assert stride % 2 == 0
            planes = [_strided(y, stride, rng), _strided(u, stride // 2, rng),
                      _strided(v, stride // 2, rng)]
            packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)
            decoded = cv2.cvtColor(packed, cv2.COLOR_YUV2RGB_I420)
    elif name in FOUR_BYTE:
        conversion, bgr = FOUR_BYTE[name]
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)  # alpha: garbage
        pixels[..., :3] = rgb[..., ::-1] if bgr else rgb
        stride = 4 * w + stride_pad
        planes = [_strided(pixels.reshape(h, 4 * w), stride, rng)]
        decoded = cv2.cvtColor(pixels, conversion)
    elif name == "GRAY8":
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        stride = w + stride_pad
        planes = [_strided(gray, stride, rng)]
        decoded = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    else:
        pixels = rgb[..., ::-1] if fmt == FORMATS["BGR24"] else rgb
        stride = 3 * w + stride_pad
        planes = [_strided(np.ascontiguousarray(pixels).reshape(h, 3 * w), stride, rng)]
        decoded = (cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_BGR2RGB)
                   if fmt == FORMATS["BGR24"] else rgb)
    data = np.concatenate(planes)
    assert data.size == reference_kernels.frame_nbytes(fmt, w, h, stride)
    big = rng.integers(0, 256, offset + data.size + 1000, dtype=np.uint8)
    big[offset:offset + data.size] = data
    src = big[offset:offset + data.size] if offset else big  # longer than needed is fine
    return Frame(src, fmt, w, h, stride, decoded)


def opencv_letterbox(rgb: np.ndarray, dst_w: int, dst_h: int) -> np.ndarray:
    """The contract's reference pipeline, as Ultralytics writes it, on a decoded RGB frame."""
    h, w = rgb.shape[:2]
    r = min(dst_w / w, dst_h / h)
    new_w, new_h = max(1, round(w * r)), max(1, round(h * r))  # max: a 1x700 frame
    left, top = round((dst_w - new_w) / 2 - 0.1), round((dst_h - new_h) / 2 - 0.1)
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    padded = cv2.copyMakeBorder(resized, top, dst_h - new_h - top, left, dst_w - new_w - left,
                                cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return np.ascontiguousarray((padded.astype(np.float32) / 255).transpose(2, 0, 1))


def opencv_preprocess(rgb: np.ndarray, dst_w: int, dst_h: int, placement: tuple[int, ...],
                      pad_value: int = 114, bgr: bool = False, mean=(0.0, 0.0, 0.0),
                      std=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Any placement, written with OpenCV and numpy: resize, cut what lies outside the
    output, copyMakeBorder the rest, /255, plane order, (x - mean) / std, CHW."""
    new_w, new_h, left, top = placement
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    x0, y0 = max(0, -left), max(0, -top)
    visible = resized[y0:min(new_h, dst_h - top), x0:min(new_w, dst_w - left)]
    at_x, at_y = left + x0, top + y0
    padded = cv2.copyMakeBorder(visible, at_y, dst_h - at_y - visible.shape[0], at_x,
                                dst_w - at_x - visible.shape[1], cv2.BORDER_CONSTANT,
                                value=(pad_value,) * 3)
    x = padded.astype(np.float32) / 255
    if bgr:
        x = x[..., ::-1]
    x = (x - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pil_preprocess(rgb: np.ndarray, dst_w: int, dst_h: int, placement: tuple[int, ...],
                   pad_value: int = 114) -> np.ndarray:
    """Ultralytics' classifier input, as torchvision builds it from a PIL image: PIL's
    Image.resize(BILINEAR) of the decoded RGB frame, the placement's crop / pad, /255, CHW."""
    image = pytest.importorskip("PIL.Image")
    new_w, new_h, left, top = placement
    resized = np.asarray(image.fromarray(rgb).resize((new_w, new_h), image.BILINEAR))
    canvas = np.full((dst_h, dst_w, 3), pad_value, np.uint8)
    x0, y0 = max(0, -left), max(0, -top)
    visible = resized[y0:min(new_h, dst_h - top), x0:min(new_w, dst_w - left)]
    canvas[top + y0:top + y0 + visible.shape[0], left + x0:left + x0 + visible.shape[1]] = visible
    return np.ascontiguousarray((canvas.astype(np.float32) / 255).transpose(2, 0, 1))


def assert_matches_opencv(out: np.ndarray, expected: np.ndarray, std=(1.0,)) -> None:
    diff = np.abs(out.astype(np.float64) - expected) * min(std)  # in units of v / 255
    # The contract: mean <= 2/255, 99.9% of elements within 8/255. The kernel does
    # OpenCV's integer arithmetic, so it is held to 1/255 everywhere (it is exact here;
    # 1e-6: (x - mean) * (1 / std) against numpy's (x - mean) / std).
    assert diff.mean() <= 2 / 255
    assert np.mean(diff <= 8 / 255 + 1e-6) >= 0.999
    assert diff.max() <= 1 / 255 + 1e-6, f"max diff {diff.max() * 255:.3f}/255"


# (name, source size, crop, model size W x H, stride padding per format kind, offset)
CASES = [
    ("photo-up-640", (512, 512), "full", (640, 640), 0, 0),
    ("photo-320", (512, 512), "full", (320, 320), 14, 4099),
    ("wide-640", (512, 256), "wide", (640, 640), 14, 1),
    ("tall-640", (256, 512), "tall", (640, 640), 0, 64),
    ("wide-320x256", (512, 256), "wide", (320, 256), 14, 0),
    ("tall-320x256", (256, 512), "tall", (320, 256), 2, 3),
    ("1080p-640", (1920, 1080), "full", (640, 640), 14, 0),   # exact 3x: one tap per row
    ("720p-320x256", (1280, 720), "full", (320, 256), 0, 0),
    ("720p-640", (1280, 720), "full", (640, 640), 14, 3),     # exact 2:1: contiguous pairs
    ("rows-3:1-cols-2tap", (1922, 1080), "full", (641, 360), 2, 0),  # one row, two columns
    ("4k-640", (3840, 2160), "full", (640, 640), 14, 7),
    ("same-size", (640, 640), "full", (640, 640), 0, 0),
    ("tiny-2x2", (2, 2), "full", (640, 640), 14, 5),
    ("tiny-2x4", (2, 4), "full", (320, 320), 0, 0),
    ("tiny-4x2", (4, 2), "full", (320, 256), 2, 0),
]


@functools.cache
def _case_frame(fmt: int, case: tuple) -> tuple[Frame, np.ndarray]:
    """The case's frame and the OpenCV pipeline's tensor for it (built once per session)."""
    _, (w, h), crop, (dst_w, dst_h), pad, offset = case
    frame = make_frame(photo(w, h, crop), fmt, stride_pad=pad, offset=offset)
    frame.src.flags.writeable = False
    expected = opencv_letterbox(frame.rgb_opencv, dst_w, dst_h)
    expected.flags.writeable = False
    return frame, expected


def _run_case(kernel: types.ModuleType, fmt: int, case: tuple, out: np.ndarray | None = None,
              threads: int = 1, **options) -> tuple[np.ndarray, np.ndarray]:
    _, (w, h), _, (dst_w, dst_h), _, _ = case
    frame, expected = _case_frame(fmt, case)
    _, new_w, new_h, left, top = reference_kernels.letterbox_geometry(w, h, dst_w, dst_h)
    if out is None:
        out = np.full((3, dst_h, dst_w), np.nan, np.float32)
    kernel.letterbox_into(frame.src, fmt, w, h, frame.stride, out, new_w, new_h, left, top,
                          threads=threads, **options)
    return out, expected


# Cases for the resize modes: a subset of CASES, plus square classifier-sized inputs
# (centre crop cuts a wide or tall frame; upscales and downscales).
MODE_CASES = [c for c in CASES if c[0] in ("photo-320", "wide-640", "tall-320x256",
                                           "720p-640", "1080p-640", "tiny-2x4")] + [
    ("720p-224", (1280, 720), "full", (224, 224), 14, 0),
    ("tall-224", (256, 512), "tall", (224, 224), 2, 5),
    ("photo-up-700x500", (700, 500), "full", (224, 224), 0, 0),  # crop offset 44.5 -> 44
]
# (id, Preprocess fields): channel order, mean/std, pad value
OPTIONS = [
    ("bgr", {"channel_order": "bgr"}),
    ("imagenet", {"mean": IMAGENET.mean, "std": IMAGENET.std}),
    ("bgr-imagenet-pad0", {"channel_order": "bgr", "mean": IMAGENET.mean[::-1],
                           "std": IMAGENET.std[::-1], "pad_value": 0}),
    ("pad255-odd-mean", {"pad_value": 255, "mean": (0.5, -0.25, 1.0), "std": (0.5, 2.0, 0.125)}),
]


def _kernel_options(pre: Preprocess) -> dict:
    return {"bgr": pre.channel_order == "bgr", "pad_value": pre.pad_value, "mean": pre.mean,
            "std": pre.std, "antialias": pre.filter == "antialias"}


# Antialias cases: (name, source size, crop, model size W x H, stride padding, offset, resize).
# Up and down, odd sizes, Pillow's two pass orders (vertical first: the height shrinks by
# more than twice the width), crops and letterbox / stretch placements.
AA_CASES = [
    ("2x-224-crop", (448, 448), "full", (224, 224), 0, 0, "center_crop"),  # the zoo check
    ("720p-224-crop", (1280, 720), "full", (224, 224), 14, 3, "center_crop"),
    ("tall-224-crop", (256, 512), "tall", (224, 224), 2, 0, "center_crop"),
    ("tall-vertical-first", (300, 1400), "full", (224, 224), 0, 5, "center_crop"),
    ("up-224-crop", (100, 60), "full", (224, 224), 4, 0, "center_crop"),
    ("odd-224-crop", (334, 212), "full", (224, 224), 2, 1, "center_crop"),
    ("odd-letterbox", (334, 210), "full", (160, 128), 0, 0, "letterbox"),  # 160 x 101
    ("wide-stretch-odd", (512, 256), "wide", (97, 61), 6, 0, "stretch"),
    ("stretch-up-down", (120, 300), "full", (301, 75), 0, 0, "stretch"),  # x up, y down
    ("tiny-2x2", (2, 2), "full", (64, 64), 0, 0, "center_crop"),
    ("one-column", (2, 96), "full", (32, 32), 0, 0, "stretch"),
]


def _run_antialias(kernel: types.ModuleType, fmt: int, case: tuple, threads: int = 1,
                   **fields) -> tuple[np.ndarray, np.ndarray, Preprocess]:
    """The case's frame through the antialias filter, and PIL's tensor for it (pad 114)."""
    _, (w, h), crop, (dst_w, dst_h), stride_pad, offset, resize = case
    frame = make_frame(photo(w, h, crop), fmt, stride_pad=stride_pad, offset=offset)
    pre = Preprocess(resize=resize, filter="antialias", **fields)
    _, placement = pre.placement(w, h, dst_w, dst_h)
    out = np.full((3, dst_h, dst_w), np.nan, np.float32)
    kernel.letterbox_into(frame.src, fmt, w, h, frame.stride, out, *placement,
                          threads=threads, **_kernel_options(pre))
    return out, pil_preprocess(frame.rgb_opencv, dst_w, dst_h, placement), pre


def _run_mode(kernel: types.ModuleType, fmt: int, case: tuple, pre: Preprocess,
              threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The case's frame through `pre` (its placement and options), and OpenCV's tensor."""
    _, (w, h), _, (dst_w, dst_h), _, _ = case
    frame, _ = _case_frame(fmt, case)
    _, placement = pre.placement(w, h, dst_w, dst_h)
    out = np.full((3, dst_h, dst_w), np.nan, np.float32)
    kernel.letterbox_into(frame.src, fmt, w, h, frame.stride, out, *placement, threads=threads,
                          **_kernel_options(pre))
    expected = opencv_preprocess(frame.rgb_opencv, dst_w, dst_h, placement, pre.pad_value,
                                 pre.channel_order == "bgr", pre.mean, pre.std)
    return out, expected


class _LetterboxBehaviour:
    kernel: ClassVar[types.ModuleType]

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_matches_opencv(self, fmt_name: str, case: tuple) -> None:
        out, expected = _run_case(self.kernel, FORMATS[fmt_name], case)
        assert_matches_opencv(out, expected)

    @pytest.mark.parametrize("size", [(333, 211), (211, 333), (1, 1), (3, 1), (1, 700)])
    @pytest.mark.parametrize("fmt_name", ["BGR24", "RGB24", "BGRA", "RGBx", "GRAY8"])
    def test_odd_sizes_packed_formats(self, fmt_name: str, size: tuple[int, int]) -> None:
        w, h = size
        frame = make_frame(photo(w, h), FORMATS[fmt_name], stride_pad=5, offset=11)
        _, new_w, new_h, left, top = reference_kernels.letterbox_geometry(w, h, 320, 256)
        out = np.empty((3, 256, 320), np.float32)
        self.kernel.letterbox_into(frame.src, frame.fmt, w, h, frame.stride, out,
                                   new_w, new_h, left, top)
        assert_matches_opencv(out, opencv_letterbox(frame.rgb_opencv, 320, 256))

    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_padding_is_exactly_114(self, fmt_name: str) -> None:
        out, _ = _run_case(self.kernel, FORMATS[fmt_name], CASES[2])  # wide: bands top/bottom
        _, new_w, new_h, left, top = reference_kernels.letterbox_geometry(512, 256, 640, 640)
        assert (new_w, new_h, left, top) == (640, 320, 0, 160)
        inside = np.zeros(out.shape, bool)
        inside[:, top:top + new_h, left:left + new_w] = True
        assert np.all(out[~inside] == PAD)
        assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1

    def test_writes_only_its_batch_slot(self) -> None:
        batch = np.full((3, 3, 320, 320), -1.0, np.float32)
        _, expected = _run_case(self.kernel, FORMATS["NV12"], CASES[1], out=batch[1])
        assert_matches_opencv(batch[1], expected)
        assert np.all(batch[0] == -1) and np.all(batch[2] == -1)

    def test_geometry_constants(self) -> None:
        assert self.kernel.FORMAT_CODES == FORMATS
        assert self.kernel.min_stride(0, 640) == 640 and self.kernel.min_stride(1, 640) == 640
        assert self.kernel.min_stride(2, 640) == 1920 and self.kernel.min_stride(3, 640) == 1920
        assert self.kernel.frame_nbytes(0, 640, 480, 704) == 704 * 480 * 3 // 2
        assert self.kernel.frame_nbytes(1, 640, 480, 706) == 706 * 480 + 2 * 353 * 240
        assert self.kernel.frame_nbytes(2, 5, 3, 16) == 48
        assert self.kernel.frame_nbytes(3, 5, 3, 15) == 45
        assert self.kernel.min_stride(4, 640) == self.kernel.min_stride(9, 640) == 640
        assert all(self.kernel.min_stride(fmt, 640) == 2560 for fmt in (5, 6, 7, 8))
        assert self.kernel.frame_nbytes(4, 640, 480, 703) == 703 * 480 * 3 // 2
        assert self.kernel.frame_nbytes(5, 5, 3, 21) == self.kernel.frame_nbytes(8, 5, 3, 21) == 63
        assert self.kernel.frame_nbytes(9, 5, 3, 5) == 15

    @pytest.mark.parametrize("args", [
        (0, 641, 480, 641),   # odd width, NV12
        (1, 640, 481, 640),   # odd height, I420
        (1, 640, 480, 641),   # odd I420 stride
        (4, 640, 479, 640),   # odd height, NV21
        (0, 640, 480, 639),   # stride below a row
        (2, 640, 480, 1919),
        (5, 640, 480, 2559),  # BGRA: 4 bytes a pixel
        (9, 640, 480, 639),   # GRAY8
        (10, 640, 480, 640),  # unknown format
        (-1, 640, 480, 640),
        (2, 0, 480, 0),
        (2, 640, 0, 1920),
    ])
    def test_invalid_frame_geometry(self, args: tuple[int, int, int, int]) -> None:
        fmt, w, h, stride = args
        out = np.empty((3, 64, 64), np.float32)
        with pytest.raises(ValueError):
            self.kernel.frame_nbytes(fmt, w, h, stride)
        with pytest.raises(ValueError):
            self.kernel.letterbox_into(bytes(4 * 1024 * 1024), fmt, w, h, stride, out,
                                       64, 48, 0, 8)

    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_short_buffer(self, fmt_name: str) -> None:
        fmt = FORMATS[fmt_name]
        stride = self.kernel.min_stride(fmt, 64)
        need = self.kernel.frame_nbytes(fmt, 64, 48, stride)
        out = np.empty((3, 64, 64), np.float32)
        self.kernel.letterbox_into(bytes(need), fmt, 64, 48, stride, out, 64, 48, 0, 8)
        with pytest.raises(ValueError, match="bytes"):
            self.kernel.letterbox_into(bytes(need - 1), fmt, 64, 48, stride, out,
                                       64, 48, 0, 8)

    @pytest.mark.parametrize("bad_out", [
        np.empty((3, 64, 64), np.float64),
        np.empty((64, 64, 3), np.float32),
        np.empty((4, 64, 64), np.float32),
        np.empty((3, 64), np.float32),
        np.empty((3, 64, 128), np.float32)[:, :, ::2],        # not contiguous
        np.frombuffer(bytes(3 * 64 * 64 * 4), np.float32).reshape(3, 64, 64),  # read-only
    ], ids=["float64", "hwc", "4-planes", "2-d", "strided", "read-only"])
    def test_bad_out(self, bad_out: np.ndarray) -> None:
        with pytest.raises(ValueError):
            self.kernel.letterbox_into(bytes(64 * 48 * 3), 2, 64, 48, 192, bad_out,
                                       64, 48, 0, 8)

    @pytest.mark.parametrize("placement", [
        (0, 48, 0, 8), (64, 0, 0, 8), (64, 48, 64, 0), (64, 48, -64, 0), (64, 48, 0, 64),
        (64, 48, 0, -48), (-5, 48, 0, 0)])
    def test_placement_must_overlap(self, placement: tuple[int, int, int, int]) -> None:
        out = np.empty((3, 64, 64), np.float32)
        with pytest.raises(ValueError):
            self.kernel.letterbox_into(bytes(64 * 48 * 3), 2, 64, 48, 192, out, *placement)

    # --- the general placement and output transform ---------------------------------------

    @pytest.mark.slow
    @pytest.mark.parametrize("case", MODE_CASES, ids=[c[0] for c in MODE_CASES])
    @pytest.mark.parametrize("resize", ["letterbox", "stretch", "center_crop"])
    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_modes_match_opencv(self, fmt_name: str, resize: str, case: tuple) -> None:
        out, expected = _run_mode(self.kernel, FORMATS[fmt_name], case, Preprocess(resize=resize))
        assert_matches_opencv(out, expected)

    @pytest.mark.slow
    @pytest.mark.parametrize("options", OPTIONS, ids=[o[0] for o in OPTIONS])
    @pytest.mark.parametrize("resize", ["letterbox", "center_crop"])
    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_order_mean_std_pad_match_opencv(self, fmt_name: str, resize: str,
                                             options: tuple) -> None:
        pre = Preprocess(resize=resize, **options[1])
        for case in (MODE_CASES[1], MODE_CASES[4]):
            out, expected = _run_mode(self.kernel, FORMATS[fmt_name], case, pre)
            assert_matches_opencv(out, expected, pre.std)

    @pytest.mark.parametrize("placement", [
        (96, 80, -10, -5),      # larger than out both ways, cropped on all four sides
        (80, 70, -16, -6),      # cropped left/top, padded right/bottom
        (90, 40, 3, 20),        # overhangs the right edge only
        (40, 90, 20, 3),        # overhangs the bottom edge only
        (200, 30, -70, 10),     # a band: crop left and right, pad above and below
        (1, 1, 63, 63),         # one pixel in the last corner
        (64, 64, 0, 0),         # stretch
    ], ids=str)
    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_any_placement_matches_opencv(self, fmt_name: str, placement: tuple) -> None:
        frame = make_frame(photo(128, 96), FORMATS[fmt_name], stride_pad=6, offset=3)
        out = np.full((3, 64, 64), np.nan, np.float32)
        self.kernel.letterbox_into(frame.src, frame.fmt, 128, 96, frame.stride, out, *placement)
        assert_matches_opencv(out, opencv_preprocess(frame.rgb_opencv, 64, 64, placement))

    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_bgr_is_the_planes_reversed_and_mean_std_exact(self, fmt_name: str) -> None:
        """BGR gives the RGB planes in reverse, bit for bit; mean/std give
        (rgb - float32(mean)) * float32(1 / std), bit for bit, pads included."""
        rgb, _ = _run_case(self.kernel, FORMATS[fmt_name], CASES[2])  # wide: pad bands
        bgr, _ = _run_case(self.kernel, FORMATS[fmt_name], CASES[2], bgr=True)
        assert np.array_equal(bgr, rgb[::-1])
        norm, _ = _run_case(self.kernel, FORMATS[fmt_name], CASES[2], mean=IMAGENET.mean,
                            std=IMAGENET.std)
        mean = np.array(IMAGENET.mean, np.float32)[:, None, None]
        inv_std = np.array([1 / s for s in IMAGENET.std], np.float32)[:, None, None]
        assert np.array_equal(norm, (rgb - mean) * inv_std)
        both, _ = _run_case(self.kernel, FORMATS[fmt_name], CASES[2], bgr=True,
                            mean=IMAGENET.mean[::-1], std=IMAGENET.std[::-1])
        assert np.array_equal(both, norm[::-1])

    @pytest.mark.parametrize("pad_value", [0, 1, 114, 255])
    def test_pad_values(self, pad_value: int) -> None:
        out, _ = _run_case(self.kernel, FORMATS["RGB24"], CASES[2], pad_value=pad_value)
        inside = np.zeros(out.shape, bool)
        inside[:, 160:480, :] = True  # wide-640: the picture is rows 160..479
        assert np.all(out[~inside] == np.float32(pad_value) / np.float32(255))
        default, _ = _run_case(self.kernel, FORMATS["RGB24"], CASES[2])
        assert np.array_equal(out[inside], default[inside])
        norm, _ = _run_case(self.kernel, FORMATS["RGB24"], CASES[2], pad_value=pad_value,
                            mean=IMAGENET.mean, std=IMAGENET.std)
        pad = Preprocess(pad_value=pad_value, mean=IMAGENET.mean, std=IMAGENET.std).pad_pixel
        for c in range(3):
            assert np.all(norm[c][~inside[c]] == pad[c])

    @pytest.mark.parametrize("bad", [
        {"pad_value": -1}, {"pad_value": 256}, {"mean": (0.0, 0.0)}, {"std": (1.0, 1.0, 1.0, 1.0)},
        {"std": (1.0, 0.0, 1.0)}, {"std": (1.0, -1.0, 1.0)}, {"std": (float("nan"), 1.0, 1.0)},
        {"mean": (float("inf"), 0.0, 0.0)}], ids=str)
    def test_bad_output_transform(self, bad: dict) -> None:
        out = np.empty((3, 64, 64), np.float32)
        with pytest.raises(ValueError):
            self.kernel.letterbox_into(bytes(64 * 48 * 3), 2, 64, 48, 192, out, 64, 48, 0, 8,
                                       **bad)


    # --- the antialias filter: PIL's resize -------------------------------------------------

    @pytest.mark.slow
    @pytest.mark.parametrize("case", AA_CASES, ids=[c[0] for c in AA_CASES])
    @pytest.mark.parametrize("fmt_name", list(FORMATS))
    def test_antialias_equals_pil(self, fmt_name: str, case: tuple) -> None:
        out, expected, _ = _run_antialias(self.kernel, FORMATS[fmt_name], case)
        assert np.array_equal(out, expected), np.abs(out - expected).max() * 255

    @pytest.mark.parametrize("fmt_name", ["NV12", "BGR24"])
    def test_antialias_order_mean_std_pad(self, fmt_name: str) -> None:
        """The pad value, BGR planes and mean/std on PIL's values, bit for bit."""
        case = AA_CASES[6]  # letterbox: pad bands
        plain, expected, _ = _run_antialias(self.kernel, FORMATS[fmt_name], case, pad_value=3)
        _, (w, h), _, (dst_w, dst_h), _, _, _ = case
        _, (new_w, new_h, left, top) = Preprocess().placement(w, h, dst_w, dst_h)
        inside = np.zeros(plain.shape, bool)
        inside[:, top:top + new_h, left:left + new_w] = True
        assert np.array_equal(plain[inside], expected[inside])
        assert np.all(plain[~inside] == np.float32(3) / np.float32(255))
        both, _, pre = _run_antialias(self.kernel, FORMATS[fmt_name], case, pad_value=3,
                                      channel_order="bgr", mean=IMAGENET.mean[::-1],
                                      std=IMAGENET.std[::-1])
        mean = np.array(pre.mean, np.float32)[:, None, None]
        inv_std = np.array([1 / v for v in pre.std], np.float32)[:, None, None]
        assert np.array_equal(both, (plain[::-1] - mean) * inv_std)

    def test_antialias_is_not_bilinear_on_a_downscale(self) -> None:
        """A downscale averages the whole footprint (INTER_LINEAR samples 2x2 pixels)."""
        down, _, _ = _run_antialias(self.kernel, FORMATS["RGB24"], AA_CASES[1])
        bilinear, _ = _run_mode(self.kernel, FORMATS["RGB24"], MODE_CASES[6],
                                Preprocess(resize="center_crop"))
        assert MODE_CASES[6][0] == "720p-224"
        assert np.abs(down - bilinear).max() > 20 / 255


class TestCompiledLetterbox(_LetterboxBehaviour):
    kernel = letterbox


@pytest.mark.slow  # a slow numpy reference; the compiled kernel runs the same checks fast
class TestReferenceLetterbox(_LetterboxBehaviour):
    kernel = reference_kernels


# --- geometry --------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [
    (1920, 1080, 640, 640), (1080, 1920, 640, 640), (512, 512, 320, 256), (512, 256, 320, 256),
    (256, 512, 320, 256), (1280, 720, 320, 320), (2, 2, 640, 640), (2, 4, 320, 320),
    (3840, 2160, 640, 640), (641, 479, 640, 640), (333, 211, 320, 256), (640, 640, 640, 640),
    (1000, 3, 640, 640)])
def test_letterbox_geometry_formula(sizes: tuple[int, int, int, int]) -> None:
    src_w, src_h, dst_w, dst_h = sizes
    r = min(dst_w / src_w, dst_h / src_h)
    new_w, new_h = round(src_w * r), round(src_h * r)
    expected = (r, new_w, new_h, round((dst_w - new_w) / 2 - 0.1),
                round((dst_h - new_h) / 2 - 0.1))
    assert letterbox.letterbox_geometry(*sizes) == expected
    assert reference_kernels.letterbox_geometry(*sizes) == expected


def test_letterbox_geometry_known_values() -> None:
    assert letterbox.letterbox_geometry(1920, 1080, 640, 640) == (1 / 3, 640, 360, 0, 140)
    assert letterbox.letterbox_geometry(512, 512, 320, 256) == (0.5, 256, 256, 32, 0)
    # Never a zero-sized image: a sliver frame still gets one row.
    assert letterbox.letterbox_geometry(5000, 1, 640, 640)[1:3] == (640, 1)
    with pytest.raises(ValueError):
        letterbox.letterbox_geometry(0, 10, 640, 640)


# --- vasipc.preprocess ------------------------------------------------------------------------

@pytest.mark.parametrize(("resize", "sizes", "geometry", "placement"), [
    ("letterbox", (1920, 1080, 640, 640), (1 / 3, 1 / 3, 0, 140), (640, 360, 0, 140)),
    ("letterbox", (512, 256, 320, 256), (0.625, 0.625, 0, 48), (320, 160, 0, 48)),
    ("stretch", (1920, 1080, 640, 640), (1 / 3, 640 / 1080, 0, 0), (640, 640, 0, 0)),
    ("stretch", (333, 211, 320, 256), (320 / 333, 256 / 211, 0, 0), (320, 256, 0, 0)),
    # torchvision Resize(224): int(224 * 1920 / 1080) = 398; CenterCrop: round(174 / 2) = 87
    ("center_crop", (1920, 1080, 224, 224), (398 / 1920, 224 / 1080, -87, 0), (398, 224, -87, 0)),
    ("center_crop", (1080, 1920, 224, 224), (224 / 1080, 398 / 1920, 0, -87), (224, 398, 0, -87)),
    # int(224 * 700 / 500) = 313; round(89 / 2.0) = round(44.5) = 44 (Python's, to even)
    ("center_crop", (700, 500, 224, 224), (313 / 700, 224 / 500, -44, 0), (313, 224, -44, 0)),
    ("center_crop", (100, 50, 224, 224), (448 / 100, 224 / 50, -112, 0), (448, 224, -112, 0)),
    ("center_crop", (640, 640, 224, 224), (0.35, 0.35, 0, 0), (224, 224, 0, 0)),
    # a non-square input: Ultralytics' Resize((h, w)) stretches, its crop cuts nothing
    ("center_crop", (1920, 1080, 320, 256), (320 / 1920, 256 / 1080, 0, 0), (320, 256, 0, 0)),
])
def test_preprocess_placement(resize: str, sizes: tuple, geometry: tuple, placement: tuple) -> None:
    src_w, src_h = sizes[:2]
    got = Preprocess(resize=resize).placement(*sizes)
    assert got == (Geometry(*geometry, src_w, src_h), placement)
    assert all(type(v) is int for v in got[1])


def test_preprocess_defaults_and_describe() -> None:
    pre = Preprocess()
    assert (pre.resize, pre.pad_value, pre.channel_order) == ("letterbox", 114, "rgb")
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0)
    assert np.array_equal(pre.pad_pixel, np.full(3, np.float32(114) / np.float32(255)))
    assert Preprocess("stretch", 114, "rgb", (0.485, 0.456, 0.406),
                      (0.229, 0.224, 0.225)) == IMAGENET
    assert json.loads(json.dumps(IMAGENET.describe())) == {
        "resize": "stretch", "filter": "bilinear", "pad_value": 114, "channel_order": "rgb",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert pre.filter == "bilinear"
    assert Preprocess(resize="center_crop", filter="antialias").describe()["filter"] == "antialias"
    assert Preprocess(mean=[0, 0, 0]) == pre and hash(Preprocess(mean=[0, 0, 0])) == hash(pre)


def test_preprocess_from_mapping() -> None:
    assert Preprocess.from_mapping({}, IMAGENET) == IMAGENET
    got = Preprocess.from_mapping({"resize": "center_crop", "channel_order": "BGR",
                                   "pad_value": 0, "mean": [0.5, 0.5, 0.5]}, IMAGENET)
    assert got == Preprocess("center_crop", 0, "bgr", (0.5, 0.5, 0.5), IMAGENET.std)
    got = Preprocess.from_mapping({"filter": "AntiAlias"}, Preprocess(resize="center_crop"))
    assert got == Preprocess(resize="center_crop", filter="antialias")


@pytest.mark.parametrize(("mapping", "lines"), [
    ({"resise": "stretch"}, ["preprocess.resise: unknown key"]),
    ({"resize": "fit"}, ["preprocess.resize: expected one of letterbox, stretch, center_crop"]),
    ({"pad_value": 256}, ["preprocess.pad_value: expected an integer in 0..255"]),
    ({"pad_value": 1.5}, ["preprocess.pad_value"]),
    ({"pad_value": True}, ["preprocess.pad_value"]),
    ({"channel_order": "rgba"}, ["preprocess.channel_order: expected rgb or bgr"]),
    ({"filter": "bicubic"}, ["preprocess.filter: expected bilinear or antialias"]),
    ({"filter": 1}, ["preprocess.filter: expected bilinear or antialias"]),
    ({"mean": [0.5, 0.5]}, ["preprocess.mean: expected 3 numbers"]),
    ({"mean": "0.5"}, ["preprocess.mean: expected a list of 3 numbers"]),
    ({"std": [1, 0, 1]}, ["preprocess.std: values must be > 0"]),
    ({"std": [1, "a", 1]}, ["preprocess.std: expected numbers"]),
    ({"std": [1, float("nan"), 1]}, ["preprocess.std: values must be finite"]),
    ({"foo": 1, "resize": "x", "std": [0, 1, 1]},
     ["preprocess.foo: unknown key", "preprocess.resize", "preprocess.std"]),
], ids=str)
def test_preprocess_from_mapping_errors(mapping: dict, lines: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        Preprocess.from_mapping(mapping, Preprocess())
    got = str(err.value).split("\n")
    assert len(got) == len(lines)
    for line, start in zip(got, lines, strict=True):
        assert line.startswith(start), (line, start)


def test_preprocess_rejects_bad_fields_and_mappings() -> None:
    with pytest.raises(ValueError, match=r"preprocess\.resize"):
        Preprocess(resize="letterbox2")
    with pytest.raises(ValueError, match="expected a mapping"):
        Preprocess.from_mapping(["resize"], Preprocess())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Preprocess().placement(0, 10, 640, 640)


@pytest.mark.parametrize("pre", [Preprocess(), Preprocess(resize="center_crop", channel_order="bgr"),
                                 IMAGENET], ids=lambda p: p.resize)
def test_preprocess_into_a_frame_file(pre: Preprocess, tmp_path: Path) -> None:
    """Preprocess.into on an OpenFrame from the server's own opener: the kernel with the
    mode's placement and options, and the geometry that maps source boxes to the input."""
    rgb = photo(640, 480)
    frame = make_frame(rgb, FORMATS["NV12"])
    data = np.asarray(frame.src)[:frame.stride * 720]
    write_frame_dir(tmp_path / "f", data, width=640, height=480, pixel_format="NV12",
                    frame_id=3)
    opener = FrameOpener(FrameRoots([str(tmp_path)]), 8192)
    opened = opener.open(str(tmp_path / "f"), FrameMetadata())
    out = np.empty((3, 224, 224), np.float32)
    try:
        geometry = pre.into(opened, out, threads=2)
    finally:
        opened.close()
    expected_geometry, placement = pre.placement(640, 480, 224, 224)
    assert geometry == expected_geometry
    assert_matches_opencv(out, opencv_preprocess(
        frame.rgb_opencv, 224, 224, placement, pre.pad_value, pre.channel_order == "bgr",
        pre.mean, pre.std), pre.std)
    # the geometry maps the source's corners onto the resized image's
    x0, y0 = geometry.pad_left, geometry.pad_top
    x1, y1 = 640 * geometry.scale_x + x0, 480 * geometry.scale_y + y0
    new_w, new_h, left, top = placement
    assert (x0, y0) == (left, top)
    assert (x1, y1) == pytest.approx((left + new_w, top + new_h), abs=0.6)


def test_classifier_default_is_pil_on_a_frame_file(tmp_path: Path) -> None:
    """yolo-classify's preprocessing (centre crop, antialias) through Preprocess.into on an
    NV12 frame file: Ultralytics' tensor, PIL's resize of the decoded frame, bit for bit."""
    from vasipc.heads.classify import PREPROCESS

    assert Preprocess(resize="center_crop", filter="antialias") == PREPROCESS
    frame = make_frame(photo(640, 480), FORMATS["NV12"])
    data = np.asarray(frame.src)[:frame.stride * 720]
    write_frame_dir(tmp_path / "f", data, width=640, height=480, pixel_format="NV12",
                    frame_id=1)
    opened = FrameOpener(FrameRoots([str(tmp_path)]), 8192).open(str(tmp_path / "f"),
                                                                   FrameMetadata())
    out = np.empty((3, 224, 224), np.float32)
    try:
        PREPROCESS.into(opened, out, threads=2)
    finally:
        opened.close()
    _, placement = PREPROCESS.placement(640, 480, 224, 224)
    assert np.array_equal(out, pil_preprocess(frame.rgb_opencv, 224, 224, placement))


# --- compiled only ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in AA_CASES if c[0] != "one-column"],
                         ids=lambda c: c[0])
def test_antialias_threads_bit_for_bit(case: tuple) -> None:
    """Each worker's ring of horizontal-pass rows starts empty at its range boundary."""
    one, _, _ = _run_antialias(letterbox, FORMATS["I420"], case)
    for threads in (2, 3, 64):
        many, _, _ = _run_antialias(letterbox, FORMATS["I420"], case, threads=threads)
        assert np.array_equal(many, one), threads

@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_compiled_equals_reference_bit_for_bit(fmt_name: str, case: tuple) -> None:
    compiled, expected = _run_case(letterbox, FORMATS[fmt_name], case)
    reference, _ = _run_case(reference_kernels, FORMATS[fmt_name], case)
    assert np.array_equal(compiled, reference)
    # Both do OpenCV's integer arithmetic: on OpenCV 5 (where that was checked) they equal
    # it exactly; older versions round their scalar row tails differently (1/255 above).
    if int(cv2.__version__.split(".")[0]) >= 5:
        assert np.array_equal(compiled, expected)


@pytest.mark.slow
@pytest.mark.parametrize("options", [("default", {}), *OPTIONS], ids=lambda o: o[0])
@pytest.mark.parametrize("resize", ["letterbox", "stretch", "center_crop"])
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_modes_compiled_equals_reference_bit_for_bit(fmt_name: str, resize: str,
                                                     options: tuple) -> None:
    pre = Preprocess(resize=resize, **options[1])
    for case in MODE_CASES:
        if case[0] in ("1080p-640", "720p-640") and options[0] != "default":
            continue  # the big frames once per mode: the reference is slow
        compiled, _ = _run_mode(letterbox, FORMATS[fmt_name], case, pre)
        reference, _ = _run_mode(reference_kernels, FORMATS[fmt_name], case, pre)
        assert np.array_equal(compiled, reference), case[0]


@pytest.mark.slow
@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
@pytest.mark.parametrize("fmt_name", ["NV12", "RGB24"])
def test_modes_threads_bit_for_bit(fmt_name: str, resize: str) -> None:
    """Row ranges over the visible rows only (a centre crop's rows start inside the
    resized image)."""
    pre = Preprocess(resize=resize, channel_order="bgr", mean=IMAGENET.mean, std=IMAGENET.std)
    for case in MODE_CASES:
        one, _ = _run_mode(letterbox, FORMATS[fmt_name], case, pre)
        for threads in (2, 3, 64):
            many, _ = _run_mode(letterbox, FORMATS[fmt_name], case, pre, threads=threads)
            assert np.array_equal(many, one), (case[0], threads)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "4k-640"], ids=lambda c: c[0])
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_threads_split_rows_bit_for_bit(fmt_name: str, case: tuple) -> None:
    """Any thread count gives the single-threaded tensor exactly: each thread's row range
    (upscales: a source row cached across a range boundary is recomputed), borders, and
    counts above the number of resized rows (capped)."""
    one, _ = _run_case(letterbox, FORMATS[fmt_name], case)
    for threads in (2, 3, 7, 64):
        many, _ = _run_case(letterbox, FORMATS[fmt_name], case, threads=threads)
        assert np.array_equal(many, one), threads


def test_threads_one_resized_row_and_bad_counts() -> None:
    frame = make_frame(photo(700, 2), FORMATS["RGB24"])
    _, new_w, new_h, left, top = letterbox.letterbox_geometry(700, 2, 320, 256)
    assert new_h == 1
    outs = [np.empty((3, 256, 320), np.float32) for _ in range(2)]
    for out, threads in zip(outs, (1, 64), strict=True):
        letterbox.letterbox_into(frame.src, 3, 700, 2, frame.stride, out, new_w, new_h, left,
                                 top, threads=threads)
    assert np.array_equal(outs[0], outs[1])
    for bad in (0, -1, 65):
        with pytest.raises(ValueError, match="threads"):
            letterbox.letterbox_into(frame.src, 3, 700, 2, frame.stride, outs[0], new_w,
                                     new_h, left, top, threads=bad)


def test_any_buffer_is_a_source(tmp_path: Path) -> None:
    frame = make_frame(photo(64, 48), FORMATS["NV12"])
    raw = np.asarray(frame.src)[:frame.stride * 72].tobytes()
    expected = opencv_letterbox(frame.rgb_opencv, 64, 64)
    path = tmp_path / "frame"
    path.write_bytes(raw)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for src in (raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, np.uint8),
                    np.frombuffer(raw, np.uint8).reshape(72, 64), mm):
            out = np.empty((3, 64, 64), np.float32)
            letterbox.letterbox_into(src, 0, 64, 48, 64, out, 64, 48, 0, 8)
            assert np.array_equal(out, expected)
    with pytest.raises((ValueError, BufferError)):  # a strided source has no flat buffer
        letterbox.letterbox_into(np.zeros((72, 128), np.uint8)[:, ::2], 0, 64, 48, 64,
                                 np.empty((3, 64, 64), np.float32), 64, 48, 0, 8)


def test_threads_run_concurrently_and_agree() -> None:
    frame = make_frame(photo(1920, 1080), FORMATS["I420"], stride_pad=14)
    outs = [np.empty((3, 640, 640), np.float32) for _ in range(4)]

    def work(out: np.ndarray) -> None:
        for _ in range(5):
            letterbox.letterbox_into(frame.src, 1, 1920, 1080, frame.stride, out,
                                     640, 360, 0, 140)

    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = opencv_letterbox(frame.rgb_opencv, 640, 640)
    for out in outs:
        assert np.array_equal(out, expected)


# --- the thread pool: ranges 1.. of a call run on persistent threads ------------------------

POOL_CASES = [c for c in CASES if c[0] in ("720p-640", "photo-up-640", "tall-320x256",
                                           "rows-3:1-cols-2tap")]


def test_pool_many_calls_varying_threads() -> None:
    """Calls in a row with the count going up and down (the pool grows to the largest,
    then serves smaller calls with a subset) give the single-threaded tensor every time."""
    counts = (2, 5, 3, 64, 2, 1, 8, 4, 2, 16, 7, 2)
    for fmt_name in ("NV12", "RGB24"):
        for case in POOL_CASES:
            one, _ = _run_case(letterbox, FORMATS[fmt_name], case)
            out = np.empty_like(one)
            for threads in counts:
                out.fill(np.nan)
                _run_case(letterbox, FORMATS[fmt_name], case, out=out, threads=threads)
                assert np.array_equal(out, one), (fmt_name, case[0], threads)


def test_pool_concurrent_callers_different_counts_and_formats() -> None:
    """Python threads calling at once (the GIL released), each with its own count and
    format: the pool is shared (or a caller runs the ranges no worker is free for), and
    every result is exact."""
    jobs = [("NV12", POOL_CASES[0], (2, 4, 3)), ("I420", POOL_CASES[3], (3, 2, 64)),
            ("BGR24", POOL_CASES[1], (4, 1, 2)), ("RGB24", POOL_CASES[2], (2, 7, 5))]
    expected = {name: _run_case(letterbox, FORMATS[name], case)[0] for name, case, _ in jobs}
    errors: list[str] = []
    start = threading.Barrier(len(jobs))

    def work(name: str, case: tuple, counts: tuple[int, ...]) -> None:
        out = np.empty_like(expected[name])
        start.wait()
        for i in range(12):
            threads = counts[i % len(counts)]
            out.fill(np.nan)
            _run_case(letterbox, FORMATS[name], case, out=out, threads=threads)
            if not np.array_equal(out, expected[name]):
                errors.append(f"{name} threads={threads} call {i}")

    workers = [threading.Thread(target=work, args=job) for job in jobs]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers), "a caller hangs"
    assert errors == []


# The pool in a fresh process: its threads persist between calls and grow to the largest
# count (capped by LB_MAX_THREADS - 1); a forked child (also one forked while another
# thread is inside a pooled call, the pool's lock possibly held) builds its own and gets
# the same tensors; and the process exits with idle pool threads, and with a daemon thread
# still calling, without hanging.
POOL_PROBE = textwrap.dedent("""
    import os, signal, sys, threading
    import numpy as np
    from vasipc._fast import letterbox as lb

    # GCC's ASan allocator is not fork-safe: a child forked while another thread is in
    # malloc (its scratch, numpy's) can block on the allocator's lock (glibc's malloc
    # takes its locks around fork). The busy forks are for the real allocator only.
    ASAN = "libasan" in open("/proc/self/maps").read()
    W, H = 1280, 720
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, lb.frame_nbytes(lb.NV12, W, H, W), dtype=np.uint8)
    args = (lb.NV12, W, H, W)
    def run(threads):
        out = np.empty((3, 640, 640), np.float32)
        lb.letterbox_into(src, *args, out, 640, 360, 0, 140, threads=threads)
        return out
    def tasks():
        return len(os.listdir("/proc/self/task"))

    one = run(1)
    base = tasks()
    assert np.array_equal(run(4), one)
    grown = tasks() - base
    for n in (4, 2, 3, 4):
        assert np.array_equal(run(n), one)
    print("pool", grown, tasks() - base)
    assert np.array_equal(run(64), one)
    assert np.array_equal(run(2), one)
    print("pool", tasks() - base)

    def child_check():
        signal.alarm(60)  # a hung child dies rather than outlive the test
        ok = all(np.array_equal(run(n), one) for n in (4, 2, 8, 3))
        os._exit(0 if ok else 3)

    pid = os.fork()
    if pid == 0:
        child_check()
    print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

    stop = threading.Event()
    def busy():
        while not stop.is_set():
            run(3)
    t = threading.Thread(target=busy); t.start()
    codes = []
    for _ in range(0 if ASAN else 20):
        pid = os.fork()
        if pid == 0:
            child_check()
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    stop.set(); t.join()
    print("forks while busy", "skipped (ASan)" if ASAN else codes == [0] * 20)
    assert np.array_equal(run(4), one)
    threading.Thread(target=lambda: [run(4) for _ in range(1000)], daemon=True).start()
    print("exit", flush=True)
""")


def _pool_probe() -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", POOL_PROBE],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or not hasattr(os, "fork"),
                    reason="needs /proc and fork")
def test_pool_persists_forks_and_exits() -> None:
    proc = _pool_probe()  # the timeout is the "exit never hangs" check
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    busy = "skipped (ASan)" if "asan" in os.environ.get("LD_PRELOAD", "") else "True"
    assert proc.stdout.split("\n") == [
        "pool 3 3", "pool 63", "child 0", f"forks while busy {busy}", "exit", ""]


# --- SIGBUS: a frame file truncated under its mapping ----------------------------------------

@pytest.fixture
def shm_file() -> Iterator[str]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    fd, path = tempfile.mkstemp(prefix="vasipc-letterbox-", dir="/dev/shm")
    os.close(fd)
    yield path
    os.unlink(path)


# The child writes an NV12 frame to /dev/shm, maps it (mmap, FrameView), reads it once,
# truncates the file through another fd, then reads it again: in the main thread and in a
# worker thread, FrameBusError, and the process goes on (a good frame still works).
SIGBUS_PROBE = textwrap.dedent("""
    import mmap, os, signal, sys, tempfile, threading
    import numpy as np
    from vasipc._fast import letterbox as lb
    from vasipc._fast.frameview import FrameView

    W, H = 1280, 720
    N = lb.frame_nbytes(lb.NV12, W, H, W)
    out = np.zeros((3, 320, 320), np.float32)
    args = (lb.NV12, W, H, W, out, 320, 180, 0, 70)

    def truncated(kind):
        fd, path = tempfile.mkstemp(dir="/dev/shm")
        os.write(fd, np.full(N, 128, np.uint8).tobytes())
        src = mmap.mmap(fd, N, access=mmap.ACCESS_READ) if kind == "mmap" else FrameView(fd, 0, N)
        lb.letterbox_into(src, *args)                # mapped and readable
        other = os.open(path, os.O_RDWR)
        os.ftruncate(other, 0)                       # the producer truncates it
        os.close(other); os.close(fd); os.unlink(path)
        return src

    for kind in ("mmap", "frameview"):
        src = truncated(kind)
        try:
            lb.letterbox_into(src, *args)
            print(kind, "no error")
        except lb.FrameBusError:
            print(kind, "FrameBusError")
        caught = []
        def worker():
            try:
                lb.letterbox_into(src, *args)
            except lb.FrameBusError:
                caught.append(True)
        t = threading.Thread(target=worker); t.start(); t.join()
        print(kind, "thread", "FrameBusError" if caught else "no error")
        try:
            lb.letterbox_into(src, *args, threads=4)
            print(kind, "threads=4 no error")
        except lb.FrameBusError:
            print(kind, "threads=4 FrameBusError")

    # Only the second of two threads faults (the frame's bottom half is gone): the call
    # raises all the same, and the thread it started is joined.
    N3 = W * 3 * H
    fd, path = tempfile.mkstemp(dir="/dev/shm")
    os.write(fd, np.full(N3, 100, np.uint8).tobytes())
    src = mmap.mmap(fd, N3, access=mmap.ACCESS_READ)
    rgb_args = (lb.RGB24, W, H, 3 * W, out, 320, 180, 0, 70)
    lb.letterbox_into(src, *rgb_args, threads=2)
    os.ftruncate(fd, (N3 * 3 // 4) & ~0xffff)
    top_rows = out[:, :150].copy()
    try:
        lb.letterbox_into(src, *rgb_args, threads=2)
        print("worker no error")
    except lb.FrameBusError:
        print("worker FrameBusError", threading.active_count())
    assert np.array_equal(out[:, :150], top_rows)  # the first thread's rows were done
    # A pool thread that faulted serves the next calls: more faults, then good frames.
    caught = 0
    for threads in (2, 4, 2, 3):
        try:
            lb.letterbox_into(src, *rgb_args, threads=threads)
        except lb.FrameBusError:
            caught += 1
    good = np.full(N3, 100, np.uint8)
    one = np.empty_like(out)
    lb.letterbox_into(good, *rgb_args[:4], one, *rgb_args[5:])
    pooled = all(
        lb.letterbox_into(good, *rgb_args, threads=threads) is None
        and np.array_equal(out, one) for threads in (2, 4, 3, 2))
    print("pool after faults", caught, pooled)
    os.close(fd); os.unlink(path)
    assert signal.SIGBUS not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    lb.letterbox_into(bytes(N), *args)
    print("alive")
""")


@functools.cache
def _sigbus_probe() -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", SIGBUS_PROBE],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)


def test_sigbus_in_a_subprocess() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    proc = _sigbus_probe()
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split("\n") == [
        "mmap FrameBusError", "mmap thread FrameBusError", "mmap threads=4 FrameBusError",
        "frameview FrameBusError", "frameview thread FrameBusError",
        "frameview threads=4 FrameBusError", "worker FrameBusError 1",
        "pool after faults 4 True", "alive", ""]


def test_sigbus_in_process(shm_file: str) -> None:
    # Only once the subprocess showed the guard works: a broken guard kills pytest.
    if _sigbus_probe().returncode != 0:
        pytest.fail("the SIGBUS probe subprocess failed; not risking this process")
    frame = make_frame(photo(640, 480), FORMATS["NV12"])
    raw = np.asarray(frame.src)[:frame.stride * 720].tobytes()
    Path(shm_file).write_bytes(raw)
    out = np.empty((3, 320, 320), np.float32)
    args = (0, 640, 480, 640, out, 320, 240, 0, 40)
    with open(shm_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        letterbox.letterbox_into(mm, *args)
        assert np.array_equal(out, opencv_letterbox(frame.rgb_opencv, 320, 320))
        os.truncate(shm_file, 0)
        with pytest.raises(letterbox.FrameBusError):
            letterbox.letterbox_into(mm, *args)
        with pytest.raises(letterbox.FrameBusError):  # and again: the guard re-arms
            letterbox.letterbox_into(mm, *args)
    assert signal.SIGBUS not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    letterbox.letterbox_into(raw, *args)
    assert np.array_equal(out, opencv_letterbox(frame.rgb_opencv, 320, 320))


def test_sigbus_outside_the_guard_still_kills(shm_file: str) -> None:
    """A bus error that is not the kernel's goes to the previous handler (faulthandler,
    then the default action): the guard must not swallow other code's crashes."""
    code = textwrap.dedent(f"""
        import mmap, os
        import numpy as np
        from vasipc._fast import letterbox as lb
        out = np.zeros((3, 8, 8), np.float32)
        lb.letterbox_into(bytes(48), lb.RGB24, 4, 4, 12, out, 8, 8, 0, 0)  # handler installed
        path = {shm_file!r}
        with open(path, "wb") as f:
            f.write(bytes(1 << 20))
        f = open(path, "rb")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        os.truncate(path, 0)
        print("reading", flush=True)
        mm[4096]                                     # SIGBUS in Python, outside any guard
        print("survived", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout == "reading\n"
    assert "Bus error" in proc.stderr                # faulthandler saw it
    assert proc.returncode != 0
    if "AddressSanitizer" not in proc.stderr:
        assert proc.returncode == -signal.SIGBUS     # then the default action
