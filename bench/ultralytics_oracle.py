"""Ultralytics itself as the oracle for every task, run by hand (never in CI, never a
dependency): the server's answers against `YOLO(model).predict(...)` on the same ONNX file.

    python -m venv /tmp/oracle && /tmp/oracle/bin/pip install ultralytics==8.4.190 onnxruntime orjson
    python -c "import skimage.data as d, cv2; cv2.imwrite('/tmp/a.png', d.astronaut()[..., ::-1])"
    /tmp/oracle/bin/python bench/ultralytics_oracle.py --image /tmp/a.png \\
        --vasipc-python .venv/bin/python "$VASIPC_ZOO"/*.onnx

For each model and each frame whose model input any correct implementation reproduces
exactly (the model's own input size, and an exact 2x pixel-replicated upscale of it), it
starts `python -m vasipc.serve` (with the project's interpreter), sends the frame as an
RGB24 frame-export directory (vasipc's own client and frame writer: pure Python, taken
from this checkout), runs Ultralytics' predict on the same pixels
(`rect=False, retina_masks=True`, confidence 0.25, IoU 0.45) and compares, as issue 10
states it: the same detections, confidences and coordinates within 0.002, masks at
IoU >= 0.9 (masks of >= 100 pixels), keypoints within 0.002, the same top-5 classes.
Prints one line per model and frame, and the mismatches; exit code 1 on any.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the client and the frame writer need no compiled core

from vasipc.client import Client  # noqa: E402
from vasipc.frames import write_frame_dir  # noqa: E402

TOL = 0.002


def compare(ours, theirs, task: str) -> list[str]:
    """Mismatches between the server's InferResult and an Ultralytics Results."""
    problems: list[str] = []
    if task == "classify":
        got = [c.class_id for c in ours.classifications]
        if got != list(theirs.probs.top5):
            problems.append(f"top-5 {got} != {list(theirs.probs.top5)}")
        return problems
    dets = ours.detections
    if task == "obb":
        conf, cls = theirs.obb.conf.numpy(), theirs.obb.cls.numpy().astype(int)
        boxes = theirs.obb.xyxyxyxyn.numpy().reshape(-1, 8)
        mine = np.array([np.ravel(d.polygon) for d in dets]).reshape(-1, 8)
    else:
        conf, cls = theirs.boxes.conf.numpy(), theirs.boxes.cls.numpy().astype(int)
        boxes = theirs.boxes.xyxyn.numpy()
        mine = np.array([d.bbox for d in dets]).reshape(-1, 4)
    if len(dets) != len(conf):
        return [f"{len(dets)} detections, Ultralytics {len(conf)}"]
    used: set[int] = set()
    for i, d in enumerate(dets):  # each of ours to the nearest unused one of theirs
        cand = [j for j in range(len(conf)) if j not in used and cls[j] == d.class_id]
        if not cand:
            problems.append(f"detection {i}: no Ultralytics detection of class {d.class_id}")
            continue
        j = min(cand, key=lambda j: np.abs(boxes[j] - mine[i]).max() + abs(conf[j] - d.confidence))
        used.add(j)
        box_diff = np.abs(boxes[j] - mine[i]).max()
        if abs(conf[j] - d.confidence) > TOL or box_diff > TOL:
            problems.append(f"detection {i}: conf {d.confidence:.4f} vs {conf[j]:.4f}, "
                            f"box diff {box_diff:.4f}")
            continue
        if task == "pose":
            diff = np.abs(np.array([k[:2] for k in d.keypoints]) - theirs.keypoints.xyn.numpy()[j]).max()
            if diff > TOL:
                problems.append(f"detection {i}: keypoints differ by {diff:.4f}")
        if task == "segment":
            m, t = d.mask.to_array(), theirs.masks.data.numpy()[j] > 0.5
            if max(m.sum(), t.sum()) >= 100 and (m & t).sum() / max(1, (m | t).sum()) < 0.9:
                problems.append(f"detection {i}: mask IoU {(m & t).sum() / (m | t).sum():.3f}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--image", required=True, help="a photo (BGR as cv2 reads it)")
    ap.add_argument("--vasipc-python", required=True, help="the interpreter that has vasipc")
    args = ap.parse_args()
    from ultralytics import YOLO

    bgr = cv2.imread(args.image)
    work = Path(tempfile.mkdtemp(prefix="oracle-", dir="/dev/shm"))
    failures = 0
    try:
        for model in args.models:
            sock = str(work / "s.sock")
            proc = subprocess.Popen([args.vasipc_python, "-m", "vasipc.serve", "--model", model,
                                     "--model-id", "m", "--socket", sock, "--frame-root", str(work)],
                                    cwd=REPO, stderr=subprocess.PIPE)
            try:
                while not os.path.exists(sock):
                    if proc.poll() is not None:
                        raise SystemExit(proc.stderr.read().decode())
                    time.sleep(0.1)
                with Client(sock, model_id="m", timeout=120) as client:
                    info = client.info()
                    task, size = info["task"], info["input"]["width"]
                    yolo = YOLO(model, task=task)
                    own = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
                    for label, img in (("own size", own), ("2x", np.repeat(np.repeat(own, 2, 0), 2, 1))):
                        frame = work / f"f{time.monotonic_ns()}"
                        h, w = img.shape[:2]
                        write_frame_dir(frame, np.ascontiguousarray(img[..., ::-1]), width=w, height=h,
                                        pixel_format="RGB24")
                        ours = client.infer(frame, camera_id="c")
                        theirs = yolo.predict(img, imgsz=size, conf=0.25, iou=0.45, rect=False,
                                              retina_masks=True, verbose=False, max_det=300)[0]
                        problems = compare(ours, theirs, task)
                        n = len(ours.classifications or ours.detections)
                        print(f"{Path(model).name:32s} {label:8s} {task:8s} {n:4d} results  "
                              f"{'ok' if not problems else f'{len(problems)} MISMATCHES'}", flush=True)
                        for p in problems[:10]:
                            print("    " + p)
                        failures += bool(problems)
            finally:
                proc.terminate()
                proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
