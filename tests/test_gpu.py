"""The CUDA path: `--device cuda` / `auto` on a real GPU with onnxruntime-gpu.

Skipped where no GPU is usable (CI has none); run on the lent GPU machine with
bench/gpu_check.sh. Results must match the CPU server's within the 1e-3 tolerance the
GPU issue sets for CUDA.
"""

from __future__ import annotations

import shutil
import socket
import threading

import numpy as np
import pytest
from contract_util import (
    FORMATS,
    assert_ok,
    assert_serving,
    infer,
    raw_4k_truncated_in_flight,
    write_dir,
    write_raw,
)

ort = pytest.importorskip("onnxruntime")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers() or not shutil.which("nvidia-smi"),
        reason="no CUDA GPU with onnxruntime-gpu here"),
]

TOL = 1e-3


@pytest.fixture(scope="module")
def cuda_server(nudenet_model):
    from conftest import ServerLauncher

    launcher = ServerLauncher(nudenet_model)
    try:
        yield launcher("--device", "cuda", model_id="320n")
    finally:
        launcher.close()


def test_cuda_session_is_really_on_the_gpu(cuda_server):
    import wire

    info = wire.roundtrip(cuda_server.socket, {"op": "info"})
    assert info["providers"][0] == "CUDAExecutionProvider"
    assert info["max_batch_size"] >= 1


def _same(g: list[dict], w: list[dict], tol: float = TOL) -> None:
    assert [d["class_id"] for d in g] == [d["class_id"] for d in w]
    for a, b in zip(g, w, strict=True):
        assert abs(a["confidence"] - b["confidence"]) <= tol
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= tol


def test_cuda_detections_match_cpu(cuda_server, server_factory, shm_dir, astronaut_rgb):
    """The CUDA server (graph preprocessing by default) against the CPU server running the
    same preprocessing graph: only the provider differs."""
    frame = shm_dir / "astro"
    write_dir(frame, astronaut_rgb, "NV12")
    cpu = server_factory("--device", "cpu", "--preprocess", "graph", model_id="320n")
    got = infer(cuda_server.socket, frame, model_id="320n")
    want = infer(cpu.socket, frame, model_id="320n")
    assert got["metadata"]["device"] == "cuda:0"
    assert want["metadata"]["device"] == "cpu"
    g, w = assert_ok(got), assert_ok(want)
    assert [d["class_id"] for d in g] == [d["class_id"] for d in w]
    assert any(d["class_name"] == "FACE_FEMALE" for d in g)
    for a, b in zip(g, w, strict=True):
        assert abs(a["confidence"] - b["confidence"]) <= TOL
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= TOL


def test_auto_picks_cuda(server_factory):
    import wire

    server = server_factory("--device", "auto", model_id="320n")
    assert wire.roundtrip(server.socket, {"op": "info"})["providers"][0] == "CUDAExecutionProvider"


# --- the device path (vasipc/device_path.py) on CUDA ---------------------------------------

def test_cuda_server_uses_the_graph_path(cuda_server):
    import wire

    info = wire.roundtrip(cuda_server.socket, {"op": "info"})
    assert info["preprocess"] == "graph"
    assert "preprocess graph (staging " in cuda_server.stderr_text()


def test_cuda_staging_memory_is_pinned(cuda_server):
    """The frame's bytes go up from page-locked memory (else: pageable, slower uploads;
    the server logs which at start)."""
    assert "preprocess graph (staging pinned)" in cuda_server.stderr_text(), \
        cuda_server.stderr_text()[-2000:]


@pytest.fixture(scope="module")
def cpu_servers(nudenet_model):
    from conftest import ServerLauncher

    launcher = ServerLauncher(nudenet_model)
    try:
        yield {"graph": launcher("--device", "cpu", "--preprocess", "graph", model_id="320n"),
               "cpu": launcher("--device", "cpu", model_id="320n")}
    finally:
        launcher.close()


@pytest.mark.parametrize("form", ["dir", "raw"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_graph_matches_cpu_every_format(cuda_server, cpu_servers, shm_dir, astronaut_rgb,
                                             fmt, form):
    """Every pixel format and frame form: the CUDA graph path equals the CPU provider's
    graph path within 1e-3 (same classes), and the C kernel's within the graph's own
    tolerance (boxes 2e-3, confidences 0.02)."""
    if form == "dir":
        ref, md = write_dir(shm_dir / f"a-{fmt}", astronaut_rgb, fmt), None
    else:
        md = write_raw(shm_dir / f"a-{fmt}.raw", astronaut_rgb, fmt)
        ref = shm_dir / f"a-{fmt}.raw"
    got = assert_ok(infer(cuda_server.socket, ref, md, model_id="320n"))
    assert any(d["class_name"] == "FACE_FEMALE" for d in got)
    _same(got, assert_ok(infer(cpu_servers["graph"].socket, ref, md, model_id="320n")))
    kernel = assert_ok(infer(cpu_servers["cpu"].socket, ref, md, model_id="320n"))
    assert [d["class_id"] for d in got] == [d["class_id"] for d in kernel]
    for a, b in zip(got, kernel, strict=True):
        assert abs(a["confidence"] - b["confidence"]) <= 0.02
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= 2e-3


def test_cuda_kernel_path_matches_cpu(server_factory, cpu_servers, shm_dir, astronaut_rgb):
    """--preprocess cpu on CUDA: the C kernel's tensor, uploaded by session.run."""
    frame = write_dir(shm_dir / "astro", astronaut_rgb, "NV12")
    cuda = server_factory("--device", "cuda", "--preprocess", "cpu", model_id="320n")
    _same(assert_ok(infer(cuda.socket, frame, model_id="320n")),
          assert_ok(infer(cpu_servers["cpu"].socket, frame, model_id="320n")))


def _pipelined(path: str, msgs: list[dict]) -> list[dict]:
    import wire

    with wire.connect(path, 60) as s:
        s.sendall(b"".join(wire.encode(m) for m in msgs))
        s.shutdown(socket.SHUT_WR)
        return [wire.recv(s) for _ in msgs]


def test_cuda_batched_equals_unbatched(server_factory, shm_dir, astronaut_rgb):
    """32 concurrent clients, mixed formats: --max-batch 16 (padded runs) against
    --max-batch 1, request by request within 1e-3."""
    import wire

    refs = [str(write_dir(shm_dir / f"f{i}", np.roll(astronaut_rgb, 37 * i, axis=1).copy(),
                          FORMATS[i % 4], frame_id=i)) for i in range(8)]
    streams = [[wire.infer_request(refs[(c + i) % 8], "320n", request_id=f"{c}-{i}",
                                   config={"confidence_threshold": 0.05}) for i in range(8)]
               for c in range(32)]
    results = {}
    for mb in ("1", "16"):
        server = server_factory("--device", "cuda", "--max-batch", mb, model_id="320n")
        got: list = [None] * len(streams)

        def client(c: int, got=got, sock=server.socket) -> None:
            got[c] = _pipelined(sock, streams[c])

        threads = [threading.Thread(target=client, args=(c,)) for c in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        results[mb] = got
    assert max(r["metadata"]["batch_size"] for got in results["16"] for r in got) > 1
    for one, many in zip(results["1"], results["16"], strict=True):
        for ra, rb in zip(one, many, strict=True):
            assert ra["request_id"] == rb["request_id"]
            _same(assert_ok(ra), assert_ok(rb))


def test_cuda_truncated_frame_is_frame_changed(cuda_server, shm_dir):
    """The guarded copy into pinned memory: a frame file shrinking while it is read gives
    frame_changed / frame_invalid, never a crash."""
    codes, _ = raw_4k_truncated_in_flight(cuda_server.socket, shm_dir / "4k.nv12", model_id="320n")
    assert set(codes) <= {None, "frame_changed", "frame_invalid"}, codes
    assert cuda_server.proc.poll() is None
    assert_serving(cuda_server.socket)


def test_reload_under_load_on_cuda(server_factory, tmp_path, nudenet_model, astronaut_frame):
    """Hot reload on the GPU: a new session and device path (buffers, preprocessing
    sessions) beside the serving one, swapped under load: no request fails."""
    from test_reload import reload_under_load, write_version

    model_dir = tmp_path / "det"
    write_version(model_dir, nudenet_model, 1)
    reload_under_load(server_factory, model_dir, nudenet_model, astronaut_frame,
                      ["--device", "cuda", "--max-batch", "8"], reloads=5, clients=8)
