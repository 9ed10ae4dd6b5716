"""YOLOv8 decode + per-class NMS (vasipc._fast.yolo, CONTRACT 6).

`_DecodeBehaviour` runs against the compiled kernel and the numpy reference
(tests/reference_kernels.py). Both must give the same detections as an independent
pipeline, numpy + cv2.dnn.NMSBoxesBatched, on real outputs (nudenet's 320n.onnx, a
trained YOLOv8n, on the astronaut photo) and on a stress case with thousands of heavily
overlapping candidates; then the edge cases, and the argument checks.
"""

from __future__ import annotations

import ast
import types
from typing import ClassVar

import numpy as np
import pytest
import reference_kernels

from vasipc._fast import yolo

cv2 = pytest.importorskip("cv2")

FACE_FEMALE = 1


def assert_same_detections(got, expected, atol: float = 1e-5) -> None:
    boxes, scores, class_ids = got
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert class_ids.dtype == np.int32
    assert boxes.shape == (len(scores), 4) and class_ids.shape == scores.shape
    np.testing.assert_array_equal(class_ids, expected[2])
    np.testing.assert_allclose(scores, expected[1], rtol=0, atol=atol)
    np.testing.assert_allclose(boxes, expected[0], rtol=0, atol=atol)
    assert np.all(np.diff(scores) <= 0)                   # score descending
    assert np.all(boxes >= 0) and np.all(boxes <= 1)
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])


# --- inputs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nudenet_output(nudenet_model: str, astronaut_rgb: np.ndarray):
    """(pred [22, N] for the astronaut letterboxed to 320, geometry, class names)."""
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
    return out[0], (r, left, top, w, h), names


GEOM = (0.5, 0.0, 140.0, 1280, 720)  # scale, pad_left, pad_top, src_w, src_h (720p -> 640)


class _DecodeBehaviour:
    decode: ClassVar[types.FunctionType]

    def run(self, pred, conf=0.25, iou=0.45, max_det=300, classes=None, geom=GEOM):
        return type(self).decode(pred, conf, iou, max_det, classes, *geom)

    # real model output
    @pytest.mark.parametrize("conf", [0.25, 0.05])
    def test_nudenet_matches_opencv(self, nudenet_output, conf: float) -> None:
        pred, geom, names = nudenet_output
        got = self.run(pred, conf=conf, geom=geom)
        assert_same_detections(got, reference_kernels.opencv_decode(pred, conf, 0.45, 300, None, *geom))
        assert FACE_FEMALE in got[2].tolist() and names[FACE_FEMALE] == "FACE_FEMALE"
        if conf == 0.25:
            face = got[0][got[2].tolist().index(FACE_FEMALE)]
            # The astronaut's face sits in the upper middle of the photo.
            assert 0.3 < (face[0] + face[2]) / 2 < 0.7 and (face[1] + face[3]) / 2 < 0.45

    def test_nudenet_class_filter(self, nudenet_output) -> None:
        pred, geom, _ = nudenet_output
        got = self.run(pred, conf=0.05, classes=[FACE_FEMALE, 12], geom=geom)
        assert set(got[2].tolist()) <= {FACE_FEMALE, 12} and FACE_FEMALE in got[2]
        assert_same_detections(got, reference_kernels.opencv_decode(pred, 0.05, 0.45, 300, [1, 12], *geom))

    # stress
    @pytest.mark.parametrize(("conf", "iou", "max_det"), [
        (0.05, 0.45, 300), (0.0, 0.7, 10000), (0.3, 0.1, 50)])
    def test_stress_matches_opencv(self, conf: float, iou: float, max_det: int) -> None:
        pred = reference_kernels.stress_prediction()
        candidates = int((pred[4:].max(axis=0) >= conf).sum())
        assert candidates > 1000
        got = self.run(pred, conf=conf, iou=iou, max_det=max_det)
        assert_same_detections(got, reference_kernels.opencv_decode(pred, conf, iou, max_det, None, *GEOM))
        assert 0 < len(got[1]) <= max_det

    def test_stress_with_classes(self) -> None:
        pred = reference_kernels.stress_prediction(seed=8)
        classes = np.array([0, 3, 5, 11, 79], np.int32)
        got = self.run(pred, conf=0.05, classes=classes)
        assert set(got[2].tolist()) <= set(classes.tolist())
        assert_same_detections(got, reference_kernels.opencv_decode(pred, 0.05, 0.45, 300, classes, *GEOM))

    # edges
    def test_no_candidates(self) -> None:
        boxes, scores, class_ids = self.run(reference_kernels.stress_prediction(), conf=1.5)
        assert boxes.shape == (0, 4) and scores.shape == (0,) and class_ids.shape == (0,)
        assert boxes.dtype == np.float32 and class_ids.dtype == np.int32

    def test_zero_anchors_and_zero_max_detections(self) -> None:
        assert self.run(np.zeros((6, 0), np.float32))[0].shape == (0, 4)
        assert len(self.run(reference_kernels.stress_prediction(), max_det=0)[1]) == 0

    def test_empty_classes_keeps_nothing(self) -> None:
        assert len(self.run(reference_kernels.stress_prediction(), conf=0.0, classes=[])[1]) == 0
        empty = np.array([], int)
        assert len(self.run(reference_kernels.stress_prediction(), conf=0.0, classes=empty)[1]) == 0
        assert len(self.run(reference_kernels.stress_prediction(), conf=0.0, classes=[-1, 1000])[1]) == 0

    def test_class_filter_uses_best_class_before_nms(self) -> None:
        # Anchor 0: best class 1 (0.9), class 0 at 0.8. Anchor 1: class 0 at 0.5, elsewhere.
        pred = np.zeros((6, 2), np.float32)
        pred[:4, 0] = [100, 100, 50, 50]
        pred[:4, 1] = [300, 300, 50, 50]
        pred[4:, 0] = [0.8, 0.9]
        pred[4:, 1] = [0.5, 0.1]
        _, scores, class_ids = self.run(pred, classes=[0], max_det=1)
        # Anchor 0 is not re-labelled class 0, and the filter runs before max_detections.
        assert class_ids.tolist() == [0] and scores.tolist() == [0.5]
        _, scores, class_ids = self.run(pred, classes=None, max_det=1)
        assert class_ids.tolist() == [1] and scores.tolist() == [pytest.approx(0.9)]

    def test_single_class(self) -> None:
        pred = np.array([[10, 12, 200], [10, 10, 200], [8, 8, 20], [8, 8, 20],
                         [0.9, 0.8, 0.3]], np.float32)
        boxes, scores, class_ids = self.run(pred, geom=(1.0, 0.0, 0.0, 400, 400))
        assert class_ids.tolist() == [0, 0]
        np.testing.assert_allclose(scores, [0.9, 0.3], rtol=1e-6)
        np.testing.assert_allclose(boxes[0], [6 / 400, 6 / 400, 14 / 400, 14 / 400], rtol=1e-5)

    def test_ties_first_max_and_lower_anchor_first(self) -> None:
        # Three identical boxes with identical scores: the lowest anchor survives; class
        # ties (two classes at the same score) go to the lower class id.
        pred = np.zeros((7, 5), np.float32)
        pred[:4] = np.array([[100, 100, 40, 40]] * 3 + [[300, 300, 40, 40]] * 2,
                            np.float32).T
        pred[4:, :3] = [[0.0] * 3, [0.6] * 3, [0.6] * 3]      # classes 1 and 2 tie
        pred[4:, 3:] = [[0.7, 0.7], [0.0, 0.0], [0.0, 0.0]]
        boxes, scores, class_ids = self.run(pred, geom=(1.0, 0.0, 0.0, 400, 400))
        assert class_ids.tolist() == [0, 1] and scores.tolist() == [
            pytest.approx(0.7), pytest.approx(0.6)]
        np.testing.assert_allclose(boxes[0], [280 / 400, 280 / 400, 320 / 400, 320 / 400])
        # Non-overlapping equal scores come out in anchor order.
        pred = np.zeros((5, 4), np.float32)
        pred[0] = [300, 100, 200, 0]
        pred[1:4] = [[10] * 4, [8] * 4, [8] * 4]
        pred[4] = 0.5
        boxes, _, _ = self.run(pred, geom=(1.0, 0.0, 0.0, 400, 400))
        np.testing.assert_allclose((boxes[:, 0] + boxes[:, 2]) * 200, [300, 100, 200, 2])

    def test_iou_strictly_greater_suppresses(self) -> None:
        # [0,0,10,10] vs [0,0,10,5]: IoU exactly 0.5.
        pred = np.array([[5, 5], [5, 2.5], [10, 10], [10, 5], [0.9, 0.8]], np.float32)
        assert len(self.run(pred, iou=0.5, geom=(1, 0, 0, 10, 10))[1]) == 2
        assert len(self.run(pred, iou=0.49, geom=(1, 0, 0, 10, 10))[1]) == 1

    def test_classes_do_not_suppress_each_other(self) -> None:
        pred = np.zeros((6, 2), np.float32)
        pred[:4] = [[50, 50], [50, 50], [20, 20], [20, 20]]
        pred[4:] = [[0.9, 0.1], [0.1, 0.8]]
        assert self.run(pred)[2].tolist() == [0, 1]

    def test_max_detections_keeps_the_best(self) -> None:
        pred = reference_kernels.stress_prediction()
        full = self.run(pred, conf=0.05, max_det=10000)
        top = self.run(pred, conf=0.05, max_det=17)
        assert len(top[1]) == 17
        for a, b in zip(top, full, strict=True):
            np.testing.assert_array_equal(a, b[:17])

    def test_unletterbox_and_clip(self) -> None:
        # 1280x720 in 640x640: scale 0.5, top 140. A box reaching into the padding clips.
        pred = np.array([[320, 20], [320, 150], [100, 60], [50, 40], [0.9, 0.8]], np.float32)
        boxes, _, _ = self.run(pred, geom=GEOM)
        np.testing.assert_allclose(boxes[0], [540 / 1280, (295 - 140) / 0.5 / 720,
                                              740 / 1280, (345 - 140) / 0.5 / 720], rtol=1e-6)
        np.testing.assert_allclose(boxes[1], [0, 0, 100 / 1280, (170 - 140) / 0.5 / 720],
                                   rtol=1e-6, atol=1e-7)

    def test_max_nms_cap(self) -> None:
        # 31000 disjoint boxes, all candidates: only the best 30000 enter NMS.
        n, nc = 31000, 50
        rng = np.random.default_rng(3)
        pred = np.zeros((4 + nc, n), np.float32)
        pred[0] = (np.arange(n) % 200) * 10 + 5
        pred[1] = (np.arange(n) // 200) * 10 + 5
        pred[2:4] = 8
        scores = rng.permutation(n).astype(np.float32) / n + np.float32(0.01)
        pred[4 + rng.integers(0, nc, n), np.arange(n)] = scores
        _, got, _ = self.run(pred, conf=0.0, max_det=n, geom=(1.0, 0.0, 0.0, 2000, 2000))
        assert len(got) == 30000
        np.testing.assert_array_equal(got, np.sort(scores)[::-1][:30000])

    def test_any_strides(self) -> None:
        pred = reference_kernels.stress_prediction(n=3000, nc=20)
        expected = self.run(pred, conf=0.05)
        fortran = np.asfortranarray(pred)
        wide = np.zeros((pred.shape[0], 2 * pred.shape[1]), np.float32)
        wide[:, ::2] = pred
        readonly = pred.copy()
        readonly.flags.writeable = False
        for variant in (fortran, wide[:, ::2], readonly):
            got = self.run(variant, conf=0.05)
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)

    # argument checks
    @pytest.mark.parametrize(("pred", "kw"), [
        (np.zeros((6, 10), np.float64), {}),
        (np.zeros(60, np.float32), {}),
        (np.zeros((1, 6, 10), np.float32), {}),
        (np.zeros((4, 10), np.float32), {}),                 # nc = 0
        (np.zeros((6, 10), np.float32), {"conf": float("nan")}),
        (np.zeros((6, 10), np.float32), {"iou": float("nan")}),
        (np.zeros((6, 10), np.float32), {"max_det": -1}),
        (np.zeros((6, 10), np.float32), {"classes": [[0, 1]]}),
        (np.zeros((6, 10), np.float32), {"classes": [0.5]}),
        (np.zeros((6, 10), np.float32), {"geom": (0.0, 0, 0, 10, 10)}),
        (np.zeros((6, 10), np.float32), {"geom": (1.0, float("inf"), 0, 10, 10)}),
        (np.zeros((6, 10), np.float32), {"geom": (1.0, 0, 0, 0, 10)}),
    ], ids=["float64", "1-d", "3-d", "nc0", "conf-nan", "iou-nan", "max-det", "classes-2d",
            "classes-float", "scale0", "pad-inf", "src0"])
    def test_invalid_arguments(self, pred: np.ndarray, kw: dict) -> None:
        with pytest.raises(ValueError):
            self.run(pred, **kw)


class TestCompiledDecode(_DecodeBehaviour):
    decode = staticmethod(yolo.decode_yolo)


class TestReferenceDecode(_DecodeBehaviour):
    decode = staticmethod(reference_kernels.decode_yolo)


@pytest.mark.parametrize("seed", range(5))
def test_compiled_equals_reference_exactly(seed: int) -> None:
    pred = reference_kernels.stress_prediction(n=5000, nc=30, seed=100 + seed)
    for conf, iou, max_det in [(0.05, 0.45, 300), (0.0, 0.3, 5000), (0.5, 0.9, 20)]:
        got = yolo.decode_yolo(pred, conf, iou, max_det, None, *GEOM)
        expected = reference_kernels.decode_yolo(pred, conf, iou, max_det, None, *GEOM)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
