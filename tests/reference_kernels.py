"""Pure numpy reference of the compiled letterbox kernel, vasipc._fast.letterbox
(the decoder's is tests/reference_decode.py).

Written from the formulas (docs/contract.md 5.3, 6), not from the C, and with no OpenCV: the
tests run one set of assertions against both the compiled kernel and these (uvloop's
pattern), so each pins the other. They are slow and clear; nothing in the product uses
them.

The letterbox reference does OpenCV's arithmetic, because the contract's reference
pipeline is OpenCV's: BT.601 limited-range YUV -> RGB in 20-bit fixed point rounded to
uint8 (cvtColor), bilinear weights as 11-bit fixed point from float source positions,
and the vertical blend as OpenCV's SIMD path rounds it (resize INTER_LINEAR). With
antialias it resizes as PIL's Image.resize(BILINEAR) does instead (Resample.c): a
triangle filter widened by the downscale factor, weights in 22-bit fixed point, two
separable passes rounded to uint8, the vertical one first when the height shrinks by
more than twice the width (Pillow 13).
"""

from __future__ import annotations

import numpy as np

NV12, I420, BGR24, RGB24, NV21, BGRA, BGRX, RGBA, RGBX, GRAY8 = range(10)
FORMAT_CODES = {"NV12": NV12, "I420": I420, "BGR24": BGR24, "RGB24": RGB24, "NV21": NV21,
                "BGRA": BGRA, "BGRx": BGRX, "RGBA": RGBA, "RGBx": RGBX, "GRAY8": GRAY8}
YUV420 = (NV12, NV21, I420)
# Packed formats: bytes per pixel and the byte of R, G, B in a pixel (alpha never read).
PACKED = {BGR24: (3, (2, 1, 0)), RGB24: (3, (0, 1, 2)), BGRA: (4, (2, 1, 0)),
          BGRX: (4, (2, 1, 0)), RGBA: (4, (0, 1, 2)), RGBX: (4, (0, 1, 2)),
          GRAY8: (1, (0, 0, 0))}
PAD_VALUE = 114

# OpenCV's YUV420 -> RGB coefficients, scaled by 2**20 (1.164, 2.018, -0.391, -0.813, 1.596).
_YUV_SHIFT = 20
_CY, _CUB, _CUG, _CVG, _CVR = 1220542, 2116026, -409993, -852492, 1673527
_WEIGHT_ONE = 2048  # bilinear weight 1.0 in OpenCV's fixed point
_AA_BITS = 22  # PIL's PRECISION_BITS


# --- letterbox -----------------------------------------------------------------------------

def min_stride(fmt: int, width: int) -> int:
    if fmt not in FORMAT_CODES.values():
        raise ValueError(f"unknown pixel format code {fmt}")
    if width < 0:
        raise ValueError(f"frame width {width} is negative")
    return PACKED[fmt][0] * width if fmt in PACKED else width


def frame_nbytes(fmt: int, width: int, height: int, stride: int) -> int:
    packed = min_stride(fmt, width)
    if width < 1 or height < 1:
        raise ValueError(f"frame size {width}x{height} has a zero dimension")
    if fmt in YUV420 and (width % 2 or height % 2):
        raise ValueError(f"YUV 4:2:0 needs an even size, got {width}x{height}")
    if stride < packed:
        raise ValueError(f"stride {stride} < {packed}")
    if fmt == I420 and stride % 2:
        raise ValueError(f"I420 stride must be even, got {stride}")
    if fmt in (NV12, NV21):
        return stride * height * 3 // 2
    if fmt == I420:
        return stride * height + 2 * (stride // 2) * (height // 2)
    return stride * height


def letterbox_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int
                       ) -> tuple[float, int, int, int, int]:
    if min(src_w, src_h, dst_w, dst_h) < 1:
        raise ValueError("sizes must be positive")
    r = min(dst_w / src_w, dst_h / src_h)
    new_w, new_h = max(1, round(src_w * r)), max(1, round(src_h * r))
    return r, new_w, new_h, round((dst_w - new_w) / 2 - 0.1), round((dst_h - new_h) / 2 - 0.1)


def _taps(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's source position of each destination index: (d + 0.5) * scale - 0.5 with
    scale = 1 / (n_dst / n_src), as float32, split into index and fraction."""
    scale = 1.0 / (n_dst / n_src)
    pos = ((np.arange(n_dst) + 0.5) * scale - 0.5).astype(np.float32)
    index = np.floor(pos)
    return index.astype(np.int64), (pos - index).astype(np.float32)


def _weights(fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    one = np.float32(_WEIGHT_ONE)
    # np.rint rounds half to even, as OpenCV's saturate_cast<short>(float).
    return (np.rint((np.float32(1) - fraction) * one).astype(np.int32),
            np.rint(fraction * one).astype(np.int32))


def _column_taps(width: int, new_w: int):
    sx, fx = _taps(width, new_w)
    fx[sx < 0] = 0
    sx[sx < 0] = 0
    w0, w1 = _weights(fx)
    right = sx >= width - 1  # OpenCV: the last pixel alone
    sx[right] = width - 1
    w0[right], w1[right] = _WEIGHT_ONE, 0
    return sx, np.minimum(sx + 1, width - 1), w0, w1


def _row_taps(height: int, new_h: int):
    sy, fy = _taps(height, new_h)
    w0, w1 = _weights(fy)  # rows keep the fraction; the indices are clamped
    return np.clip(sy, 0, height - 1), np.clip(sy + 1, 0, height - 1), w0, w1


def _aa_coeffs(n_in: int, n_out: int, first: int, count: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's precompute_coeffs and normalize_coeffs_8bpc for destination indices
    [first, first + count): each one's first source index, its number of taps and its
    weights (a row of ksize, zero past the taps) as 22-bit integers."""
    scale = float(np.float32(n_in)) / n_out  # PIL: float box edges, a double division
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the triangle's support is 1
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(first, first + count) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): truncation
    taps = np.minimum((center + support + 0.5).astype(np.int64), n_in) - xmin
    t = np.arange(ksize)
    x = (t[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(np.abs(x) < 1.0, 1.0 - np.abs(x), 0.0)
    w[t[None, :] >= taps[:, None]] = 0.0
    total = np.zeros(count)
    for i in range(ksize):  # summed in PIL's order (np.sum would pair them)
        total += w[:, i]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    return xmin, taps, np.floor(0.5 + w * (1 << _AA_BITS)).astype(np.int64)


def _aa_pass(values: np.ndarray, axis: int, n_out: int, first: int, count: int) -> np.ndarray:
    """One of PIL's passes along `axis` of uint8 values: destination indices
    [first, first + count), each (2^21 + sum of value x weight) >> 22 clamped to 0..255."""
    n_in = values.shape[axis]
    xmin, _, weights = _aa_coeffs(n_in, n_out, first, count)
    moved = np.moveaxis(values.astype(np.int64), axis, 0)
    acc = np.full((count, *moved.shape[1:]), 1 << (_AA_BITS - 1), np.int64)
    shape = (count,) + (1,) * (moved.ndim - 1)
    for t in range(weights.shape[1]):  # taps past a row's count weigh 0
        acc += moved[np.minimum(xmin + t, n_in - 1)] * weights[:, t].reshape(shape)
    return np.moveaxis(np.clip(acc >> _AA_BITS, 0, 255), 0, axis)


def _antialias(rgb: np.ndarray, new_w: int, new_h: int, vx: int, vw: int, vy: int, vh: int
               ) -> np.ndarray:
    """PIL's Image.resize(BILINEAR) of rgb (3, H, W) to new_w x new_h, the visible window
    [vy, vy + vh) x [vx, vx + vw) of it."""
    height, width = rgb.shape[1:]
    dy, dx = height - new_h, width - new_w
    if dy > 0 and dy > dx * 2:  # Pillow 13's "vertical pass first" rule
        return _aa_pass(_aa_pass(rgb, 1, new_h, vy, vh), 2, new_w, vx, vw)
    return _aa_pass(_aa_pass(rgb, 2, new_w, vx, vw), 1, new_h, vy, vh)


def _yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    yy = np.maximum(y.astype(np.int32) - 16, 0) * _CY
    uu, vv = u.astype(np.int32) - 128, v.astype(np.int32) - 128
    half = 1 << (_YUV_SHIFT - 1)
    rgb = [(yy + half + _CVR * vv) >> _YUV_SHIFT,
           (yy + half + _CVG * vv + _CUG * uu) >> _YUV_SHIFT,
           (yy + half + _CUB * uu) >> _YUV_SHIFT]
    return np.clip(np.stack(rgb), 0, 255).astype(np.int32)  # (3, ...): uint8 values


def _pixels(data: np.ndarray, fmt: int, height: int, stride: int,
            rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """RGB (3, len(rows), len(cols)) of source pixels (rows[i], cols[j]), as uint8 values."""
    r, c = rows[:, None], cols[None, :]
    if fmt in PACKED:
        nbytes, channels = PACKED[fmt]
        packed = data[:stride * height].reshape(height, stride)
        return np.stack([packed[r, nbytes * c + k] for k in channels]).astype(np.int32)
    luma = data[:stride * height].reshape(height, stride)
    chroma = data[stride * height:]
    if fmt in (NV12, NV21):
        pairs = chroma[:stride * (height // 2)].reshape(height // 2, stride)
        first, second = pairs[r // 2, (c // 2) * 2], pairs[r // 2, (c // 2) * 2 + 1]
        u, v = (first, second) if fmt == NV12 else (second, first)
    else:
        cs, ch = stride // 2, height // 2
        u = chroma[:cs * ch].reshape(ch, cs)[r // 2, c // 2]
        v = chroma[cs * ch:2 * cs * ch].reshape(ch, cs)[r // 2, c // 2]
    return _yuv_to_rgb(luma[r, c], u, v)


def _normalization(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane mean (float32) and 1/std (a double rounded to float32)."""
    mean = (0.0, 0.0, 0.0) if mean is None else tuple(float(m) for m in mean)
    std = (1.0, 1.0, 1.0) if std is None else tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values each")
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise ValueError("mean must be finite, std finite and > 0")
    return np.array(mean, np.float32), np.array([1.0 / s for s in std], np.float32)


def letterbox_into(src, fmt: int, width: int, height: int, stride: int, out,
                   new_w: int, new_h: int, left: int, top: int, *, threads: int = 1,
                   bgr: bool = False, pad_value: int = PAD_VALUE, mean=None, std=None,
                   antialias: bool = False) -> None:
    """The resized frame at (left, top) of out (negative offsets and overhangs crop), the
    rest pad_value; each plane (v / 255 - mean) * (1 / std), planes RGB or BGR. Resized
    as OpenCV's INTER_LINEAR, or with antialias as PIL's Image.resize(BILINEAR)."""
    if not 1 <= threads <= 64:
        raise ValueError(f"threads must be in 1..64, got {threads}")
    needed = frame_nbytes(fmt, width, height, stride)
    data = np.frombuffer(src, dtype=np.uint8)
    if data.size < needed:
        raise ValueError(f"frame buffer holds {data.size} bytes, needs {needed}")
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.ndim != 3
            or out.shape[0] != 3 or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError("out must be a writable C-contiguous float32 (3, H, W) array")
    _, out_h, out_w = out.shape
    if (new_w < 1 or new_h < 1 or left >= out_w or top >= out_h
            or left + new_w <= 0 or top + new_h <= 0):
        raise ValueError("the resized image does not overlap out")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value}")
    mean32, inv_std32 = _normalization(mean, std)
    # The visible window: resized columns [vx, vx + vw) at output columns [vx + left, ...).
    vx, vy = max(0, -left), max(0, -top)
    vw, vh = min(new_w, out_w - left) - vx, min(new_h, out_h - top) - vy

    if antialias:
        rgb = _pixels(data, fmt, height, stride, np.arange(height), np.arange(width))
        value = _antialias(rgb, new_w, new_h, vx, vw, vy, vh)
    else:
        x0, x1, wx0, wx1 = (t[vx:vx + vw] for t in _column_taps(width, new_w))
        y0, y1, wy0, wy1 = (t[vy:vy + vh] for t in _row_taps(height, new_h))
        # Horizontal pass on both source rows of every output row: tap0*w0 + tap1*w1.
        h0 = (_pixels(data, fmt, height, stride, y0, x0) * wx0
              + _pixels(data, fmt, height, stride, y0, x1) * wx1)
        h1 = (_pixels(data, fmt, height, stride, y1, x0) * wx0
              + _pixels(data, fmt, height, stride, y1, x1) * wx1)
        # Vertical pass: OpenCV's 16-bit multiply-high of (row >> 4), then (sum + 2) >> 2.
        wy0, wy1 = wy0[None, :, None], wy1[None, :, None]
        value = (((wy0 * (h0 >> 4)) >> 16) + ((wy1 * (h1 >> 4)) >> 16) + 2) >> 2
        value = np.minimum(value, 255)
    if bgr:
        value = value[::-1]

    for c in range(3):
        out[c] = (np.float32(pad_value) / np.float32(255) - mean32[c]) * inv_std32[c]
        out[c, vy + top:vy + top + vh, vx + left:vx + left + vw] = (
            value[c].astype(np.float32) / np.float32(255) - mean32[c]) * inv_std32[c]
