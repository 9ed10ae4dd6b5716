"""The contract's framing (docs/contract.md section 2): the reference reader and the JSON depth check.

tests/reference_framing.py is the oracle from which test_connloop.py's fuzzing derives
what the connection loop must answer to any byte stream; the tests here pin that oracle
to the contract's rules on real sockets (a socketpair and a real AF_UNIX listener).
Then vasipc._fast.framing.json_depth_exceeds, the contract's nesting limit, against its
pure-Python reference: the same tests, and a differential fuzz.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import reference_framing
from wire import in_thread

from vasipc._fast import framing

PREFIX = struct.Struct(">I")
MiB = 1024 * 1024
LONG = 30.0   # a timeout that must not expire in a passing test (a hang guard)
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


@pytest.fixture
def reader_on() -> Iterator[Callable[..., reference_framing.MessageReader]]:
    """reader_on(sock, max_bytes=16 MiB): a reference reader, closed after the test."""
    made: list[reference_framing.MessageReader] = []

    def make(sock: socket.socket, max_bytes: int = 16 * MiB) -> reference_framing.MessageReader:
        made.append(reference_framing.MessageReader(sock.fileno(), max_bytes))
        return made[-1]

    yield make
    for reader in made:
        reader.close()


def dribble(sock: socket.socket, data: bytes, pause: float) -> Callable[[], None]:
    def send() -> None:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            time.sleep(pause)
    return send


# ---- the reference reader: whole messages -------------------------------------------------

def test_single_message_then_clean_eof(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)
    peer.sendall(frame(b'{"op":"health"}'))
    assert bytes(reader.read_message(LONG, LONG)) == b'{"op":"health"}'
    peer.close()
    assert reader.read_message(LONG, LONG) is None


def test_fragmented_byte_by_byte(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)
    bodies = [b'{"n":1}', bytes(range(256)) * 2]
    data = b"".join(frame(b) for b in bodies)
    with in_thread(dribble(peer, data, 0.0005)):
        got = [bytes(reader.read_message(LONG, LONG)) for _ in bodies]
    assert got == bodies


def test_pipelined_in_one_sendall(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)
    bodies = [b'{"request_id":%d,"pad":"%s"}' % (i, b"x" * (i % 97)) for i in range(500)]
    data = b"".join(frame(b) for b in bodies)

    def send() -> None:
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)

    with in_thread(send):
        got = [bytes(reader.read_message(LONG, LONG)) for _ in bodies]
        assert reader.read_message(LONG, LONG) is None
    assert got == bodies


def test_large_message_8mib(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)
    big = np.random.default_rng(1).integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
    small = b'{"after":"big"}'
    with in_thread(lambda: peer.sendall(frame(big) + frame(small))):
        assert bytes(reader.read_message(LONG, LONG)) == big
        assert bytes(reader.read_message(LONG, LONG)) == small


def test_max_message_bytes_is_inclusive(pair, reader_on):
    server, peer = pair
    reader = reader_on(server, max_bytes=10)
    peer.sendall(frame(b"0123456789"))
    assert bytes(reader.read_message(LONG, LONG)) == b"0123456789"


# ---- bad prefixes -----------------------------------------------------------------------

def test_zero_length(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)
    peer.sendall(PREFIX.pack(0) + b"{}")
    with pytest.raises(reference_framing.ZeroLength):
        reader.read_message(LONG, LONG)


def test_too_large_does_not_wait_for_the_body(pair, reader_on):
    server, peer = pair
    reader = reader_on(server, max_bytes=10 * MiB)
    peer.sendall(PREFIX.pack(100 * MiB))  # and nothing follows: waiting for it times out
    with pytest.raises(reference_framing.TooLarge) as info:
        reader.read_message(LONG, SHORT)
    assert info.value.length == 100 * MiB
    assert isinstance(info.value, reference_framing.FramingError)


# ---- timeouts -----------------------------------------------------------------------------

def test_idle_timeout_leaves_the_connection_usable(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)
    with pytest.raises(reference_framing.IdleTimeout):
        reader.read_message(0.05, LONG)
    peer.sendall(frame(b"{}"))
    assert bytes(reader.read_message(LONG, LONG)) == b"{}"


@pytest.mark.parametrize("sent", [2, 4, 4 + 10], ids=["mid-prefix", "prefix-only", "mid-body"])
def test_read_timeout_when_a_message_stalls(pair, reader_on, sent):
    server, peer = pair
    reader = reader_on(server)
    peer.sendall(frame(b"x" * 100)[:sent])
    start = time.monotonic()
    with pytest.raises(reference_framing.ReadTimeout):
        reader.read_message(LONG, SHORT)
    assert time.monotonic() - start >= SHORT * 0.9


def test_nan_timeout_is_refused(pair, reader_on):
    server, _peer = pair
    reader = reader_on(server)
    with pytest.raises(ValueError):
        reader.read_message(float("nan"), LONG)
    with pytest.raises(ValueError):
        reader.read_message(LONG, float("nan"))


# ---- the peer goes away -------------------------------------------------------------------

@pytest.mark.parametrize("sent", [2, 4, 4 + 3], ids=["mid-prefix", "after-prefix", "mid-body"])
def test_eof_mid_message(pair, reader_on, sent):
    server, peer = pair
    reader = reader_on(server)
    peer.sendall(frame(b"0123456789")[:sent])
    peer.close()
    with pytest.raises(reference_framing.ConnectionClosed):
        reader.read_message(LONG, LONG)


def test_eof_after_whole_messages_is_clean(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)
    peer.sendall(frame(b"a") + frame(b"b"))
    peer.shutdown(socket.SHUT_WR)
    assert bytes(reader.read_message(LONG, LONG)) == b"a"
    assert bytes(reader.read_message(LONG, LONG)) == b"b"
    assert reader.read_message(LONG, LONG) is None
    assert reader.read_message(LONG, LONG) is None  # and stays so


def test_eof_while_waiting_wakes_the_reader(pair, reader_on):
    server, peer = pair
    reader = reader_on(server)

    def close_later() -> None:
        time.sleep(SHORT)
        peer.shutdown(socket.SHUT_RDWR)

    with in_thread(close_later):
        assert reader.read_message(LONG, LONG) is None


@pytest.mark.parametrize("sent", [0, 7], ids=["between-messages", "mid-message"])
def test_peer_reset(pair, reader_on, sent):
    server, peer = pair
    reader = reader_on(server)
    # A Unix socket closed with unread data in its queue resets its peer (ECONNRESET).
    server.sendall(b"unread by the peer")
    peer.sendall(frame(b"0123456789")[:sent])
    peer.close()
    with pytest.raises(reference_framing.ConnectionClosed):
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


# ---- fuzz: the reference reader under random chunking; the depth check against its reference ----

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
    # Sizes around the prefix and the reference's 64 KiB receive size.
    EDGE_SIZES = [1, 2, 3, 4, 5, 65527, 65531, 65532, 65533, 65536, 65537, 131069]

    bodies_strategy = st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=300),
            st.tuples(st.sampled_from(EDGE_SIZES), st.integers(0, 255))
              .map(lambda size_fill: bytes([size_fill[1]]) * size_fill[0]),
        ),
        min_size=1, max_size=12)

    @FUZZ
    @given(bodies=bodies_strategy, cuts=st.lists(st.integers(0, 1 << 20), max_size=40),
           pause=st.booleans())
    def test_fuzz_random_chunking(bodies, cuts, pause):
        stream = b"".join(frame(b) for b in bodies)
        points = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
        chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
        server, peer = socket.socketpair()
        with server, peer:
            reader = reference_framing.MessageReader(server.fileno(), 1 << 20)

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
                reader.close()
        assert got == bodies

    @settings(max_examples=4 * FUZZ_EXAMPLES, deadline=None)
    @given(text=st.one_of(st.binary(max_size=300),
                          st.text(alphabet='[]{}"\\ ,:a1', max_size=300).map(str.encode)),
           max_depth=st.integers(-1, 12))
    def test_fuzz_json_depth_matches_the_reference(text, max_depth):
        assert (framing.json_depth_exceeds(text, max_depth)
                == reference_framing.json_depth_exceeds(text, max_depth))
