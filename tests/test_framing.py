"""Length-prefixed message I/O (vasipc._fast.framing, docs/contract.md section 2), on real sockets.

`_FramingBehaviour` is run against the compiled module and the pure-Python reference
(tests/reference_framing.py), over a socketpair and over a real AF_UNIX listener, so the
rules are pinned by the same tests; what only the compiled reader promises (GIL released,
zero-copy views, no SIGPIPE) is tested after it, then a differential fuzz of the two.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pytest
import reference_framing
from wire import in_thread

from vasipc._fast import framing

PREFIX = struct.Struct(">I")
MiB = 1024 * 1024
LONG = 10.0   # a timeout that must not expire in a passing test
SHORT = 0.2   # a timeout that must expire


def frame(body: bytes) -> bytes:
    return PREFIX.pack(len(body)) + body


def _unix_listener_pair() -> tuple[socket.socket, socket.socket]:
    """A connection through a real listening AF_UNIX socket in /tmp: (server side, client)."""
    with tempfile.TemporaryDirectory(prefix="vasipc-framing-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(path)
            server, _ = listener.accept()
    return server, client


@pytest.fixture(params=["socketpair", "listener"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, peer): the reader reads `server`, the test plays the peer."""
    if request.param == "socketpair":
        server, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        server, peer = _unix_listener_pair()
    with server, peer:
        yield server, peer


def dribble(sock: socket.socket, data: bytes, pause: float) -> Callable[[], None]:
    def send() -> None:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            time.sleep(pause)
    return send


def set_rcvbuf_small(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


class _FramingBehaviour:
    """The rules of docs/contract.md 2 as the reader and send_message implement them."""

    impl: ClassVar[types.ModuleType]

    @pytest.fixture(autouse=True)
    def _readers(self) -> Iterator[None]:
        self._made: list[object] = []
        yield
        for reader in self._made:
            close = getattr(reader, "close", None)  # the reference holds a dup'd socket
            if close is not None:
                close()

    def reader(self, sock: socket.socket, max_bytes: int = 16 * MiB):
        reader = self.impl.MessageReader(sock.fileno(), max_bytes)
        self._made.append(reader)
        return reader

    # ---- whole messages ---------------------------------------------------------------
    def test_single_message_then_clean_eof(self, pair):
        server, peer = pair
        reader = self.reader(server)
        peer.sendall(frame(b'{"op":"health"}'))
        body = reader.read_message(LONG, LONG)
        assert bytes(body) == b'{"op":"health"}'
        assert body.readonly
        assert reader.buffered() == 0
        peer.close()
        assert reader.read_message(LONG, LONG) is None

    def test_send_message_round_trip(self, pair):
        server, peer = pair
        reader = self.reader(server)
        for body in (b"x", bytearray(b"[1,2]"), memoryview(b'{"a":"b"}')):
            self.impl.send_message(peer.fileno(), body, LONG)
            assert bytes(reader.read_message(LONG, LONG)) == bytes(body)

    def test_send_message_writes_the_wire_format(self, pair):
        server, peer = pair
        self.impl.send_message(peer.fileno(), b"hello", LONG)
        assert server.recv(100) == b"\x00\x00\x00\x05hello"

    def test_send_message_refuses_an_empty_body(self, pair):
        _server, peer = pair
        with pytest.raises(ValueError):
            self.impl.send_message(peer.fileno(), b"", LONG)

    def test_fragmented_byte_by_byte(self, pair):
        server, peer = pair
        reader = self.reader(server)
        bodies = [b'{"n":1}', bytes(range(256)) * 2]
        data = b"".join(frame(b) for b in bodies)
        with in_thread(dribble(peer, data, 0.0005)):
            got = [bytes(reader.read_message(LONG, LONG)) for _ in bodies]
        assert got == bodies

    def test_pipelined_in_one_sendall(self, pair):
        server, peer = pair
        reader = self.reader(server)
        bodies = [b'{"request_id":%d,"pad":"%s"}' % (i, b"x" * (i % 97)) for i in range(500)]
        data = b"".join(frame(b) for b in bodies)

        def send() -> None:
            peer.sendall(data)
            peer.shutdown(socket.SHUT_WR)

        with in_thread(send):
            first = bytes(reader.read_message(LONG, LONG))
            assert reader.buffered() > 0
            assert reader.readable_now()
            rest = [bytes(reader.read_message(LONG, LONG)) for _ in bodies[1:]]
            assert reader.read_message(LONG, LONG) is None
        assert [first, *rest] == bodies

    def test_large_message_8mib(self, pair):
        server, peer = pair
        reader = self.reader(server)
        big = np.random.default_rng(1).integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
        small = b'{"after":"big"}'

        def send() -> None:
            peer.sendall(frame(big) + frame(small))

        with in_thread(send):
            assert bytes(reader.read_message(LONG, LONG)) == big
            assert bytes(reader.read_message(LONG, LONG)) == small

    def test_large_message_via_send_message(self, pair):
        server, peer = pair
        reader = self.reader(server)
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB
        with in_thread(lambda: self.impl.send_message(peer.fileno(), big, LONG)):
            assert bytes(reader.read_message(LONG, LONG)) == big

    def test_max_message_bytes_is_inclusive(self, pair):
        server, peer = pair
        reader = self.reader(server, max_bytes=10)
        peer.sendall(frame(b"0123456789"))
        assert bytes(reader.read_message(LONG, LONG)) == b"0123456789"

    # ---- bad prefixes -----------------------------------------------------------------
    def test_zero_length(self, pair):
        server, peer = pair
        reader = self.reader(server)
        peer.sendall(PREFIX.pack(0) + b"{}")
        with pytest.raises(self.impl.ZeroLength):
            reader.read_message(LONG, LONG)

    def test_too_large_does_not_read_the_body(self, pair):
        server, peer = pair
        reader = self.reader(server, max_bytes=10 * MiB)
        peer.sendall(PREFIX.pack(100 * MiB))  # and nothing follows
        start = time.monotonic()
        with pytest.raises(self.impl.TooLarge) as info:
            reader.read_message(LONG, LONG)
        assert time.monotonic() - start < 1.0
        assert info.value.length == 100 * MiB
        assert isinstance(info.value, self.impl.FramingError)

    def test_too_large_leaves_the_body_unread(self, pair):
        server, peer = pair
        reader = self.reader(server, max_bytes=4)
        peer.sendall(frame(b"12345"))
        with pytest.raises(self.impl.TooLarge):
            reader.read_message(LONG, LONG)
        # The body arrived with the prefix but was not consumed as a message.
        assert reader.buffered() == 5

    # ---- timeouts ---------------------------------------------------------------------
    def test_idle_timeout(self, pair):
        server, _peer = pair
        reader = self.reader(server)
        start = time.monotonic()
        with pytest.raises(self.impl.IdleTimeout):
            reader.read_message(SHORT, LONG)
        assert SHORT * 0.9 <= time.monotonic() - start < SHORT + 1.0

    def test_idle_timeout_leaves_the_connection_usable(self, pair):
        server, peer = pair
        reader = self.reader(server)
        with pytest.raises(self.impl.IdleTimeout):
            reader.read_message(0.05, LONG)
        peer.sendall(frame(b"{}"))
        assert bytes(reader.read_message(LONG, LONG)) == b"{}"

    @pytest.mark.parametrize("sent", [2, 4, 4 + 10], ids=["mid-prefix", "prefix-only", "mid-body"])
    def test_read_timeout_when_a_message_stalls(self, pair, sent):
        server, peer = pair
        reader = self.reader(server)
        peer.sendall(frame(b"x" * 100)[:sent])
        start = time.monotonic()
        with pytest.raises(self.impl.ReadTimeout):
            reader.read_message(LONG, SHORT)
        assert SHORT * 0.9 <= time.monotonic() - start < SHORT + 1.0

    def test_read_timeout_starts_at_the_first_byte(self, pair):
        server, peer = pair
        reader = self.reader(server)

        def send_late() -> None:
            time.sleep(2 * SHORT)  # idle time, not counted against read_timeout
            peer.sendall(frame(b"{}"))

        with in_thread(send_late):
            assert bytes(reader.read_message(LONG, SHORT)) == b"{}"

    def test_read_timeout_bounds_the_whole_message(self, pair):
        server, peer = pair
        reader = self.reader(server)
        # Every byte comes well within the timeout of the one before, but the whole
        # message takes longer than the timeout: a slow-loris peer.
        stop = threading.Event()

        def slow_loris() -> None:
            data = frame(b"x" * 1000)
            for i in range(len(data)):
                if stop.is_set():
                    return
                with contextlib.suppress(OSError):
                    peer.sendall(data[i : i + 1])
                time.sleep(0.02)

        with in_thread(slow_loris):
            start = time.monotonic()
            with pytest.raises(self.impl.ReadTimeout):
                reader.read_message(LONG, SHORT)
            assert time.monotonic() - start < SHORT + 1.0
            stop.set()

    def test_nan_timeout_is_refused(self, pair):
        server, _peer = pair
        reader = self.reader(server)
        with pytest.raises(ValueError):
            reader.read_message(float("nan"), LONG)
        with pytest.raises(ValueError):
            reader.read_message(LONG, float("nan"))
        with pytest.raises(ValueError):
            self.impl.send_message(server.fileno(), b"{}", float("nan"))

    def test_zero_and_inf_mean_no_timeout(self, pair):
        server, peer = pair
        reader = self.reader(server)

        def send_late() -> None:
            time.sleep(SHORT)
            peer.sendall(frame(b"{}")[:3])
            time.sleep(SHORT)
            peer.sendall(frame(b"{}")[3:])

        with in_thread(send_late):
            assert bytes(reader.read_message(0, float("inf"))) == b"{}"

    # ---- the peer goes away -----------------------------------------------------------
    @pytest.mark.parametrize("sent", [2, 4, 4 + 3], ids=["mid-prefix", "after-prefix", "mid-body"])
    def test_eof_mid_message(self, pair, sent):
        server, peer = pair
        reader = self.reader(server)
        peer.sendall(frame(b"0123456789")[:sent])
        peer.close()
        with pytest.raises(self.impl.ConnectionClosed):
            reader.read_message(LONG, LONG)

    def test_eof_after_whole_messages_is_clean(self, pair):
        server, peer = pair
        reader = self.reader(server)
        peer.sendall(frame(b"a") + frame(b"b"))
        peer.shutdown(socket.SHUT_WR)
        assert bytes(reader.read_message(LONG, LONG)) == b"a"
        assert bytes(reader.read_message(LONG, LONG)) == b"b"
        assert reader.read_message(LONG, LONG) is None
        assert reader.read_message(LONG, LONG) is None  # and stays so

    def test_eof_while_waiting_wakes_the_reader(self, pair):
        server, peer = pair
        reader = self.reader(server)

        def close_later() -> None:
            time.sleep(SHORT)
            peer.shutdown(socket.SHUT_RDWR)

        with in_thread(close_later):
            assert reader.read_message(LONG, LONG) is None

    @pytest.mark.parametrize("sent", [0, 7], ids=["between-messages", "mid-message"])
    def test_peer_reset(self, pair, sent):
        server, peer = pair
        reader = self.reader(server)
        # A Unix socket closed with unread data in its queue resets its peer (ECONNRESET).
        server.sendall(b"unread by the peer")
        peer.sendall(frame(b"0123456789")[:sent])
        peer.close()
        with pytest.raises(self.impl.ConnectionClosed):
            reader.read_message(LONG, LONG)

    def test_send_to_a_closed_peer(self, pair):
        server, peer = pair
        server.close()
        with pytest.raises(self.impl.ConnectionClosed):
            self.impl.send_message(peer.fileno(), b'{"status":"ok"}', LONG)

    def test_send_timeout_when_the_peer_never_reads(self, pair):
        server, peer = pair
        set_rcvbuf_small(server)
        set_rcvbuf_small(peer)
        start = time.monotonic()
        with pytest.raises(self.impl.SendTimeout) as info:
            self.impl.send_message(peer.fileno(), b"x" * (8 * MiB), SHORT)
        assert isinstance(info.value, TimeoutError)
        assert SHORT * 0.9 <= time.monotonic() - start < SHORT + 1.0

    # ---- readiness --------------------------------------------------------------------
    def test_readable_now(self, pair):
        server, peer = pair
        reader = self.reader(server)
        assert not reader.readable_now()
        peer.sendall(frame(b"a") + frame(b"b"))
        deadline = time.monotonic() + LONG
        while not reader.readable_now():
            assert time.monotonic() < deadline
        assert bytes(reader.read_message(LONG, LONG)) == b"a"
        assert reader.readable_now()  # "b" is buffered or still in the socket
        assert bytes(reader.read_message(LONG, LONG)) == b"b"
        assert not reader.readable_now()
        peer.close()
        assert reader.readable_now()  # EOF counts as readable
        assert reader.read_message(LONG, LONG) is None


class TestFramingCompiled(_FramingBehaviour):
    impl = framing


class TestFramingReference(_FramingBehaviour):
    impl = reference_framing


# ---- what only the compiled reader promises -------------------------------------------

def test_error_hierarchy():
    for cls in (framing.ConnectionClosed, framing.IdleTimeout, framing.ReadTimeout,
                framing.ZeroLength, framing.TooLarge, framing.SendTimeout):
        assert issubclass(cls, framing.FramingError)
    assert issubclass(framing.SendTimeout, TimeoutError)
    assert not issubclass(framing.ReadTimeout, OSError)


def test_gil_is_released_while_a_reader_waits():
    """One thread stalls mid-message in read_message; 200 round trips on another
    connection meanwhile are not held up."""
    stalled_server, stalled_peer = socket.socketpair()
    server, client = socket.socketpair()
    with stalled_server, stalled_peer, server, client:
        stalled_peer.sendall(frame(b"x" * 100)[:10])
        stalled = framing.MessageReader(stalled_server.fileno(), MiB)
        outcome: list[BaseException] = []

        def wait_stalled() -> None:
            try:
                stalled.read_message(LONG, LONG)
            except framing.FramingError as exc:
                outcome.append(exc)

        def echo() -> None:
            reader = framing.MessageReader(server.fileno(), MiB)
            while (body := reader.read_message(LONG, LONG)) is not None:
                framing.send_message(server.fileno(), body, LONG)

        # Timed from before the stalled thread starts: if it held the GIL while it
        # waits, nothing below could even begin.
        start = time.monotonic()
        waiter = threading.Thread(target=wait_stalled, daemon=True)
        waiter.start()
        time.sleep(0.05)  # let it block in poll()
        with in_thread(echo):
            reader = framing.MessageReader(client.fileno(), MiB)
            for i in range(200):
                framing.send_message(client.fileno(), b'{"i":%d}' % i, LONG)
                assert bytes(reader.read_message(LONG, LONG)) == b'{"i":%d}' % i
            elapsed = time.monotonic() - start
            assert waiter.is_alive(), "the stalled read should still be waiting"
            client.shutdown(socket.SHUT_WR)
        assert elapsed < 2.0, f"200 round trips took {elapsed:.2f} s beside a stalled reader"
        stalled_peer.close()  # wakes the stalled reader: EOF mid-message
        waiter.join(LONG)
        assert [type(exc) for exc in outcome] == [framing.ConnectionClosed]


def test_body_is_a_readonly_zero_copy_view():
    server, peer = socket.socketpair()
    with server, peer:
        reader = framing.MessageReader(server.fileno(), MiB)
        peer.sendall(frame(b"abcdef"))
        body = reader.read_message(LONG, LONG)
        assert body.readonly and body.format == "B" and body.ndim == 1 and body.nbytes == 6
        with pytest.raises(TypeError):
            body[0] = 0
        array = np.frombuffer(body, np.uint8)
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array.flags.writeable = True
        # The exporter under the memoryview refuses a writable buffer too.
        view = ctypes.create_string_buffer(256)  # room for a Py_buffer
        api = ctypes.pythonapi
        api.PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
        with pytest.raises(BufferError):
            api.PyObject_GetBuffer(body.obj, view, 1)  # PyBUF_WRITABLE


def test_previous_body_is_released_by_the_next_read():
    server, peer = socket.socketpair()
    with server, peer:
        reader = framing.MessageReader(server.fileno(), MiB)
        peer.sendall(frame(b"first") + frame(b"second"))
        first = reader.read_message(LONG, LONG)
        reader.read_message(LONG, LONG)
        with pytest.raises(ValueError):
            bytes(first)


def test_steady_state_reuses_one_buffer():
    """Bodies dropped before the next read: every message, across compactions, comes
    from the same receive buffer (no allocation but the memoryview)."""
    server, peer = socket.socketpair()
    with server, peer:
        reader = framing.MessageReader(server.fileno(), MiB)
        bodies = [b'{"i":%d,"pad":"%s"}' % (i, b"p" * (i % 300)) for i in range(2000)]

        def send() -> None:
            peer.sendall(b"".join(frame(b) for b in bodies))

        with in_thread(send):
            owners = set()
            for expected in bodies:
                body = reader.read_message(LONG, LONG)
                owners.add(body.obj)  # kept alive: a freed block cannot lend its id
                assert bytes(body) == expected
        assert len(owners) == 1


def test_bodies_held_elsewhere_never_change():
    """An export taken from a body (np.frombuffer, a slice) outlives the next reads:
    the reader moves to a fresh buffer instead of compacting under it."""
    server, peer = socket.socketpair()
    with server, peer:
        reader = framing.MessageReader(server.fileno(), MiB)
        bodies = [bytes([i % 251]) * (1000 + i) for i in range(300)]  # ~450 KB: many compactions

        def send() -> None:
            peer.sendall(b"".join(frame(b) for b in bodies))
            peer.shutdown(socket.SHUT_WR)

        kept = []
        with in_thread(send):
            for i, expected in enumerate(bodies):
                body = reader.read_message(LONG, LONG)
                if i % 10 == 0:
                    kept.append((np.frombuffer(body, np.uint8), body[1:], expected))
                assert bytes(body) == expected
            assert reader.read_message(LONG, LONG) is None
        for array, tail, expected in kept:
            assert array.tobytes() == expected
            assert bytes(tail) == expected[1:]


def test_one_reader_is_not_shared_between_threads():
    server, peer = socket.socketpair()
    with server, peer:
        reader = framing.MessageReader(server.fileno(), MiB)

        def read() -> None:
            with contextlib.suppress(framing.ConnectionClosed):
                reader.read_message(LONG, LONG)

        peer.sendall(b"\x00")  # the thread now waits in the middle of a prefix
        with in_thread(read):
            time.sleep(0.1)
            with pytest.raises(RuntimeError):
                reader.read_message(LONG, LONG)
            peer.close()


def test_fd_flags_are_left_alone():
    server, peer = socket.socketpair()
    with server, peer:
        before = fcntl.fcntl(server.fileno(), fcntl.F_GETFL)
        reader = framing.MessageReader(server.fileno(), MiB)
        peer.sendall(frame(b"{}"))
        reader.read_message(LONG, LONG)
        framing.send_message(server.fileno(), b"{}", LONG)
        assert fcntl.fcntl(server.fileno(), fcntl.F_GETFL) == before
        assert server.gettimeout() is None


def test_no_sigpipe_when_sending_to_a_closed_peer():
    """CPython ignores SIGPIPE, which would hide a write() without MSG_NOSIGNAL: restore the
    default action (death) in a child and send to a closed peer there."""
    code = textwrap.dedent("""
        import signal, socket
        from vasipc._fast import framing
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        a, b = socket.socketpair()
        b.close()
        try:
            framing.send_message(a.fileno(), b"{}", 1.0)
        except framing.ConnectionClosed:
            print("ConnectionClosed")
    """)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.strip() == "ConnectionClosed"


def test_send_message_refuses_non_contiguous_buffers():
    server, peer = socket.socketpair()
    with server, peer, pytest.raises(BufferError):
        framing.send_message(peer.fileno(), memoryview(b"abcdef")[::2], LONG)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        framing.MessageReader(-1, MiB)
    with pytest.raises(ValueError):
        framing.MessageReader(0, 0)


def test_reading_a_closed_fd_is_an_oserror():
    server, peer = socket.socketpair()
    with peer:
        reader = framing.MessageReader(server.fileno(), MiB)
        server.close()
        with pytest.raises(OSError):
            reader.read_message(LONG, LONG)


# ---- json_depth_exceeds ---------------------------------------------------------------

@pytest.mark.parametrize("impl", [framing, reference_framing], ids=["compiled", "reference"])
class TestJsonDepth:
    def test_limit_is_64(self, impl):
        assert not impl.json_depth_exceeds(b"[" * 64 + b"]" * 64)
        assert impl.json_depth_exceeds(b"[" * 65 + b"]" * 65)
        assert not impl.json_depth_exceeds(b'{"a":' * 64 + b"1" + b"}" * 64)
        assert impl.json_depth_exceeds(b'{"a":[' * 33 + b"]}" * 33)  # 66 deep

    def test_siblings_do_not_add_up(self, impl):
        assert not impl.json_depth_exceeds(b"[" + b"[[]]," * 1000 + b"[]]", 3)

    def test_brackets_inside_strings_do_not_count(self, impl):
        assert not impl.json_depth_exceeds(b'{"a": "[[[[{{{{"}', 1)
        assert not impl.json_depth_exceeds(b'["\\"[[[["]', 1)  # escaped quote stays in the string

    def test_escaped_backslash_ends_before_the_quote(self, impl):
        # "\\" is a complete string; the brackets after it are real.
        assert impl.json_depth_exceeds(b'["\\\\", [[]]]', 2)
        assert not impl.json_depth_exceeds(b'["\\\\", [[]]]', 3)

    def test_max_depth_argument_and_buffers(self, impl):
        assert impl.json_depth_exceeds(memoryview(b"[[[]]]"), 2)
        assert not impl.json_depth_exceeds(bytearray(b"[[[]]]"), 3)
        assert not impl.json_depth_exceeds(b"", 0)
        assert not impl.json_depth_exceeds(b'"unterminated [[[[', 1)

    def test_large_body(self, impl):
        body = b'{"k":[' + b'"[{\\"}]",' * 20000 + b"1]}"  # ~180 KB: the GIL-free path
        assert not impl.json_depth_exceeds(body, 2)
        assert impl.json_depth_exceeds(body, 1)


# ---- fuzz: random chunking, random streams, the compiled reader against the reference ----

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test-only extra
    given = None

if given is None:
    def test_fuzz_needs_hypothesis():
        pytest.skip("hypothesis is not installed")
else:
    # VASIPC_FUZZ_EXAMPLES=5000 for a longer run than the default few seconds.
    FUZZ_EXAMPLES = int(os.environ.get("VASIPC_FUZZ_EXAMPLES", "120"))
    FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
    # Sizes around the prefix and the compiled reader's 64 KiB receive block.
    EDGE_SIZES = [1, 2, 3, 4, 5, 65527, 65531, 65532, 65533, 65536, 65537, 131069]

    bodies_strategy = st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=300),
            st.binary(min_size=1, max_size=300),
            st.tuples(st.sampled_from(EDGE_SIZES), st.integers(0, 255))
              .map(lambda size_fill: bytes([size_fill[1]]) * size_fill[0]),
        ),
        min_size=1, max_size=12)

    def outcomes(impl: types.ModuleType, stream: bytes, max_bytes: int) -> list[object]:
        """What a reader makes of `stream` followed by EOF: bodies, then None or an error."""
        server, peer = socket.socketpair()
        with server, peer:
            reader = impl.MessageReader(server.fileno(), max_bytes)
            try:
                with in_thread(lambda: (peer.sendall(stream), peer.shutdown(socket.SHUT_WR))):
                    seen: list[object] = []
                    while True:
                        try:
                            body = reader.read_message(LONG, LONG)
                        except impl.FramingError as exc:
                            seen.append((type(exc).__name__, getattr(exc, "length", None)))
                            break
                        if body is None:
                            seen.append(None)
                            break
                        seen.append(bytes(body))
                    # Drain what an error left unread, so the writer thread can finish.
                    with contextlib.suppress(OSError):
                        while server.recv(1 << 20):
                            pass
            finally:
                if hasattr(reader, "close"):
                    reader.close()
        return seen

    @FUZZ
    @given(bodies=bodies_strategy, cuts=st.lists(st.integers(0, 1 << 20), max_size=40),
           pause=st.booleans(), impl=st.sampled_from([framing, reference_framing]))
    def test_fuzz_random_chunking(bodies, cuts, pause, impl):
        stream = b"".join(frame(b) for b in bodies)
        points = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
        chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
        server, peer = socket.socketpair()
        with server, peer:
            reader = impl.MessageReader(server.fileno(), 1 << 20)

            def send() -> None:
                for chunk in chunks:
                    peer.sendall(chunk)
                    if pause:
                        time.sleep(0.0002)
                peer.shutdown(socket.SHUT_WR)

            try:
                with in_thread(send):
                    got = [bytes(reader.read_message(LONG, LONG)) for _ in bodies]
                    assert reader.read_message(LONG, LONG) is None
            finally:
                if hasattr(reader, "close"):
                    reader.close()
        assert got == bodies

    framed_garbage = st.lists(
        st.tuples(st.integers(0, 90), st.binary(max_size=90)), max_size=12,
    ).map(lambda parts: b"".join(PREFIX.pack(n) + body for n, body in parts))

    @FUZZ
    @given(stream=st.one_of(st.binary(max_size=600), framed_garbage,
                            st.tuples(framed_garbage, st.binary(max_size=8))
                              .map(lambda parts: parts[0] + parts[1])),
           max_bytes=st.integers(1, 100))
    def test_fuzz_random_streams_match_the_reference(stream, max_bytes):
        compiled = outcomes(framing, stream, max_bytes)
        assert compiled == outcomes(reference_framing, stream, max_bytes)
        assert compiled[-1] is None or isinstance(compiled[-1], tuple)

    @settings(max_examples=4 * FUZZ_EXAMPLES, deadline=None)
    @given(text=st.one_of(st.binary(max_size=300),
                          st.text(alphabet='[]{}"\\ ,:a1', max_size=300).map(str.encode)),
           max_depth=st.integers(-1, 12))
    def test_fuzz_json_depth_matches_the_reference(text, max_depth):
        assert (framing.json_depth_exceeds(text, max_depth)
                == reference_framing.json_depth_exceeds(text, max_depth))
