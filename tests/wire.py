"""Raw wire access for contract tests: bytes on a real Unix socket, no client library.

The contract suites speak the protocol by hand (struct + json) so they test the server,
not our own client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def connect(path: str, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def encode(msg: Any) -> bytes:
    return frame(json.dumps(msg).encode())


def send(sock: socket.socket, msg: Any) -> None:
    sock.sendall(encode(msg))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> dict:
    (n,) = struct.unpack(">I", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, n))


def roundtrip(path: str, msg: Any, timeout: float = 30.0) -> dict:
    """Connect-per-request, as the original callers do."""
    with connect(path, timeout) as s:
        send(s, msg)
        return recv(s)


def is_closed(sock: socket.socket, timeout: float = 30.0) -> bool:
    """True when the peer closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def infer_request(frame_reference: str, model_id: str, frame_metadata: dict | None = None,
                  **extra: Any) -> dict:
    msg = {"frame_reference": frame_reference, "frame_metadata": frame_metadata or {},
           "camera_id": "camera_1", "model_id": model_id, "timestamp": time.time()}
    msg.update(extra)
    return msg


@contextlib.contextmanager
def in_thread(target: Callable[[], object]) -> Iterator[threading.Thread]:
    """Run `target` in a thread for the duration of the block, and re-raise its failure."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # handed to the test thread below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(30)
    assert not thread.is_alive(), "helper thread hung"
    if failure:
        raise failure[0]
