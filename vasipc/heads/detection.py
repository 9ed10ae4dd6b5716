"""Box detectors of every family: one compiled decode, then the task's extras.

`DetectionHead` runs `decode_detections` (score, threshold, NMS or top-k, geometry undone)
on one image's candidate rows and turns the kept rows into response dicts; a family only
supplies the decode layout, how to view its outputs as rows, and the task's extras
(`MaskExtra`, `KeypointExtra`, `RotatedExtra`) gathered by kept row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vasipc._fast.decode import Decoded, DecodeLayout, decode_detections
from vasipc._fast.masks import MASK_POLYGON, MASK_RLE, segment_masks
from vasipc.client import rle_counts
from vasipc.heads.base import Head, Keypoints, round6, round6_scalar
from vasipc.preprocess import Geometry, Preprocess
from vasipc.schema import InferConfig


def is_empty_rle(counts: str, pixels: int) -> bool:
    """An all-zero mask: its RLE is one run of every pixel (a few characters at most)."""
    return len(counts) <= 8 and rle_counts(counts) == [pixels]


class Extra:
    """What a task adds to each detection, from the kept rows."""

    def add(self, dets: list[dict], found: Decoded, rows: np.ndarray,
            outputs: Sequence[np.ndarray], i: int, geom: Geometry, cfg: InferConfig) -> None:
        raise NotImplementedError


class MaskExtra(Extra):
    """Instance masks: the kept rows' coefficients x the image's prototypes (output
    `protos`), over the whole source frame (docs/contract.md 6.2)."""

    def __init__(self, coeff_offset: int, num_coeffs: int, protos: int) -> None:
        self.coeffs = slice(coeff_offset, coeff_offset + num_coeffs)
        self.protos = protos  # index of the prototypes output

    def add(self, dets, found, rows, outputs, i, geom, cfg) -> None:
        fmt = cfg.mask_format or "rle"
        if fmt == "none" or not dets:
            return
        w, h = geom.src_w, geom.src_h
        coeffs = np.ascontiguousarray(rows[found.rows, self.coeffs])
        boxes = found.boxes.astype(np.float64) * np.array([w, h, w, h])
        masks = segment_masks(outputs[self.protos][i], coeffs, boxes.astype(np.float32), w, h,
                              MASK_RLE if fmt == "rle" else MASK_POLYGON)
        # A detection whose mask is empty is dropped, as Ultralytics drops it (its
        # construct_result keeps masks with a pixel set): the box alone found nothing.
        if fmt == "rle":
            kept = [(det, counts) for det, counts in zip(dets, masks, strict=True)
                    if not is_empty_rle(counts, h * w)]
            for det, counts in kept:
                det["mask"] = {"size": [h, w], "counts": counts}
        else:
            kept = [(det, poly) for det, poly in zip(dets, masks, strict=True) if len(poly)]
            for det, poly in kept:
                det["polygon"] = round6(poly)
        dets[:] = [det for det, _ in kept]


class KeypointExtra(Extra):
    """Pose: K keypoints of D values (x, y in input pixels, visibility) per row."""

    def __init__(self, offset: int, keypoints: Keypoints) -> None:
        self.fields = slice(offset, offset + keypoints.count * keypoints.dims)
        self.count, self.dims = keypoints.count, keypoints.dims

    def add(self, dets, found, rows, outputs, i, geom, cfg) -> None:
        if not dets:
            return
        k = rows[found.rows, self.fields].astype(np.float64).reshape(len(dets), self.count, self.dims)
        xy = np.empty((len(dets), self.count, 3))
        xy[..., 0] = np.clip((k[..., 0] - geom.pad_left) / geom.scale_x, 0, geom.src_w) / geom.src_w
        xy[..., 1] = np.clip((k[..., 1] - geom.pad_top) / geom.scale_y, 0, geom.src_h) / geom.src_h
        if self.dims == 3:
            xy[..., 2] = k[..., 2]
            for det, points in zip(dets, round6(xy), strict=True):
                det["keypoints"] = points
        else:
            for det, points in zip(dets, round6(xy[..., :2]), strict=True):
                det["keypoints"] = [[x, y, None] for x, y in points]


class RotatedExtra(Extra):
    """Oriented boxes: the rotated box in source pixels and its corners, normalized."""

    def add(self, dets, found, rows, outputs, i, geom, cfg) -> None:
        if not dets:
            return
        for det, rbox, corners in zip(dets, round6(found.rotated), round6(found.corners), strict=True):
            det["rotated_box"] = rbox
            det["polygon"] = [corners[0:2], corners[2:4], corners[4:6], corners[6:8]]


def detection_dicts(found: Decoded, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The contract's detection objects, confidence and bbox rounded to 6 decimals."""
    k = len(found.scores)
    if not k:
        return []
    ids = found.class_ids.tolist()
    if k <= 3:  # a few: np.round(x, 6) of each float in plain Python is cheaper
        try:
            return [
                {"class_id": c, "class_name": names[c], "confidence": round6_scalar(s * 1e6),
                 "bbox": [round6_scalar(x0 * 1e6), round6_scalar(y0 * 1e6),
                          round6_scalar(x1 * 1e6), round6_scalar(y1 * 1e6)], "track_id": None}
                for c, s, (x0, y0, x1, y1) in zip(ids, found.scores.tolist(),
                                                  found.boxes.tolist(), strict=True)
            ]
        except (ValueError, OverflowError):  # NaN or inf: rounded as numpy does, below
            pass
    rows = np.empty((k, 5))  # [score, x_min, y_min, x_max, y_max]
    rows[:, 0] = found.scores
    rows[:, 1:] = found.boxes
    return [
        {"class_id": c, "class_name": names[c], "confidence": row[0], "bbox": row[1:],
         "track_id": None}
        for c, row in zip(ids, round6(rows), strict=True)
    ]


class DetectionHead(Head):
    """A box detector: subclasses set `layout` and may override `rows`."""

    def __init__(self, *, architecture: str, task: str, nms: str,
                 class_names: tuple[str, ...], preprocess: Preprocess, layout: DecodeLayout,
                 extra: Extra | None = None, keypoints: Keypoints | None = None) -> None:
        self.architecture, self.task, self.nms = architecture, task, nms
        self.class_names = class_names
        self.preprocess = preprocess
        self.layout = layout
        self.extra = extra
        self.keypoints = keypoints

    def rows(self, outputs: Sequence[np.ndarray], i: int) -> np.ndarray:
        """Image i's candidates as float32 [N, fields] (a view where the layout allows)."""
        return outputs[0][i]

    def class_mask(self, classes: tuple[int, ...] | None) -> np.ndarray | None:
        if classes is None:
            return None
        mask = np.zeros(self.num_classes, np.uint8)
        ids = [c for c in classes if c < self.num_classes]  # other ids match nothing
        mask[ids] = 1
        return mask

    def decode(self, outputs: Sequence[np.ndarray], i: int, geom: Geometry, cfg: InferConfig,
               defaults: Any) -> dict:
        rows = self.rows(outputs, i)
        conf = defaults.confidence_threshold if cfg.confidence_threshold is None else cfg.confidence_threshold
        iou = defaults.nms_iou_threshold if cfg.nms_iou_threshold is None else cfg.nms_iou_threshold
        max_det = defaults.max_detections if cfg.max_detections is None else cfg.max_detections
        found = decode_detections(self.layout, rows, conf, iou, min(max_det, 1 << 30),
                                  self.class_mask(cfg.classes), geom.scale_x, geom.scale_y,
                                  geom.pad_left, geom.pad_top, geom.src_w, geom.src_h)
        dets = detection_dicts(found, self.class_names)
        if self.extra is not None:
            self.extra.add(dets, found, rows, outputs, i, geom, cfg)
        return {"detections": dets}
