"""The frame-export layout (docs/contract.md 5.1) and pixel-format encoders, for producers and tests.

This module is the one definition of the 64-byte `frame.meta` header: the server reads it
with `FrameHeader.unpack`, producers write it with `write_frame_dir`. Pure Python + numpy,
so a video pipeline can import it without the compiled core or onnxruntime.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Self

import numpy as np

HEADER_SIZE = 64
# version, padding, frame_id, timestamp_ns, width, height, pixel_format, stride, data_size,
# 16 reserved bytes: the table of docs/contract.md 5.1, little-endian.
HEADER_STRUCT = struct.Struct("<IIQQIIIIQ16x")
assert HEADER_STRUCT.size == HEADER_SIZE

# The header's pixel_format codes and their names (docs/contract.md 5.1, 5.3). BGRx and
# RGBx have a padding byte where BGRA and RGBA have alpha; the server ignores both.
NV12, I420, BGR24, RGB24, NV21, BGRA, BGRX, RGBA, RGBX, GRAY8 = range(10)
PIXEL_FORMATS: dict[str, int] = {
    "NV12": NV12, "I420": I420, "BGR24": BGR24, "RGB24": RGB24, "NV21": NV21, "BGRA": BGRA,
    "BGRx": BGRX, "RGBA": RGBA, "RGBx": RGBX, "GRAY8": GRAY8,
}
# Other names for them: FFmpeg's pix_fmt and GStreamer's video/x-raw format where they
# differ from ours. Names and aliases match in any case.
FORMAT_ALIASES: dict[str, str] = {
    "yuv420p": "I420", "bgr": "BGR24", "rgb": "RGB24", "bgr0": "BGRx", "rgb0": "RGBx",
    "gray": "GRAY8",
}
FORMAT_NAMES: dict[int, str] = {code: name for name, code in PIXEL_FORMATS.items()}
_CODES_BY_UPPER: dict[str, int] = {
    **{name.upper(): code for name, code in PIXEL_FORMATS.items()},
    **{alias.upper(): PIXEL_FORMATS[name] for alias, name in FORMAT_ALIASES.items()},
}

YUV420_FORMATS = (NV12, NV21, I420)  # even width and height
# Packed formats (GRAY8 included): bytes per pixel, and the byte of R, G, B in a pixel.
PACKED_LAYOUTS: dict[int, tuple[int, tuple[int, int, int]]] = {
    BGR24: (3, (2, 1, 0)), RGB24: (3, (0, 1, 2)), BGRA: (4, (2, 1, 0)), BGRX: (4, (2, 1, 0)),
    RGBA: (4, (0, 1, 2)), RGBX: (4, (0, 1, 2)), GRAY8: (1, (0, 0, 0)),
}

# What the writers accept as pixels: anything with the buffer protocol, numpy included.
BytesLike = bytes | bytearray | memoryview | np.ndarray

FRAME_META = "frame.meta"
FRAME_DATA = "frame.data"


def parse_format(name: str) -> int:
    """The pixel-format code for a format name or alias (FORMAT_ALIASES), in any case."""
    if not isinstance(name, str):
        raise ValueError(f"pixel format must be a string, got {type(name).__name__}")
    try:
        return _CODES_BY_UPPER[name.upper()]
    except KeyError:
        raise ValueError(
            f"unknown pixel format {name!r} (expected one of {', '.join(PIXEL_FORMATS)}, "
            f"or an alias: {', '.join(FORMAT_ALIASES)})"
        ) from None


def _format_code(pixel_format: str | int) -> int:
    if isinstance(pixel_format, str):
        return parse_format(pixel_format)
    if isinstance(pixel_format, int) and not isinstance(pixel_format, bool):
        if pixel_format not in FORMAT_NAMES:
            raise ValueError(f"unknown pixel format code {pixel_format}")
        return pixel_format
    raise ValueError(f"pixel format must be a name or a code, got {pixel_format!r}")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The 64-byte `frame.meta` of a frame-export directory."""

    version: int
    frame_id: int
    timestamp_ns: int
    width: int
    height: int
    pixel_format: int
    stride: int
    data_size: int

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(
            self.version, 0, self.frame_id, self.timestamp_ns, self.width, self.height,
            self.pixel_format, self.stride, self.data_size,
        )

    @classmethod
    def unpack(cls, buf: BytesLike) -> Self:
        """Parse the first 64 bytes of `buf`; fields are not validated (the reader does that)."""
        view = memoryview(buf).cast("B")
        if len(view) < HEADER_SIZE:
            raise ValueError(f"frame header needs {HEADER_SIZE} bytes, got {len(view)}")
        (version, _padding, frame_id, timestamp_ns, width, height, pixel_format, stride,
         data_size) = HEADER_STRUCT.unpack_from(view)
        return cls(version, frame_id, timestamp_ns, width, height, pixel_format, stride,
                   data_size)


def packed_stride(width: int, pixel_format: str | int) -> int:
    """Bytes per row of the first plane without padding."""
    code = _format_code(pixel_format)
    return width * PACKED_LAYOUTS[code][0] if code in PACKED_LAYOUTS else width


def frame_size(width: int, height: int, pixel_format: str | int, stride: int | None = None) -> int:
    """Bytes a frame occupies (docs/contract.md 5.3), with rows of `stride` bytes."""
    code = _format_code(pixel_format)
    if stride is None:
        stride = packed_stride(width, code)
    if code in (NV12, NV21):
        return stride * height + stride * (height // 2)
    if code == I420:
        return stride * height + 2 * (stride // 2) * (height // 2)
    return stride * height


# --- writing ---------------------------------------------------------------------------------

def _as_bytes_view(data: BytesLike) -> memoryview:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    return memoryview(data).cast("B")


def _write_atomically(path: str, data: BytesLike) -> None:
    """Write `path` through a temporary file in the same directory and a rename, so a reader
    sees the old file or the new one, never a partial one."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_frame_dir(
    path: str | os.PathLike[str],
    data: BytesLike,
    *,
    width: int,
    height: int,
    pixel_format: str | int,
    stride: int | None = None,
    frame_id: int = 0,
    timestamp_ns: int | None = None,
    version: int = 1,
) -> FrameHeader:
    """Export one frame as a frame-export directory (docs/contract.md 5.1).

    Writes `frame.data`, then `frame.meta`, each by atomic rename, creating the directory
    if needed. `data_size` is the length of `data`; the pixels are written as given (the
    server validates them against the header), so tests can export deliberately broken
    frames too. `stride` defaults to the packed row size.
    """
    path = os.fspath(path)
    code = _format_code(pixel_format)
    pixels = _as_bytes_view(data)
    header = FrameHeader(
        version=version,
        frame_id=frame_id,
        timestamp_ns=time.time_ns() if timestamp_ns is None else timestamp_ns,
        width=width,
        height=height,
        pixel_format=code,
        stride=packed_stride(width, code) if stride is None else stride,
        data_size=len(pixels),
    )
    os.makedirs(path, exist_ok=True)
    _write_atomically(os.path.join(path, FRAME_DATA), pixels)
    _write_atomically(os.path.join(path, FRAME_META), header.pack())
    return header


def write_raw_frame(path: str | os.PathLike[str], data: BytesLike,
                    offset: int = 0) -> None:
    """Write `data` at `offset` of a raw frame file (docs/contract.md 5.2), creating it if needed.

    In place, not atomic: a raw file can be a ring of frames that readers address by offset.
    At offset 0 the file becomes exactly this frame (cut to its length), because a file read
    without an offset must be one frame long; a ring's frames sit at offsets above 0.
    """
    pixels = _as_bytes_view(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(pixels):
            written += os.pwrite(fd, pixels[written:], offset + written)
        if offset == 0:
            os.ftruncate(fd, len(pixels))
    finally:
        os.close(fd)


# --- encoding --------------------------------------------------------------------------------
# BT.601 limited range, the coefficients OpenCV's COLOR_RGB2YUV_I420 approximates and
# COLOR_YUV2RGB_NV12 / _I420 invert. Chroma comes from the top-left pixel of each 2x2 block,
# as OpenCV samples it, so frames encoded here match cv2-encoded ones to +-1.
_RGB_TO_Y = np.array([65.481, 128.553, 24.966], dtype=np.float32) / 255.0
_RGB_TO_U = np.array([-37.797, -74.203, 112.0], dtype=np.float32) / 255.0
_RGB_TO_V = np.array([112.0, -93.786, -18.214], dtype=np.float32) / 255.0


def _to_u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _check_rgb(rgb: np.ndarray, *, even: bool) -> tuple[int, int]:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        raise ValueError("expected an RGB image: a uint8 array of shape (height, width, 3)")
    height, width = rgb.shape[:2]
    if width == 0 or height == 0:
        raise ValueError("empty image")
    if even and (width % 2 or height % 2):
        raise ValueError(f"YUV 4:2:0 needs even width and height, got {width}x{height}")
    return height, width


def _yuv420_planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-resolution Y and quarter-resolution U, V planes of an even-sized RGB image."""
    pixels = rgb.astype(np.float32)
    y = _to_u8(pixels @ _RGB_TO_Y + 16.0)
    chroma_sites = pixels[::2, ::2]
    u = _to_u8(chroma_sites @ _RGB_TO_U + 128.0)
    v = _to_u8(chroma_sites @ _RGB_TO_V + 128.0)
    return y, u, v


def _padded_rows(plane: np.ndarray, stride: int) -> np.ndarray:
    """`plane` (rows x bytes) as rows of `stride` bytes, zero-padded, flattened."""
    rows, row_bytes = plane.shape
    if stride < row_bytes:
        raise ValueError(f"stride {stride} is smaller than the row size {row_bytes}")
    if stride == row_bytes:
        return np.ascontiguousarray(plane).reshape(-1)
    out = np.zeros((rows, stride), dtype=np.uint8)
    out[:, :row_bytes] = plane
    return out.reshape(-1)


def _packed_pixels(rgb: np.ndarray, code: int) -> np.ndarray:
    """The image as rows of packed pixels (height x width * bytes per pixel); alpha or the
    padding byte 255, GRAY8 the BT.601 luma of OpenCV's COLOR_RGB2GRAY (to +-1)."""
    height, width = rgb.shape[:2]
    nbytes, channels = PACKED_LAYOUTS[code]
    if code == GRAY8:
        weights = np.array([4899, 9617, 1868], np.int32)  # 0.299, 0.587, 0.114 * 2**14
        return ((rgb.astype(np.int32) @ weights + (1 << 13)) >> 14).astype(np.uint8)
    pixels = np.full((height, width, nbytes), 255, np.uint8)
    for c, at in enumerate(channels):
        pixels[:, :, at] = rgb[:, :, c]
    return pixels.reshape(height, width * nbytes)


def encode_frame(rgb: np.ndarray, pixel_format: str | int,
                 stride: int | None = None) -> np.ndarray:
    """Encode an RGB image (uint8, height x width x 3) in one of the contract's pixel formats
    (docs/contract.md 5.3), rows padded to `stride` bytes (default: packed). Returns flat uint8.

    NV12, NV21 and I420 need an even width and height (ValueError otherwise; crop first).
    """
    code = _format_code(pixel_format)
    height, width = _check_rgb(rgb, even=code in YUV420_FORMATS)
    if stride is None:
        stride = packed_stride(width, code)
    if code in PACKED_LAYOUTS:
        planes = [(_packed_pixels(rgb, code), stride)]
    else:
        y, u, v = _yuv420_planes(rgb)
        if code in (NV12, NV21):
            pairs = [u, v] if code == NV12 else [v, u]
            uv = np.stack(pairs, axis=-1).reshape(height // 2, width)
            planes = [(y, stride), (uv, stride)]
        else:
            if stride % 2:
                raise ValueError(f"I420 needs an even stride, got {stride}")
            planes = [(y, stride), (u, stride // 2), (v, stride // 2)]
    return np.concatenate([_padded_rows(plane, plane_stride) for plane, plane_stride in planes])


def rgb_to_nv12(rgb: np.ndarray, stride: int | None = None) -> np.ndarray:
    """NV12 bytes of an RGB image (see `encode_frame`)."""
    return encode_frame(rgb, NV12, stride)


def rgb_to_i420(rgb: np.ndarray, stride: int | None = None) -> np.ndarray:
    """I420 bytes of an RGB image (see `encode_frame`)."""
    return encode_frame(rgb, I420, stride)


def crop_even(rgb: np.ndarray) -> np.ndarray:
    """`rgb` cropped to an even width and height (drops the last row/column if odd)."""
    height, width = rgb.shape[:2]
    return rgb[: height - height % 2, : width - width % 2]
