"""docs/contract.md section 2 (framing): length prefixes, JSON bodies, persistent and
connect-per-request use, pipelining, timeouts, many connections. Raw bytes on real
sockets against real servers."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import wire
from conftest import ServerLauncher, ServerProcess

MODEL_ID = "nudenet-320n"
DEFAULT_MAX = 10 * 1024 * 1024
SMALL_MAX = 1000  # --max-message-bytes of the `small` server


@pytest.fixture(scope="module")
def small(nudenet_model: str) -> Iterator[ServerProcess]:
    """A server with short limits: 1000-byte messages, 1 s read and idle timeouts. Tests
    using it must not leave a connection idle for a second unless that is the point."""
    launcher = ServerLauncher(nudenet_model)
    try:
        yield launcher("--max-message-bytes", str(SMALL_MAX), "--read-timeout", "1",
                       "--idle-timeout", "1")
    finally:
        launcher.close()


def health_msg(rid: int | str | None = None) -> dict:
    return {"op": "health"} if rid is None else {"op": "health", "request_id": rid}


def padded(size: int) -> bytes:
    """A valid `health` request body of exactly `size` bytes."""
    head, tail = b'{"op":"health","pad":"', b'"}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body


def assert_error(resp: dict, code: str) -> dict:
    assert resp["error_code"] == code, resp
    assert isinstance(resp["error"], str) and resp["error"], resp
    assert resp["detections"] == [], resp
    assert resp["model_id"] == MODEL_ID and resp["camera_id"] == "", resp
    return resp


def assert_health(resp: dict, rid: int | str | None = None) -> None:
    assert resp.get("op") == "health" and resp.get("ready") is True, resp
    if rid is not None:
        assert resp.get("request_id") == rid, resp


def no_response(sock: socket.socket, timeout: float) -> bool:
    """True when not a byte arrives within `timeout` (the peer may close or not)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        return True


def recv_within(sock: socket.socket, seconds: float) -> dict:
    sock.settimeout(seconds)
    return wire.recv(sock)


# --- connection use ----------------------------------------------------------------------------

def test_persistent_connection_many_requests(nudenet_server, astronaut_frame):
    with wire.connect(nudenet_server.socket) as s:
        for i in range(60):
            kind = i % 3
            if kind == 0:
                wire.send(s, health_msg(i))
                assert_health(wire.recv(s), i)
            elif kind == 1:
                wire.send(s, {"op": "info", "request_id": f"info-{i}"})
                resp = wire.recv(s)
                assert resp["op"] == "info" and resp["request_id"] == f"info-{i}", resp
            else:
                wire.send(s, wire.infer_request(str(astronaut_frame), MODEL_ID, request_id=i))
                resp = wire.recv(s)
                assert resp["error_code"] is None and resp["request_id"] == i, resp
                assert resp["frame_id"] == 42


def test_connect_per_request(nudenet_server, astronaut_frame):
    for i in range(15):
        msg = (health_msg(i) if i % 2 else
               wire.infer_request(str(astronaut_frame), MODEL_ID, request_id=i))
        with wire.connect(nudenet_server.socket) as s:
            wire.send(s, msg)
            resp = wire.recv(s)
        assert resp["request_id"] == i, resp
        assert resp.get("error_code") is None, resp


def test_client_closing_before_the_answer_does_not_hurt(nudenet_server, astronaut_frame):
    for _ in range(10):
        with wire.connect(nudenet_server.socket) as s:
            wire.send(s, wire.infer_request(str(astronaut_frame), MODEL_ID))
            s.sendall(wire.encode(health_msg()) * 3)
    assert_health(wire.roundtrip(nudenet_server.socket, health_msg()))


def test_pipelined_mixed_requests_answered_in_order(nudenet_server, astronaut_frame):
    kinds, chunks = [], []
    for i in range(20):
        kind = ("health", "infer", "info", "invalid_request", "invalid_message", "infer")[i % 6]
        rid = i if i % 4 else f"r-{i}"
        if kind == "health":
            msg = wire.encode(health_msg(rid))
        elif kind == "info":
            msg = wire.encode({"op": "info", "request_id": rid})
        elif kind == "infer":
            msg = wire.encode(wire.infer_request(str(astronaut_frame), MODEL_ID, request_id=rid))
        elif kind == "invalid_request":
            bad = wire.infer_request(str(astronaut_frame), MODEL_ID, request_id=rid)
            del bad["camera_id"]
            msg = wire.encode(bad)
        else:
            msg = wire.frame(b'{"op": "health", "request_id": ' + str(i).encode() + b",")
        kinds.append((kind, rid))
        chunks.append(msg)
    with wire.connect(nudenet_server.socket) as s:
        s.sendall(b"".join(chunks))
        responses = [wire.recv(s) for _ in chunks]
        # the connection is still usable afterwards
        wire.send(s, health_msg("after"))
        assert_health(wire.recv(s), "after")
    for (kind, rid), resp in zip(kinds, responses, strict=True):
        if kind == "invalid_message":
            assert_error(resp, "invalid_message")
            assert resp["request_id"] is None
            continue
        assert resp["request_id"] == rid, (kind, rid, resp)
        if kind in ("health", "info"):
            assert resp["op"] == kind, resp
        elif kind == "infer":
            assert resp["error_code"] is None and resp["frame_id"] == 42, resp
        else:
            assert resp["error_code"] == "invalid_request", resp


def test_pipelined_infers_on_many_connections_stay_in_order(nudenet_server, astronaut_frame):
    n_conn, depth = 4, 6
    socks = [wire.connect(nudenet_server.socket) for _ in range(n_conn)]
    try:
        for c, s in enumerate(socks):
            s.sendall(b"".join(
                wire.encode(wire.infer_request(str(astronaut_frame), MODEL_ID,
                                               request_id=f"{c}-{k}")) for k in range(depth)))
        for c, s in enumerate(socks):
            got = [wire.recv(s)["request_id"] for _ in range(depth)]
            assert got == [f"{c}-{k}" for k in range(depth)]
    finally:
        for s in socks:
            s.close()


def test_half_closed_client_gets_all_answers(nudenet_server, astronaut_frame):
    """A caller may send its requests and shut down its sending side: every request read
    is still answered, then the server closes."""
    with wire.connect(nudenet_server.socket) as s:
        s.sendall(wire.encode(wire.infer_request(str(astronaut_frame), MODEL_ID, request_id=1))
                  + wire.encode(health_msg(2)))
        s.shutdown(socket.SHUT_WR)
        assert wire.recv(s)["request_id"] == 1
        assert_health(wire.recv(s), 2)
        assert wire.is_closed(s, 5)


def test_message_split_across_many_writes(nudenet_server):
    data = wire.encode(health_msg("split"))
    with wire.connect(nudenet_server.socket) as s:
        for b in data:
            s.sendall(bytes([b]))
            time.sleep(0.002)
        assert_health(wire.recv(s), "split")


# --- length prefix -----------------------------------------------------------------------------

def test_zero_length_is_invalid_message_and_closes(nudenet_server):
    with wire.connect(nudenet_server.socket) as s:
        # a valid request follows the empty message: it must not be read or answered
        s.sendall(struct.pack(">I", 0) + wire.encode(health_msg("next")))
        assert_error(recv_within(s, 5), "invalid_message")
        assert wire.is_closed(s, 5)


@pytest.mark.parametrize("length", [DEFAULT_MAX + 1, 0xFFFFFFFF])
def test_too_large_answered_at_once_without_body(nudenet_server, length):
    """Answered from the prefix alone: a server waiting for the body would close the
    connection at its read timeout (10 s) without an answer, and recv would fail."""
    with wire.connect(nudenet_server.socket) as s:
        s.sendall(struct.pack(">I", length))  # no body follows
        assert_error(recv_within(s, 30), "message_too_large")
        assert wire.is_closed(s, 30)


@pytest.mark.slow
def test_too_large_with_partial_body_closes_without_reading_it(small):
    with wire.connect(small.socket) as s:
        s.sendall(struct.pack(">I", SMALL_MAX + 1) + padded(SMALL_MAX + 1)[:200])
        assert_error(recv_within(s, 3), "message_too_large")
        assert wire.is_closed(s, 5)


@pytest.mark.parametrize(("sent", "hint"), [
    (json.dumps({"op": "health"}).encode(), "reads as the text '{\"op'"),  # JSON, no prefix
    (b'\n {"op": "health"}', "reads as the text '\\n {\"'"),
    (struct.pack("<I", 17) + b'{"op": "health"}', "byte-swapped the prefix is 17"),
    (struct.pack(">I", DEFAULT_MAX + 1), None),
    (struct.pack(">I", 0xFFFFFFFF), None),
], ids=["json", "json-whitespace", "little-endian", "too-large", "max"])
def test_wrong_framing_gets_a_hint(nudenet_server, sent, hint):
    """A refused prefix that is JSON text or a little-endian length says so; one that is
    neither says only that it is too large."""
    with wire.connect(nudenet_server.socket) as s:
        s.sendall(sent)
        resp = assert_error(recv_within(s, 5), "message_too_large")
        assert f"exceeds max_message_bytes {DEFAULT_MAX}" in resp["error"], resp
        if hint is None:
            assert "byte-swapped" not in resp["error"] and "reads as" not in resp["error"], resp
        else:
            assert hint in resp["error"], resp
        assert wire.is_closed(s, 5)


def test_little_endian_hint_within_the_servers_limit(small):
    with wire.connect(small.socket) as s:
        s.sendall(struct.pack("<I", SMALL_MAX) + padded(SMALL_MAX))
        resp = assert_error(recv_within(s, 5), "message_too_large")
        assert (f"byte-swapped the prefix is {SMALL_MAX}: if it was written little-endian, it "
                "must be big-endian") in resp["error"]
    with wire.connect(small.socket) as s:  # one above the limit swapped: no hint
        s.sendall(struct.pack("<I", SMALL_MAX + 1))
        assert "byte-swapped" not in assert_error(recv_within(s, 5), "message_too_large")["error"]


@pytest.mark.parametrize("prefix", [0, DEFAULT_MAX + 1], ids=["zero", "too-large"])
def test_requests_before_a_bad_prefix_are_answered_first(nudenet_server, astronaut_frame,
                                                          prefix):
    """Pipelined requests ahead of a bad length prefix are answered, in order, before its
    error response; then the connection is closed."""
    with wire.connect(nudenet_server.socket, timeout=30) as s:
        s.sendall(wire.encode(wire.infer_request(str(astronaut_frame), MODEL_ID, request_id=1))
                  + wire.encode(health_msg(2))
                  + wire.encode(wire.infer_request(str(astronaut_frame), MODEL_ID, request_id=3))
                  + struct.pack(">I", prefix))
        first, second, third = wire.recv(s), wire.recv(s), wire.recv(s)
        assert first["request_id"] == 1 and first["error_code"] is None, first
        assert_health(second, 2)
        assert third["request_id"] == 3 and third["error_code"] is None, third
        assert_error(recv_within(s, 5),
                     "invalid_message" if prefix == 0 else "message_too_large")
        assert wire.is_closed(s, 5)


def test_exactly_max_message_bytes_is_accepted(nudenet_server, small):
    with wire.connect(small.socket) as s:
        s.sendall(wire.frame(padded(SMALL_MAX)))
        assert_health(recv_within(s, 5))
        s.sendall(wire.frame(padded(SMALL_MAX + 1)))
        assert_error(recv_within(s, 5), "message_too_large")
        assert wire.is_closed(s, 5)
    with wire.connect(nudenet_server.socket, timeout=30) as s:
        s.sendall(wire.frame(padded(DEFAULT_MAX)))
        assert_health(wire.recv(s))


# --- bodies ------------------------------------------------------------------------------------

def nested(depth: int) -> bytes:
    """A health request whose nesting depth (the top-level object included) is `depth`."""
    inner = depth - 1
    return b'{"op":"health","request_id":"deep","x":' + b"[" * inner + b"]" * inner + b"}"


BAD_BODIES = {
    "truncated": b'{"op": "health"',
    "not-json": b"hello",
    "nan": b'{"op": "health", "x": NaN}',
    "infinity": b'{"op": "health", "x": Infinity}',
    "minus-infinity": b'{"op": "health", "x": -Infinity}',
    "single-quotes": b"{'op': 'health'}",
    "trailing-comma": b'{"op": "health",}',
    "trailing-garbage": b'{"op": "health"} x',
    "two-objects": b'{"op": "health"}{"op": "health"}',
    "comment": b'{"op": "health"} // hi',
    "array": b'[{"op": "health"}]',
    "string": b'"health"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "whitespace-only": b" \n",
    "nul-byte": b"\x00",
    "invalid-utf8": b'{"op": "health", "x": "\xff"}',
    "overlong-utf8": b'{"op": "health", "x": "\xc0\xaf"}',
    "utf8-surrogate": b'{"op": "health", "x": "\xed\xa0\x80"}',
    "latin1": b'{"op": "health", "x": "caf\xe9"}',
    "utf16": '{"op": "health"}'.encode("utf-16"),
    "control-char-in-string": b'{"op": "health", "x": "a\x01b"}',
    "depth-65": nested(65),
    "depth-65-objects": b'{"op":"health",' + b'"a":{' * 64 + b"}" * 64 + b"}",
    "depth-100000": b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_body_is_invalid_message_and_connection_stays_open(nudenet_server, body):
    with wire.connect(nudenet_server.socket) as s:
        s.sendall(wire.frame(body))
        assert_error(recv_within(s, 10), "invalid_message")
        wire.send(s, health_msg("next"))
        assert_health(recv_within(s, 10), "next")


GOOD_BODIES = {
    "depth-64": nested(64),
    "depth-64-objects": b'{"op":"health","request_id":"deep",' + b'"a":{' * 63 + b"}" * 63 + b"}",
    "brackets-in-strings": b'{"op":"health","request_id":"deep","x":"' + b"[{" * 100 + b'"}',
    "escaped-backslash-then-brackets":
        b'{"op":"health","request_id":"deep","a":"\\\\","b":"' + b"[" * 100 + b'"}',
    "escaped-quote-then-brackets":
        b'{"op":"health","request_id":"deep","a":"\\"' + b"[" * 100 + b'"}',
    "surrounding-whitespace": b' \r\n\t{"op":"health","request_id":"deep"}\n ',
    "unicode-escape": b'{"op":"h\\u0065alth","request_id":"deep"}',
    "utf8-text": '{"op":"health","request_id":"deep","x":"\u00e9\u6f22\U0001f600"}'.encode(),
    "unknown-fields": b'{"op":"health","request_id":"deep","zzz":[1,2.5e300,null,{}]}',
}


@pytest.mark.parametrize("body", GOOD_BODIES.values(), ids=GOOD_BODIES.keys())
def test_valid_bodies_are_parsed(nudenet_server, body):
    with wire.connect(nudenet_server.socket) as s:
        s.sendall(wire.frame(body))
        assert_health(recv_within(s, 10), "deep")


@pytest.mark.parametrize("digits", [20, 40, 128])
def test_integers_beyond_64_bits_are_exact(nudenet_server, digits):
    """JSON integers have no size limit (RFC 8259); an integer request_id of up to 128
    characters is echoed exactly, and a huge number in an unknown field is just ignored."""
    rid = int("9" * digits)
    body = b'{"op":"health","request_id":%d,"big":-%d,"e":1e300}' % (rid, rid)
    with wire.connect(nudenet_server.socket) as s:
        s.sendall(wire.frame(body))
        resp = recv_within(s, 10)
    assert resp.get("op") == "health" and resp["request_id"] == rid, resp
    assert type(resp["request_id"]) is int


def test_response_framing(nudenet_server):
    """Responses are a 4-byte big-endian length, then exactly that much UTF-8 JSON object."""
    with wire.connect(nudenet_server.socket) as s:
        wire.send(s, {"op": "info", "request_id": "\u00e9t\u00e9"})
        (n,) = struct.unpack(">I", wire.recv_exact(s, 4))
        assert n >= 2
        body = wire.recv_exact(s, n)
        doc = json.loads(body.decode("utf-8"))
        assert isinstance(doc, dict) and doc["request_id"] == "\u00e9t\u00e9"
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(1)  # nothing more than the one message


# --- timeouts ----------------------------------------------------------------------------------

def test_message_stalled_mid_body_is_dropped(small):
    with wire.connect(small.socket) as stalled:
        t0 = time.monotonic()
        stalled.sendall(wire.frame(padded(500))[:250])
        assert wire.is_closed(stalled, 30)  # without an answer
        assert time.monotonic() - t0 > 0.8  # not before the 1 s read timeout


@pytest.mark.slow
def test_others_served_while_a_message_stalls(server_factory):
    """Other connections are served while one stalls mid-message: with a read timeout longer
    than their hang guard they could not be if the stall held the server up."""
    sock = server_factory("--read-timeout", "120").socket
    with wire.connect(sock) as stalled:
        stalled.sendall(wire.frame(padded(500))[:250])
        with wire.connect(sock) as other:
            for i in range(3):
                wire.send(other, health_msg(i))
                assert_health(recv_within(other, 30), i)
        assert no_response(stalled, 0.05) and not wire.is_closed(stalled, 0.05)


@pytest.mark.parametrize("sent", [1, 3], ids=["1-prefix-byte", "3-prefix-bytes"])
def test_message_stalled_in_prefix_is_dropped(small, sent):
    with wire.connect(small.socket) as s:
        t0 = time.monotonic()
        s.sendall(wire.encode(health_msg())[:sent])
        assert wire.is_closed(s, 30)
        assert time.monotonic() - t0 > 0.8  # not before the 1 s read timeout


def test_read_timeout_runs_from_the_first_byte(small):
    """A message that trickles in, a byte now and then, must still be whole within
    read_timeout of its first byte: one taking 3 s or more is dropped unanswered (a timer
    restarted with each byte would let it through, and answer it)."""
    data = wire.encode(health_msg("trickle"))
    assert len(data) > 30
    with wire.connect(small.socket) as s:
        t0 = time.monotonic()
        for b in data:  # a byte every 0.1 s at the most
            try:
                s.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        assert wire.is_closed(s, 30), "the read timeout restarted with each byte"
        assert time.monotonic() - t0 > 0.8  # not before the 1 s read timeout


def test_idle_connection_closed_after_idle_timeout(small):
    with wire.connect(small.socket) as idle, wire.connect(small.socket) as busy:
        t0 = time.monotonic()
        for i in range(6):  # the busy one stays open: the idle timer restarts per message
            wire.send(busy, health_msg(i))
            assert_health(recv_within(busy, 30), i)
            time.sleep(0.4)
        assert wire.is_closed(idle, 30)
        assert time.monotonic() - t0 > 2.0
        wire.send(busy, health_msg("still"))
        assert_health(recv_within(busy, 30), "still")


def test_idle_timeout_after_a_response(small):
    with wire.connect(small.socket) as s:
        wire.send(s, health_msg(1))
        assert_health(recv_within(s, 30), 1)
        t0 = time.monotonic()
        assert wire.is_closed(s, 30)
        assert time.monotonic() - t0 > 0.8  # not before the 1 s idle timeout


# --- many connections --------------------------------------------------------------------------

def test_many_concurrent_connections_and_a_stalled_one(nudenet_server, astronaut_frame):
    path = nudenet_server.socket
    stalled = wire.connect(path)
    stalled.sendall(wire.frame(padded(400))[:200])  # half a message, then nothing
    socks = [wire.connect(path, timeout=60) for _ in range(256)]
    n_threads, n_infer, errors = 64, 16, []
    barrier = threading.Barrier(n_threads)
    infer = wire.encode(wire.infer_request(str(astronaut_frame), MODEL_ID))

    def worker(t: int) -> None:
        try:
            mine = socks[t::n_threads]
            barrier.wait(30)
            if t < n_infer:
                mine[0].sendall(infer)
            for k, s in enumerate(mine):
                wire.send(s, health_msg(f"{t}-{k}"))
            if t < n_infer:
                resp = wire.recv(mine[0])
                assert resp["error_code"] is None and resp["frame_id"] == 42, resp
            for k, s in enumerate(mine):
                assert_health(wire.recv(s), f"{t}-{k}")
        except Exception as exc:
            errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not errors, errors[:5]
        assert not any(t.is_alive() for t in threads)
        assert no_response(stalled, 0.05)  # the stalled one never got an answer
    finally:
        stalled.close()
        for s in socks:
            s.close()
    assert_health(wire.roundtrip(path, health_msg()))


def accepted_connection(path: str, timeout: float = 30.0) -> socket.socket:
    """A connection the server took: answered a health request. Retries while the server
    has not yet released earlier connections (its slots are freed when it sees their EOF)."""
    deadline = time.monotonic() + timeout
    while True:
        s = wire.connect(path)
        try:
            wire.send(s, health_msg("accepted"))
            assert_health(recv_within(s, 30), "accepted")
            return s
        except (EOFError, ConnectionResetError, BrokenPipeError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.slow
def test_max_connections(server_factory):
    server = server_factory("--max-connections", "3")
    first = [accepted_connection(server.socket) for _ in range(3)]
    try:
        with wire.connect(server.socket) as extra:
            # closed at accept: an accepted idle connection would stay open for 300 s
            assert wire.is_closed(extra, 30)
        for i, s in enumerate(first):  # the first three are unaffected
            wire.send(s, health_msg(i))
            assert_health(recv_within(s, 5), i)
        first.pop().close()
        accepted_connection(server.socket).close()  # the freed slot goes to a new connection
    finally:
        for s in first:
            s.close()


@pytest.mark.slow
def test_out_of_file_descriptors_is_survived(nudenet_model, tmp_path):
    """Connections beyond what the process's fd limit allows wait in the backlog; once
    connections close, the server accepts and answers again (it never stops listening)."""
    path = str(tmp_path / "fd.sock")
    code = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "runpy.run_module('vasipc.serve', run_name='__main__')")
    server = ServerProcess([sys.executable, "-c", code, "--model", nudenet_model, "--model-id",
                            MODEL_ID, "--socket", path], path, tmp_path / "fd.stderr")
    socks: list[socket.socket] = []
    try:
        server.wait_ready()
        starved = None
        for _ in range(80):
            s = wire.connect(path)
            socks.append(s)
            wire.send(s, health_msg())
            try:
                assert_health(recv_within(s, 1.0))
            except (TimeoutError, EOFError, ConnectionResetError):
                starved = s
                break
        assert starved is not None, "64 fds were never exhausted"
        for s in socks:
            if s is not starved:
                s.close()
        assert_health(recv_within(starved, 30))  # accepted once fds were free again
        with wire.connect(path) as s:
            wire.send(s, health_msg("fresh"))
            assert_health(recv_within(s, 30), "fresh")
        assert server.stop() == 0
    finally:
        for s in socks:
            s.close()
        server.kill()
