"""The epoll connection loop (vasipc._fast.connloop), on real Unix sockets.

Each test makes its own listening socket, runs a ConnectionLoop on it in a thread with
simple Python callbacks (echo, or answers deferred to other threads), and plays the
clients by hand: length prefix + body, no client library.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from wire import in_thread, is_closed, recv_exact

from vasipc._fast import connloop

PREFIX = struct.Struct(">I")
MiB = 1024 * 1024
LONG = 30.0  # a timeout that must not expire in a passing test (a hang guard)
REPO_ROOT = Path(__file__).resolve().parents[1]


def frame(body: bytes) -> bytes:
    return PREFIX.pack(len(body)) + body


def recv_body(sock: socket.socket) -> bytes:
    (n,) = PREFIX.unpack(recv_exact(sock, 4))
    return recv_exact(sock, n)


def roundtrip(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(frame(body))
    return recv_body(sock)


def wait_for(condition: Callable[[], object], timeout: float = LONG) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def echo(conn: connloop.Connection, slot: int, body: bytes) -> bytes:
    return body


def bad_length(conn: connloop.Connection, slot: int, length: int) -> bytes:
    return b"bad %d" % length


class Served:
    """A listening socket with a ConnectionLoop serving it from a thread."""

    def __init__(self, tmp: str, on_message: Callable, on_bad_length: Callable,
                 **options: float) -> None:
        self.path = os.path.join(tmp, "s.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(128)
        settings = {"max_message_bytes": MiB, "read_timeout": LONG, "idle_timeout": LONG,
                    "write_timeout": LONG, "max_connections": 1000, "pipeline_depth": 64}
        settings.update(options)
        self.loop = connloop.ConnectionLoop(self.listener.fileno(), on_message, on_bad_length,
                                            **settings)
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.clients: list[socket.socket] = []

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # reported by close()
            self.failure.append(exc)

    def connect(self, timeout: float = LONG) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        self.clients.append(s)
        return s

    def close(self) -> None:
        self.loop.close_all(1.0)
        self.thread.join(LONG)
        self.listener.close()
        for s in self.clients:
            s.close()
        assert not self.thread.is_alive(), "run() did not return after close_all()"
        assert self.loop.connections == 0
        if self.failure:
            raise self.failure[0]


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """serve(on_message=echo, on_bad_length=bad_length, **loop options) -> Served."""
    made: list[Served] = []
    with tempfile.TemporaryDirectory(prefix="vasipc-connloop-", dir="/tmp") as tmp:
        def start(on_message: Callable = echo, on_bad_length: Callable = bad_length,
                  **options: float) -> Served:
            served = Served(tempfile.mkdtemp(dir=tmp), on_message, on_bad_length, **options)
            made.append(served)
            return served
        yield start
        for served in made:
            served.close()


class Deferred:
    """An on_message that answers nothing itself: it records each request for the test."""

    def __init__(self) -> None:
        self.requests: list[tuple[connloop.Connection, int, bytes]] = []

    def __call__(self, conn: connloop.Connection, slot: int, body: bytes) -> None:
        self.requests.append((conn, slot, body))

    def wait(self, count: int, timeout: float = 5.0) -> None:
        wait_for(lambda: len(self.requests) >= count, timeout)


# --- messages and answers ---------------------------------------------------------------

def test_echo_small_and_large_messages(serve):
    served = serve(max_message_bytes=MiB)
    s = served.connect()
    for body in [b"{}", b"x" * 100, b"y" * 20000, os.urandom(MiB), b"z"]:
        assert roundtrip(s, body) == body


def test_slots_count_per_connection(serve):
    seen: list[tuple[int, int]] = []
    served = serve(lambda conn, slot, body: (seen.append((id(conn), slot)), b"ok")[1])
    a, b = served.connect(), served.connect()
    for sock in (a, b, a, a, b):
        assert roundtrip(sock, b"{}") == b"ok"
    ids = [conn for conn, _ in seen]
    assert [slot for conn, slot in seen if conn == ids[0]] == [0, 1, 2]
    assert [slot for conn, slot in seen if conn == ids[1]] == [0, 1]


def test_deferred_answer_from_another_thread(serve):
    def later(conn: connloop.Connection, slot: int, body: bytes) -> None:
        threading.Timer(0.05, conn.send_response, (slot, body.upper())).start()

    s = serve(later).connect()
    assert roundtrip(s, b"hello") == b"HELLO"
    assert roundtrip(s, b"again") == b"AGAIN"


def test_pipelined_answers_come_in_order_when_answered_out_of_order(serve):
    deferred = Deferred()
    s = serve(deferred).connect()
    bodies = [b"request %d" % i for i in range(20)]
    s.sendall(b"".join(frame(b) for b in bodies))
    deferred.wait(20)
    assert [slot for _, slot, _ in deferred.requests] == list(range(20))
    order = list(range(20))
    random.Random(7).shuffle(order)
    threads = [threading.Thread(target=deferred.requests[i][0].send_response,
                                args=(i, deferred.requests[i][2] + b" done")) for i in order]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join()
    assert [recv_body(s) for _ in bodies] == [b + b" done" for b in bodies]


def test_depth_limit_holds_back_buffered_messages_until_an_answer_is_written(serve):
    deferred = Deferred()
    s = serve(deferred, pipeline_depth=2).connect()
    s.sendall(frame(b"m0") + frame(b"m1") + frame(b"m2") + frame(b"m3"))
    deferred.wait(2)
    time.sleep(0.2)
    assert [body for _, _, body in deferred.requests] == [b"m0", b"m1"]
    conn = deferred.requests[0][0]
    assert conn.send_response(1, b"a1")  # not the head: nothing is written, depth still 2
    time.sleep(0.1)
    assert len(deferred.requests) == 2
    threading.Thread(target=conn.send_response, args=(0, b"a0")).start()
    assert recv_body(s) == b"a0"
    assert recv_body(s) == b"a1"
    deferred.wait(4)  # both held-back messages, already buffered, are now handed over
    assert [body for _, _, body in deferred.requests] == [b"m0", b"m1", b"m2", b"m3"]
    conn.send_response(2, b"a2")
    conn.send_response(3, b"a3")
    assert [recv_body(s), recv_body(s)] == [b"a2", b"a3"]


def test_message_split_byte_by_byte(serve):
    s = serve().connect()
    data = frame(b'{"op":"health"}') + frame(b"second")
    for i in range(len(data)):
        s.sendall(data[i : i + 1])
        time.sleep(0.001)
    assert recv_body(s) == b'{"op":"health"}'
    assert recv_body(s) == b"second"


def test_many_pipelined_messages_in_one_write(serve):
    s = serve().connect()
    bodies = [b"%d" % i * (i % 50 + 1) for i in range(2000)]
    threading.Thread(target=s.sendall, args=(b"".join(frame(b) for b in bodies),)).start()
    assert [recv_body(s) for _ in bodies] == bodies


# --- bad lengths --------------------------------------------------------------------------

@pytest.mark.parametrize("length", [0, 1001])
def test_bad_length_is_answered_then_closed_without_reading_the_body(serve, length):
    calls: list[tuple[int, int]] = []

    def on_bad(conn: connloop.Connection, slot: int, n: int) -> bytes:
        calls.append((slot, n))
        return b"bad %d" % n

    seen: list[bytes] = []
    served = serve(lambda conn, slot, body: (seen.append(body), body)[1], on_bad,
                   max_message_bytes=1000)
    s = served.connect()
    assert roundtrip(s, b"x" * 1000) == b"x" * 1000  # exactly the limit is fine
    s.sendall(PREFIX.pack(length) + frame(b"never read") * 3)
    assert recv_body(s) == b"bad %d" % length
    assert is_closed(s)
    assert calls == [(1, length)]
    assert seen == [b"x" * 1000]


def test_bad_length_answer_waits_for_earlier_answers(serve):
    deferred = Deferred()
    s = serve(deferred, max_message_bytes=100).connect()
    s.sendall(frame(b"first") + PREFIX.pack(0))
    deferred.wait(1)
    time.sleep(0.1)
    conn = deferred.requests[0][0]
    assert not conn.closed
    conn.send_response(0, b"answer")
    assert recv_body(s) == b"answer"
    assert recv_body(s) == b"bad 0"
    assert is_closed(s)


# --- timeouts ---------------------------------------------------------------------------

def test_read_timeout_counts_from_the_first_byte(serve):
    seen: list[bytes] = []
    served = serve(lambda conn, slot, body: (seen.append(body), body)[1], read_timeout=0.3)
    # Prefix bytes count: two of them, then nothing.
    a = served.connect()
    start = time.monotonic()
    a.sendall(b"\x00\x00")
    assert is_closed(a, LONG)
    assert time.monotonic() - start >= 0.25
    # Bytes keep coming, but the message is not whole 0.3 s after its first one.
    b = served.connect()
    data = frame(b"0123456789")
    with contextlib.suppress(OSError):
        for i in range(len(data)):
            b.sendall(data[i : i + 1])
            time.sleep(0.06)
    assert is_closed(b, LONG)
    assert seen == []
    # Idle time between messages is not read time.
    c = served.connect()
    time.sleep(0.5)
    assert roundtrip(c, b"late but whole") == b"late but whole"


def test_idle_timeout_closes_quiet_connections_only(serve):
    def on_message(conn: connloop.Connection, slot: int, body: bytes) -> bytes | None:
        if body == b"slow":
            threading.Timer(0.6, conn.send_response, (slot, b"slow answer")).start()
            return None
        return body

    served = serve(on_message, idle_timeout=0.3)
    s = served.connect()
    assert roundtrip(s, b"hi") == b"hi"
    start = time.monotonic()
    assert is_closed(s, LONG)
    assert time.monotonic() - start >= 0.25
    # A connection waiting for its answer is not idle.
    t = served.connect()
    assert roundtrip(t, b"slow") == b"slow answer"


def test_write_timeout_closes_a_client_that_never_reads(serve):
    big = b"x" * (8 * MiB)
    served = serve(lambda conn, slot, body: big if body == b"big" else body, write_timeout=0.3)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(served.path)
    served.clients.append(stalled)
    start = time.monotonic()
    stalled.sendall(frame(b"big"))
    other = served.connect()
    # One stalled connection never holds up another.
    for i in range(20):
        assert roundtrip(other, b"%d" % i) == b"%d" % i
    wait_for(lambda: served.loop.connections == 1)
    assert time.monotonic() - start >= 0.25
    assert roundtrip(other, b"still here") == b"still here"


# --- closing --------------------------------------------------------------------------

def test_half_closed_client_gets_every_answer(serve):
    def later(conn: connloop.Connection, slot: int, body: bytes) -> None:
        threading.Timer(0.02 * (slot + 1), conn.send_response, (slot, body + b"!")).start()

    s = serve(later, pipeline_depth=2).connect()
    bodies = [b"r%d" % i for i in range(6)]
    s.sendall(b"".join(frame(b) for b in bodies) + b"\x00\x00\x00\x09part")  # partial dropped
    s.shutdown(socket.SHUT_WR)
    assert [recv_body(s) for _ in bodies] == [b + b"!" for b in bodies]
    assert s.recv(1) == b""


def test_eof_with_nothing_owed_closes_at_once(serve):
    served = serve()
    s = served.connect()
    assert roundtrip(s, b"x") == b"x"
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    wait_for(lambda: served.loop.connections == 0)


def test_max_connections(serve):
    served = serve(max_connections=2)
    a, b = served.connect(), served.connect()
    assert roundtrip(a, b"a") == b"a"
    assert roundtrip(b, b"b") == b"b"
    c = served.connect()
    assert is_closed(c)
    assert served.loop.connections == 2
    a.close()
    wait_for(lambda: served.loop.connections == 1)
    d = served.connect()
    assert roundtrip(d, b"d") == b"d"
    assert served.loop.refused == {"peer": 0, "max_connections": 1}


def test_allow_lists_check_the_peers_credentials(serve):
    # This process is the peer: SO_PEERCRED gives its own effective ids and pid.
    uid, gid = os.geteuid(), os.getegid()
    refusals: list[tuple[int, int, int]] = []
    by_uid = serve(allow_uids=[uid], on_refused=lambda *cred: refusals.append(cred))
    assert roundtrip(by_uid.connect(), b"u") == b"u"
    by_gid = serve(allow_uids=[uid + 1], allow_gids=[gid])
    assert roundtrip(by_gid.connect(), b"g") == b"g"
    assert by_uid.loop.refused == by_gid.loop.refused == {"peer": 0, "max_connections": 0}

    others = serve(allow_uids=[uid + 1], allow_gids=[gid + 1],
                   on_refused=lambda *cred: refusals.append(cred))
    s = others.connect()
    with contextlib.suppress(BrokenPipeError):  # it may be closed already
        s.sendall(frame(b"never read"))
    with pytest.raises((ConnectionResetError, EOFError)):  # closed, not one byte answered
        recv_exact(s, 1)
    wait_for(lambda: refusals)
    assert refusals == [(uid, gid, os.getpid())]
    assert others.loop.refused == {"peer": 1, "max_connections": 0}
    assert others.loop.connections == 0


def test_a_raising_on_refused_is_logged_and_the_loop_goes_on(serve, caplog):
    def fail(uid: int, gid: int, pid: int) -> None:
        raise RuntimeError("on_refused broke")

    served = serve(allow_uids=[os.geteuid() + 1], on_refused=fail)
    with caplog.at_level(logging.ERROR, logger="vasipc"):
        for _ in range(2):
            assert is_closed(served.connect())
        wait_for(lambda: served.loop.refused["peer"] == 2)
    assert served.thread.is_alive() and not served.failure
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
    with pytest.raises(TypeError):
        serve(on_refused=42)


def test_stop_accepting_serves_existing_connections_only(serve):
    served = serve()
    old = served.connect()
    assert roundtrip(old, b"before") == b"before"
    served.loop.stop_accepting()
    late = served.connect()  # the kernel still queues it in the backlog
    late.sendall(frame(b"hello?"))
    assert roundtrip(old, b"after") == b"after"
    late.settimeout(0.3)
    with pytest.raises(TimeoutError):
        late.recv(1)
    assert served.loop.connections == 1
    served.listener.close()  # the loop no longer touches it
    assert roundtrip(old, b"still") == b"still"


class DrainRecorder(Deferred):
    """Deferred, plus each request's `read_before_drain` as the loop gave it; with `gate`,
    the first request holds the loop thread inside on_message until the gate opens."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.before: list[bool] = []
        self.gate = gate

    def __call__(self, conn: connloop.Connection, slot: int, body: bytes) -> None:
        self.before.append(conn.read_before_drain)
        super().__call__(conn, slot, body)
        if self.gate is not None and len(self.requests) == 1:
            assert self.gate.wait(LONG)


def test_mark_drain_holds_what_was_sent_before_it(serve):
    """Messages sent before mark_drain(), dispatched or held back by the depth limit, in
    the read buffer or still in the socket, are `read_before_drain`; a partial message
    finished after the mark, and later messages, are not. The mark is taken from another
    thread while the loop thread is inside on_message, and a client still in the listen
    backlog (the loop is busy) is accepted by it and its messages held too."""
    gate = threading.Event()
    rec = DrainRecorder(gate)
    served = serve(rec, pipeline_depth=2)
    a = served.connect()
    a.sendall(b"".join(frame(b"a%d" % i) for i in range(40)) + frame(b"a-partial")[:6])
    rec.wait(1)  # the loop thread now waits in on_message for a0
    b = served.connect()  # not accepted: the loop thread is busy
    b.sendall(frame(b"b0") + frame(b"b1"))
    # a0, inside on_message, counts as held: a drain waits for it as for the buffered ones
    assert served.loop.connections == 1 and served.loop.held_messages == 1
    served.loop.mark_drain()
    assert served.loop.connections == 2
    assert served.loop.held_messages == 1 + 39 + 2  # a0 in on_message; a: 39 more; b: 2
    gate.set()
    a.sendall(frame(b"a-partial")[6:] + frame(b"a-late"))
    b.sendall(frame(b"b-late"))
    # answer everything as it comes, in order per connection
    answered = 0
    deadline = time.monotonic() + LONG
    while answered < 40 + 2 + 2 + 1:
        assert time.monotonic() < deadline, rec.requests[answered:]
        if answered < len(rec.requests):
            conn, slot, body = rec.requests[answered]
            conn.send_response(slot, body)
            answered += 1
        else:
            time.sleep(0.002)
    got = {body: before for (_, _, body), before in zip(rec.requests, rec.before, strict=True)}
    assert all(got[b"a%d" % i] for i in range(40))
    assert got[b"b0"] and got[b"b1"]
    assert not got[b"a-partial"] and not got[b"a-late"] and not got[b"b-late"]
    assert served.loop.held_messages == 0
    assert [recv_body(a) for _ in range(42)][-2:] == [b"a-partial", b"a-late"]
    assert [recv_body(b) for _ in range(3)] == [b"b0", b"b1", b"b-late"]


def test_release_held_after_a_drain_gives_up(serve):
    rec = DrainRecorder()
    served = serve(rec, pipeline_depth=1)
    s = served.connect()
    s.sendall(frame(b"m0") + frame(b"m1") + frame(b"m2"))
    rec.wait(1)
    time.sleep(0.05)
    served.loop.mark_drain()
    assert served.loop.held_messages == 2
    served.loop.release_held()
    assert served.loop.held_messages == 0
    for i in range(3):
        rec.wait(i + 1)
        conn, slot, body = rec.requests[i]
        conn.send_response(slot, body)
    assert rec.before == [True, False, False]


def test_close_all_flushes_answered_output_and_closes(serve):
    big = os.urandom(4 * MiB)
    deferred = Deferred()

    def on_message(conn: connloop.Connection, slot: int, body: bytes) -> bytes | None:
        if body == b"big":
            return big
        deferred(conn, slot, body)
        return None

    served = serve(on_message)
    reader, waiter, idle = served.connect(), served.connect(), served.connect()
    reader.sendall(frame(b"big"))
    waiter.sendall(frame(b"unanswered"))
    deferred.wait(1)
    time.sleep(0.1)  # the big answer is stuck in the out buffer: nobody reads it yet
    closer = threading.Thread(target=served.loop.close_all, args=(LONG,))
    closer.start()
    assert recv_body(reader) == big
    assert reader.recv(1) == b""
    assert waiter.recv(1) == b""
    assert idle.recv(1) == b""
    closer.join(LONG)
    assert not closer.is_alive()
    served.thread.join(LONG)
    assert not served.thread.is_alive()
    assert served.loop.connections == 0
    conn = deferred.requests[0][0]
    assert conn.closed
    assert conn.send_response(0, b"too late") is False


def test_close_all_gives_up_after_flush_timeout(serve):
    served = serve(lambda conn, slot, body: b"x" * (8 * MiB))
    stalled = served.connect()
    stalled.sendall(frame(b"big"))
    time.sleep(0.1)
    start = time.monotonic()
    served.loop.close_all(0.3)  # returns (pytest-timeout is the hang guard)
    assert time.monotonic() - start >= 0.2
    served.thread.join(LONG)
    assert not served.thread.is_alive()


def test_close_all_before_run_returns_at_once(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "s.sock"))
        listener.listen(1)
        loop = connloop.ConnectionLoop(
            listener.fileno(), echo, bad_length, max_message_bytes=100, read_timeout=1,
            idle_timeout=1, write_timeout=1, max_connections=1, pipeline_depth=1)
        loop.close_all(1.0)
        loop.run()  # returns at once: already closed
        assert loop.connections == 0


def test_raising_callback_closes_only_its_connection(serve, caplog):
    def on_message(conn: connloop.Connection, slot: int, body: bytes) -> bytes:
        if body == b"boom":
            raise RuntimeError("callback failure")
        if body == b"wrong type":
            return "not bytes"  # type: ignore[return-value]
        return body

    served = serve(on_message)
    bystander = served.connect()
    for trigger in (b"boom", b"wrong type"):
        victim = served.connect()
        with caplog.at_level(logging.ERROR, logger="vasipc"):
            victim.sendall(frame(trigger))
            assert is_closed(victim)
        assert roundtrip(bystander, b"fine") == b"fine"
    messages = [r.getMessage() for r in caplog.records if r.name == "vasipc"]
    assert len(messages) == 2 and all("on_message" in m for m in messages)
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


def test_send_response_twice_raises(serve):
    deferred = Deferred()
    s = serve(deferred).connect()
    s.sendall(frame(b"a") + frame(b"b"))
    deferred.wait(2)
    conn = deferred.requests[0][0]
    assert conn.send_response(1, b"B") is True
    with pytest.raises(ValueError):
        conn.send_response(1, b"again")
    assert conn.send_response(0, b"A") is True
    with pytest.raises(ValueError):
        conn.send_response(0, b"again")
    with pytest.raises(ValueError):
        conn.send_response(2, b"no such request")
    assert [recv_body(s), recv_body(s)] == [b"A", b"B"]
    with pytest.raises(TypeError):
        conn.send_response(0, None)  # type: ignore[arg-type]


def test_send_response_after_close_returns_false(serve):
    deferred = Deferred()
    s = serve(deferred).connect()
    s.sendall(frame(b"x") + frame(b"y"))
    deferred.wait(2)
    conn = deferred.requests[0][0]
    s.close()  # gone: the loop sees HUP, or the write gets EPIPE
    first = conn.send_response(0, b"lost")
    wait_for(lambda: conn.closed)
    assert conn.send_response(1, b"lost too") is False
    assert first in (True, False)


# --- load and resources ---------------------------------------------------------------

def test_sixteen_clients_two_thousand_requests_each(serve):
    work: queue.Queue = queue.Queue()

    def on_message(conn: connloop.Connection, slot: int, body: bytes) -> bytes | None:
        if body.endswith(b"7"):  # some answers come from another thread
            work.put((conn, slot, body[::-1]))
            return None
        return body[::-1]

    def worker() -> None:
        while (item := work.get()) is not None:
            item[0].send_response(item[1], item[2])

    answerer = threading.Thread(target=worker, daemon=True)
    answerer.start()
    served = serve(on_message)
    errors: list[str] = []

    def client(n: int) -> None:
        with served.connect() as s:
            for i in range(2000):
                body = b'{"op":"health","c":%d,"i":%d}' % (n, i)
                if roundtrip(s, body) != body[::-1]:
                    errors.append(f"client {n} request {i}")
                    return

    clients = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    work.put(None)
    assert not errors
    assert not any(t.is_alive() for t in clients)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fds_back_to_baseline_after_many_connections(serve):
    served = serve()
    with served.connect() as warm:
        assert roundtrip(warm, b"warm") == b"warm"
    wait_for(lambda: served.loop.connections == 0)
    baseline = _open_fds()
    for i in range(10000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(served.path)
        if i % 2:
            s.sendall(frame(b"%d" % i))
            assert recv_body(s) == b"%d" % i
        s.close()
    wait_for(lambda: served.loop.connections == 0)
    assert _open_fds() == baseline


@pytest.mark.slow
def test_accepts_again_after_running_out_of_fds(tmp_path):
    """Clients left in the backlog while fds ran out are accepted once fds free up."""
    path = str(tmp_path / "s.sock")
    child = textwrap.dedent(f"""
        import os, resource, socket, sys, threading
        from vasipc._fast import connloop
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind({path!r})
        listener.listen(64)
        loop = connloop.ConnectionLoop(
            listener.fileno(), lambda c, s, b: b, lambda c, s, n: b"bad",
            max_message_bytes=100, read_timeout=10, idle_timeout=10, write_timeout=10,
            max_connections=100, pipeline_depth=4)
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + 3, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))  # room for three connections (and listdir's fd)
        threading.Thread(target=lambda: (sys.stdin.read(), loop.close_all(1.0)),
                         daemon=True).start()
        print("ready", flush=True)
        loop.run()
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    clients: list[socket.socket] = []
    try:
        assert proc.stdout.readline() == b"ready\n"
        for i in range(6):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(LONG)
            s.connect(path)
            s.sendall(frame(b"c%d" % i))
            clients.append(s)
        answered = []
        for s in clients:
            s.settimeout(0.3)
            try:
                answered.append(recv_body(s))
            except TimeoutError:
                answered.append(None)
        assert answered[:2] == [b"c0", b"c1"]
        assert None in answered
        waiting = [i for i, a in enumerate(answered) if a is None]
        for i, a in enumerate(answered):
            if a is not None:
                clients[i].close()  # frees an fd in the server
        for i in waiting:
            clients[i].settimeout(LONG)
            assert recv_body(clients[i]) == b"c%d" % i
    finally:
        for s in clients:
            s.close()
        proc.stdin.close()
        assert proc.wait(LONG) == 0


def test_garbage_from_peers_never_breaks_the_loop(serve):
    served = serve(max_message_bytes=1000, read_timeout=0.5)
    rng = random.Random(1234)
    socks = []
    for _ in range(40):
        s = served.connect()
        chunks = [rng.randbytes(rng.randrange(1, 300)) for _ in range(rng.randrange(1, 6))]
        if rng.random() < 0.5:
            chunks.insert(0, frame(rng.randbytes(rng.randrange(1, 1000))))
        with contextlib.suppress(OSError):
            for chunk in chunks:
                s.sendall(chunk)
        if rng.random() < 0.5:
            s.close()
        else:
            socks.append(s)
    fresh = served.connect()
    assert roundtrip(fresh, b"ok") == b"ok"
    for s in socks:
        s.close()
    wait_for(lambda: served.loop.connections == 1)


# --- fuzz: random streams and chunking against the pure-Python reference reader ------------
#
# What the loop must make of a client's byte stream is what tests/reference_framing.py
# (the reference of the blocking reader) makes of it: every whole body answered, in
# order; a zero or oversize length answered by on_bad_length and then the connection
# closed; a truncated tail dropped at EOF. The expected answers are derived from the
# reference's outcome for the same stream, never from framing rules restated here.

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test-only extra
    given = None

if given is None:
    def test_fuzz_needs_hypothesis():
        pytest.skip("hypothesis is not installed")
else:
    import reference_framing
    from connloop_answerer import Answerer, answer_for, bad_answer_for

    # VASIPC_FUZZ_EXAMPLES=2000 for a longer run than the default few seconds.
    FUZZ_EXAMPLES = int(os.environ.get("VASIPC_FUZZ_EXAMPLES", "100"))
    FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    # Sizes around the prefix, the loop's first read buffer (16 KiB) and the size above
    # which an emptied read buffer shrinks back (64 KiB).
    EDGE_SIZES = [1, 2, 3, 4, 5, 16379, 16380, 16383, 16384, 16385]
    BIG_SIZES = [65532, 65536, 65537, 70000]
    # Limits: small (many frames too large), and around the same buffer sizes.
    max_bytes_strategy = st.one_of(
        st.integers(1, 300), st.sampled_from([16380, 16384, 65536, 70000, MiB]))

    @st.composite
    def streams(draw: st.DrawFn, max_bytes: int) -> bytes:
        """Mostly frames (valid or not for max_bytes), some zero and oversize lengths,
        garbage, and maybe a truncated tail."""
        junk = st.binary(max_size=40)
        small = st.binary(min_size=1, max_size=min(200, max_bytes)).map(frame)
        edge, big = (st.tuples(st.sampled_from(sizes), st.integers(0, 255)).map(
            lambda size_fill: frame(bytes([size_fill[1]]) * size_fill[0]))
            for sizes in (EDGE_SIZES, BIG_SIZES))
        odd = st.one_of(
            junk.map(lambda rest: PREFIX.pack(0) + rest),
            st.tuples(st.integers(min(max_bytes + 1, 0xFFFFFFFF), 0xFFFFFFFF), junk)
              .map(lambda n_rest: PREFIX.pack(n_rest[0]) + n_rest[1]),
            # A length that need not match its bytes: framing goes out of step.
            st.tuples(st.integers(0, 90), st.binary(max_size=90))
              .map(lambda n_body: PREFIX.pack(n_body[0]) + n_body[1]),
            junk,
        )
        tail = st.one_of(
            st.just(b""),
            st.binary(min_size=1, max_size=3),  # part of a prefix
            st.tuples(st.integers(1, 70000), st.binary(max_size=100))
              .map(lambda n_body: PREFIX.pack(n_body[0]) + n_body[1][: n_body[0] - 1]),
        )
        parts = []
        for _ in range(draw(st.integers(0, 12), label="parts")):
            kind = draw(st.integers(0, 9), label="kind")
            parts.append(draw(small if kind < 5 else edge if kind < 6 else big if kind < 8
                              else odd))
        return b"".join(parts) + draw(tail)

    def reference_answers(stream: bytes, max_bytes: int) -> list[bytes]:
        """The answers a client sending `stream` then EOF must get, per the reference."""
        server, peer = socket.socketpair()
        outcome: list[object] = []
        with server, peer:
            def send() -> None:
                with contextlib.suppress(OSError):
                    peer.sendall(stream)
                    peer.shutdown(socket.SHUT_WR)

            reader = reference_framing.MessageReader(server.fileno(), max_bytes)
            writer = threading.Thread(target=send, daemon=True)
            writer.start()
            try:
                while True:
                    try:
                        body = reader.read_message(LONG, LONG)
                    except reference_framing.ZeroLength:
                        outcome.append(0)
                        break
                    except reference_framing.TooLarge as exc:
                        outcome.append(exc.length)
                        break
                    except reference_framing.ConnectionClosed:
                        break  # a truncated tail: no answer
                    if body is None:
                        break
                    outcome.append(bytes(body))
                server.shutdown(socket.SHUT_RD)  # unblocks the writer after an error
            finally:
                reader.close()
                writer.join(LONG)
        return [answer_for(slot, item) if isinstance(item, bytes) else bad_answer_for(slot, item)
                for slot, item in enumerate(outcome)]

    PEER_GONE = (BrokenPipeError, ConnectionResetError)

    def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
        if not stream:
            return []
        points = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
        return [stream[a:b] for a, b in itertools.pairwise(points)]

    def read_until_closed(sock: socket.socket, delay: float = 0.0,
                          pause: float = 0.0) -> list[bytes]:
        """Every answer until the server closes; a close inside an answer is recorded.
        `delay`: start reading late, so that answers pile up in the loop's out buffer
        (not for long: after a bad length the sender may wait for the loop to close,
        which waits for us to read)."""
        got: list[bytes] = []
        time.sleep(delay)
        try:
            while True:
                head = sock.recv(4)
                if not head:
                    return got
                head += recv_exact(sock, 4 - len(head))
                got.append(recv_exact(sock, PREFIX.unpack(head)[0]))
                if pause and len(got) % 3 == 0:
                    time.sleep(pause)  # the loop meets a full socket now and then
        except ConnectionResetError:
            # Closed with our unread request bytes in its buffer (a bad length): the
            # kernel hands over every byte it sent first, then ECONNRESET.
            return got
        except EOFError as exc:
            got.append(b"<closed inside an answer: %s>" % str(exc).encode())
            return got

    def send_chunks(sock: socket.socket, chunks: list[bytes], pause: float) -> None:
        # The loop stops reading after a bad length and closes once it has answered:
        # a write that meets the closed socket is the expected end.
        with contextlib.suppress(*PEER_GONE):
            for chunk in chunks:
                sock.sendall(chunk)
                if pause:
                    time.sleep(pause)
            sock.shutdown(socket.SHUT_WR)

    @contextlib.contextmanager
    def serving(answerer: Answerer, **options: float) -> Iterator[Served]:
        with tempfile.TemporaryDirectory(prefix="vasipc-connloop-", dir="/tmp") as tmp:
            served = Served(tmp, answerer.on_message, answerer.on_bad_length, **options)
            try:
                yield served
                wait_for(lambda: served.loop.connections == 0)
            finally:
                served.close()
                answerer.stop()
        assert not answerer.errors, answerer.errors

    def converse(served: Served, chunks: list[bytes], pause: float,
                 read_delay: float = 0.0, read_pause: float = 0.0) -> list[bytes]:
        s = served.connect(LONG)
        with in_thread(lambda: send_chunks(s, chunks, pause)):
            got = read_until_closed(s, read_delay, read_pause)
        s.close()
        return got

    @pytest.mark.slow
    @FUZZ
    @given(data=st.data(), max_bytes=max_bytes_strategy,
           cuts=st.lists(st.integers(0, 1 << 20), max_size=30),
           pause=st.sampled_from([0.0, 0.0, 0.0003, 0.002]),
           read_delay=st.sampled_from([0.0, 0.03]),
           read_pause=st.sampled_from([0.0, 0.0, 0.001]),
           depth=st.sampled_from([1, 2, 3, 64]), mode=st.sampled_from(["sync", "mixed"]),
           seed=st.integers(0, 1000))
    def test_fuzz_one_connection_matches_the_reference(data, max_bytes, cuts, pause,
                                                       read_delay, read_pause, depth, mode,
                                                       seed):
        stream = data.draw(streams(max_bytes), label="stream")
        expected = reference_answers(stream, max_bytes)
        with serving(Answerer(mode, seed), max_message_bytes=max_bytes,
                     pipeline_depth=depth) as served:
            got = converse(served, chunked(stream, cuts), pause, read_delay, read_pause)
        assert got == expected

    @FUZZ
    @given(data=st.data(), max_bytes=max_bytes_strategy,
           cuts=st.lists(st.integers(0, 1 << 20), max_size=20),
           pause=st.sampled_from([0.0, 0.0003]), depth=st.sampled_from([1, 2, 5, 64]),
           seed=st.integers(0, 1000))
    def test_fuzz_deferred_answers_in_random_order_arrive_in_request_order(
            data, max_bytes, cuts, pause, depth, seed):
        stream = data.draw(streams(max_bytes), label="stream")
        expected = reference_answers(stream, max_bytes)
        with serving(Answerer("deferred", seed), max_message_bytes=max_bytes,
                     pipeline_depth=depth) as served:
            got = converse(served, chunked(stream, cuts), pause)
        assert got == expected

    @FUZZ
    @given(bodies=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=120),
           cut=st.integers(0, 1 << 20), depth=st.sampled_from([1, 2, 64]))
    def test_fuzz_mark_drain_splits_at_what_was_sent(bodies, cut, depth):
        """Valid messages, sent up to a random byte, then mark_drain(), then the rest:
        exactly the messages whose last byte was sent before the mark are
        `read_before_drain`, whatever the depth limit held back; all are answered in
        order."""
        stream = b"".join(frame(b) for b in bodies)
        cut %= len(stream) + 1
        ends = list(itertools.accumulate(len(b) + 4 for b in bodies))
        rec = DrainRecorder()
        with tempfile.TemporaryDirectory(prefix="vasipc-connloop-", dir="/tmp") as tmp:
            served = Served(tmp, rec, bad_length, pipeline_depth=depth)
            try:
                sock = served.connect(LONG)
                sock.sendall(stream[:cut])
                served.loop.mark_drain()
                sock.sendall(stream[cut:])
                answered = 0
                deadline = time.monotonic() + LONG
                while answered < len(bodies):
                    assert time.monotonic() < deadline, f"{answered} of {len(bodies)} answered"
                    if answered < len(rec.requests):
                        conn, slot, body = rec.requests[answered]
                        conn.send_response(slot, body)
                        answered += 1
                    else:
                        time.sleep(0.0005)
                assert [recv_body(sock) for _ in bodies] == bodies
                assert rec.before == [end <= cut for end in ends]
                assert served.loop.held_messages == 0
            finally:
                served.close()

    @pytest.mark.slow
    @FUZZ
    @given(data=st.data(), max_bytes=max_bytes_strategy, clients=st.integers(2, 4),
           depth=st.sampled_from([1, 3, 64]), mode=st.sampled_from(["sync", "mixed"]),
           seed=st.integers(0, 1 << 32))
    def test_fuzz_interleaved_connections_each_get_their_own_answers(
            data, max_bytes, clients, depth, mode, seed):
        streams_ = [data.draw(streams(max_bytes), label=f"stream {i}") for i in range(clients)]
        chunks = [chunked(stream, data.draw(st.lists(st.integers(0, 1 << 20), max_size=12),
                                            label=f"cuts {i}"))
                  for i, stream in enumerate(streams_)]
        expected = [reference_answers(stream, max_bytes) for stream in streams_]
        # One sender plays every client's chunks in a random interleaving (each client's
        # own order kept); one reader per client.
        # (A plain Random: a Hypothesis one would draw from `data` in the sender thread.)
        interleave = random.Random(seed)
        order = [i for i, own in enumerate(chunks) for _ in own]
        interleave.shuffle(order)
        delays = [interleave.choice([0.0, 0.03]) for _ in range(clients)]
        with serving(Answerer(mode, seed), max_message_bytes=max_bytes,
                     pipeline_depth=depth) as served:
            socks = [served.connect(LONG) for _ in range(clients)]
            got: list[list[bytes]] = [[] for _ in range(clients)]

            def send_all() -> None:
                position = [0] * clients
                for i in order:
                    with contextlib.suppress(*PEER_GONE):  # its bad length: closed
                        socks[i].sendall(chunks[i][position[i]])
                    position[i] += 1
                    if interleave.random() < 0.2:
                        time.sleep(0.0003)
                for s in socks:
                    with contextlib.suppress(*PEER_GONE, OSError):  # ENOTCONN once closed
                        s.shutdown(socket.SHUT_WR)

            def read(i: int) -> None:
                got[i] = read_until_closed(socks[i], delays[i])

            with contextlib.ExitStack() as threads:
                threads.enter_context(in_thread(send_all))
                for i in range(clients):
                    threads.enter_context(in_thread(functools.partial(read, i)))
        assert got == expected



def test_an_empty_answer_is_refused_and_the_stream_stays_intact(serve):
    """docs/contract.md 2: 1 <= N. An empty answer cannot be framed: ValueError, nothing written,
    and the slot can still be answered."""
    deferred = Deferred()
    s = serve(deferred).connect()
    s.sendall(frame(b"a"))
    deferred.wait(1)
    conn = deferred.requests[0][0]
    with pytest.raises(ValueError):
        conn.send_response(0, b"")
    assert conn.send_response(0, b"A") is True
    assert recv_body(s) == b"A"
