"""Pure numpy reference of every family's post-processing (docs/contract.md 6), written
from the families' own post-processing code (Ultralytics 8.4's non_max_suppression,
batch_probiou, scale_boxes / scale_coords, xywhr2xyxyxyxy; RF-DETR's top-k; D-FINE's
target sizes), independent of vasipc.heads and vasipc._fast.

`answer(case, outputs, geometry, ...)` takes one image's outputs (batch dimension
removed) and returns the response fields the server must give: `detections` (and
`classifications` for classifiers), rounded as the wire rounds them. Masks come from
tests/reference_masks.py, the numpy reference of the mask kernel.
"""

from __future__ import annotations

import numpy as np
import reference_masks

from vasipc.preprocess import Geometry as Geom  # input pixel = source pixel * scale + pad

MAX_NMS = 30000


def r6(x) -> list | float:
    return (np.rint(np.asarray(x, np.float64) * 1e6) / 1e6).tolist()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, kind="stable")  # ties: the lower index first


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """torchvision.ops.batched_nms: per class, a box survives unless a kept box of its class
    overlaps it by IoU > iou (float32 arithmetic). Indices in score order."""
    keep: list[int] = []
    for i in _order(scores):
        b = boxes[i]
        area = (b[2] - b[0]) * (b[3] - b[1])
        ok = True
        for k in keep:
            if classes[k] != classes[i]:
                continue
            kb = boxes[k]
            iw = max(np.float32(0), min(b[2], kb[2]) - max(b[0], kb[0]))
            ih = max(np.float32(0), min(b[3], kb[3]) - max(b[1], kb[1]))
            inter = np.float32(iw * ih)
            union = np.float32((kb[2] - kb[0]) * (kb[3] - kb[1]) + area - inter)
            if float(np.float32(inter / union)) > iou:
                ok = False
                break
        if ok:
            keep.append(int(i))
    return np.array(keep, np.int64)


def _covariance(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, bb, c = b[:, 2] ** 2 / 12, b[:, 3] ** 2 / 12, b[:, 4]
    cos, sin = np.cos(c), np.sin(c)
    return a * cos**2 + bb * sin**2, a * sin**2 + bb * cos**2, (a - bb) * cos * sin


def probiou(b1: np.ndarray, b2: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Ultralytics' batch_probiou: [n, m] ProbIoU of rotated boxes (cx, cy, w, h, angle)."""
    x1, y1 = b1[:, 0:1], b1[:, 1:2]
    x2, y2 = b2[None, :, 0], b2[None, :, 1]
    a1, bb1, c1 = (v[:, None] for v in _covariance(b1))
    a2, bb2, c2 = (v[None] for v in _covariance(b2))
    den = (a1 + a2) * (bb1 + bb2) - (c1 + c2) ** 2 + eps
    t1 = ((a1 + a2) * (y1 - y2) ** 2 + (bb1 + bb2) * (x1 - x2) ** 2) / den * 0.25
    t2 = ((c1 + c2) * (x2 - x1) * (y1 - y2)) / den * 0.5
    t3 = np.log(((a1 + a2) * (bb1 + bb2) - (c1 + c2) ** 2)
                / (4 * np.sqrt(np.clip(a1 * bb1 - c1**2, 0, None) * np.clip(a2 * bb2 - c2**2, 0, None)) + eps)
                + eps) * 0.5
    bd = np.clip(t1 + t2 + t3, eps, 100.0)
    return 1 - np.sqrt(1.0 - np.exp(-bd) + eps)


def rotated_nms(rboxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Ultralytics' rotated NMS (fast NMS): in score order, a box is dropped when its
    ProbIoU with any higher-scored box of its class is >= iou."""
    order = _order(scores)
    b = rboxes[order].astype(np.float32)
    m = probiou(b, b).astype(np.float32)
    same = classes[order][:, None] == classes[order][None, :]
    m = np.triu(np.where(same, m, 0), k=1)
    return order[(m >= iou).sum(0) <= 0]


def corners(rb: np.ndarray) -> np.ndarray:
    """Ultralytics' xywhr2xyxyxyxy: [k, 4, 2]."""
    ctr, w, h, a = rb[:, None, :2], rb[:, 2:3], rb[:, 3:4], rb[:, 4:5]
    cos, sin = np.cos(a), np.sin(a)
    v1 = np.concatenate([w / 2 * cos, w / 2 * sin], axis=1)[:, None]
    v2 = np.concatenate([-h / 2 * sin, h / 2 * cos], axis=1)[:, None]
    return np.concatenate([ctr + v1 + v2, ctr + v1 - v2, ctr - v1 - v2, ctr - v1 + v2], axis=1)


def _to_source(xyxy: np.ndarray, g: Geom) -> np.ndarray:
    """Input-pixel boxes -> source pixels, clipped (Ultralytics scale_boxes)."""
    out = np.empty_like(xyxy, dtype=np.float64)
    out[:, [0, 2]] = np.clip((xyxy[:, [0, 2]] - g.pad_left) / g.scale_x, 0, g.src_w)
    out[:, [1, 3]] = np.clip((xyxy[:, [1, 3]] - g.pad_top) / g.scale_y, 0, g.src_h)
    return out


def answer(case, outputs: list[np.ndarray], g: Geom, input_size: tuple[int, int], *,
           conf: float = 0.25, iou: float = 0.45,
           max_det: int = 300, classes: list[int] | None = None, mask_format: str = "rle",
           top_k: int | None = None) -> dict:
    arch, task = case.architecture, case.task
    nc_names = case.names
    if arch == "yolo-classify":
        probs = outputs[0]
        top = _order(probs)[: min(top_k or 5, len(probs))]
        return {"detections": [], "classifications": [
            {"class_id": int(c), "class_name": nc_names[int(c)], "confidence": r6(probs[c])}
            for c in top]}

    rot = None
    if arch == "yolo":
        rows = outputs[0].T
        nc = len(nc_names)
        cls_scores = rows[:, 4:4 + nc]
        scores, cls = cls_scores.max(1), cls_scores.argmax(1)
        c = rows[:, :4]
        boxes = np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], axis=1)
        if task == "obb":
            rot = np.concatenate([rows[:, :4], rows[:, -1:]], axis=1)
    elif arch == "yolo-end2end":
        rows = outputs[0]
        scores, cls = rows[:, 4], rows[:, 5].astype(np.int64)
        if task == "obb":
            rot = np.concatenate([rows[:, :4], rows[:, 6:7]], axis=1)
            boxes = rows[:, :4]  # replaced by the corners' bounds below
        else:
            boxes = rows[:, :4]
    elif arch == "yolov5":
        rows = outputs[0]
        prod = rows[:, 5:] * rows[:, 4:5]
        scores, cls = prod.max(1), prod.argmax(1)
        c = rows[:, :4]
        boxes = np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], axis=1)
    elif arch == "rtdetr":
        rows = outputs[0].astype(np.float64)
        c = rows[:, :4] * np.array([*input_size, *input_size], np.float64)
        boxes = np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], axis=1)
        if rows.shape[1] == 6:
            scores, cls = rows[:, 4].astype(np.float32), rows[:, 5].astype(np.int64)
        else:
            scores, cls = rows[:, 4:].max(1).astype(np.float32), rows[:, 4:].argmax(1)
    elif arch == "rfdetr":
        dets, logits = outputs
        q, c = logits.shape
        prob = _sigmoid(logits).reshape(-1)  # every (query, class) pair is a candidate
        pairs = np.arange(q * c)
        cxcy = dets.astype(np.float64)[:, :4] * np.array([*input_size, *input_size], np.float64)
        xyxy = np.concatenate([cxcy[:, :2] - cxcy[:, 2:] / 2, cxcy[:, :2] + cxcy[:, 2:] / 2], axis=1)
        boxes, scores, cls = xyxy[pairs // c], prob, pairs % c
    elif arch == "dfine":
        labels, bx, sc = outputs
        boxes, scores, cls = bx, sc, labels
    else:
        raise ValueError(arch)

    names = nc_names
    if names is None:  # no names anywhere: class_{id} for every column
        names = {i: f"class_{i}" for i in range(outputs[-1].shape[-1])}
    nc = len(names)
    keep = scores >= np.float32(conf)
    if arch in ("yolo-end2end", "dfine"):
        keep &= (scores > 0) & (cls >= 0) & (cls < nc)
    if classes is not None:
        keep &= np.isin(cls, classes)
    idx = np.nonzero(keep)[0]
    idx = idx[_order(scores[idx])][:MAX_NMS]
    if arch in ("yolo", "yolov5") and task != "obb":
        idx = idx[greedy_nms(boxes[idx].astype(np.float32), scores[idx], cls[idx], iou)]
    elif arch == "yolo" and task == "obb":
        idx = idx[rotated_nms(rot[idx], scores[idx], cls[idx], iou)]
    idx = idx[:max_det]

    dets = []
    if rot is not None:
        rb = rot[idx].astype(np.float64)
        src = np.stack([(rb[:, 0] - g.pad_left) / g.scale_x, (rb[:, 1] - g.pad_top) / g.scale_y,
                        rb[:, 2] / g.scale_x, rb[:, 3] / g.scale_y, rb[:, 4]], axis=1)
        # not clipped: Ultralytics' scale_boxes(xywh=True) returns the rotated box as is
        pts = corners(src)
        px = np.concatenate([pts.min(1), pts.max(1)], axis=1)
        src_boxes = np.empty_like(px)
        src_boxes[:, [0, 2]] = np.clip(px[:, [0, 2]], 0, g.src_w)
        src_boxes[:, [1, 3]] = np.clip(px[:, [1, 3]], 0, g.src_h)
    else:
        src_boxes = _to_source(np.asarray(boxes, np.float64)[idx], g)
    norm = src_boxes / np.array([g.src_w, g.src_h, g.src_w, g.src_h])
    for j, i in enumerate(idx):
        dets.append({"class_id": int(cls[i]), "class_name": names[int(cls[i])],
                     "confidence": r6(scores[i]), "bbox": r6(norm[j]), "track_id": None})
    if rot is not None:
        for j, d in enumerate(dets):
            d["rotated_box"] = r6(src[j])
            d["polygon"] = r6(pts[j] / np.array([g.src_w, g.src_h]))
    if task == "pose" and dets:
        k, d = case.kpt_shape
        off = 4 + len(names) if arch == "yolo" else 6
        kp = np.asarray(outputs[0].T if arch == "yolo" else outputs[0], np.float64)[idx, off:off + k * d]
        kp = kp.reshape(len(idx), k, d)
        x = np.clip((kp[..., 0] - g.pad_left) / g.scale_x, 0, g.src_w) / g.src_w
        y = np.clip((kp[..., 1] - g.pad_top) / g.scale_y, 0, g.src_h) / g.src_h
        for j, det in enumerate(dets):
            det["keypoints"] = [[r6(x[j, m]), r6(y[j, m]), r6(kp[j, m, 2]) if d == 3 else None]
                                for m in range(k)]
    if task == "segment" and dets and mask_format != "none":
        off = 4 + len(names) if arch == "yolo" else 6
        coeffs = np.ascontiguousarray(np.asarray(
            outputs[0].T if arch == "yolo" else outputs[0], np.float32)[idx, off:off + 32])
        fmt = reference_masks.MASK_RLE if mask_format == "rle" else reference_masks.MASK_POLYGON
        px = (norm * np.array([g.src_w, g.src_h, g.src_w, g.src_h])).astype(np.float32)
        masks = reference_masks.segment_masks(outputs[1], coeffs, px, g.src_w, g.src_h, fmt)
        kept = []
        for det, m in zip(dets, masks, strict=True):
            if mask_format == "rle":
                if not reference_masks.rle_decode(m, g.src_h, g.src_w).any():
                    continue  # Ultralytics drops a detection whose mask is empty
                det["mask"] = {"size": [g.src_h, g.src_w], "counts": m}
            else:
                if not len(m):
                    continue
                det["polygon"] = r6(m)
            kept.append(det)
        dets = kept
    return {"detections": dets}


def input_geometry(resize: str, src_w: int, src_h: int, dst_w: int, dst_h: int) -> Geom:
    """Where the source lands in the input, as the families' preprocessing places it:
    Ultralytics' LetterBox, a plain resize, or torchvision's Resize(shorter side) +
    CenterCrop (Ultralytics' classify_transforms)."""
    if resize == "stretch":
        return Geom(dst_w / src_w, dst_h / src_h, 0.0, 0.0, src_w, src_h)
    if resize == "letterbox":
        r = min(dst_w / src_w, dst_h / src_h)
        nw, nh = round(src_w * r), round(src_h * r)
        return Geom(r, r, round((dst_w - nw) / 2 - 0.1), round((dst_h - nh) / 2 - 0.1), src_w, src_h)
    size = min(dst_w, dst_h)
    if src_w <= src_h:
        rw, rh = size, int(size * src_h / src_w)
    else:
        rw, rh = int(size * src_w / src_h), size
    return Geom(rw / src_w, rh / src_h, -round((rw - dst_w) / 2.0),
                -round((rh - dst_h) / 2.0), src_w, src_h)
