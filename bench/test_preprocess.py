"""NV12 frame -> 640x640 letterboxed float32 CHW: our kernel vs OpenCV, single thread.

    python -m pytest bench/test_preprocess.py --benchmark-only

One group per source resolution, so each comparison prints side by side:
- `vasipc`: `letterbox_into` writing straight into the (preallocated) input slot;
- `vasipc_threads2`: the same with `threads=2` (the output rows split between the calling
  thread and one of the kernel's persistent pool; not single-threaded, listed for the ratio);
- `opencv`: the reference pipeline of docs/contract.md 6 as a Python server would write it:
  cvtColor NV12->RGB, resize INTER_LINEAR, copyMakeBorder 114, astype(float32)/255,
  transpose to CHW (contiguous);
- `graph_cpu`: the preprocessing graph the GPU path runs (vasipc/preprocess_graph.py), here
  on ONNX Runtime's CPU provider with one thread: what `--preprocess graph` costs on a CPU;
- `opencv_blob`: OpenCV at its best: cvtColor, resize into the centre of a preallocated
  114-filled canvas (no border copy), then dnn.blobFromImage (scale + CHW in one C++ pass).

- `vasipc_old`: the same call on a build of the kernel before issue 10 (the general
  placement, plane order and mean/std), loaded from the .so file that
  `VASIPC_BENCH_OLD_LETTERBOX` names (skipped without it): the no-regression check. Build
  it with `git worktree add /tmp/old <commit> && cd /tmp/old && python build.py --only
  letterbox` and point the variable at /tmp/old/vasipc/_fast/letterbox*.so;
- `vasipc_imagenet_stretch`, `vasipc_center_crop_224`: other families' preprocessing
  (RF-DETR's stretch with ImageNet mean/std into 640x640; the classifier's centre crop
  into 224x224, listed for scale, not a like-for-like comparison); `vasipc_center_crop_224_
  antialias`: the classifier's default, the same crop with PIL's antialiased resize (its
  footprint grows with the downscale: every source pixel of the crop is read), and
  `pil_center_crop_224`, the same tensor as Ultralytics makes it (cvtColor, PIL resize,
  crop, /255), bit for bit.

Groups `formats <name>`: a 1080p frame in each other pixel format pipelines emit
(docs/contract.md 5.3) -> 640x640 letterbox, `vasipc` against `opencv`, the same reference
pipeline with that format's cvtColor (COLOR_YUV2RGB_NV21, BGR2RGB, BGRA2RGB, RGBA2RGB,
GRAY2RGB), each result held to 1/255 of OpenCV's.

A last group, `tiny`, letterboxes a 64x48 frame into 64x64 with threads=1 and 2: the work
is a few microseconds, so threads=2 shows what handing a range to another thread costs (a pool
thread's wake-up, formerly a pthread_create + join per call).
"""

from __future__ import annotations

import importlib.util
import os

import cv2
import numpy as np
import pytest
from _common import RESOLUTIONS as _RESOLUTIONS
from _common import nv12_photo, photo

from vasipc._fast.letterbox import NV12, letterbox_geometry, letterbox_into
from vasipc.frames import PACKED_LAYOUTS, PIXEL_FORMATS, encode_frame, packed_stride
from vasipc.preprocess import IMAGENET, Preprocess

SIZE = 640
# 1440p: 4:1, the general two-tap path with no source row shared between output rows
RESOLUTIONS = {**_RESOLUTIONS, "1440p": (2560, 1440)}


@pytest.fixture(scope="module", params=list(RESOLUTIONS), ids=list(RESOLUTIONS))
def frame(request):
    w, h = RESOLUTIONS[request.param]
    return request.param, nv12_photo(w, h), w, h, letterbox_geometry(w, h, SIZE, SIZE)


def vasipc_letterbox(nv12, w, h, geom, out, threads=1):
    _, nw, nh, left, top = geom
    letterbox_into(nv12, NV12, w, h, w, out, nw, nh, left, top, threads=threads)
    return out


def opencv_letterbox(nv12, w, h, geom):
    _, nw, nh, left, top = geom
    rgb = cv2.cvtColor(nv12.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_NV12)
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    padded = cv2.copyMakeBorder(resized, top, SIZE - nh - top, left, SIZE - nw - left,
                                cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return np.ascontiguousarray((padded.astype(np.float32) / 255).transpose(2, 0, 1))


def opencv_blob(nv12, w, h, geom, canvas):
    _, nw, nh, left, top = geom
    rgb = cv2.cvtColor(nv12.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_NV12)
    cv2.resize(rgb, (nw, nh), dst=canvas[top:top + nh, left:left + nw],
               interpolation=cv2.INTER_LINEAR)
    return cv2.dnn.blobFromImage(canvas, scalefactor=1 / 255)[0]


def _group(benchmark, name):
    benchmark.group = f"preprocess {name} NV12 -> {SIZE}x{SIZE} float32 CHW"


def test_vasipc(benchmark, frame):
    name, nv12, w, h, geom = frame
    _group(benchmark, name)
    out = np.empty((3, SIZE, SIZE), np.float32)
    got = benchmark(vasipc_letterbox, nv12, w, h, geom, out)
    # same work as the reference (docs/contract.md 6 tolerance), so the timings compare like with like
    assert np.abs(got - opencv_letterbox(nv12, w, h, geom)).mean() < 2 / 255


@pytest.fixture(scope="module")
def old_kernel():
    path = os.environ.get("VASIPC_BENCH_OLD_LETTERBOX")
    if not path:
        pytest.skip("VASIPC_BENCH_OLD_LETTERBOX names no old letterbox build")
    spec = importlib.util.spec_from_file_location("letterbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vasipc_old(benchmark, frame, old_kernel):
    name, nv12, w, h, geom = frame
    _group(benchmark, name)
    _, nw, nh, left, top = geom
    out = np.empty((3, SIZE, SIZE), np.float32)
    benchmark(old_kernel.letterbox_into, nv12, NV12, w, h, w, out, nw, nh, left, top)
    assert np.array_equal(out, vasipc_letterbox(nv12, w, h, geom, np.empty_like(out)))


@pytest.mark.parametrize(("pre", "size"), [
    (IMAGENET, SIZE), (Preprocess(resize="center_crop"), 224),
    (Preprocess(resize="center_crop", filter="antialias"), 224)],
    ids=["imagenet_stretch", "center_crop_224", "center_crop_224_antialias"])
def test_vasipc_family(benchmark, frame, pre, size):
    name, nv12, w, h, _ = frame
    _group(benchmark, name)
    _, placement = pre.placement(w, h, size, size)
    out = np.empty((3, size, size), np.float32)
    benchmark(letterbox_into, nv12, NV12, w, h, w, out, *placement, mean=pre.mean, std=pre.std,
              antialias=pre.filter == "antialias")


def pil_center_crop(nv12, w, h, size):
    """Ultralytics' classifier preprocessing on the frame: cvtColor to RGB, PIL image,
    torchvision's Resize (PIL's resize) and CenterCrop, ToTensor (/255, CHW)."""
    from PIL import Image

    _, (nw, nh, left, top) = Preprocess(resize="center_crop").placement(w, h, size, size)
    rgb = cv2.cvtColor(nv12.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_NV12)
    image = Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR)
    image = image.crop((-left, -top, -left + size, -top + size))
    return np.ascontiguousarray((np.asarray(image, np.float32) / 255).transpose(2, 0, 1))


def test_pil_center_crop_224(benchmark, frame):
    """The reference for `vasipc_center_crop_224_antialias`: the same tensor, bit for bit."""
    name, nv12, w, h, _ = frame
    _group(benchmark, name)
    got = benchmark(pil_center_crop, nv12, w, h, 224)
    pre = Preprocess(resize="center_crop", filter="antialias")
    out = np.empty((3, 224, 224), np.float32)
    letterbox_into(nv12, NV12, w, h, w, out, *pre.placement(w, h, 224, 224)[1], antialias=True)
    assert np.array_equal(got, out)


def test_vasipc_threads2(benchmark, frame):
    name, nv12, w, h, geom = frame
    _group(benchmark, name)
    out = np.empty((3, SIZE, SIZE), np.float32)
    got = benchmark(vasipc_letterbox, nv12, w, h, geom, out, 2)
    assert np.array_equal(got, vasipc_letterbox(nv12, w, h, geom, np.empty_like(out)))


def test_graph_cpu(benchmark, frame):
    import onnxruntime as ort

    from vasipc.preprocess_graph import PreprocessSession

    name, nv12, w, h, geom = frame
    _group(benchmark, name)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = PreprocessSession(NV12, SIZE, SIZE, sess_options=options)
    got = benchmark(session.run, nv12, w, h, w)
    assert np.abs(got.reshape(3, SIZE, SIZE) - opencv_letterbox(nv12, w, h, geom)).mean() < 2 / 255


def test_opencv(benchmark, frame):
    name, nv12, w, h, geom = frame
    _group(benchmark, name)
    benchmark(opencv_letterbox, nv12, w, h, geom)


def test_opencv_blob(benchmark, frame):
    name, nv12, w, h, geom = frame
    _group(benchmark, name)
    canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
    got = benchmark(opencv_blob, nv12, w, h, geom, canvas)
    np.testing.assert_allclose(got, opencv_letterbox(nv12, w, h, geom), atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_vasipc_tiny(benchmark, threads):
    size, w, h = 64, 64, 48
    benchmark.group = f"preprocess tiny {w}x{h} NV12 -> {size}x{size}: thread hand-off cost"
    nv12, geom = nv12_photo(w, h), letterbox_geometry(w, h, size, size)
    out = np.empty((3, size, size), np.float32)
    got = benchmark(vasipc_letterbox, nv12, w, h, geom, out, threads)
    assert np.array_equal(got, vasipc_letterbox(nv12, w, h, geom, np.empty_like(out)))


# --- the other pixel formats ------------------------------------------------------------------

# Each format's OpenCV conversion to RGB (the reference pipeline's first step).
FORMAT_CONVERSIONS = {"NV21": cv2.COLOR_YUV2RGB_NV21, "I420": cv2.COLOR_YUV2RGB_I420,
                      "BGR24": cv2.COLOR_BGR2RGB, "BGRA": cv2.COLOR_BGRA2RGB,
                      "BGRx": cv2.COLOR_BGRA2RGB, "RGBA": cv2.COLOR_RGBA2RGB,
                      "RGBx": cv2.COLOR_RGBA2RGB, "GRAY8": cv2.COLOR_GRAY2RGB}


@pytest.fixture(scope="module", params=list(FORMAT_CONVERSIONS))
def format_frame(request):
    """(name, code, the frame's bytes, their array shape for cvtColor, w, h, geometry) of
    a 1080p frame in each format."""
    name = request.param
    code = PIXEL_FORMATS[name]
    w, h = RESOLUTIONS["1080p"]
    data = encode_frame(photo(w, h), code)
    if code in PACKED_LAYOUTS:
        nbytes = PACKED_LAYOUTS[code][0]
        shape = (h, w, nbytes) if nbytes > 1 else (h, w)
    else:
        shape = (h * 3 // 2, w)
    return name, code, data, shape, w, h, letterbox_geometry(w, h, SIZE, SIZE)


def opencv_format_letterbox(data, shape, conversion, geom):
    _, nw, nh, left, top = geom
    rgb = cv2.cvtColor(data.reshape(shape), conversion)
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    padded = cv2.copyMakeBorder(resized, top, SIZE - nh - top, left, SIZE - nw - left,
                                cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return np.ascontiguousarray((padded.astype(np.float32) / 255).transpose(2, 0, 1))


def _format_group(benchmark, name):
    benchmark.group = f"preprocess formats {name} 1080p -> {SIZE}x{SIZE} float32 CHW"


def test_format_vasipc(benchmark, format_frame):
    name, code, data, shape, w, h, geom = format_frame
    _format_group(benchmark, name)
    _, nw, nh, left, top = geom
    out = np.empty((3, SIZE, SIZE), np.float32)
    benchmark(letterbox_into, data, code, w, h, packed_stride(w, code), out, nw, nh, left, top)
    want = opencv_format_letterbox(data, shape, FORMAT_CONVERSIONS[name], geom)
    assert np.abs(out - want).max() <= 1 / 255 + 1e-6


def test_format_opencv(benchmark, format_frame):
    name, _, data, shape, _, _, geom = format_frame
    _format_group(benchmark, name)
    benchmark(opencv_format_letterbox, data, shape, FORMAT_CONVERSIONS[name], geom)
