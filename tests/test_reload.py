"""Hot reload (issue 5): SIGHUP and --watch load a new model beside the serving one, warm
it up and swap it in without failing a request; a model that cannot load is refused and
the old one keeps serving.

Each version here is the same trained detector with its own labels file, so a response
says which model answered twice: `metadata.model_version`, and class names of the form
`v<version>_c<id>` that only that version's labels produce. A response whose two answers
disagree was put together from two models.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import wire
from serve_cli import info, spawn

pytestmark = [pytest.mark.usefixtures("every_backend"),  # each test on every runtime
              pytest.mark.slow]  # servers reloading under load (test_logs.py reloads one in the fast subset)

NUM_CLASSES = 18  # nudenet's 320n.onnx
RELOAD_WAIT_S = 180.0  # a hang guard: OpenVINO reloads take ~20 s on a loaded 2-core CI


def write_version(model_dir: Path, weights: str, version: int, *, model_id: str = "det",
                  labels: int = NUM_CLASSES) -> None:
    """model.yaml for `version`, with labels v<version>_c<id>; written whole and renamed
    into place, as a deployment tool would, so the server never reads half a file."""
    model_dir.mkdir(parents=True, exist_ok=True)
    names = model_dir / f"labels_{version}.txt"
    names.write_text("".join(f"v{version}_c{i}\n" for i in range(labels)))
    tmp = model_dir / "model.yaml.tmp"
    tmp.write_text(f"model_id: {model_id}\nmodel_name: reload test\nmodel_weights: {weights}\n"
                   f"model_version: '{version}'\noutput_schema:\n"
                   f"  class_names_file: {names.name}\n")
    os.replace(tmp, model_dir / "model.yaml")


def wait_for(predicate, what: str, server, timeout: float = RELOAD_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert server.proc.poll() is None, f"server died:\n{server.stderr_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{server.stderr_text()}"
        time.sleep(0.02)


def wait_polls(server, n: int) -> None:
    """Wait until the watcher has polled `n` more times (its debug lines: needs
    --log-level DEBUG), so "nothing reloads" is checked over polls, not over time."""
    before = len(log_lines(server, "watch poll"))
    wait_for(lambda: len(log_lines(server, "watch poll")) >= before + n, f"{n} polls", server)


def served_version(server) -> str:
    return info(server.socket)["model_version"]


def log_lines(server, pattern: str) -> list[str]:
    return [ln for ln in server.stderr_text().splitlines() if re.search(pattern, ln)]


def check_consistent(resp: dict) -> int:
    """The response is a success from exactly one version: returns that version."""
    assert resp["error_code"] is None, resp
    version = resp["metadata"]["model_version"]
    for det in resp["detections"]:
        assert det["class_name"] == f"v{version}_c{det['class_id']}", (version, det)
    return int(version)


@pytest.fixture
def model_dir(tmp_path: Path, nudenet_model: str) -> Path:
    d = tmp_path / "det"
    write_version(d, nudenet_model, 1)
    return d


def reload_under_load(server_factory, model_dir: Path, weights: str, frame: Path,
                      args: list[str], reloads: int, clients: int = 16) -> None:
    """`clients` clients infer without pause while the model is reloaded `reloads` times:
    every request succeeds, each response comes from one version, and no client sees a
    version go back. (tests/test_gpu.py runs it on CUDA.)"""
    sock = server_factory.socket_path("reload.sock")
    server = spawn(server_factory, ["--model-dir", str(model_dir), "--socket", sock, *args],
                   sock)
    stop = threading.Event()
    seen: list[list[tuple[int, int]]] = [[] for _ in range(clients)]  # (version, detections)
    request = wire.infer_request(str(frame), "det")

    def client(i: int) -> None:
        with wire.connect(sock, timeout=60) as s:
            while not stop.is_set():
                wire.send(s, request)
                resp = wire.recv(s)
                seen[i].append((check_consistent(resp), len(resp["detections"])))

    with contextlib.ExitStack() as stack:  # joins every client, re-raising a failure
        for i in range(clients):
            stack.enter_context(wire.in_thread(lambda i=i: client(i)))
        stack.callback(stop.set)  # runs first on the way out: the clients stop, then join
        wait_for(lambda: all(seen), "every client's first response", server)
        for version in range(2, reloads + 2):
            write_version(model_dir, weights, version)
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda v=version: served_version(server) == str(v), f"version {version}", server)
            # let the load run across the new version for a few requests before the next one
            n = sum(map(len, seen))
            wait_for(lambda n=n: sum(map(len, seen)) >= n + clients, "requests on the new version",
                     server)

    for versions in seen:
        order = [v for v, _ in versions]
        assert order == sorted(order), "a client saw an older model after a newer one"
    answered = {v for versions in seen for v, _ in versions}
    assert answered == set(range(1, reloads + 2)), sorted(answered)
    detections = sum(d for versions in seen for _, d in versions)
    assert detections > 0, "the astronaut gave no detections: labels were never checked"
    assert len(log_lines(server, r"reloaded \(SIGHUP\): version \d+ -> \d+")) == reloads
    assert server.stop() == 0


@pytest.mark.parametrize("preprocess, reloads", [("cpu", 20), ("graph", 4)])
def test_reload_under_load_fails_no_request(server_factory, model_dir, nudenet_model,
                                            astronaut_frame, preprocess, reloads, every_backend):
    """16 clients while the model is reloaded 20 times (the graph path, whose buffers
    belong to each model's device path, 4 times): no request fails (reload_under_load)."""
    if preprocess == "graph" and every_backend != "onnxruntime":
        pytest.skip("the graph path is ONNX Runtime's")
    reload_under_load(server_factory, model_dir, nudenet_model, astronaut_frame,
                      ["--max-batch", "4", "--preprocess", preprocess], reloads)


@pytest.mark.parametrize("break_it, why", [
    (lambda d, w: (d / "bad.onnx").write_bytes(b"not an onnx model") and
     write_version(d, "bad.onnx", 2), "cannot load"),
    (lambda d, w: write_version(d, "missing.onnx", 2), "does not exist"),
    (lambda d, w: write_version(d, w, 2, model_id="other"), "model id changed"),
    (lambda d, w: write_version(d, w, 2, labels=5), "5"),
    (lambda d, w: (d / "model.yaml").write_text("model_weights: [unclosed\n"), "YAML"),
], ids=["corrupt-weights", "missing-weights", "new-model-id", "class-count", "bad-yaml"])
def test_failed_reload_keeps_the_old_model(server_factory, model_dir, nudenet_model,
                                           astronaut_frame, break_it, why):
    sock = server_factory.socket_path("reload.sock")
    server = spawn(server_factory, ["--model-dir", str(model_dir), "--socket", sock], sock)
    request = wire.infer_request(str(astronaut_frame), "det")
    break_it(model_dir, nudenet_model)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: log_lines(server, "reload refused"), "the refusal", server)
    refused = log_lines(server, "reload refused")
    assert len(refused) == 1 and why.lower() in refused[0].lower(), server.stderr_text()
    assert "still serving version 1" in refused[0]
    assert "Traceback" not in server.stderr_text()
    assert served_version(server) == "1"
    assert check_consistent(wire.roundtrip(sock, request)) == 1
    # fixed, a reload goes through
    write_version(model_dir, nudenet_model, 3)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served_version(server) == "3", "version 3", server)
    assert check_consistent(wire.roundtrip(sock, request)) == 3
    assert server.stop() == 0


def test_watch_picks_up_a_new_version_directory(server_factory, tmp_path, nudenet_model,
                                                astronaut_frame):
    """--models-root with --watch: a version directory moved into place is served, once."""
    root = tmp_path / "models"
    write_version(root / "det" / "1", nudenet_model, 1)
    sock = server_factory.socket_path("watch.sock")
    server = spawn(server_factory, ["--models-root", str(root), "--model-id", "det", "--socket",
                                    sock, "--watch", "--watch-interval", "0.1", "--log-level", "DEBUG"], sock)
    staging = tmp_path / "staging"
    write_version(staging, nudenet_model, 2)
    os.rename(staging, root / "det" / "2")
    wait_for(lambda: served_version(server) == "2", "version 2", server)
    request = wire.infer_request(str(astronaut_frame), "det")
    assert check_consistent(wire.roundtrip(sock, request)) == 2
    wait_polls(server, 10)  # nothing changed, so nothing reloads
    reloads = log_lines(server, r"reloaded \(a watched file changed\)")
    assert len(reloads) == 1, server.stderr_text()
    assert "version 1 -> 2" in reloads[0]
    assert server.stop() == 0


def test_watch_with_a_pinned_version_ignores_new_versions(server_factory, tmp_path,
                                                          nudenet_model):
    """--model-version 1 --watch: a version 2 appearing is not a change of what is served;
    a change to version 1's own model.yaml is."""
    root = tmp_path / "models"
    write_version(root / "det" / "1", nudenet_model, 1)
    sock = server_factory.socket_path("pinned.sock")
    server = spawn(server_factory, ["--models-root", str(root), "--model-id", "det",
                                    "--model-version", "1", "--socket", sock, "--watch",
                                    "--watch-interval", "0.1", "--log-level", "DEBUG"], sock)
    write_version(root / "det" / "2", nudenet_model, 2)
    wait_polls(server, 10)
    assert not log_lines(server, "reloaded|reload refused"), server.stderr_text()
    write_version(root / "det" / "1", nudenet_model, 1)  # rewritten in place: a new inode
    wait_for(lambda: log_lines(server, r"reloaded \(a watched file changed\): version 1 -> 1"),
             "the reload", server)
    assert served_version(server) == "1"
    assert server.stop() == 0


def test_watch_reloads_replaced_weights(server_factory, tmp_path, nudenet_model):
    """--model FILE --watch: weights replaced in place (a rename over the file) reload; a
    file that does not load is refused once, not once per poll."""
    weights = tmp_path / "det.onnx"
    weights.write_bytes(Path(nudenet_model).read_bytes())
    sock = server_factory.socket_path("watch.sock")
    server = spawn(server_factory, ["--model", str(weights), "--socket", sock, "--watch",
                                    "--watch-interval", "0.1", "--log-level", "DEBUG"], sock)
    new = tmp_path / "det.onnx.new"
    new.write_bytes(Path(nudenet_model).read_bytes())
    os.replace(new, weights)
    wait_for(lambda: log_lines(server, r"reloaded \(a watched file changed\)"), "the reload", server)
    new.write_bytes(b"truncated")
    os.replace(new, weights)
    wait_for(lambda: log_lines(server, "reload refused"), "the refusal", server)
    wait_polls(server, 10)
    assert len(log_lines(server, "reload refused")) == 1, server.stderr_text()
    assert wire.roundtrip(sock, {"op": "health"})["ready"] is True
    assert server.stop() == 0


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_sighup_while_loading_is_a_reload_once_serving(server_factory, model_dir):
    """SIGHUP's default action terminates a process: the server catches it before it loads
    the model, and a SIGHUP that came during the load is one reload once serving."""
    sock = server_factory.socket_path("early.sock")
    server = spawn(server_factory, ["--model-dir", str(model_dir), "--socket", sock], sock,
                   wait=False)
    wait_for(lambda: catches(server.pid, signal.SIGHUP), "the SIGHUP handler", server, 30)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_ready()
    wait_for(lambda: log_lines(server, r"reloaded \(SIGHUP\)"), "the reload", server)
    assert server.proc.poll() is None
    assert server.stop() == 0
