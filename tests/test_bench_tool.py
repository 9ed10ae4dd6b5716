"""`python -m vasipc.bench`, the load generator, run for real against a nudenet server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vasipc import bench


def run_bench(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vasipc.bench", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture
def frame_dir(shm_dir: Path) -> Path:
    """Where the bench writes its frame rings (under /dev/shm, the server's frame root)."""
    return shm_dir


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and the
    # bench leaves an ignored signal ignored: the child gets the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def long_run(child_env: dict[str, str],
             frame_dir: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, Path]]]:
    """long_run(socket, *args) starts a 10-minute closed-loop bench and returns (process,
    ring directory) once its ring holds a frame (with --warmup 0: once measured requests
    are under way); the process is killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(socket: str, *args: str) -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vasipc.bench", "--socket", socket, "-c", "2",
             "--duration", "600", "--width", "320", "--height", "240",
             "--frame-dir", str(frame_dir), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
            preexec_fn=_default_sigint)
        procs.append(proc)
        for line in proc.stdout:
            if line.startswith("-- ") and "; frames in " in line:
                ring = Path(line.rsplit("; frames in ", 1)[1].strip())
                break
        else:
            pytest.fail(f"the bench exited before its run: {proc.wait()} {proc.stderr.read()}")
        assert ring.parent == frame_dir
        deadline = time.monotonic() + 60
        while not any(ring.rglob("slot_*")):  # the writers are at work
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        return proc, ring

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.slow
def test_closed_loop(server_factory, child_env, frame_dir: Path, tmp_path: Path) -> None:
    server = server_factory()
    out = tmp_path / "r.json"
    res = run_bench("--socket", server.socket, "--concurrency", "2", "--duration", "2",
                    "--width", "640", "--height", "480", "--frame-dir", str(frame_dir),
                    "--json", str(out), env=child_env)
    assert res.returncode == 0, res.stderr
    for needle in ("model nudenet-320n", "closed loop, concurrency 2", "throughput:",
                   "errors:     none", "latency ms: p50", "p90", "p99", "max",
                   "server ms (medians): queue", "preprocess", "inference", "postprocess"):
        assert needle in res.stdout, (needle, res.stdout)
    doc = json.loads(out.read_text())
    assert doc["model_id"] == "nudenet-320n"
    assert doc["config"]["concurrency"] == 2 and doc["config"]["open_loop"] is False
    assert doc["requests"] == doc["ok"] > 0 and doc["errors"] == {}
    assert doc["throughput_rps"] > 0
    lat = doc["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert doc["server_ms"]["inference_ms"] > 0 and doc["server_ms"]["batch_size"] >= 1
    assert list(frame_dir.iterdir()) == []  # rings removed


@pytest.mark.slow
def test_open_loop(server_factory, child_env, frame_dir: Path,
                                            tmp_path: Path) -> None:
    server = server_factory()
    out = tmp_path / "o.json"
    res = run_bench("--socket", server.socket, "--cameras", "2", "--fps", "5", "--poisson",
                    "--duration", "2", "--width", "320", "--height", "240", "--format", "BGR24",
                    "--frame-dir", str(frame_dir), "--json", str(out), env=child_env)
    assert res.returncode == 0, res.stderr
    assert "open loop, 2 camera(s) x 5 fps (Poisson)" in res.stdout
    assert "from scheduled send time" in res.stdout and "offered:" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["config"]["open_loop"] is True and doc["offered_rps"] == 10
    assert doc["requests"] == doc["scheduled"] > 0
    assert doc["ok"] == doc["requests"]
    assert doc["client_wait_ms"]["p50"] is not None
    assert list(frame_dir.iterdir()) == []


@pytest.mark.slow
def test_requests_budget_and_errors_by_code(server_factory, child_env, frame_dir: Path,
                                            tmp_path: Path) -> None:
    # A frame root elsewhere: every frame is outside it, so every request is frame_forbidden.
    server = server_factory("--frame-root", str(tmp_path))
    out = tmp_path / "e.json"
    res = run_bench("--socket", server.socket, "-c", "3", "--requests", "10", "--warmup", "0",
                    "--width", "64", "--height", "48", "--frame-dir", str(frame_dir),
                    "--json", str(out), env=child_env)
    assert res.returncode == 0, res.stderr
    assert "errors:     frame_forbidden 10" in res.stdout
    first = next(line for line in res.stdout.splitlines() if line.startswith("requests:"))
    assert "(0 ok, 10 errors = 100.0%)" in first, first
    doc = json.loads(out.read_text())
    assert doc["requests"] == 10 and doc["ok"] == 0 and doc["errors"] == {"frame_forbidden": 10}
    assert doc["error_rate"] == 1.0 and doc["server_lost"] is None
    assert doc["latency_ms"]["p50"] is None
    assert list(frame_dir.iterdir()) == []


@pytest.mark.slow
def test_plot(server_factory, child_env, frame_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    server = server_factory()
    png, out = tmp_path / "sweep.png", tmp_path / "s.json"
    res = run_bench("--socket", server.socket, "--sweep", "1,2", "--plot", str(png),
                    "--duration", "1", "--width", "320", "--height", "240",
                    "--frame-dir", str(frame_dir), "--json", str(out), env=child_env)
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(out.read_text())["runs"]
    assert [r["config"]["concurrency"] for r in runs] == [1, 2]
    assert "| 2 |" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_and_removes_the_rings(sig: signal.Signals, server_factory,
                                                      long_run, frame_dir: Path) -> None:
    server = server_factory()
    proc, ring = long_run(server.socket)
    proc.send_signal(sig)
    assert proc.wait(60) == 128 + sig
    stderr = proc.stderr.read()
    assert f"interrupted by {sig.name}" in stderr and "Traceback" not in stderr, stderr
    assert not ring.exists()
    assert list(frame_dir.iterdir()) == []


@pytest.mark.slow
def test_a_lost_server_stops_the_run(server_factory, long_run, frame_dir: Path) -> None:
    server = server_factory()
    proc, ring = long_run(server.socket, "--warmup", "0")
    server.kill()
    assert proc.wait(60) == 1
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    assert "lost the server on" in stderr and "Traceback" not in stderr, stderr
    first = next(line for line in stdout.splitlines() if line.startswith("requests:"))
    assert "errors = " in first and first.endswith("the server was lost"), first
    assert "client_connection" in stdout
    assert not ring.exists()
    assert list(frame_dir.iterdir()) == []


def test_plot_throughput_axis_starts_at_zero(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")

    def summary(concurrency: int, requests: int) -> dict:
        samples = [bench.Sample(0.01, None, None) for _ in range(requests)]
        return bench.Result({"concurrency": concurrency}, "m", 1.0, samples).summary()

    png = tmp_path / "p.png"
    fig = bench.plot([summary(1, 100), summary(2, 103)], str(png), "a 3% wobble")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    throughput_axis = next(ax for ax in fig.axes if ax.get_ylabel().startswith("throughput"))
    bottom, top = throughput_axis.get_ylim()
    assert bottom == 0 and top >= 103


@pytest.mark.parametrize("args", [
    [],  # no --socket
    ["--socket", "/tmp/x.sock", "--cameras", "2"],  # no --fps
    ["--socket", "/tmp/x.sock", "--cameras", "2", "--fps", "5", "-c", "2"],
    ["--socket", "/tmp/x.sock", "-c", "0"],
    ["--socket", "/tmp/x.sock", "--duration", "abc"],
    ["--socket", "/tmp/x.sock", "--format", "YUYV"],
    ["--socket", "/tmp/x.sock", "--width", "641"],  # odd for NV12
    ["--socket", "/tmp/x.sock", "--sweep", "0,2"],
    ["--socket", "/tmp/x.sock", "--cameras", "1", "--fps", "1", "--sweep", "1,2"],
    ["--socket", "/tmp/x.sock", "--poisson"],
    ["--socket", "/tmp/x.sock", "--frame-dir", "/nonexistent-dir"],
    ["--socket", "/tmp/x.sock", "--bogus"],
])
def test_bad_command_line_exits_2(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) <= 2


@pytest.mark.slow
def test_unreachable_server_exits_1(child_env, tmp_path: Path) -> None:
    res = run_bench("--socket", str(tmp_path / "none.sock"), "-n", "1", env=child_env)
    assert res.returncode == 1
    assert "cannot query" in res.stderr and res.stderr.count("\n") == 1


def test_image_sources(tmp_path: Path) -> None:
    import numpy as np

    rgb, source = bench.load_image(None)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and source
    path = tmp_path / "img.npy"
    np.save(path, np.zeros((10, 12, 3), np.uint8))
    rgb, source = bench.load_image(str(path))
    assert rgb.shape == (10, 12, 3) and source == str(path)
    variants = bench.make_variants(rgb, 64, 48, "I420", 3)
    assert len(variants) == 3 and all(v.size == 64 * 48 * 3 // 2 for v in variants)
    with pytest.raises(bench.UsageError):
        bench.load_image(str(tmp_path / "missing.png"))


def test_no_matplotlib_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(SystemExit) as exc:
        bench.main(["--socket", "/tmp/x.sock", "--plot", os.devnull])
    assert exc.value.code == 2
    assert "matplotlib" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(("case_name", "config"), [("yolo-classify", '{"top_k": 1}'),
                                                   ("yolo-segment", '{"mask_format": "polygon"}'),
                                                   ("yolo-segment", '{"mask_format": "bitmap"}')])
def test_any_task_with_a_request_config(case_name: str, config: str, server_factory, child_env,
                                        frame_dir: Path, tmp_path: Path) -> None:
    """Every task is measured the same way; --config is sent as each request's `config`
    (a value the server refuses shows up as errors, by code)."""
    from family_models import build

    _, model = build(case_name, tmp_path / "model")
    server = server_factory(model=str(model), model_id="m")
    res = run_bench("--socket", server.socket, "--requests", "20", "--width", "320",
                    "--height", "240", "--frame-dir", str(frame_dir), "--config", config,
                    env=child_env)
    task = "classify" if case_name == "yolo-classify" else "segment"
    assert f"model m (yolo-classify {task}" in res.stdout or f"model m (yolo {task}" in res.stdout
    assert res.returncode == 0, res.stderr
    want = "errors:     invalid_request 20" if "bitmap" in config else "errors:     none"
    assert want in res.stdout, res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("config", ["[1]", "{not json"])
def test_config_must_be_a_json_object(config: str, child_env) -> None:
    res = run_bench("--socket", "/nonexistent.sock", "--config", config, env=child_env)
    assert res.returncode == 2 and "--config" in res.stderr and "Traceback" not in res.stderr
