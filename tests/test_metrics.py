"""`--metrics-port`: /metrics, /healthz, /readyz on real servers, scraped over real HTTP and
parsed with prometheus_client's parser; and `Stats` recording from many threads at once."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import wire
from prometheus_client.parser import text_string_to_metric_families
from serve_cli import assert_refused, run_serve

from vasipc.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S, STAGES, Stats

MODEL_ID = "nudenet-320n"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- helpers -----------------------------------------------------------------------------------

def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(base: str) -> Samples:
    status, body = http_get(base + "/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples}


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_url(server, timeout: float = 30.0) -> str:
    """The metrics address from the server's startup line."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"metrics (http://[0-9.]+:\d+)", server.stderr_text())
        if m:
            return m.group(1)
        assert time.monotonic() < deadline, f"no metrics address logged:\n{server.stderr_text()}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def histogram(samples: Samples, name: str, **labels: str) -> tuple[list[float], float, float]:
    """(cumulative bucket counts in bound order, +Inf included), count, sum."""
    bounds = sorted((dict(lab)["le"] for n, lab in samples if n == name + "_bucket"
                     and {k: v for k, v in lab if k != "le"} == labels), key=float)
    buckets = [val(samples, name + "_bucket", **labels, le=b) for b in bounds]
    return buckets, val(samples, name + "_count", **labels), val(samples, name + "_sum", **labels)


def expected_buckets(values: list[float], bounds: tuple) -> list[int]:
    return [sum(v <= b for v in values) for b in bounds] + [len(values)]


def infer(path: str, frame: str, model_id: str = MODEL_ID) -> dict:
    return wire.roundtrip(path, wire.infer_request(frame, model_id))


# --- /metrics ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_follow_the_requests(server_factory, astronaut_frame, shm_dir):
    """Counts by op and error_code, the stage and total histograms (bucket by bucket, from
    the responses' own metadata), batches, frame bytes, gauges and the model info."""
    server = server_factory("--metrics-port", "0", "--metrics-host", "127.0.0.1",
                            "--max-batch", "4")
    base = metrics_url(server)
    path, frame = server.socket, str(astronaut_frame)
    before = scrape(base)

    n_conn, depth = 4, 8  # pipelined: requests that find the device busy batch together
    oks = [infer(path, frame) for _ in range(5)]
    socks = [wire.connect(path, timeout=60) for _ in range(n_conn)]
    for s in socks:
        s.sendall(b"".join(wire.encode(wire.infer_request(frame, MODEL_ID)) for _ in range(depth)))
    for s in socks:
        oks += [wire.recv(s) for _ in range(depth)]
        s.close()
    assert all(r["error_code"] is None and r["frame_id"] == 42 for r in oks), oks
    missing = [infer(path, str(shm_dir / "missing")) for _ in range(2)]
    assert [r["error_code"] for r in missing] == ["frame_not_found"] * 2
    assert infer(path, frame, "someone-else")["error_code"] == "model_mismatch"
    with wire.connect(path) as s:
        s.sendall(wire.frame(b"not json"))
        assert wire.recv(s)["error_code"] == "invalid_message"
    assert wire.roundtrip(path, {"op": "nope"})["error_code"] == "invalid_request"
    info = wire.roundtrip(path, {"op": "info"})
    for _ in range(2):
        assert wire.roundtrip(path, {"op": "health"})["ready"] is True
    held = [wire.connect(path) for _ in range(3)]  # open connections, each accepted
    for s in held:
        wire.send(s, {"op": "health"})
        wire.recv(s)

    after = scrape(base)
    for s in held:
        s.close()

    def moved(name: str, **labels: str) -> float:
        return val(after, name, **labels) - val(before, name, **labels)

    n_ok = len(oks)
    req = "vasipc_requests_total"
    assert moved(req, op="infer", error_code="ok") == n_ok
    assert moved(req, op="infer", error_code="frame_not_found") == 2
    assert moved(req, op="infer", error_code="model_mismatch") == 1
    assert moved(req, op="unknown", error_code="invalid_message") == 1
    assert moved(req, op="unknown", error_code="invalid_request") == 1
    assert moved(req, op="info", error_code="ok") == 1
    assert moved(req, op="health", error_code="ok") == 2 + len(held)
    assert sum(v for (n, _), v in after.items() if n == req) \
        - sum(v for (n, _), v in before.items() if n == req) == n_ok + 2 + 1 + 1 + 1 + 1 + 5

    # the histograms hold exactly the successful responses' metadata
    md = [r["metadata"] for r in oks]
    for stage in STAGES:
        buckets, count, total = histogram(after, "vasipc_stage_duration_seconds", stage=stage)
        values = [m[f"{stage}_ms"] / 1e3 for m in md]
        assert count == n_ok and buckets[-1] == n_ok, stage
        assert buckets == expected_buckets(values, LATENCY_BUCKETS_S), stage
        assert total == pytest.approx(sum(values), rel=1e-9, abs=1e-12), stage
    buckets, count, total = histogram(after, "vasipc_request_duration_seconds")
    totals = [m["total_ms"] / 1e3 for m in md]
    assert count == n_ok and buckets == expected_buckets(totals, LATENCY_BUCKETS_S)
    assert total == pytest.approx(sum(totals), rel=1e-9)
    stage_sum = sum(val(after, "vasipc_stage_duration_seconds_sum", stage=s) for s in STAGES)
    assert 0 < stage_sum <= total  # the stages are parts of each request's total

    # batches, as the responses saw them: a batch of n answers n requests with batch_size n
    sizes = [m["batch_size"] for m in md]
    assert max(sizes) <= 4
    batches = []
    for n in set(sizes):
        assert sizes.count(n) % n == 0, sizes
        batches += [n] * (sizes.count(n) // n)
    buckets, count, total = histogram(after, "vasipc_batch_size")
    assert count == len(batches) and total == n_ok
    assert buckets == expected_buckets(batches, BATCH_BUCKETS)

    frame_bytes = (astronaut_frame / "frame.data").stat().st_size
    assert moved("vasipc_frame_read_bytes_total") == n_ok * frame_bytes

    assert val(after, "vasipc_queue_depth") == 0
    assert val(after, "vasipc_in_flight_requests") == 0
    assert val(after, "vasipc_open_connections") >= len(held)
    assert val(after, "vasipc_model_info", model_id=MODEL_ID,
               model_version=info["model_version"], providers=",".join(info["providers"]),
               device=info["device"], backend=info["backend"], precision=info["precision"],
               streams=str(info["streams"]), architecture="yolo", task="detect") == 1
    assert val(after, "vasipc_reloads_total", result="ok") == 0
    assert ("vasipc_reloads_total", (("result", "failed"),)) in after
    assert val(after, "process_resident_memory_bytes") > 0


@pytest.mark.slow
def test_reload_counts_on_metrics(server_factory):
    """SIGHUP reloads the model; /metrics reads the server's reload counts when scraped."""
    server = server_factory("--metrics-port", "0", "--metrics-host", "127.0.0.1")
    base = metrics_url(server)
    assert val(scrape(base), "vasipc_reloads_total", result="ok") == 0
    os.kill(server.pid, signal.SIGHUP)
    deadline = time.monotonic() + 60
    while val(after := scrape(base), "vasipc_reloads_total", result="ok") < 1:
        assert time.monotonic() < deadline, server.stderr_text()
        time.sleep(0.1)
    assert val(after, "vasipc_reloads_total", result="ok") == 1
    assert val(after, "vasipc_reloads_total", result="failed") == 0
    assert any(n == "vasipc_model_info" for n, _ in after)


# --- probes ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_probes_during_load_and_while_serving(server_factory, tmp_path, monkeypatch):
    """The HTTP server is up before the model loads: /healthz 200, /readyz 503 (the labels
    file is a FIFO, so the load waits for us), then 200 once serving. Options from the
    environment; unknown paths 404."""
    port = free_port()
    monkeypatch.setenv("VASIPC_METRICS_PORT", str(port))
    monkeypatch.setenv("VASIPC_METRICS_HOST", "127.0.0.1")
    labels = tmp_path / "labels.txt"
    os.mkfifo(labels)
    server = server_factory("--labels", str(labels), wait=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert server.proc.poll() is None, server.stderr_text()
        try:
            status, _ = http_get(base + "/healthz", timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, server.stderr_text()
            time.sleep(0.05)
    assert status == 200
    assert http_get(base + "/readyz") == (503, b"not ready\n")
    assert not os.path.exists(server.socket)  # still loading
    loading = scrape(base)
    assert val(loading, "process_resident_memory_bytes") > 0
    assert not any(n.startswith("vasipc_") for n, _ in loading)
    with open(labels, "w") as f:  # the server was blocked opening it
        f.write("".join(f"class{i}\n" for i in range(18)))
    server.wait_ready()
    assert http_get(base + "/readyz") == (200, b"ready\n")
    assert http_get(base + "/healthz")[0] == 200
    assert http_get(base + "/nothing")[0] == 404
    assert http_get(base + "/metrics?x=1")[0] == 200
    assert f"metrics http://127.0.0.1:{port}" in server.stderr_text()


@pytest.mark.slow
def test_readyz_503_while_draining(server_factory, bench_model, astronaut_frame):
    """SIGTERM with ~2 s of work queued: while the server drains, /readyz says 503 and
    /healthz 200, as the socket's health says ready false."""
    server = server_factory("--metrics-port", "0", "--metrics-host", "127.0.0.1",
                            "--drain-timeout", "120", model=bench_model, model_id="bench-m")
    base = metrics_url(server)
    assert http_get(base + "/readyz")[0] == 200
    n_conn, depth = 2, 10
    monitor = wire.connect(server.socket)
    socks = [wire.connect(server.socket, timeout=120) for _ in range(n_conn)]
    try:
        for s in socks:
            s.sendall(b"".join(wire.encode(wire.infer_request(str(astronaut_frame), "bench-m"))
                               for _ in range(depth)))
        deadline = time.monotonic() + 30
        while True:  # every request read: the drain must answer them all
            wire.send(monitor, {"op": "health"})
            if wire.recv(monitor)["requests_total"] >= n_conn * depth:
                break
            assert time.monotonic() < deadline
            time.sleep(0.005)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while http_get(base + "/readyz")[0] != 503:
            assert time.monotonic() < deadline, "readyz still 200 after SIGTERM"
            time.sleep(0.01)
        assert http_get(base + "/healthz")[0] == 200
        wire.send(monitor, {"op": "health"})
        h = wire.recv(monitor)
        assert h["ready"] is False and h["in_flight"] > 0, h  # observed during the drain
        for s in socks:
            assert all(wire.recv(s)["error_code"] is None for _ in range(depth))
        assert server.proc.wait(60) == 0
    finally:
        monitor.close()
        for s in socks:
            s.close()


def test_metrics_port_taken_is_exit_2(nudenet_model, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--model", nudenet_model, "--socket", str(tmp_path / "s.sock"),
                           "--metrics-host", "127.0.0.1", "--metrics-port", str(port))
    assert_refused(result, "metrics", str(port), max_lines=1)
    assert not (tmp_path / "s.sock").exists()


def test_bad_metrics_port_is_a_usage_error(nudenet_model):
    assert_refused(run_serve("--model", nudenet_model, "--metrics-port", "70000"),
                   "--metrics-port")


# --- Stats under concurrency -------------------------------------------------------------------

def test_stats_lose_nothing_under_concurrent_recording():
    """Threads recording while others fold and scrape: every response is counted once."""
    stats = Stats()
    threads, per_thread = 4, 20_000
    md = {"queue_ms": 0.2, "preprocess_ms": 1.0, "inference_ms": 3.0, "postprocess_ms": 0.1,
          "total_ms": 4.5, "batch_size": 2}
    done = threading.Event()

    def record(i: int) -> None:
        for k in range(per_thread):
            if k % 3:
                stats.infer_ok(md)
            else:
                stats.count("infer", f"code{i}")

    def scrape_loop() -> None:
        while not done.is_set():
            stats.snapshot()

    scraper = threading.Thread(target=scrape_loop)
    scraper.start()
    workers = [threading.Thread(target=record, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    scraper.join()
    snap = stats.snapshot()
    n_err = len(range(0, per_thread, 3))
    n_ok = threads * (per_thread - n_err)
    assert snap["counts"] == {("infer", "ok"): n_ok, **{("infer", f"code{i}"): n_err
                                                        for i in range(threads)}}
    assert snap["latency"].sum(axis=1).tolist() == [n_ok] * (len(STAGES) + 1)
    assert snap["latency_sum_ms"][-1] == pytest.approx(4.5 * n_ok)
    assert snap["batch_sizes"].sum() == 0  # recorded by the batcher, once per batch
