"""The CUDA path: `--device cuda` / `auto` on a real GPU with onnxruntime-gpu.

Skipped where no GPU is usable (CI has none); run on the lent GPU machine with
bench/gpu_check.sh. Results must match the CPU server's within the 1e-3 tolerance the
GPU issue sets for CUDA.
"""

from __future__ import annotations

import shutil

import pytest
from contract_util import assert_ok, infer, write_dir

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


def test_cuda_detections_match_cpu(cuda_server, server_factory, shm_dir, astronaut_rgb):
    frame = shm_dir / "astro"
    write_dir(frame, astronaut_rgb, "NV12")
    cpu = server_factory("--device", "cpu", model_id="320n")
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
