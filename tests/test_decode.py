"""The detection decoder (vasipc._fast.decode): every layout, score mode and NMS.

`_DecodeBehaviour` runs against the compiled module and the numpy reference
(tests/reference_decode.py, which exposes the same names). The raw YOLO layout must give
the same detections as an independent pipeline, numpy + cv2.dnn.NMSBoxesBatched, on real
outputs (nudenet's 320n.onnx, a trained YOLOv8n, on the astronaut photo) and on a stress
case with thousands of heavily overlapping candidates; rotated NMS must keep the same set
as a vectorized numpy port of Ultralytics' ProbIoU fast NMS on 2,000 overlapping
candidates. Then each layout and mode, the edge cases, the argument checks, and a
Hypothesis property: compiled == reference on random inputs in every mode.
"""

from __future__ import annotations

import ast
import math
import types
from typing import ClassVar

import numpy as np
import pytest
import reference_decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vasipc._fast import decode

cv2 = pytest.importorskip("cv2")

FACE_FEMALE = 1
GEOM = (0.5, 0.5, 0.0, 140.0, 1280, 720)  # scale_x, scale_y, pad_left, pad_top, src_w, src_h
UNIT = (1.0, 1.0, 0.0, 0.0, 400, 400)


def mask_of(ids, nc: int) -> np.ndarray:
    mask = np.zeros(nc, np.uint8)
    mask[np.asarray(ids, np.int64)] = 1
    return mask


def assert_same_detections(got, expected, atol: float = 1e-5) -> None:
    boxes, scores, class_ids = got[:3]
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert class_ids.dtype == np.int32 and got.rows.dtype == np.int32
    assert boxes.shape == (len(scores), 4) and class_ids.shape == scores.shape
    np.testing.assert_array_equal(class_ids, expected[2])
    np.testing.assert_allclose(scores, expected[1], rtol=0, atol=atol)
    np.testing.assert_allclose(boxes, expected[0], rtol=0, atol=atol)
    if len(expected) > 3:
        np.testing.assert_array_equal(got.rows, expected[3])
    assert np.all(np.diff(scores) <= 0)                   # score descending
    assert np.all(boxes >= 0) and np.all(boxes <= 1)
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])


def assert_equal_decoded(got, expected, corners_tol: float = 0.0) -> None:
    """Bit-equal, except the rotated corners (cos/sin of the platform's libm and numpy's)."""
    for name in ("scores", "class_ids", "rows"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    if got.rotated is None:
        assert expected.rotated is None and expected.corners is None and got.corners is None
        np.testing.assert_array_equal(got.boxes, expected.boxes)
        return
    np.testing.assert_array_equal(got.rotated, expected.rotated)
    np.testing.assert_allclose(got.corners, expected.corners, rtol=corners_tol, atol=corners_tol)
    np.testing.assert_allclose(got.boxes, expected.boxes, rtol=corners_tol, atol=corners_tol)


# --- inputs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nudenet_output(nudenet_model: str, astronaut_rgb: np.ndarray):
    """(pred [N, 22] for the astronaut letterboxed to 320, geometry, class names)."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(nudenet_model, providers=["CPUExecutionProvider"])
    names = ast.literal_eval(session.get_modelmeta().custom_metadata_map["names"])
    h, w = astronaut_rgb.shape[:2]
    r = min(320 / w, 320 / h)
    new_w, new_h = round(w * r), round(h * r)
    left, top = round((320 - new_w) / 2 - 0.1), round((320 - new_h) / 2 - 0.1)
    resized = cv2.resize(astronaut_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    padded = cv2.copyMakeBorder(resized, top, 320 - new_h - top, left, 320 - new_w - left,
                                cv2.BORDER_CONSTANT, value=(114, 114, 114))
    x = np.ascontiguousarray((padded.astype(np.float32) / 255).transpose(2, 0, 1))[None]
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert out.shape[:2] == (1, 4 + len(names))
    return out[0].T, (r, r, left, top, w, h), names


def stress(**kw) -> np.ndarray:
    return reference_decode.stress_prediction(**kw).T  # [N, 4 + nc], a strided view


def opencv(pred, conf=0.25, iou=0.45, max_det=300, mask=None, geom=GEOM):
    return reference_decode.opencv_decode(pred, conf, iou, max_det, mask, *geom)


class _DecodeBehaviour:
    mod: ClassVar[types.ModuleType]

    def layout(self, **kw):
        return self.mod.DecodeLayout(**kw)

    def decode(self, layout, pred, conf=0.25, iou=0.45, max_det=300, mask=None, geom=GEOM):
        return self.mod.decode_detections(layout, pred, conf, iou, max_det, mask, *geom)

    def run(self, pred, conf=0.25, iou=0.45, max_det=300, classes=None, geom=GEOM):
        """The raw YOLO detect layout: [N, 4 + nc], best class, per-class NMS."""
        nc = pred.shape[1] - 4
        layout = self.layout(num_fields=pred.shape[1], num_classes=nc)
        mask = None if classes is None else mask_of(classes, nc)
        return self.decode(layout, pred, conf, iou, max_det, mask, geom)

    # real model output
    @pytest.mark.parametrize("conf", [0.25, 0.05])
    def test_nudenet_matches_opencv(self, nudenet_output, conf: float) -> None:
        pred, geom, names = nudenet_output
        got = self.run(pred, conf=conf, geom=geom)
        assert_same_detections(got, opencv(pred, conf, geom=geom))
        assert got.rotated is None and got.corners is None
        assert FACE_FEMALE in got.class_ids.tolist() and names[FACE_FEMALE] == "FACE_FEMALE"
        if conf == 0.25:
            face = got.boxes[got.class_ids.tolist().index(FACE_FEMALE)]
            # The astronaut's face sits in the upper middle of the photo.
            assert 0.3 < (face[0] + face[2]) / 2 < 0.7 and (face[1] + face[3]) / 2 < 0.45

    def test_nudenet_class_filter(self, nudenet_output) -> None:
        pred, geom, _ = nudenet_output
        got = self.run(pred, conf=0.05, classes=[FACE_FEMALE, 12], geom=geom)
        assert set(got.class_ids.tolist()) <= {FACE_FEMALE, 12} and FACE_FEMALE in got.class_ids
        assert_same_detections(got, opencv(pred, 0.05, mask=mask_of([1, 12], 18), geom=geom))

    # stress
    @pytest.mark.parametrize(("conf", "iou", "max_det"), [
        (0.05, 0.45, 300), (0.0, 0.7, 10000), (0.3, 0.1, 50)])
    def test_stress_matches_opencv(self, conf: float, iou: float, max_det: int) -> None:
        pred = stress()
        assert int((pred[:, 4:].max(axis=1) >= conf).sum()) > 1000
        got = self.run(pred, conf=conf, iou=iou, max_det=max_det)
        assert_same_detections(got, opencv(pred, conf, iou, max_det))
        assert 0 < len(got.scores) <= max_det

    def test_stress_with_classes(self) -> None:
        pred = stress(seed=8)
        classes = [0, 3, 5, 11, 79]
        got = self.run(pred, conf=0.05, classes=classes)
        assert set(got.class_ids.tolist()) <= set(classes)
        assert_same_detections(got, opencv(pred, 0.05, mask=mask_of(classes, 80)))

    def test_rows_are_the_candidates(self) -> None:
        pred = stress()
        got = self.run(pred, conf=0.05)
        np.testing.assert_array_equal(got.scores, pred[got.rows, 4:].max(axis=1))
        np.testing.assert_array_equal(got.class_ids, pred[got.rows, 4:].argmax(axis=1))

    # edges
    def test_no_candidates(self) -> None:
        got = self.run(stress(), conf=1.5)
        assert got.boxes.shape == (0, 4) and got.scores.shape == (0,) and got.rows.shape == (0,)
        assert got.boxes.dtype == np.float32 and got.class_ids.dtype == np.int32

    def test_zero_rows_and_zero_max_detections(self) -> None:
        assert self.run(np.zeros((0, 6), np.float32)).boxes.shape == (0, 4)
        assert len(self.run(stress(), max_det=0).scores) == 0

    def test_empty_mask_keeps_nothing(self) -> None:
        assert len(self.run(stress(), conf=0.0, classes=[]).scores) == 0

    def test_class_filter_uses_best_class_before_nms(self) -> None:
        # Row 0: best class 1 (0.9), class 0 at 0.8. Row 1: class 0 at 0.5, elsewhere.
        pred = np.zeros((2, 6), np.float32)
        pred[0] = [100, 100, 50, 50, 0.8, 0.9]
        pred[1] = [300, 300, 50, 50, 0.5, 0.1]
        got = self.run(pred, classes=[0], max_det=1)
        # Row 0 is not re-labelled class 0, and the filter runs before max_detections.
        assert got.class_ids.tolist() == [0] and got.scores.tolist() == [0.5]
        assert got.rows.tolist() == [1]
        got = self.run(pred, classes=None, max_det=1)
        assert got.class_ids.tolist() == [1] and got.scores.tolist() == [pytest.approx(0.9)]

    def test_single_class(self) -> None:
        pred = np.array([[10, 10, 8, 8, 0.9], [12, 10, 8, 8, 0.8], [200, 200, 20, 20, 0.3]],
                        np.float32)
        got = self.run(pred, geom=UNIT)
        assert got.class_ids.tolist() == [0, 0] and got.rows.tolist() == [0, 2]
        np.testing.assert_allclose(got.scores, [0.9, 0.3], rtol=1e-6)
        np.testing.assert_allclose(got.boxes[0], [6 / 400, 6 / 400, 14 / 400, 14 / 400], rtol=1e-5)

    def test_ties_first_max_and_lower_row_first(self) -> None:
        # Three identical boxes with identical scores: the lowest row survives; class
        # ties (two classes at the same score) go to the lower class id.
        pred = np.zeros((5, 7), np.float32)
        pred[:, :4] = [[100, 100, 40, 40]] * 3 + [[300, 300, 40, 40]] * 2
        pred[:3, 4:] = [0.0, 0.6, 0.6]
        pred[3:, 4:] = [0.7, 0.0, 0.0]
        got = self.run(pred, geom=UNIT)
        assert got.class_ids.tolist() == [0, 1] and got.rows.tolist() == [3, 0]
        np.testing.assert_allclose(got.boxes[0], [280 / 400, 280 / 400, 320 / 400, 320 / 400])
        # Non-overlapping equal scores come out in row order.
        pred = np.zeros((4, 5), np.float32)
        pred[:, 0] = [300, 100, 200, 0]
        pred[:, 1:4] = [10, 8, 8]
        pred[:, 4] = 0.5
        got = self.run(pred, geom=UNIT)
        assert got.rows.tolist() == [0, 1, 2, 3]

    def test_iou_strictly_greater_suppresses(self) -> None:
        # [0,0,10,10] vs [0,0,10,5]: IoU exactly 0.5.
        pred = np.array([[5, 5, 10, 10, 0.9], [5, 2.5, 10, 5, 0.8]], np.float32)
        geom = (1, 1, 0, 0, 10, 10)
        assert len(self.run(pred, iou=0.5, geom=geom).scores) == 2
        assert len(self.run(pred, iou=0.49, geom=geom).scores) == 1

    def test_classes_do_not_suppress_each_other(self) -> None:
        pred = np.array([[50, 50, 20, 20, 0.9, 0.1], [50, 50, 20, 20, 0.1, 0.8]], np.float32)
        assert self.run(pred).class_ids.tolist() == [0, 1]

    def test_max_detections_keeps_the_best(self) -> None:
        pred = stress()
        full = self.run(pred, conf=0.05, max_det=10000)
        top = self.run(pred, conf=0.05, max_det=17)
        assert len(top.scores) == 17
        for a, b in zip(top[:4], full[:4], strict=True):
            np.testing.assert_array_equal(a, b[:17])

    def test_unletterbox_and_clip(self) -> None:
        # 1280x720 in 640x640: scale 0.5, top 140. A box reaching into the padding clips.
        pred = np.array([[320, 320, 100, 50, 0.9], [20, 150, 60, 40, 0.8]], np.float32)
        got = self.run(pred, geom=GEOM)
        np.testing.assert_allclose(got.boxes[0], [540 / 1280, (295 - 140) / 0.5 / 720,
                                                  740 / 1280, (345 - 140) / 0.5 / 720], rtol=1e-6)
        np.testing.assert_allclose(got.boxes[1], [0, 0, 100 / 1280, (170 - 140) / 0.5 / 720],
                                   rtol=1e-6, atol=1e-7)

    def test_stretch_geometry(self) -> None:
        # A 1280x720 frame stretched to 640x480: x / 0.5, y / (2 / 3); negative padding too.
        pred = np.array([[320, 240, 100, 60, 0.9]], np.float32)
        got = self.run(pred, geom=(0.5, 480 / 720, 0.0, 0.0, 1280, 720))
        np.testing.assert_allclose(got.boxes[0], [540 / 1280, 315 / 720, 740 / 1280, 405 / 720],
                                   rtol=1e-6)
        got = self.run(pred, geom=(1.0, 1.0, -10.0, -20.0, 1000, 1000))
        np.testing.assert_allclose(got.boxes[0], [0.28, 0.23, 0.38, 0.29], rtol=1e-6)

    def test_max_nms_cap(self) -> None:
        # 31000 disjoint boxes, all candidates: only the best 30000 enter NMS.
        n, nc = 31000, 50
        rng = np.random.default_rng(3)
        pred = np.zeros((n, 4 + nc), np.float32)
        pred[:, 0] = (np.arange(n) % 200) * 10 + 5
        pred[:, 1] = (np.arange(n) // 200) * 10 + 5
        pred[:, 2:4] = 8
        scores = rng.permutation(n).astype(np.float32) / n + np.float32(0.01)
        pred[np.arange(n), 4 + rng.integers(0, nc, n)] = scores
        got = self.run(pred, conf=0.0, max_det=n, geom=(1.0, 1.0, 0.0, 0.0, 2000, 2000))
        assert len(got.scores) == 30000
        np.testing.assert_array_equal(got.scores, np.sort(scores)[::-1][:30000])
        small = self.layout(num_fields=4 + nc, num_classes=nc, max_nms=100)
        got = self.decode(small, pred, conf=0.0, max_det=n)
        np.testing.assert_array_equal(got.scores, np.sort(scores)[::-1][:100])

    def test_any_strides(self) -> None:
        raw = reference_decode.stress_prediction(n=3000, nc=20)  # [F, N], as a model gives it
        expected = self.run(raw.T, conf=0.05)
        wide = np.zeros((raw.shape[0], 2 * raw.shape[1]), np.float32)
        wide[:, ::2] = raw
        readonly = np.ascontiguousarray(raw.T)
        readonly.flags.writeable = False
        for variant in (np.ascontiguousarray(raw.T), wide[:, ::2].T, readonly,
                        np.asfortranarray(raw.T)):
            got = self.run(variant, conf=0.05)
            for a, b in zip(got[:4], expected[:4], strict=True):
                np.testing.assert_array_equal(a, b)

    # box layouts
    def test_xyxy_and_offsets(self) -> None:
        # Integer centres and even sizes: x1 = cx - w / 2 is exact, so both layouts agree.
        pred = np.round(stress(n=2000, nc=10))
        pred[:, 2:4] = np.round(pred[:, 2:4] / 2) * 2
        pred[:, 4:] = stress(n=2000, nc=10)[:, 4:]
        expected = self.run(pred, conf=0.05)
        xyxy = np.empty((len(pred), 2 + 4 + 10), np.float32)  # two unused fields first
        xyxy[:, :2] = -1
        xyxy[:, 2:4] = pred[:, 0:2] - pred[:, 2:4] / 2
        xyxy[:, 4:6] = pred[:, 0:2] + pred[:, 2:4] / 2
        xyxy[:, 6:] = pred[:, 4:]
        layout = self.layout(num_fields=16, num_classes=10, box_format=self.mod.BOX_XYXY,
                             box_offset=2, class_offset=6)
        got = self.decode(layout, xyxy, conf=0.05)
        assert_equal_decoded(got, expected)

    def test_normalized_boxes_with_box_scale(self) -> None:
        # A 512 x 256 input: dividing by powers of two is exact, so the pixels come back.
        pred = stress(n=2000, nc=10)
        normalized = pred.copy()
        normalized[:, [0, 2]] /= 512
        normalized[:, [1, 3]] /= 256
        layout = self.layout(num_fields=14, num_classes=10, box_scale=(512, 256))
        assert layout.box_scale == (512.0, 256.0)
        assert_equal_decoded(self.decode(layout, normalized, conf=0.05),
                             self.run(pred, conf=0.05))

    # score modes
    def test_obj_x_class(self) -> None:
        # Original YOLOv5 [N, 5 + nc]: per class obj * cls in float32, then the best.
        rng = np.random.default_rng(5)
        pred = stress(n=3000, nc=12)
        obj = rng.uniform(0, 1, len(pred)).astype(np.float32)
        v5 = np.concatenate([pred[:, :4], obj[:, None], pred[:, 4:]], axis=1)
        layout = self.layout(num_fields=17, num_classes=12, score_mode=self.mod.SCORE_OBJ_X_CLASS,
                             obj_field=4, class_offset=5)
        products = pred.copy()
        products[:, 4:] = pred[:, 4:] * obj[:, None]
        for conf, mask in [(0.05, None), (0.01, mask_of([0, 2], 12))]:
            got = self.decode(layout, v5, conf=conf, mask=mask)
            assert_equal_decoded(got, self.run(products, conf=conf,
                                               classes=None if mask is None else [0, 2]))
            assert len(got.scores) > 10

    def end2end(self):
        """A YOLO end-to-end export [M, 6]: x1, y1, x2, y2, score, class; padding rows."""
        pred = np.zeros((12, 6), np.float32)
        pred[:7] = [[10, 10, 50, 50, 0.9, 2], [12, 12, 52, 52, 0.8, 2],   # overlap: kept
                    [100, 100, 140, 150, 0.7, 0], [5, 5, 9, 9, 0.3, 1],
                    [0, 0, 10, 10, 0.95, -1], [0, 0, 10, 10, 0.95, 2.5],    # not class ids
                    [0, 0, 10, 10, 0.95, 3]]                                # nc = 3
        pred[7] = [0, 0, 10, 10, 0.96, np.nan]
        pred[8] = [0, 0, 10, 10, -0.5, 1]
        return pred, self.layout(num_fields=6, num_classes=3, box_format=self.mod.BOX_XYXY,
                                 score_mode=self.mod.SCORE_FIELD, score_field=4, class_field=5,
                                 nms=self.mod.NMS_NONE)

    def test_field_scores_drop_padding_and_bad_classes(self) -> None:
        pred, layout = self.end2end()
        got = self.decode(layout, pred, conf=0.0, geom=UNIT)
        assert got.rows.tolist() == [0, 1, 2, 3] and got.class_ids.tolist() == [2, 2, 0, 1]
        np.testing.assert_array_equal(got.scores, pred[:4, 4])
        np.testing.assert_allclose(got.boxes[2], [0.25, 0.25, 0.35, 0.375])
        assert self.decode(layout, pred, conf=0.5, geom=UNIT).rows.tolist() == [0, 1, 2]
        got = self.decode(layout, pred, conf=0.0, mask=np.array([1, 1, 0], np.uint8), geom=UNIT)
        assert got.rows.tolist() == [2, 3]
        assert self.decode(layout, pred, conf=0.0, max_det=2, geom=UNIT).rows.tolist() == [0, 1]

    def test_pairs_sigmoid_top_k(self) -> None:
        # RF-DETR: Q queries x C logits, sigmoid, top-k over every (query, class) pair.
        rng = np.random.default_rng(9)
        q, c = 300, 7
        pred = np.concatenate([rng.uniform(0.05, 0.95, (q, 4)), rng.normal(-3, 2, (q, c))],
                              axis=1).astype(np.float32)
        pred[:, 2:4] /= 4
        pred[5, 4:6] = 9.0                 # one query, two classes, equal best scores
        layout = self.layout(num_fields=4 + c, num_classes=c, score_mode=self.mod.SCORE_PAIRS,
                             sigmoid=True, box_scale=(640, 640), nms=self.mod.NMS_NONE)
        got = self.decode(layout, pred, conf=0.0, max_det=100,
                          geom=(640 / 1280, 640 / 720, 0, 0, 1280, 720))
        prob = (1 / (1 + np.exp(-pred[:, 4:].astype(np.float64)))).ravel()
        top = np.argsort(-prob, kind="stable")[:100]
        np.testing.assert_array_equal(got.rows, top // c)
        np.testing.assert_array_equal(got.class_ids, top % c)
        np.testing.assert_allclose(got.scores, prob[top], rtol=1e-6)
        assert got.rows[:2].tolist() == [5, 5] and got.class_ids[:2].tolist() == [0, 1]
        r = got.rows[0]
        cx, cy, w, h = pred[r, :4].astype(np.float64)
        np.testing.assert_allclose(got.boxes[0], np.clip([cx - w / 2, cy - h / 2, cx + w / 2,
                                                          cy + h / 2], 0, 1), atol=1e-6)
        got = self.decode(layout, pred, conf=0.5, max_det=1000, mask=mask_of([3], c))
        assert set(got.class_ids.tolist()) == {3} and np.all(got.scores >= 0.5)
        assert len(got.scores) == int((prob.reshape(q, c)[:, 3] >= np.float32(0.5)).sum())

    def test_max_class_sigmoid(self) -> None:
        pred = np.array([[50, 50, 10, 10, -1.0, 2.0, 2.0], [90, 90, 10, 10, -3.0, -2.0, -4.0]],
                        np.float32)
        layout = self.layout(num_fields=7, num_classes=3, sigmoid=True)
        got = self.decode(layout, pred, conf=0.1, geom=UNIT)
        assert got.class_ids.tolist() == [1, 1] and got.rows.tolist() == [0, 1]
        np.testing.assert_allclose(got.scores, 1 / (1 + np.exp([-2.0, 2.0])), rtol=1e-6)

    def test_nms_none_is_top_k(self) -> None:
        pred = stress()
        layout = self.layout(num_fields=84, num_classes=80, nms=self.mod.NMS_NONE)
        got = self.decode(layout, pred, conf=0.05, max_det=500)
        best = pred[:, 4:].max(axis=1)
        rows = np.flatnonzero(best >= np.float32(0.05))
        rows = rows[np.lexsort((rows, -best[rows]))][:500]
        np.testing.assert_array_equal(got.rows, rows)
        np.testing.assert_array_equal(got.scores, best[rows])

    # rotated
    def obb_layout(self, nc: int, nms=None, **kw):
        return self.layout(num_fields=4 + nc + 1, num_classes=nc, angle_field=4 + nc,
                           nms=self.mod.NMS_ROTATED if nms is None else nms, **kw)

    @pytest.mark.parametrize(("iou", "max_det"), [(0.45, 300), (0.7, 10000), (0.1, 10000)])
    def test_rotated_nms_matches_numpy_probiou(self, iou: float, max_det: int) -> None:
        pred = reference_decode.rotated_prediction().T  # 2000 overlapping candidates
        got = self.decode(self.obb_layout(15), pred, conf=0.05, iou=iou, max_det=max_det)
        rows, scores, class_ids = reference_decode.numpy_rotated_decode(pred, 0.05, iou, max_det)
        assert 20 < len(rows) < 2000
        np.testing.assert_array_equal(got.rows, rows)
        np.testing.assert_array_equal(got.scores, scores)
        np.testing.assert_array_equal(got.class_ids, class_ids)

    def rbox_row(self, *rows):
        return np.array([[*r[:4], 0.9 - 0.1 * i, r[5] if len(r) > 5 else 0.0, r[4]]
                         for i, r in enumerate(rows)], np.float32)

    def probiou(self, p, q) -> float:
        return float(reference_decode.batch_probiou(p[None], q[None])[0, 0])

    def test_rotated_threshold_is_inclusive_and_classes_apart(self) -> None:
        pred = self.rbox_row((100, 100, 40, 20, 0.3), (104, 101, 40, 20, 0.35))
        boxes = pred[:, [0, 1, 2, 3, 6]]
        p = self.probiou(boxes[0], boxes[1])
        assert 0.5 < p < 1
        layout = self.obb_layout(2)
        assert self.decode(layout, pred, iou=p, geom=UNIT).rows.tolist() == [0]
        above = float(np.nextafter(np.float32(p), np.float32(1)))
        assert self.decode(layout, pred, iou=above, geom=UNIT).rows.tolist() == [0, 1]
        pred[1, 4:6] = [0.0, 0.8]  # the second box is class 1 now
        assert self.decode(layout, pred, iou=0.1, geom=UNIT).class_ids.tolist() == [0, 1]
        # A threshold <= 0 keeps nothing (Ultralytics' zeroed diagonal counts).
        assert len(self.decode(layout, pred, iou=0.0, geom=UNIT).rows) == 0

    def test_rotated_fast_nms_suppressed_boxes_still_suppress(self) -> None:
        # A > B > C in score, in a row: B overlaps both, A and C overlap less. B is
        # suppressed by A, and (fast NMS, unlike greedy) still suppresses C.
        pred = self.rbox_row((100, 100, 40, 20, 0.0), (118, 100, 40, 20, 0.0),
                             (136, 100, 40, 20, 0.0))
        boxes = pred[:, [0, 1, 2, 3, 6]]
        ab, bc, ac = (self.probiou(boxes[i], boxes[j]) for i, j in [(0, 1), (1, 2), (0, 2)])
        assert ac < bc and ac < ab
        thr = (ac + min(ab, bc)) / 2
        assert self.decode(self.obb_layout(2), pred, iou=thr, geom=UNIT).rows.tolist() == [0]

    def test_rotated_outputs(self) -> None:
        angle = math.pi / 6
        pred = self.rbox_row((320, 320, 100, 50, angle), (20, 150, 80, 40, -0.5))
        got = self.decode(self.obb_layout(2), pred, geom=GEOM)
        assert got.rows.tolist() == [0, 1]
        np.testing.assert_allclose(got.rotated[0], [640, 360, 200, 100, angle], rtol=1e-6)
        cos, sin = math.cos(angle), math.sin(angle)
        v1, v2 = np.array([100 * cos, 100 * sin]), np.array([-50 * sin, 50 * cos])
        c = np.array([640, 360])
        corners = np.array([c + v1 + v2, c + v1 - v2, c - v1 - v2, c - v1 + v2]) / [1280, 720]
        np.testing.assert_allclose(got.corners[0], corners.ravel(), rtol=1e-6)
        np.testing.assert_allclose(got.boxes[0], [*corners.min(axis=0), *corners.max(axis=0)],
                                   rtol=1e-6)
        # Out of the frame: the rotated box and corners are not clipped, the bounds are.
        assert got.rotated[1][0] == 40 and got.rotated[1][1] == 20 and got.corners[1].min() < 0
        assert got.boxes[1][0] == 0 and got.boxes[1][1] == 0 and got.boxes[1][2] > 0
        # Stretch: w and h scale by their own axis.
        got = self.decode(self.obb_layout(2), pred[:1], geom=(0.5, 0.25, 0, 0, 1280, 2560))
        np.testing.assert_allclose(got.rotated[0], [640, 1280, 200, 200, angle], rtol=1e-6)

    def test_rotated_end2end_without_nms(self) -> None:
        # YOLO end-to-end OBB [M, 7]: cx, cy, w, h, score, class, angle.
        pred = np.array([[100, 100, 40, 20, 0.9, 1, 0.3], [101, 100, 40, 20, 0.8, 1, 0.3],
                         [0, 0, 0, 0, 0, 0, 0]], np.float32)
        layout = self.layout(num_fields=7, num_classes=2, score_mode=self.mod.SCORE_FIELD,
                             score_field=4, class_field=5, angle_field=6, nms=self.mod.NMS_NONE)
        got = self.decode(layout, pred, conf=0.0, geom=UNIT)
        assert got.rows.tolist() == [0, 1] and got.class_ids.tolist() == [1, 1]
        assert got.rotated.shape == (2, 5) and got.corners.shape == (2, 8)
        np.testing.assert_allclose(got.rotated[:, 4], [0.3, 0.3], rtol=1e-6)

    # argument checks
    @pytest.mark.parametrize("kw", [
        {"num_fields": 0, "num_classes": 1},
        {"num_fields": 6, "num_classes": 0},
        {"num_fields": 6, "num_classes": 3},                       # classes 4..6 > fields
        {"num_fields": 6, "num_classes": 2, "box_offset": 3},
        {"num_fields": 6, "num_classes": 2, "box_format": 7},
        {"num_fields": 6, "num_classes": 2, "score_mode": 9},
        {"num_fields": 6, "num_classes": 2, "nms": 9},
        {"num_fields": 6, "num_classes": 2, "max_nms": 0},
        {"num_fields": 6, "num_classes": 2, "box_scale": (0.0, 1.0)},
        {"num_fields": 6, "num_classes": 2, "box_scale": (1.0, float("nan"))},
        {"num_fields": 6, "num_classes": 2, "class_offset": -1},
        {"num_fields": 7, "num_classes": 2, "score_mode": 1},       # no obj_field
        {"num_fields": 7, "num_classes": 2, "score_mode": 1, "obj_field": 7},
        {"num_fields": 6, "num_classes": 2, "score_mode": 2, "score_field": 4},
        {"num_fields": 6, "num_classes": 2, "score_mode": 2, "score_field": 4, "class_field": 6},
        {"num_fields": 6, "num_classes": 2, "score_mode": 2, "score_field": 4, "class_field": 5,
         "sigmoid": True},
        {"num_fields": 7, "num_classes": 2, "angle_field": 7, "nms": 2},
        {"num_fields": 7, "num_classes": 2, "nms": 2},               # rotated NMS, no angle
        {"num_fields": 7, "num_classes": 2, "angle_field": 6},       # NMS_CLASS on rotated
        {"num_fields": 7, "num_classes": 2, "angle_field": 6, "nms": 2, "box_format": 1},
    ])
    def test_invalid_layouts(self, kw: dict) -> None:
        with pytest.raises(ValueError):
            self.layout(**kw)

    @pytest.mark.parametrize(("pred", "kw"), [
        (np.zeros((10, 6), np.float32), {"conf": float("nan")}),
        (np.zeros((10, 6), np.float32), {"iou": float("nan")}),
        (np.zeros((10, 6), np.float32), {"max_det": -1}),
        (np.zeros((10, 6), np.float32), {"mask": np.ones(3, np.uint8)}),
        (np.zeros((10, 6), np.float32), {"geom": (0.0, 1, 0, 0, 10, 10)}),
        (np.zeros((10, 6), np.float32), {"geom": (1, float("inf"), 0, 0, 10, 10)}),
        (np.zeros((10, 6), np.float32), {"geom": (1, 1, float("nan"), 0, 10, 10)}),
        (np.zeros((10, 6), np.float32), {"geom": (1, 1, 0, 0, 0, 10)}),
        (np.zeros((10, 5), np.float32), {}),                    # too few fields
        (np.zeros((10, 7), np.float32), {}),
        (np.zeros(60, np.float32), {}),
        (np.zeros((1, 10, 6), np.float32), {}),
    ], ids=["conf-nan", "iou-nan", "max-det", "mask-length", "scale0", "scale-inf", "pad-nan",
            "src0", "5-fields", "7-fields", "1-d", "3-d"])
    def test_invalid_arguments(self, pred: np.ndarray, kw: dict) -> None:
        layout = self.layout(num_fields=6, num_classes=2)
        with pytest.raises(ValueError):
            self.decode(layout, pred, **kw)

    @pytest.mark.parametrize(("pred", "mask"), [
        (np.zeros((10, 6), np.float64), None),
        ([[0.0] * 6], None),
        (np.zeros((10, 6), np.float32), np.ones(2, bool)),
        (np.zeros((10, 6), np.float32), [1, 1]),
    ], ids=["float64", "list", "bool-mask", "list-mask"])
    def test_wrong_types(self, pred, mask) -> None:
        with pytest.raises(TypeError):
            self.decode(self.layout(num_fields=6, num_classes=2), pred, mask=mask)


class TestCompiledDecode(_DecodeBehaviour):
    mod = decode

    def test_layout_is_immutable_and_readable(self) -> None:
        layout = decode.DecodeLayout(num_fields=20, num_classes=15, angle_field=19,
                                     nms=decode.NMS_ROTATED, box_scale=(2, 3))
        assert (layout.num_fields, layout.num_classes, layout.angle_field, layout.nms,
                layout.box_scale, layout.max_nms) == (20, 15, 19, decode.NMS_ROTATED,
                                                      (2.0, 3.0), 30000)
        assert "NMS_ROTATED" in repr(layout) and "angle_field=19" in repr(layout)
        with pytest.raises(AttributeError):
            layout.num_classes = 3  # type: ignore[misc]
        with pytest.raises(TypeError):
            decode.decode_detections(None, np.zeros((1, 20), np.float32), 0.5, 0.5, 1, None,
                                     1, 1, 0, 0, 1, 1)


@pytest.mark.slow  # a slow numpy reference; the compiled decoder runs the same checks fast
class TestReferenceDecode(_DecodeBehaviour):
    mod = reference_decode


def test_same_constants() -> None:
    for name in ("BOX_CXCYWH", "BOX_XYXY", "SCORE_MAX_CLASS", "SCORE_OBJ_X_CLASS", "SCORE_FIELD",
                 "SCORE_PAIRS", "NMS_NONE", "NMS_CLASS", "NMS_ROTATED", "MAX_NMS"):
        assert getattr(decode, name) == getattr(reference_decode, name), name
    assert decode.Decoded._fields == reference_decode.Decoded._fields


# --- compiled == reference ---------------------------------------------------------------------

def both(pred, layout_kw, *args):
    return [m.decode_detections(m.DecodeLayout(**layout_kw), pred, *args)
            for m in (decode, reference_decode)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_compiled_equals_reference_exactly(seed: int) -> None:
    pred = stress(n=5000, nc=30, seed=100 + seed)
    for conf, iou, max_det in [(0.05, 0.45, 300), (0.0, 0.3, 5000), (0.5, 0.9, 20)]:
        assert_equal_decoded(*both(pred, {"num_fields": 34, "num_classes": 30},
                                   conf, iou, max_det, None, *GEOM))
    obb = reference_decode.rotated_prediction(n=1500, nc=6, seed=seed).T
    for iou in (0.2, 0.5, 0.8):
        assert_equal_decoded(*both(obb, {"num_fields": 11, "num_classes": 6, "angle_field": 10,
                                         "nms": decode.NMS_ROTATED}, 0.05, iou, 1000, None, *GEOM),
                             corners_tol=1e-6)


_FINITE = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def random_case(draw):
    """A layout in one of the modes and an input that exercises it."""
    mode = draw(st.sampled_from(["max", "max-sigmoid", "obj", "field", "pairs", "none",
                                 "rotated", "rotated-field", "xyxy"]))
    nc = draw(st.integers(1, 5))
    n = draw(st.integers(0, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    boxes = np.concatenate([rng.uniform(0, 200, (n, 2)), rng.uniform(0, 80, (n, 2))], axis=1)
    if draw(st.booleans()):  # coarse values: equal scores and coincident boxes
        boxes = np.round(boxes / 40) * 40
    scores = rng.uniform(0, 1, (n, nc))
    if draw(st.booleans()):
        scores = np.round(scores * 4) / 4
    kw: dict = {"num_classes": nc}
    if mode in ("max", "max-sigmoid", "none", "xyxy", "pairs"):
        cols = [boxes, scores if mode != "max-sigmoid" else scores * 8 - 4]
        kw.update(sigmoid=mode == "max-sigmoid", nms=decode.NMS_NONE if mode == "none" else 1)
        if mode == "xyxy":
            kw["box_format"] = decode.BOX_XYXY
        if mode == "pairs":
            kw.update(score_mode=decode.SCORE_PAIRS, sigmoid=True, nms=decode.NMS_CLASS)
            cols[1] = scores * 8 - 4
    elif mode == "obj":
        cols = [boxes, rng.uniform(0, 1, (n, 1)), scores]
        kw.update(score_mode=decode.SCORE_OBJ_X_CLASS, obj_field=4, class_offset=5)
    elif mode in ("field", "rotated-field"):
        classes = rng.integers(-1, nc + 1, (n, 1)).astype(float)
        classes[rng.uniform(0, 1, n) < 0.1] = 0.5
        cols = [boxes, scores[:, :1] - 0.1, classes]
        kw.update(score_mode=decode.SCORE_FIELD, score_field=4, class_field=5,
                  nms=decode.NMS_NONE)
        if mode == "rotated-field":
            cols.append(rng.uniform(-1, 3, (n, 1)))
            kw["angle_field"] = 6
    else:
        cols = [boxes, scores, rng.uniform(-np.pi / 4, 3 * np.pi / 4, (n, 1))]
        kw.update(angle_field=4 + nc, nms=decode.NMS_ROTATED)
    pred = np.concatenate(cols, axis=1).astype(np.float32) if n else np.zeros(
        (0, sum(c.shape[1] for c in cols)), np.float32)
    kw["num_fields"] = pred.shape[1]
    if draw(st.booleans()):
        pred = np.asfortranarray(pred)
    mask = None
    if draw(st.booleans()):
        mask = (rng.uniform(0, 1, nc) < 0.7).astype(np.uint8)
    conf = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    iou = draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]))
    max_det = draw(st.integers(0, 80))
    geom = (draw(st.sampled_from([0.5, 1.0, 0.3])), draw(st.sampled_from([0.5, 1.0, 0.7])),
            draw(_FINITE) / 100, draw(_FINITE) / 100, draw(st.integers(1, 400)),
            draw(st.integers(1, 400)))
    return kw, pred, (conf, iou, max_det, mask, *geom)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_case())
def test_compiled_equals_reference_on_random_inputs(case) -> None:
    kw, pred, args = case
    assert_equal_decoded(*both(pred, kw, *args), corners_tol=1e-6)
