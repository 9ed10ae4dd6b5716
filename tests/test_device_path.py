"""The device path (vasipc/device_path.py) and padded batch sizes, on the CPU provider.

`--preprocess graph` runs on CPU exactly the code CUDA runs by default: the frame's bytes
copied (guarded) to a staging buffer, the letterbox graph writing into the batch buffer's
slot through IO binding, the model run IO-bound. The graph matches the C kernel within the
contract's tolerance, not bit for bit, so its detections are compared with the default
server's within a tolerance; batched against unbatched on the same path, within 1e-4.
Every family's Preprocess runs on the path (its geometry, its pad slots), and a run
returns all the model's outputs in their own dtypes with its extra inputs fed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import wire
from contract_util import (
    FORMATS,
    MODEL_ID,
    assert_ok,
    assert_serving,
    infer,
    raw_4k_truncated_in_flight,
    write_dir,
    write_raw,
)

from vasipc import frames
from vasipc._fast import letterbox as lb
from vasipc.batcher import Batcher
from vasipc.device_path import DeviceBatch, DevicePath, resolve_preprocess
from vasipc.errors import FrameChanged
from vasipc.frame_source import FrameOpener, FrameRoots
from vasipc.model import ModelError, ModelSpec, batch_sizes_for, load_model
from vasipc.preprocess import IMAGENET, LETTERBOX, Preprocess
from vasipc.preprocess_graph import PreprocessSession
from vasipc.runtime import Device
from vasipc.schema import parse_infer

REPO_ROOT = Path(__file__).resolve().parents[1]
BOX_TOL = 2e-3   # graph vs C kernel: normalized bbox coordinates
CONF_TOL = 0.02  # and confidences
CONFIDENT = 0.5  # detections at least this confident must be in both results
SAME_PATH_TOL = 1e-4  # batched vs unbatched on one path (the CPU tolerance)


# --- padded batch sizes ----------------------------------------------------------------------

@pytest.mark.parametrize(("max_batch", "sizes"), [
    (1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 4)), (6, (1, 2, 4, 6)),
    (8, (1, 2, 4, 8)), (16, (1, 2, 4, 8, 16)), (20, (1, 2, 4, 8, 16, 20))])
def test_batch_sizes(max_batch, sizes):
    assert batch_sizes_for(max_batch) == sizes
    assert batch_sizes_for(max_batch, fixed_batch=8) == (8,)  # a static batch runs only that


def _spec(path: str) -> ModelSpec:
    return ModelSpec(path=path, model_id=MODEL_ID, model_name="n", model_version="1",
                     threads=1)


class _Recording:
    """An ORT session recording the batch size of every run (plain and IO-bound)."""

    def __init__(self, inner) -> None:
        self.inner, self.sizes = inner, []

    def run(self, names, feeds, options=None):
        self.sizes.append(next(iter(feeds.values())).shape[0])
        return self.inner.run(names, feeds, options)

    def run_with_iobinding(self, binding, options=None):
        self.inner.run_with_iobinding(binding, options)
        self.sizes.append(binding.get_outputs()[0].shape()[0])

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("mode", ["cpu", "graph"])
def test_warm_up_runs_each_padded_size_once(nudenet_model, monkeypatch, mode):
    import vasipc.backends.onnxruntime as ort_backend

    made: list[_Recording] = []
    real = ort_backend.create_session

    def recording(*args, **kw):
        made.append(_Recording(real(*args, **kw)))
        return made[-1]

    monkeypatch.setattr(ort_backend, "create_session", recording)
    m = load_model(_spec(nudenet_model), Device("cpu"), 6, mode)
    assert m.batch_sizes == (1, 2, 4, 6) and m.max_batch == 6 and m.preprocess == mode
    assert made[0].sizes == [1, 2, 4, 6]
    assert [m.run_size(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError):
        m.run_size(7)


def test_preprocess_modes(nudenet_model):
    assert resolve_preprocess("auto", Device("cpu")) == "cpu"
    assert resolve_preprocess("auto", Device("cuda", 1)) == "graph"
    assert resolve_preprocess("graph", Device("cpu")) == "graph"
    assert resolve_preprocess("cpu", Device("cuda")) == "cpu"
    with pytest.raises(ValueError):
        resolve_preprocess("gpu", Device("cpu"))
    with pytest.raises(ModelError, match="preprocess"):
        load_model(_spec(nudenet_model), Device("cpu"), 1, "gpu")


@pytest.fixture(scope="module")
def models(nudenet_model):
    spec = _spec(nudenet_model)
    return {(b, mode): load_model(spec, Device("cpu"), b, mode)
            for b in (1, 4) for mode in ("cpu", "graph")}


@pytest.fixture(scope="module")
def nv12_frames(astronaut_rgb):
    """Three different NV12 frames (uint8 arrays) of one size, with their width and height."""
    out = []
    for i in range(3):
        rgb = np.roll(astronaut_rgb[::2, ::2], 60 * i, axis=1).copy()
        out.append(frames.rgb_to_nv12(rgb))
    h, w = astronaut_rgb[::2, ::2].shape[:2]
    return out, w, h


@pytest.mark.slow
def test_padded_batch_equals_unpadded_requests(models, nv12_frames):
    """n=3 with max_batch 4 runs at 4 (one pad slot): each request's output equals its
    own batch-1 run within 1e-4 (C kernel buffers and the device path alike)."""
    nv12s, w, h = nv12_frames
    for mode in ("cpu", "graph"):
        four, one = models[4, mode], models[1, mode]
        assert four.run_size(3) == 4
        _, placement = LETTERBOX.placement(w, h, four.input_width, four.input_height)
        x = four.new_input(3)
        for i, nv12 in enumerate(nv12s):
            lb.letterbox_into(nv12, lb.NV12, w, h, w, x[i], *placement)
        buf = four.new_buffer()
        if mode == "cpu":
            buf[:3] = x
        else:
            for i, nv12 in enumerate(nv12s):
                four.device_path.preprocess_into(_staged(four, buf, nv12, w, h), buf[i])
        (in_buffer,) = four.run_batch(buf, 3)  # runs the buffer's first 4 slots
        assert in_buffer.shape == (3, 4 + four.num_classes, in_buffer.shape[2])
        for i in range(3):  # each alone in a batch-1 buffer of the same path
            b1 = one.new_buffer()
            if mode == "cpu":
                b1[0] = x[i]
            else:
                one.device_path.preprocess_into(_staged(one, b1, nv12s[i], w, h), b1[0])
            (alone,) = one.run_batch(b1, 1)
            assert np.abs(in_buffer[i] - alone[0]).max() <= 1e-4


# --- the device path in process --------------------------------------------------------------

class _Frame:
    """What DevicePath.stage reads of an OpenFrame."""

    def __init__(self, view, fmt: int, w: int, h: int, stride: int) -> None:
        self.view, self.pixel_format, self.width, self.height, self.stride = view, fmt, w, h, stride


def _staged(model, buf: DeviceBatch, data: np.ndarray, w: int, h: int, fmt: int = lb.NV12,
            stride: int | None = None):
    return model.device_path.stage(_Frame(data, fmt, w, h, stride or lb.min_stride(fmt, w)), buf)


@pytest.mark.slow
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_slot_is_the_graph_output(models, astronaut_rgb, fmt_name):
    """The graph writes its output straight into its slot of the batch buffer, and only
    there; it equals the graph run by itself (PreprocessSession) and the C kernel within
    the contract tolerance. Odd strides included."""
    model = models[4, "graph"]
    rgb = astronaut_rgb[:300, :402]
    h, w = rgb.shape[:2]
    fmt = frames.PIXEL_FORMATS[fmt_name]
    stride = lb.min_stride(fmt, w) + (6 if fmt_name == "I420" else 3)
    data = np.asarray(frames.encode_frame(rgb, fmt_name, stride)).reshape(-1)
    buf = model.new_buffer()
    before = buf.value.numpy()
    geom = model.device_path.preprocess_into(_staged(model, buf, data, w, h, fmt, stride), buf[2])
    after = buf.value.numpy()
    expected_geom, placement = LETTERBOX.placement(w, h, model.input_width, model.input_height)
    assert geom == expected_geom
    assert np.array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))
    ref = PreprocessSession(fmt, model.input_width, model.input_height).run(data, w, h, stride)
    assert np.array_equal(after[2], ref[0])
    kernel = np.empty_like(ref[0])
    lb.letterbox_into(data, fmt, w, h, stride, kernel, *placement)
    assert np.abs(after[2] - kernel).mean() <= 1 / 255
    assert fmt in model.device_path.formats()


MODES = [Preprocess(resize="stretch"), Preprocess(resize="center_crop", channel_order="bgr"),
         IMAGENET, Preprocess(pad_value=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 2.0))]


@pytest.mark.parametrize("pre", MODES, ids=lambda p: f"{p.resize}-{p.channel_order}-{p.pad_value}")
def test_every_family_preprocess_on_the_path(models, astronaut_rgb, pre):
    """A DevicePath for each family's preprocessing: its pad slots start at that family's
    pad value, a slot holds what PreprocessSession gives for it (and the C kernel within
    the contract's tolerance), and letterbox() returns the mode's Geometry."""
    model = models[1, "graph"]
    path = DevicePath(Device("cpu"), model.input_width, model.input_height, 1, pre)
    buf = path.new_batch(model)
    assert np.array_equal(buf.value.numpy(), np.broadcast_to(
        pre.pad_pixel[None, :, None, None], buf.value.numpy().shape))
    rgb = astronaut_rgb[:300, :402]
    h, w = rgb.shape[:2]
    data = frames.rgb_to_nv12(rgb)
    staged = path.stage(_Frame(data, lb.NV12, w, h, w), buf)
    geom = path.preprocess_into(staged, buf[0])
    expected_geom, placement = pre.placement(w, h, model.input_width, model.input_height)
    assert geom == expected_geom
    got = buf.value.numpy()[0]
    ref = PreprocessSession(lb.NV12, model.input_width, model.input_height,
                            preprocess=pre).run(data, w, h, w)
    assert np.array_equal(got, ref[0])
    kernel = np.empty_like(got)
    lb.letterbox_into(data, lb.NV12, w, h, w, kernel, *placement, bgr=pre.channel_order == "bgr",
                      pad_value=pre.pad_value, mean=pre.mean, std=pre.std)
    assert np.abs(got - kernel).mean() * min(pre.std) <= 1 / 255


def test_run_returns_every_output_with_extra_inputs(tmp_path):
    """DevicePath.run on a real D-FINE-shaped model (tests/family_models.py: inputs images
    and orig_target_sizes, outputs labels int64, boxes scaled by the target sizes, scores):
    every output in output_names order, cut to n, C-contiguous, int64 kept, floats float32,
    and orig_target_sizes (the input's own size) fed at the padded size."""
    from family_models import IMGSZ
    from family_models import build as build_case

    from vasipc import model_yaml

    case, path = build_case("dfine", tmp_path)
    spec = model_yaml.model_spec(model_yaml.from_model_dir(str(path)), Device("cpu"), "m")
    model = load_model(spec, Device("cpu"), 4, preprocess="graph")
    assert model.device_path is not None and model.batch_sizes == (1, 2, 4)
    want = dict(case.outputs)
    buf = model.new_buffer()
    for n in (3, 1):  # 3 runs padded to 4, cut to 3
        labels, boxes, scores = model.device_path.run(model, buf, n)
        assert labels.dtype == np.int64 and np.array_equal(labels, np.repeat(want["labels"], n, 0))
        assert boxes.dtype == np.float32
        assert np.allclose(boxes, np.repeat(want["boxes"], n, 0) * IMGSZ, rtol=1e-6)
        assert np.array_equal(scores, np.repeat(want["scores"], n, 0))
        assert all(o.flags.c_contiguous and o.shape[0] == n for o in (labels, boxes, scores))


def test_staging_buffers_are_reused(models, nv12_frames):
    model = models[1, "graph"]
    nv12s, w, h = nv12_frames
    buf = model.new_buffer()
    a = _staged(model, buf, nv12s[0], w, h).value
    b = _staged(model, buf, nv12s[1], w, h).value
    assert a.data_ptr() == b.data_ptr()  # one buffer per frame size, per worker
    assert np.array_equal(b.numpy(), nv12s[1])
    small = np.full(lb.frame_nbytes(lb.NV12, 64, 48, 64), 7, np.uint8)
    c = _staged(model, buf, small, 64, 48).value
    assert c.data_ptr() != a.data_ptr() and c.shape() == [small.size]
    assert model.device_path.staging_kind == "cpu"
    with pytest.raises(IndexError):
        buf[1]


# --- the guarded staging copy ------------------------------------------------------------------

def test_copy_frame_guarded_basics():
    src = np.arange(256, dtype=np.uint8)
    dst = np.zeros(256, np.uint8)
    lb.copy_frame_guarded(src, dst.ctypes.data, 100)
    assert np.array_equal(dst[:100], src[:100]) and not dst[100:].any()
    lb.copy_frame_guarded(b"", dst.ctypes.data, 0)
    with pytest.raises(ValueError, match="holds 256 bytes"):
        lb.copy_frame_guarded(src, dst.ctypes.data, 257)
    with pytest.raises(ValueError):
        lb.copy_frame_guarded(src, 0, 10)
    with pytest.raises(ValueError):
        lb.copy_frame_guarded(src, dst.ctypes.data, -1)


# The child maps a file, copies it once, truncates it through another fd, then copies
# again: FrameBusError in the main thread and in another thread, and the process goes on.
COPY_PROBE = textwrap.dedent("""
    import mmap, os, signal, tempfile, threading
    import numpy as np
    from vasipc._fast import letterbox as lb
    from vasipc._fast.frameview import FrameView

    N = 1 << 22
    dst = np.zeros(N, np.uint8)
    for kind in ("mmap", "frameview"):
        fd, path = tempfile.mkstemp(dir="/dev/shm")
        os.write(fd, np.full(N, 9, np.uint8).tobytes())
        src = mmap.mmap(fd, N, access=mmap.ACCESS_READ) if kind == "mmap" else FrameView(fd, 0, N)
        lb.copy_frame_guarded(src, dst.ctypes.data, N)
        assert (dst == 9).all()
        os.ftruncate(fd, N // 2)
        try:
            lb.copy_frame_guarded(src, dst.ctypes.data, N)
            print(kind, "no error")
        except lb.FrameBusError:
            print(kind, "FrameBusError")
        caught = []
        def worker():
            try:
                lb.copy_frame_guarded(src, dst.ctypes.data, N)
            except lb.FrameBusError:
                caught.append(True)
        t = threading.Thread(target=worker); t.start(); t.join()
        print(kind, "thread", "FrameBusError" if caught else "no error")
        lb.copy_frame_guarded(src, dst.ctypes.data, N // 2)  # what is left still copies
        os.close(fd); os.unlink(path)
    assert signal.SIGBUS not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    print("alive")
""")


@functools.cache
def _copy_probe() -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", COPY_PROBE],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)


def test_copy_frame_guarded_sigbus_in_a_subprocess():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    proc = _copy_probe()
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split("\n") == [
        "mmap FrameBusError", "mmap thread FrameBusError", "frameview FrameBusError",
        "frameview thread FrameBusError", "alive", ""]


def test_graph_preprocess_of_a_truncated_frame_is_frame_changed(models, shm_dir, astronaut_rgb):
    """Batcher._preprocess in graph mode: a frame file truncated between its mapping and
    the staging copy gives frame_changed (FrameChanged, the header's frame_id), and the
    same buffer serves the next frame."""
    if _copy_probe().returncode != 0:
        pytest.fail("the SIGBUS probe subprocess failed; not risking this process")
    model = models[1, "graph"]
    path = write_dir(shm_dir / "f", astronaut_rgb, "NV12", frame_id=7)
    opener = FrameOpener(FrameRoots([str(shm_dir)]), 8192)
    b = Batcher(model, opener, max_queue=1, batch_timeout_s=0, respond=lambda *a: None,
                on_fatal=lambda t: None)
    req = parse_infer(wire.infer_request(str(path), MODEL_ID), MODEL_ID)
    buf = model.new_buffer()
    frame = opener.open(req.frame_reference, req.frame_metadata)
    try:
        os.truncate(path / "frame.data", 0)
        with pytest.raises(FrameChanged) as err:
            Batcher._preprocess_graph(model, frame, buf[0])
        assert err.value.code == "frame_changed" and err.value.frame_id == 7
    finally:
        frame.close()
    assert signal.SIGBUS not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    write_dir(path, astronaut_rgb, "NV12", frame_id=8)
    geom, frame_id = b._preprocess(model, req.frame_reference, req.frame_metadata, buf[0])
    assert frame_id == 8 and (geom.src_w, geom.src_h) == astronaut_rgb.shape[1::-1]
    assert model.run_batch(buf, 1)[0].shape[0] == 1


@pytest.mark.slow
def test_graph_mode_reads_no_frame_copy_in_python(models, shm_dir):
    """The frame reaches the staging buffer by the C copy from the mapping: preprocessing a
    4K frame allocates far less in Python than its 12 MB."""
    import tracemalloc

    w, h = 3840, 2160
    nv12 = np.full(w * h * 3 // 2, 128, np.uint8)
    path = shm_dir / "k4"
    frames.write_frame_dir(path, nv12, width=w, height=h, pixel_format="NV12")
    model = models[1, "graph"]
    b = Batcher(model, FrameOpener(FrameRoots([str(shm_dir)]), 8192), max_queue=1,
                batch_timeout_s=0, respond=lambda *a: None, on_fatal=lambda t: None)
    req = parse_infer(wire.infer_request(str(path), MODEL_ID), MODEL_ID)
    buf = model.new_buffer()
    b._preprocess(model, req.frame_reference, req.frame_metadata, buf[0])  # warm: the staging buffer exists
    tracemalloc.start()
    try:
        b._preprocess(model, req.frame_reference, req.frame_metadata, buf[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < nv12.nbytes / 100, peak
    slot = buf.value.numpy()[0]
    assert np.allclose(slot[:, slot.shape[1] // 2, slot.shape[2] // 2], 128 / 255, atol=0.05)


def test_model_replace_keeps_the_device_path(models):
    """A batch buffer is made for the model that makes it (its session, its sizes)."""
    model = models[4, "graph"]
    other = dataclasses.replace(model)
    buf = other.new_buffer()
    assert isinstance(buf, DeviceBatch) and buf.model is other and len(buf) == 4
    assert isinstance(other.device_path, DevicePath)


# --- servers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(nudenet_model):
    from conftest import ServerLauncher

    launcher = ServerLauncher(nudenet_model)
    try:
        yield {
            "cpu": launcher(),
            "graph": launcher("--preprocess", "graph"),
            "graph4": launcher("--preprocess", "graph", "--max-batch", "4"),
        }
    finally:
        launcher.close()


def _match(got: list[dict], want: list[dict]) -> None:
    """Detections of the graph path against the C kernel's: every confident detection of
    either has a partner of the same class in the other, boxes within BOX_TOL."""
    for a_list, b_list in ((got, want), (want, got)):
        for a in a_list:
            if a["confidence"] < CONFIDENT:
                continue
            partners = [b for b in b_list if b["class_id"] == a["class_id"]
                        and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True))
                        <= BOX_TOL]
            assert partners, (a, b_list)
            assert min(abs(a["confidence"] - b["confidence"]) for b in partners) <= CONF_TOL


@pytest.mark.slow
def test_info_says_graph(servers):
    assert wire.roundtrip(servers["graph"].socket, {"op": "info"})["preprocess"] == "graph"
    assert wire.roundtrip(servers["cpu"].socket, {"op": "info"})["preprocess"] == "cpu"
    info = wire.roundtrip(servers["graph4"].socket, {"op": "info"})
    assert info["max_batch_size"] == 4
    assert "preprocess graph (staging cpu)" in servers["graph4"].stderr_text()
    assert "runs at 1/2/4" in servers["graph4"].stderr_text()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dir", "raw"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_server_finds_the_face(servers, shm_dir, astronaut_rgb, fmt, form):
    if form == "dir":
        ref, md = write_dir(shm_dir / f"a-{fmt}", astronaut_rgb, fmt), None
    else:
        md = write_raw(shm_dir / f"a-{fmt}.raw", astronaut_rgb, fmt)
        ref = shm_dir / f"a-{fmt}.raw"
    got = infer(servers["graph"].socket, ref, md)
    want = infer(servers["cpu"].socket, ref, md)
    g, w = assert_ok(got), assert_ok(want)
    assert any(d["class_name"] == "FACE_FEMALE" and d["confidence"] >= CONFIDENT for d in g), g
    assert got["frame_id"] == want["frame_id"]
    _match(g, w)


def _pipelined(path: str, msgs: list[dict]) -> list[dict]:
    with wire.connect(path, 60) as s:
        s.sendall(b"".join(wire.encode(m) for m in msgs))
        s.shutdown(socket.SHUT_WR)
        out = [wire.recv(s) for _ in msgs]
        assert wire.is_closed(s)
    return out


@pytest.mark.slow
def test_graph_batched_equals_unbatched(servers, astronaut_rgb):
    root = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="vasipc-dp-"))
    try:
        refs = []
        for i, fmt in enumerate(FORMATS * 2):
            rgb = np.roll(astronaut_rgb[::2, ::2], 50 * i, axis=1).copy()
            refs.append(str(write_dir(root / f"f{i}", rgb, fmt, frame_id=i)))
        streams = [[wire.infer_request(refs[(c + i) % len(refs)], MODEL_ID,
                                       request_id=f"{c}-{i}",
                                       config={"confidence_threshold": 0.05})
                    for i in range(12)] for c in range(4)]
        results: dict[str, list] = {}
        for name in ("graph", "graph4"):
            got: list = [None] * len(streams)

            def client(c: int, name=name, got=got) -> None:
                got[c] = _pipelined(servers[name].socket, streams[c])

            threads = [threading.Thread(target=client, args=(c,)) for c in range(len(streams))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            results[name] = got
        sizes = [r["metadata"]["batch_size"] for got in results["graph4"] for r in got]
        assert max(sizes) > 1, sizes
        for one, four in zip(results["graph"], results["graph4"], strict=True):
            for ra, rb in zip(one, four, strict=True):
                assert ra["error_code"] is None and rb["error_code"] is None, (ra, rb)
                assert ra["request_id"] == rb["request_id"]
                da, db = ra["detections"], rb["detections"]
                assert [d["class_id"] for d in da] == [d["class_id"] for d in db]
                for x, y in zip(da, db, strict=True):
                    assert abs(x["confidence"] - y["confidence"]) <= SAME_PATH_TOL
                    assert np.allclose(x["bbox"], y["bbox"], atol=SAME_PATH_TOL)
    finally:
        import shutil
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_graph_server_truncated_frame(servers, shm_dir):
    """A raw frame file shrinking and growing while requests read it: answers are ok,
    frame_changed or frame_invalid, never a crash; the server keeps serving."""
    sock = servers["graph4"].socket
    path = shm_dir / "4k.nv12"
    codes, md = raw_4k_truncated_in_flight(sock, path)
    assert set(codes) <= {None, "frame_changed", "frame_invalid"}, codes
    assert servers["graph4"].proc.poll() is None, servers["graph4"].stderr_text()[-2000:]
    assert_serving(sock)
    os.truncate(path, frames.frame_size(3840, 2160, "NV12"))
    assert_ok(infer(sock, path, md))


@pytest.mark.slow
def test_preprocess_option_and_env(nudenet_model, tmp_path, server_factory, astronaut_frame,
                                   monkeypatch):
    from serve_cli import assert_refused, run_serve

    assert_refused(run_serve("--model", nudenet_model, "--socket", str(tmp_path / "s.sock"),
                             "--preprocess", "gpu"), "--preprocess")
    # the environment variable, as every option's
    monkeypatch.setenv("VASIPC_PREPROCESS", "graph")
    server = server_factory()
    assert wire.roundtrip(server.socket, {"op": "info"})["preprocess"] == "graph"
    assert_ok(infer(server.socket, astronaut_frame))


@pytest.mark.slow
def test_mapping_is_released(models, shm_dir, astronaut_rgb):
    """After a graph-mode preprocess the frame's mapping is gone (closed as on the CPU path)."""
    model = models[1, "graph"]
    path = write_dir(shm_dir / "m", astronaut_rgb, "I420")
    b = Batcher(model, FrameOpener(FrameRoots([str(shm_dir)]), 8192), max_queue=1,
                batch_timeout_s=0, respond=lambda *a: None, on_fatal=lambda t: None)
    req = parse_infer(wire.infer_request(str(path), MODEL_ID), MODEL_ID)
    b._preprocess(model, req.frame_reference, req.frame_metadata, model.new_buffer()[0])
    assert str(path / "frame.data") not in Path("/proc/self/maps").read_text()
