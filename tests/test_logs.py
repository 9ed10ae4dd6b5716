"""Logs: `--log-format json|text` on real servers (one line per error class, none per
successful request), the per-class limiter over time, and the JSON formatter."""

from __future__ import annotations

import json
import logging
import re

import pytest
import wire

from vasipc.logs import ErrorLog, JsonFormatter

MODEL_ID = "nudenet-320n"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) vasipc: ")


def parse_lines(stderr: str, fmt: str) -> list[dict]:
    """Every stderr line as {level, message, ...}; each must be a whole log line."""
    out = []
    for line in stderr.splitlines():
        if fmt == "json":
            rec = json.loads(line)
            assert {"time", "level", "logger", "message"} <= rec.keys(), rec
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"]), rec
        else:
            m = TEXT_LINE.match(line)
            assert m, f"not a log line: {line!r}"
            rec = {"level": m.group(1), "message": line[m.end():]}
        out.append(rec)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_one_line_per_error_class_none_per_success(server_factory, astronaut_frame, shm_dir,
                                                   fmt):
    server = server_factory("--log-format", fmt)
    path, frame = server.socket, str(astronaut_frame)
    for _ in range(10):
        assert wire.roundtrip(path, wire.infer_request(frame, MODEL_ID))["error_code"] is None
    missing = str(shm_dir / "missing")
    for _ in range(5):
        resp = wire.roundtrip(path, wire.infer_request(missing, MODEL_ID))
        assert resp["error_code"] == "frame_not_found"
    for _ in range(3):
        resp = wire.roundtrip(path, wire.infer_request(frame, "someone-else"))
        assert resp["error_code"] == "model_mismatch"
    assert server.stop() == 0
    lines = parse_lines(server.stderr_text(), fmt)

    not_found = [r for r in lines if "frame_not_found" in r["message"]]
    assert len(not_found) == 1, lines
    assert not_found[0]["level"] == "WARNING" and missing in not_found[0]["message"]
    mismatch = [r for r in lines if "model_mismatch" in r["message"]]
    assert len(mismatch) == 1 and mismatch[0]["level"] == "WARNING", lines
    if fmt == "json":
        assert not_found[0]["error_code"] == "frame_not_found"
        assert not_found[0]["logger"] == "vasipc"
        start = next(r for r in lines if r["message"].startswith("serving model"))
        assert start["model_id"] == MODEL_ID and start["providers"] == ["CPUExecutionProvider"]
        assert start["device"] == "cpu" and start["socket"] == path and start["max_batch"] == 1
    # INFO: the startup line, draining, stopped; nothing for the 10 answered requests
    info = [r["message"] for r in lines if r["level"] == "INFO"]
    assert len(info) == 3, info
    assert info[0].startswith("serving model") and "metrics off" in info[0]
    assert info[1].startswith("draining") and info[2].startswith("stopped")


def test_cpu_server_starts_without_a_cuda_warning(server_factory):
    """A CPU-only install (onnxruntime without the CUDA provider) serving with --device
    auto: stderr is the startup line and nothing else, no word of CUDA (it once warned
    "no usable CUDA GPU" at every start)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here has the CUDA provider: --device auto is not a CPU server")
    server = server_factory()  # --device auto, the default
    assert wire.roundtrip(server.socket, {"op": "info"})["device"] == "cpu"
    assert server.stop() == 0  # then the startup line has surely been written
    stderr = server.stderr_text()
    lines = parse_lines(stderr, "text")
    assert [r["level"] for r in lines] == ["INFO"] * 3, stderr  # serving, draining, stopped
    assert lines[0]["message"].startswith("serving model") and "device cpu" in lines[0]["message"]
    assert "cuda" not in stderr.lower(), stderr


def test_bad_log_format_is_a_usage_error(nudenet_model):
    from serve_cli import assert_refused, run_serve

    assert_refused(run_serve("--model", nudenet_model, "--log-format", "xml"), "--log-format")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_error_log_counts_the_rest_once_per_interval(caplog):
    clock = _Clock()
    errors = ErrorLog(logging.getLogger("vasipc.test"), interval_s=60.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="vasipc.test")

    def lines() -> list[logging.LogRecord]:
        out = list(caplog.records)
        caplog.clear()
        return out

    for i in range(5):
        errors.note("frame_not_found", f"missing {i}")
    errors.note("overloaded", "queue full")
    first = lines()
    assert [(r.error_code, r.levelno) for r in first] == [("frame_not_found", logging.WARNING),
                                                           ("overloaded", logging.WARNING)]
    assert "missing 0" in first[0].getMessage()
    clock.now += 59.9
    errors.flush()
    assert lines() == []  # not a minute yet
    clock.now += 0.1
    errors.flush()
    (summary,) = lines()  # overloaded had no more: no line
    assert summary.error_code == "frame_not_found" and summary.count == 4
    assert "4 more frame_not_found" in summary.getMessage() and "missing 4" in summary.getMessage()
    errors.flush()
    errors.note("frame_not_found", "missing 5")
    clock.now += 30
    errors.flush()
    assert lines() == []  # the next line is a minute after the last one
    clock.now += 30
    errors.flush()
    (summary,) = lines()
    assert summary.count == 1 and "missing 5" in summary.getMessage()


def test_json_formatter_extra_fields_and_exceptions():
    logger = logging.getLogger("vasipc.jsontest")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("hello %s", "world", extra={"error_code": "internal", "count": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    fmt = JsonFormatter()
    first, second = (json.loads(fmt.format(r)) for r in records)
    assert first["message"] == "hello world" and first["level"] == "WARNING"
    assert first["logger"] == "vasipc.jsontest"
    assert first["error_code"] == "internal" and first["count"] == 3
    assert "args" not in first and "msg" not in first
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_reload_lines_in_json(server_factory):
    """A reload's line carries its outcome and versions as fields for log shippers."""
    import signal

    from test_reload import log_lines, wait_for

    server = server_factory("--log-format", "json")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: log_lines(server, "reloaded"), "the reload", server)
    assert server.stop() == 0
    lines = parse_lines(server.stderr_text(), "json")
    reload = [r for r in lines if r.get("reload")]
    assert len(reload) == 1, lines
    assert reload[0]["reload"] == "ok" and reload[0]["level"] == "INFO"
    assert reload[0]["model_version"] == reload[0]["previous_version"] == "1"
