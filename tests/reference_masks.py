"""Pure numpy reference of vasipc._fast.masks: instance masks as COCO RLE or polygons.

`process_mask_native` transcribes Ultralytics 8.4's ops.process_mask_native over the whole
frame (scale_masks' pad cut, torch's CPU bilinear in float32, crop_mask's float
comparison, logit > 0). `segment_masks` (the kernel's reference, same signature) runs it
with the logits summed over the channels in order, as the kernel sums them, so the two
agree bit for bit; with `coeffs @ protos` (BLAS's order, as torch) a pixel can differ only
where a logit is within float32 rounding of 0. The RLE string is pycocotools' rleToString,
`rle_decode` its rleFrString (the client decodes masks with this algorithm), and the
polygon OpenCV's outer-border following (Suzuki-Abe, icvFetchContour) with
CHAIN_APPROX_SIMPLE, on the largest 8-connected part found by a breadth-first fill.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable

import numpy as np

MASK_RLE = 0
MASK_POLYGON = 1


# --- the mask (Ultralytics' steps) -------------------------------------------------------------

def pad_cut(mh: int, mw: int, src_h: int, src_w: int) -> tuple[int, int, int, int]:
    """ops.scale_masks: the rows [top, bottom) and columns [left, right) kept."""
    gain = min(mh / src_h, mw / src_w)
    pad_w, pad_h = (mw - src_w * gain) / 2, (mh - src_h * gain) / 2
    top, left = round(pad_h - 0.1), round(pad_w - 0.1)
    return top, mh - round(pad_h + 0.1), left, mw - round(pad_w + 0.1)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's compute_source_index_and_lambda (align_corners=False), in float32: per output
    index, the two input taps and their weights."""
    d = np.arange(n_out)
    if n_in == n_out:
        return d, d, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (d.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, np.float32(1) - lam, lam


def upsample(maps: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """F.interpolate(maps[None], (out_h, out_w), mode="bilinear")[0] for float32 [k, h, w]:
    along x first, then along y, as torch's CPU kernel sums."""
    x0, x1, wx0, wx1 = bilinear_taps(maps.shape[2], out_w)
    y0, y1, wy0, wy1 = bilinear_taps(maps.shape[1], out_h)
    rows = maps[:, :, x0] * wx0 + maps[:, :, x1] * wx1
    return rows[:, y0, :] * wy0[:, None] + rows[:, y1, :] * wy1[:, None]


def blas_logits(protos: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """coeffs @ protos, as Ultralytics computes it (summation order: the BLAS's)."""
    c, mh, mw = protos.shape
    return (coeffs @ protos.reshape(c, -1)).reshape(-1, mh, mw)


def sequential_logits(protos: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """coeffs @ protos summed over the channels in order (the kernel's order)."""
    acc = np.zeros((coeffs.shape[0], *protos.shape[1:]), np.float32)
    for c in range(protos.shape[0]):
        acc += coeffs[:, c, None, None] * protos[c]
    return acc


def process_mask_native(protos: np.ndarray, coeffs: np.ndarray, boxes: np.ndarray, src_w: int,
                        src_h: int, logits: Callable = blas_logits) -> tuple[np.ndarray, np.ndarray]:
    """(the resized logits float32 [k, src_h, src_w], the masks bool [k, src_h, src_w])."""
    protos = np.asarray(protos, np.float32)
    maps = logits(protos, np.asarray(coeffs, np.float32))
    top, bottom, left, right = pad_cut(protos.shape[1], protos.shape[2], src_h, src_w)
    resized = upsample(maps[:, top:bottom, left:right], src_h, src_w)
    boxes = np.asarray(boxes, np.float32)
    cols = np.arange(src_w, dtype=np.float32)
    rows = np.arange(src_h, dtype=np.float32)
    inside_x = (cols >= boxes[:, 0, None]) & (cols < boxes[:, 2, None])
    inside_y = (rows >= boxes[:, 1, None]) & (rows < boxes[:, 3, None])
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    return resized, (resized > 0) & inside


# --- COCO RLE --------------------------------------------------------------------------------

def rle_counts(mask: np.ndarray) -> np.ndarray:
    """pycocotools' rleEncode: run lengths of the column-major pixels, 0s first."""
    flat = np.asarray(mask, np.uint8).T.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], edges, [flat.size])))
    return np.concatenate(([0], counts)) if flat.size and flat[0] else counts


def rle_string(counts) -> str:
    """pycocotools' rleToString: from the fourth count on, the difference with the count two
    before; 5 bits a character, low first, 0x20 = more follow, + 48."""
    out = []
    for i, count in enumerate(int(c) for c in counts):
        x = count - int(counts[i - 2]) if i > 2 else count
        while True:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
            if not more:
                break
    return "".join(out)


def rle_decode(counts: str, height: int, width: int) -> np.ndarray:
    """pycocotools' rleFrString + rleDecode: the height x width uint8 mask."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        while True:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x -= 1 << (5 * k)  # sign-extend
                break
        runs.append(x + runs[-2] if len(runs) > 2 else x)
    if sum(runs) != height * width or min(runs, default=0) < 0:
        raise ValueError(f"RLE counts do not describe a {height}x{width} mask")
    values = np.arange(len(runs), dtype=np.uint8) & 1
    return np.repeat(values, runs).reshape(width, height).T.copy()


# --- polygon ---------------------------------------------------------------------------------

_DX = (1, 1, 0, -1, -1, -1, 0, 1)  # OpenCV's chain codes: 0 = +x, 2 = up
_DY = (0, -1, -1, -1, 0, 1, 1, 1)


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of mask (ties: the first in raster order), as a bool
    mask; all False when mask is empty."""
    h, w = mask.shape
    seen = np.zeros((h, w), bool)
    best: list[tuple[int, int]] = []
    for y, x in np.argwhere(mask):
        if seen[y, x]:
            continue
        seen[y, x] = True
        part, queue = [], deque([(int(y), int(x))])
        while queue:
            cy, cx = queue.popleft()
            part.append((cy, cx))
            for ny in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx in range(max(cx - 1, 0), min(cx + 2, w)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(part) > len(best):
            best = part
    out = np.zeros((h, w), bool)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def outer_contour(part: np.ndarray) -> np.ndarray:
    """OpenCV's icvFetchContour for the outer border of the part whose first pixel in raster
    order is the first nonzero pixel of `part`, CHAIN_APPROX_SIMPLE: int [P, 2] (x, y)."""
    nz = np.argwhere(part)
    if not len(nz):
        return np.zeros((0, 2), np.int64)
    img = np.pad(part.astype(bool), 1)
    y, x = int(nz[0][0]), int(nz[0][1])

    def on(px: int, py: int, s: int) -> bool:
        return bool(img[py + 1 + _DY[s & 7], px + 1 + _DX[s & 7]])

    s = 4
    while True:
        s = (s - 1) & 7
        if on(x, y, s) or s == 4:
            break
    if s == 4:  # a single pixel
        return np.array([[x, y]])
    start, first = (x, y), (x + _DX[s], y + _DY[s])
    points, prev_s, cur = [], s ^ 4, start
    while True:
        s_search = s
        while s_search < 15:
            s_search += 1
            if on(*cur, s_search):
                break
        s = s_search & 7
        nxt = (cur[0] + _DX[s], cur[1] + _DY[s])
        if s != prev_s:
            points.append(cur)
            prev_s = s
        if nxt == start and cur == first:
            break
        cur = nxt
        s = (s + 4) & 7
    return np.array(points)


def polygon(mask: np.ndarray) -> np.ndarray:
    """float32 [P, 2] (x / w, y / h): the outer contour of the mask's largest part."""
    h, w = mask.shape
    pts = outer_contour(largest_part(mask)).astype(np.float32)
    if not len(pts):
        return np.zeros((0, 2), np.float32)
    return pts / np.array([w, h], np.float32)


# --- the kernel's reference ------------------------------------------------------------------

def segment_masks(protos, coeffs, boxes, src_w: int, src_h: int, mask_format: int) -> list:
    """Reference of vasipc._fast.masks.segment_masks (same arguments, checks and results)."""
    for name, value, ndim in (("protos", protos, 3), ("coeffs", coeffs, 2), ("boxes", boxes, 2)):
        if not isinstance(value, np.ndarray) or value.dtype != np.float32:
            raise ValueError(f"{name} must be a float32 array")
        if value.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got {value.ndim}")
    if min(protos.shape) < 1:
        raise ValueError(f"protos must be a non-empty [C, mh, mw], got {protos.shape}")
    if coeffs.shape[1] != protos.shape[0]:
        raise ValueError(f"coeffs must be [k, {protos.shape[0]}], got {coeffs.shape}")
    if boxes.shape != (coeffs.shape[0], 4):
        raise ValueError(f"boxes must be [{coeffs.shape[0]}, 4], got {boxes.shape}")
    src_w, src_h, mask_format = (operator.index(v) for v in (src_w, src_h, mask_format))
    if src_w < 1 or src_h < 1:
        raise ValueError(f"source size must be positive, got {src_w}x{src_h}")
    if mask_format not in (MASK_RLE, MASK_POLYGON):
        raise ValueError(f"unknown mask_format {mask_format}")
    if not np.isfinite(boxes).all():
        raise ValueError("boxes must be finite")
    top, bottom, left, right = pad_cut(protos.shape[1], protos.shape[2], src_h, src_w)
    if top < 0 or left < 0 or bottom <= top or right <= left:
        raise ValueError("the frame leaves no prototype row or column once the pad is cut")
    if not len(coeffs):
        return []
    _, masks = process_mask_native(protos, coeffs, boxes, src_w, src_h, sequential_logits)
    if mask_format == MASK_RLE:
        return [rle_string(rle_counts(m)) for m in masks]
    return [polygon(m) for m in masks]
