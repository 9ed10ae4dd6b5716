"""Instance masks (vasipc._fast.masks): Ultralytics 8.4's native-resolution masks as COCO RLE
strings or polygons.

`_MaskBehaviour` runs against the compiled kernel and the numpy reference
(tests/reference_masks.py). The oracles: a plain numpy transcription of Ultralytics'
process_mask_native over the whole frame with `coeffs @ protos` (equal pixel for pixel
except where a logit is within float32 rounding of 0: the sum over the 32 channels is
ordered differently; such ties are bounded below), pycocotools for the RLE strings, and
cv2.connectedComponents + cv2.findContours for the polygons. The transcription's bilinear
resize is itself checked against cv2.resize.
"""

from __future__ import annotations

import types
from typing import ClassVar

import numpy as np
import pytest
import reference_masks
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vasipc._fast import masks as compiled

cv2 = pytest.importorskip("cv2")
coco = pytest.importorskip("pycocotools.mask")

# pycocotools' decode on numpy 2 (its own array wrapper), nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# A logit this close to 0 may land on either side depending on the summation order.
TIE = 1e-4


def random_case(seed: int, src_w: int, src_h: int, k: int = 6, mh: int = 160, mw: int = 160,
                channels: int = 32):
    """protos, coeffs and k boxes (one whole-frame box, one at the bottom-right corner, the
    rest random), float32."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((channels, mh, mw)).astype(np.float32)
    coeffs = (rng.standard_normal((k, channels)) * 0.3).astype(np.float32)
    x = np.sort(rng.uniform(0, src_w, (k, 2)), axis=1)
    y = np.sort(rng.uniform(0, src_h, (k, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.float32)
    boxes[0] = [0, 0, src_w, src_h]
    boxes[1] = [src_w * 0.6, src_h * 0.55, src_w, src_h]
    return protos, coeffs, boxes


def ultralytics_masks(protos, coeffs, boxes, src_w, src_h):
    """(resized logits, masks) as Ultralytics computes them (BLAS matmul)."""
    return reference_masks.process_mask_native(protos, coeffs, boxes, src_w, src_h)


def assert_same_but_ties(got: np.ndarray, expected: np.ndarray, logits: np.ndarray) -> None:
    differ = got.astype(bool) != expected
    assert np.all(np.abs(logits[differ]) < TIE), np.abs(logits[differ]).max()
    assert differ.sum() <= max(2, expected.size // 10000)


def opencv_polygon(mask: np.ndarray) -> np.ndarray:
    """The outer contour of the largest 8-connected part (ties: first in raster order)."""
    h, w = mask.shape
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n == 1:
        return np.zeros((0, 2), np.float32)
    sizes = np.bincount(labels.ravel(), minlength=n)[1:]
    first = np.full(n - 1, labels.size)
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    np.minimum.at(first, flat[nz] - 1, nz)
    best = min(np.flatnonzero(sizes == sizes.max()), key=lambda i: first[i]) + 1
    contours, _ = cv2.findContours((labels == best).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    assert len(contours) == 1
    return contours[0].reshape(-1, 2).astype(np.float32) / np.array([w, h], np.float32)


GEOMETRIES = [(1280, 720), (720, 1280), (333, 517), (640, 640), (1001, 999), (97, 61)]


class _MaskBehaviour:
    impl: ClassVar[types.ModuleType]

    def rle(self, protos, coeffs, boxes, w, h):
        return self.impl.segment_masks(protos, coeffs, boxes, w, h, self.impl.MASK_RLE)

    def polygon(self, protos, coeffs, boxes, w, h):
        return self.impl.segment_masks(protos, coeffs, boxes, w, h, self.impl.MASK_POLYGON)

    def test_constants(self) -> None:
        assert (self.impl.MASK_RLE, self.impl.MASK_POLYGON) == (0, 1)

    # the masks: Ultralytics' pixels, pycocotools' strings
    @pytest.mark.slow
    @pytest.mark.parametrize(("w", "h"), GEOMETRIES)
    def test_rle_matches_ultralytics(self, w: int, h: int) -> None:
        protos, coeffs, boxes = random_case(w * 7 + h, w, h)
        got = self.rle(protos, coeffs, boxes, w, h)
        logits, expected = ultralytics_masks(protos, coeffs, boxes, w, h)
        assert len(got) == len(boxes) and all(isinstance(s, str) for s in got)
        for s, mask, logit in zip(got, expected, logits, strict=True):
            decoded = coco.decode({"size": [h, w], "counts": s})
            assert decoded.shape == (h, w)
            assert_same_but_ties(decoded, mask, logit)
            # the string is pycocotools' own for that mask
            assert coco.encode(np.asfortranarray(decoded))["counts"].decode() == s
            np.testing.assert_array_equal(reference_masks.rle_decode(s, h, w), decoded)
        assert sum(coco.decode({"size": [h, w], "counts": s}).sum() for s in got) > 0

    @pytest.mark.parametrize(("w", "h"), GEOMETRIES[:4])
    def test_rle_strings_equal_the_reference(self, w: int, h: int) -> None:
        protos, coeffs, boxes = random_case(w + h, w, h)
        assert self.rle(protos, coeffs, boxes, w, h) == reference_masks.segment_masks(
            protos, coeffs, boxes, w, h, reference_masks.MASK_RLE)

    @pytest.mark.parametrize(("w", "h"), [(320, 180), (180, 320), (333, 517), (97, 61)])
    def test_polygon_matches_opencv(self, w: int, h: int) -> None:
        protos, coeffs, boxes = random_case(w * 3 + h, w, h)
        got = self.polygon(protos, coeffs, boxes, w, h)
        _, masks = reference_masks.process_mask_native(protos, coeffs, boxes, w, h,
                                                       reference_masks.sequential_logits)
        for points, mask in zip(got, masks, strict=True):
            assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 2
            np.testing.assert_array_equal(points, opencv_polygon(mask))
        assert sum(len(p) for p in got) > 20

    # edges
    def test_empty_boxes(self) -> None:
        protos, coeffs, _ = random_case(1, 64, 48, k=4)
        boxes = np.array([[10, 10, 10, 30], [5, 7, 20, 7], [30.2, 10, 30.9, 20],
                          [64, 0, 64, 48]], np.float32)
        for s in self.rle(protos, coeffs, boxes, 64, 48):
            assert s == reference_masks.rle_string([64 * 48])
            assert coco.decode({"size": [48, 64], "counts": s}).sum() == 0
        for points in self.polygon(protos, coeffs, boxes, 64, 48):
            assert points.shape == (0, 2) and points.dtype == np.float32

    def test_no_detections(self) -> None:
        protos, _, _ = random_case(2, 64, 48)
        empty = np.zeros((0, 32), np.float32)
        assert self.rle(protos, empty, np.zeros((0, 4), np.float32), 64, 48) == []
        assert self.polygon(protos, empty, np.zeros((0, 4), np.float32), 64, 48) == []

    def test_one_pixel_boxes(self) -> None:
        # One prototype, all positive: the mask is the box's pixels exactly.
        protos = np.ones((1, 16, 16), np.float32)
        coeffs = np.ones((4, 1), np.float32)
        boxes = np.array([[3, 4, 4, 5], [10.2, 10.2, 11.2, 11.2], [10.2, 10.2, 11.0, 11.0],
                          [63, 63, 64, 64]], np.float32)
        got = [coco.decode({"size": [64, 64], "counts": s}) for s in self.rle(protos, coeffs, boxes, 64, 64)]
        assert [np.argwhere(m).tolist() for m in got] == [[[4, 3]], [[11, 11]], [], [[63, 63]]]
        polys = self.polygon(protos, coeffs, boxes, 64, 64)
        assert [p.tolist() for p in polys] == [[[3 / 64, 4 / 64]], [[11 / 64, 11 / 64]], [],
                                               [[63 / 64, 63 / 64]]]

    def test_boxes_at_frame_edges(self) -> None:
        # Whole columns (a run of 1s crossing column ends), the last pixel set, the first.
        protos = np.ones((1, 8, 8), np.float32)
        coeffs = np.ones((4, 1), np.float32)
        boxes = np.array([[0, 0, 32, 32], [5, 0, 9, 32], [20, 3, 32, 32], [0, 0, 2, 1]],
                         np.float32)
        for s, box in zip(self.rle(protos, coeffs, boxes, 32, 32), boxes.astype(int), strict=True):
            expected = np.zeros((32, 32), np.uint8)
            expected[box[1]:box[3], box[0]:box[2]] = 1
            np.testing.assert_array_equal(coco.decode({"size": [32, 32], "counts": s}), expected)
            assert s == coco.encode(np.asfortranarray(expected))["counts"].decode()
        rect = self.polygon(protos, coeffs[:1], boxes[:1], 32, 32)[0] * 32
        assert rect.tolist() == [[0, 0], [0, 31], [31, 31], [31, 0]]

    def test_holes_and_several_parts(self) -> None:
        # One prototype drawn directly: a ring (with its hole) and a larger square blob;
        # the polygon is the blob's outline, the RLE keeps every part and the hole.
        logit = -np.ones((40, 40), np.float32)
        yy, xx = np.mgrid[:40, :40]
        r = np.hypot(yy - 12, xx - 12)
        logit[(r > 4) & (r < 8)] = 1
        logit[22:38, 22:38] = 1
        logit[2:4, 30:32] = 1
        protos, coeffs = logit[None], np.ones((1, 1), np.float32)
        boxes = np.array([[0, 0, 160, 160]], np.float32)
        s = self.rle(protos, coeffs, boxes, 160, 160)[0]
        decoded = coco.decode({"size": [160, 160], "counts": s})
        logits, expected = ultralytics_masks(protos, coeffs, boxes, 160, 160)
        assert_same_but_ties(decoded, expected[0], logits[0])
        n, _ = cv2.connectedComponents(decoded, connectivity=8)
        assert n == 4 and decoded[48, 48] == 0  # three parts, and the ring's hole
        points = self.polygon(protos, coeffs, boxes, 160, 160)[0]
        np.testing.assert_array_equal(points, opencv_polygon(decoded))
        assert points.min() * 160 > 80  # the blob, not the ring

    def test_touching_diagonally_is_one_part(self) -> None:
        logit = -np.ones((6, 6), np.float32)
        logit[[1, 2, 3, 4], [1, 2, 3, 4]] = 1
        logit[1, 4] = 1
        protos = logit[None]
        got = self.polygon(protos, np.ones((1, 1), np.float32),
                           np.array([[0, 0, 6, 6]], np.float32), 6, 6)[0]
        expected = opencv_polygon(logit > 0)
        np.testing.assert_array_equal(got, expected)
        assert len(got) == 2  # a diagonal line: its two ends

    def test_positive_logits_whose_products_underflow(self) -> None:
        # Every logit the smallest positive float32; a 2x2 map to 3x3 puts lambda = 0.5
        # on the middle row and column, where x * 0.5 rounds to 0 on both taps: all four
        # corners > 0, yet those pixels are not set.
        tiny = np.float32(2.0**-149)
        protos = np.full((1, 2, 2), tiny, np.float32)
        boxes = np.array([[0, 0, 3, 3]], np.float32)
        s = self.rle(protos, np.ones((1, 1), np.float32), boxes, 3, 3)[0]
        expected = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1]], np.uint8)
        np.testing.assert_array_equal(coco.decode({"size": [3, 3], "counts": s}), expected)
        _, masks = ultralytics_masks(protos, np.ones((1, 1), np.float32), boxes, 3, 3)
        np.testing.assert_array_equal(masks[0], expected)

    def test_equal_parts_the_first_in_raster_order(self) -> None:
        # Two equal squares: the top-right one comes first in raster order, the
        # bottom-left one first column by column; the polygon is the top-right one.
        logit = -np.ones((24, 36), np.float32)
        logit[2:6, 30:34] = 1
        logit[18:22, 2:6] = 1
        got = self.polygon(logit[None], np.ones((1, 1), np.float32),
                           np.array([[0, 0, 36, 24]], np.float32), 36, 24)[0]
        np.testing.assert_array_equal(got, opencv_polygon(logit > 0))
        assert got[:, 0].min() * 36 == 30

    @pytest.mark.parametrize(("w", "h", "cut"), [
        (1280, 720, (35, 125, 0, 160)), (720, 1280, (0, 160, 35, 125)),
        (1000, 333, (53, 107, 0, 160)), (160, 160, (0, 160, 0, 160))])
    def test_letterbox_pad_is_cut(self, w: int, h: int, cut) -> None:
        assert reference_masks.pad_cut(160, 160, h, w) == cut
        # Huge logits in the pad: none may leak into the frame.
        top, bottom, left, right = cut
        protos = np.full((1, 160, 160), 1e6, np.float32)
        protos[0, top:bottom, left:right] = -1
        protos[0, (top + bottom) // 2, (left + right) // 2] = 1
        boxes = np.array([[0, 0, w, h]], np.float32)
        s = self.rle(protos, np.ones((1, 1), np.float32), boxes, w, h)[0]
        decoded = coco.decode({"size": [h, w], "counts": s})
        _, expected = ultralytics_masks(protos, np.ones((1, 1), np.float32), boxes, w, h)
        np.testing.assert_array_equal(decoded, expected[0])
        ys, xs = np.nonzero(decoded)
        assert 0 < len(ys) < 200 and abs(ys.mean() - h / 2) < h / 40 and abs(xs.mean() - w / 2) < w / 40

    def test_frame_smaller_than_the_prototypes(self) -> None:
        protos, coeffs, boxes = random_case(5, 50, 30, mh=64, mw=96)
        got = self.rle(protos, coeffs, boxes, 50, 30)
        logits, expected = ultralytics_masks(protos, coeffs, boxes, 50, 30)
        for s, mask, logit in zip(got, expected, logits, strict=True):
            assert_same_but_ties(coco.decode({"size": [30, 50], "counts": s}), mask, logit)

    def test_any_strides(self) -> None:
        protos, coeffs, boxes = random_case(9, 200, 120, k=4, channels=8, mh=32, mw=48)
        expected_rle = self.rle(protos, coeffs, boxes, 200, 120)
        expected_poly = self.polygon(protos, coeffs, boxes, 200, 120)
        wide = np.zeros((8, 64, 96), np.float32)
        wide[:, ::2, ::2] = protos
        readonly = protos.copy()
        readonly.flags.writeable = False
        for p, c, b in [(np.asfortranarray(protos), np.asfortranarray(coeffs), np.asfortranarray(boxes)),
                        (wide[:, ::2, ::2], np.ascontiguousarray(coeffs.T).T, boxes[::-1][::-1]),
                        (readonly, coeffs, boxes),
                        (np.ascontiguousarray(protos[::-1])[::-1], coeffs, boxes)]:
            assert self.rle(p, c, b, 200, 120) == expected_rle
            for a, e in zip(self.polygon(p, c, b, 200, 120), expected_poly, strict=True):
                np.testing.assert_array_equal(a, e)

    # argument checks
    @pytest.mark.parametrize(("protos", "coeffs", "boxes"), [
        (np.zeros((4, 8, 8), np.float64), np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)),
        (np.zeros((8, 8), np.float32), np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)),
        (np.zeros((4, 8, 8), np.float32), np.zeros((1, 5), np.float32), np.zeros((1, 4), np.float32)),
        (np.zeros((4, 8, 8), np.float32), np.zeros(4, np.float32), np.zeros((1, 4), np.float32)),
        (np.zeros((4, 8, 8), np.float32), np.zeros((2, 4), np.float32), np.zeros((1, 4), np.float32)),
        (np.zeros((4, 8, 8), np.float32), np.zeros((1, 4), np.float32), np.zeros((1, 5), np.float32)),
        (np.zeros((0, 8, 8), np.float32), np.zeros((1, 0), np.float32), np.zeros((1, 4), np.float32)),
        (np.zeros((4, 0, 8), np.float32), np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)),
    ])
    def test_bad_arrays(self, protos, coeffs, boxes) -> None:
        with pytest.raises((ValueError, TypeError)):
            self.impl.segment_masks(protos, coeffs, boxes, 64, 64, self.impl.MASK_RLE)

    def test_bad_values(self) -> None:
        protos = np.zeros((4, 8, 8), np.float32)
        coeffs = np.zeros((1, 4), np.float32)
        boxes = np.array([[1, 1, 5, 5]], np.float32)
        run = self.impl.segment_masks
        for w, h in [(0, 64), (64, -1)]:
            with pytest.raises(ValueError, match="positive"):
                run(protos, coeffs, boxes, w, h, self.impl.MASK_RLE)
        for fmt in (2, -1):
            with pytest.raises(ValueError, match="mask_format"):
                run(protos, coeffs, boxes, 64, 64, fmt)
        for bad in (np.nan, np.inf):
            b = boxes.copy()
            b[0, 2] = bad
            with pytest.raises(ValueError, match="finite"):
                run(protos, coeffs, b, 64, 64, self.impl.MASK_POLYGON)
        with pytest.raises(ValueError, match="prototype row"):  # nothing left after the cut
            run(protos, coeffs, boxes, 1000, 1, self.impl.MASK_RLE)


class TestCompiledMasks(_MaskBehaviour):
    impl = compiled


@pytest.mark.slow  # a slow numpy reference; the compiled kernel runs the same checks fast
class TestReferenceMasks(_MaskBehaviour):
    impl = reference_masks


# --- the oracles' own checks -----------------------------------------------------------------

@pytest.mark.parametrize(("src", "dst"), [((90, 160), (720, 1280)), ((160, 90), (517, 333)),
                                          ((64, 96), (30, 50)), ((7, 5), (7, 5))])
def test_transcribed_bilinear_is_opencvs(src, dst) -> None:
    """torch's and OpenCV's bilinear (half-pixel centres, edges clamped) agree up to
    rounding: an independent check of the transcription's taps."""
    maps = np.random.default_rng(4).standard_normal((1, *src)).astype(np.float32)
    ours = reference_masks.upsample(maps, *dst)[0]
    theirs = cv2.resize(maps[0], dst[::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # OpenCV rounds its weights


def test_rle_string_and_decode_are_pycocotools() -> None:
    rng = np.random.default_rng(11)
    for h, w in [(1, 1), (3, 5), (40, 31), (300, 200)]:
        for density in (0.0, 0.05, 0.5, 1.0):
            mask = (rng.random((h, w)) < density).astype(np.uint8)
            s = reference_masks.rle_string(reference_masks.rle_counts(mask))
            assert s == coco.encode(np.asfortranarray(mask))["counts"].decode()
            np.testing.assert_array_equal(reference_masks.rle_decode(s, h, w), mask)


# --- compiled == reference, whatever the input -----------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), w=st.integers(1, 90), h=st.integers(1, 90),
       mh=st.integers(1, 24), mw=st.integers(1, 24), k=st.integers(0, 4),
       channels=st.integers(1, 6), fmt=st.sampled_from([0, 1]))
def test_compiled_equals_reference(seed, w, h, mh, mw, k, channels, fmt) -> None:
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((channels, mh, mw)).astype(np.float32)
    coeffs = rng.standard_normal((k, channels)).astype(np.float32)
    boxes = rng.uniform(-5, max(w, h) + 5, (k, 4)).astype(np.float32)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])  # some boxes empty, some off-frame
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
    try:
        reference_masks.segment_masks(protos, coeffs, boxes, w, h, fmt)
    except ValueError:  # an aspect that leaves no prototype row or column
        with pytest.raises(ValueError):
            compiled.segment_masks(protos, coeffs, boxes, w, h, fmt)
        return
    assert_compiled_is_reference(protos, coeffs, boxes, w, h, formats=(fmt,))


# --- the kernel's shortcuts are exact ------------------------------------------------------------
# The kernel decides whole blocks of pixels (one 2x2 cell neighbourhood) and column
# stretches from their corner logits, and evaluates pixel by pixel only where the sign
# changes (mask_kernel.c, classify() and stretch_flips()). These cases aim at where such a
# shortcut could go wrong: logits at and around 0 (signed zeros, subnormals whose
# products underflow), huge and infinite ones (inf * 0 is NaN), NaN, large upscales
# (long stretches), downscales, fractional box edges.

F32 = np.finfo(np.float32)
SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 2.0**-100, -(2.0**-100), 2.0**-101,
                    1e-30, -1e-30, 1.0, -1.0, 1e30, -1e30, 2.0**100, F32.max, -F32.max, np.inf,
                    -np.inf, np.nan], np.float32)


def assert_compiled_is_reference(protos, coeffs, boxes, w: int, h: int, formats=(0, 1)) -> None:
    with np.errstate(all="ignore"):  # inf * 0 and overflow in the reference, as in the C
        for fmt in formats:
            expected = reference_masks.segment_masks(protos, coeffs, boxes, w, h, fmt)
            got = compiled.segment_masks(protos, coeffs, boxes, w, h, fmt)
            if fmt == reference_masks.MASK_RLE:
                assert got == expected
            else:
                for a, e in zip(got, expected, strict=True):
                    np.testing.assert_array_equal(a, e)


def fractional_boxes(rng, k: int, w: int, h: int) -> np.ndarray:
    """k boxes with fractional edges, the first the whole frame, one past its edges."""
    x = np.sort(rng.uniform(-3, w + 3, (k, 2)), axis=1)
    y = np.sort(rng.uniform(-3, h + 3, (k, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.float32)
    boxes[0] = [0, 0, w, h]
    return boxes


@pytest.mark.slow
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), w=st.integers(1, 160), h=st.integers(1, 160),
       mh=st.integers(1, 12), mw=st.integers(1, 12), special=st.floats(0, 1))
def test_special_logits_compiled_equals_reference(seed, w, h, mh, mw, special) -> None:
    """One prototype, coefficient 1: the logits are the drawn values exactly, a mix of
    special values and ordinary ones in any pattern, upscaled up to 160x or downscaled."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((1, mh, mw)).astype(np.float32)
    pick = rng.random((1, mh, mw)) < special
    protos[pick] = rng.choice(SPECIAL, int(pick.sum()))
    top, bottom, left, right = reference_masks.pad_cut(mh, mw, h, w)
    assume(0 <= top < bottom and 0 <= left < right)  # the aspect leaves a row and a column
    assert_compiled_is_reference(protos, np.ones((4, 1), np.float32),
                                 fractional_boxes(rng, 4, w, h), w, h)


@pytest.mark.parametrize(("w", "h", "mh", "mw"), [
    (1920, 1080, 80, 80), (640, 360, 20, 20), (333, 517, 24, 40), (50, 30, 64, 96),
    (160, 160, 160, 160), (1001, 999, 7, 9)])
@pytest.mark.parametrize("scale", [1.0, 1e-39], ids=["ordinary", "subnormal"])
def test_near_zero_logits_compiled_equals_reference(w, h, mh, mw, scale) -> None:
    """Smooth and noisy prototypes whose logits cross 0 often, at scales up (24x, 32x) and
    down, the logits ordinary or subnormal (products underflow to 0); RLE on the whole
    frame, polygons where the reference's tracing is quick enough."""
    rng = np.random.default_rng(w + mh)
    noise = rng.standard_normal((8, mh, mw)).astype(np.float32)
    protos = np.stack([cv2.GaussianBlur(p, (0, 0), 1.5) for p in noise]) + noise * np.float32(0.2)
    coeffs = (rng.standard_normal((5, 8)) * scale).astype(np.float32)
    boxes = fractional_boxes(rng, 5, w, h)
    assert_compiled_is_reference(protos, coeffs, boxes, w, h, formats=(0,))
    _, masks = reference_masks.process_mask_native(protos, coeffs, boxes, w, h,
                                                   reference_masks.sequential_logits)
    assert masks.any()
    if w * h <= 400_000:
        for points, mask in zip(compiled.segment_masks(protos, coeffs, boxes, w, h, 1), masks,
                                strict=True):
            np.testing.assert_array_equal(points, opencv_polygon(mask))


@pytest.mark.slow
@pytest.mark.parametrize("w", [1, 7, 8, 9, 63, 64, 65, 129])
@pytest.mark.parametrize(("mh", "mw"), [(1, 3), (3, 5), (40, 40)], ids=["one-row", "upscale", "downscale"])
def test_chunk_and_lane_edges_compiled_equals_reference(w: int, mh: int, mw: int) -> None:
    """The kernel classifies columns 64 at a time, 8 lanes at once, and carries a run of
    1s from a column's end into the next when the box spans whole columns: widths around
    those boundaries, stretches up to 300 rows long (a single prototype row) or a row
    each (downscaled), masks mostly set (runs crossing column ends) or half set."""
    h = 37 if mh == 40 else (300 if w > 60 else 3 * w)
    top, bottom, left, right = reference_masks.pad_cut(mh, mw, h, w)
    assert 0 <= top < bottom and 0 <= left < right
    rng = np.random.default_rng(w * 1000 + mh)
    protos = rng.standard_normal((3, mh, mw)).astype(np.float32)
    protos[:, :, : max(1, mw - 1)] = np.abs(protos[:, :, : max(1, mw - 1)])
    coeffs = rng.standard_normal((4, 3)).astype(np.float32)
    coeffs[1] = np.abs(coeffs[1])  # set but where the last prototype column weighs in
    boxes = fractional_boxes(rng, 4, w, h)
    boxes[1] = [0, 0, w, h]
    assert_compiled_is_reference(protos, coeffs, boxes, w, h)
