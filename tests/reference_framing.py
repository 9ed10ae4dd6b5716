"""A pure-Python reference of the contract's framing (docs/contract.md section 2).

What a server must make of a connection's byte stream, read one blocking message at a
time: the oracle that test_connloop.py's and fuzz_connloop.py's fuzzing derive the
connection loop's expected answers from (test_framing.py pins it to the contract), and
the reference of vasipc._fast.framing.json_depth_exceeds. Slow and plain on purpose:
socket.recv, struct and poll, one obvious step per rule.
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import time


class FramingError(Exception):
    """Base of every way a stream stops making messages."""


class ConnectionClosed(FramingError):
    """The peer closed or reset the connection before a message was whole."""


class IdleTimeout(FramingError):
    """No byte of a new message arrived within idle_timeout."""


class ReadTimeout(FramingError):
    """A message was not whole within read_timeout of its first byte."""


class ZeroLength(FramingError):
    """The length prefix was 0 (docs/contract.md 2 requires N >= 1)."""


class TooLarge(FramingError):
    """The length prefix exceeds max_message_bytes; the body was not read."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"message of {length} bytes exceeds max_message_bytes={limit}")
        self.length = length
        self.limit = limit


_PREFIX = struct.Struct(">I")
_RECV_BYTES = 65536
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _Expired(Exception):
    pass


def _deadline(timeout: float, start: float) -> float | None:
    if math.isnan(timeout):
        raise ValueError("a timeout must be a number of seconds, not NaN")
    if timeout <= 0 or math.isinf(timeout):
        return None
    return start + timeout


def _wait(fd: int, events: int, deadline: float | None) -> None:
    poller = select.poll()
    poller.register(fd, events)
    while True:
        if deadline is None:
            timeout_ms = None
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Expired
            timeout_ms = math.ceil(left * 1000)
        if poller.poll(timeout_ms):
            return


def _socket_for(fd: int) -> socket.socket:
    # A socket object of our own on a dup of the caller's fd: closing it leaves theirs open.
    return socket.socket(fileno=os.dup(fd))


class MessageReader:
    """The messages of one connection, one blocking read at a time, on a dup of `fd`
    (close() releases it)."""

    def __init__(self, fd: int, max_message_bytes: int) -> None:
        if fd < 0 or max_message_bytes < 1:
            raise ValueError("bad fd or max_message_bytes")
        self._sock = _socket_for(fd)
        self._max = max_message_bytes
        self._buf = bytearray()
        self._last_recv = 0.0

    def close(self) -> None:
        self._sock.close()

    def _recv(self, deadline: float | None) -> bool:
        """Receive some bytes into the buffer; False on EOF."""
        while True:
            try:
                data = self._sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                _wait(self._sock.fileno(), select.POLLIN, deadline)
                continue
            except _PEER_GONE as exc:
                raise ConnectionClosed(str(exc)) from None
            if not data:
                return False
            self._buf += data
            self._last_recv = time.monotonic()
            return True

    def _fill(self, want: int, deadline: float | None, timeout: float) -> None:
        while len(self._buf) < want:
            try:
                if not self._recv(deadline):
                    raise ConnectionClosed(f"EOF {len(self._buf)} bytes into a message")
            except _Expired:
                raise ReadTimeout(f"message not whole within {timeout} s") from None

    def read_message(self, idle_timeout: float, read_timeout: float) -> memoryview | None:
        idle_deadline = _deadline(idle_timeout, time.monotonic())
        _deadline(read_timeout, 0.0)  # refuses NaN now
        if not self._buf:
            try:
                if not self._recv(idle_deadline):
                    return None
            except _Expired:
                raise IdleTimeout(f"no message within {idle_timeout} s") from None
        read_deadline = _deadline(read_timeout, self._last_recv)
        self._fill(4, read_deadline, read_timeout)
        (length,) = _PREFIX.unpack_from(self._buf)
        if length == 0:
            del self._buf[:4]
            raise ZeroLength("message length prefix is 0")
        if length > self._max:
            del self._buf[:4]
            raise TooLarge(length, self._max)
        self._fill(4 + length, read_deadline, read_timeout)
        body = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        return memoryview(body)


def json_depth_exceeds(body: bytes | memoryview, max_depth: int = 64) -> bool:
    depth = 0
    in_string = escaped = False
    for byte in bytes(body):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        elif byte in b"]}":
            depth -= 1
    return False
