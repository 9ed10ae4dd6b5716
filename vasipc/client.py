"""Client library for vasipc model servers (docs/contract.md sections 1-4), pure Python.

    with Client("/tmp/vas_model_yolov8n.sock") as client:
        result = client.infer("/dev/shm/cam1/frame_000042", camera_id="cam1")
        for det in result.detections:
            print(det.class_name, det.confidence, det.bbox)

One `Client` is meant to be shared by every thread of a process: it keeps a pool of
persistent connections per socket, routes each request to the socket with the fewest
outstanding requests, and reconnects transparently after a server restart.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from vasipc import wirejson
from vasipc.errors import error_for

_LENGTH = struct.Struct(">I")
# Responses are small JSON objects; a larger length prefix means the stream is not a
# vasipc server's (or is out of sync), so the connection is dropped, not read into memory.
_MAX_RESPONSE_BYTES = 256 * 1024 * 1024


def default_socket_dir() -> str:
    """Where servers put their sockets by default (docs/contract.md 1): $VASIPC_SOCKET_DIR or /tmp."""
    return os.environ.get("VASIPC_SOCKET_DIR") or "/tmp"


# --- typed results ---------------------------------------------------------------------------

def rle_counts(counts: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' rleFrString): 5 bits a
    character from 48, a continuation bit, the sign bit last; from the fourth run on,
    each value is a difference to the run two before."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value = shift = 0
        more = True
        while more:
            c = ord(counts[pos]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


@dataclass(frozen=True, slots=True)
class Mask:
    """An instance mask over the whole source frame, COCO compressed RLE (column-major)."""

    size: tuple[int, int]  # height, width of the source frame
    counts: str

    def to_array(self) -> Any:
        """The mask as a numpy bool array [height, width] (what pycocotools.mask.decode gives)."""
        import numpy as np

        h, w = self.size
        runs = rle_counts(self.counts)
        if sum(runs) != h * w:
            raise ValueError(f"RLE covers {sum(runs)} pixels, the mask {h}x{w}")
        values = np.zeros(len(runs), np.bool_)
        values[1::2] = True  # runs alternate, zeros first
        flat = np.repeat(values, runs)
        return flat.reshape(w, h).T  # column-major


@dataclass(frozen=True, slots=True)
class Detection:
    class_id: int
    class_name: str
    confidence: float
    bbox: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max, normalized 0..1
    track_id: None = None  # always null: servers keep no state (docs/contract.md 4)
    mask: Mask | None = None  # segment, mask_format "rle"
    polygon: list[tuple[float, float]] | None = None  # segment ("polygon") or obb: normalized points
    keypoints: list[tuple[float, float, float | None]] | None = None  # pose: x, y normalized, visibility
    rotated_box: tuple[float, float, float, float, float] | None = None  # obb: cx, cy, w, h px, angle rad

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Detection:
        x0, y0, x1, y1 = d["bbox"]
        mask, poly, kpts, rbox = d.get("mask"), d.get("polygon"), d.get("keypoints"), d.get("rotated_box")
        return cls(int(d["class_id"]), str(d["class_name"]), float(d["confidence"]),
                   (float(x0), float(y0), float(x1), float(y1)),
                   mask=None if mask is None else Mask(tuple(mask["size"]), str(mask["counts"])),
                   polygon=None if poly is None else [tuple(p) for p in poly],
                   keypoints=None if kpts is None else [tuple(k) for k in kpts],
                   rotated_box=None if rbox is None else tuple(rbox))


@dataclass(frozen=True, slots=True)
class Classification:
    class_id: int
    class_name: str
    confidence: float


@dataclass(frozen=True, slots=True)
class InferResult:
    model_id: str
    camera_id: str
    frame_id: int | None
    detections: list[Detection]
    metadata: dict[str, Any]
    request_id: str | int | None
    raw: dict[str, Any]  # the response as received
    classifications: list[Classification] | None = None  # classifiers: the top-k classes

    @classmethod
    def from_response(cls, resp: dict[str, Any]) -> InferResult:
        classes = resp.get("classifications")
        return cls(
            model_id=resp.get("model_id"),
            camera_id=resp.get("camera_id"),
            frame_id=resp.get("frame_id"),
            detections=[Detection.from_dict(d) for d in resp.get("detections") or ()],
            metadata=resp.get("metadata") or {},
            request_id=resp.get("request_id"),
            raw=resp,
            classifications=None if classes is None else [
                Classification(int(c["class_id"]), str(c["class_name"]), float(c["confidence"]))
                for c in classes],
        )


@dataclass(frozen=True, slots=True)
class ServerInfo:
    socket: str
    info: dict[str, Any]  # the server's `info` answer (docs/contract.md 3.3)


def _raise_on_error(resp: dict[str, Any]) -> dict[str, Any]:
    code = resp.get("error_code")
    if code is not None:
        raise error_for(str(code), str(resp.get("error") or code),
                        frame_id=resp.get("frame_id"), response=resp)
    return resp


# --- one connection --------------------------------------------------------------------------

class _Unreachable(ConnectionError):
    """Connecting failed: nothing was sent, so another socket may take the request."""


class _PeerGone(ConnectionError):
    """The connection was dead before any byte of the response arrived: the send failed
    with a connection error, or the first read met EOF or a reset. Safe to retry once."""


def _encode(message: dict[str, Any]) -> bytes:
    body = wirejson.dumps(message)
    if len(body) > 0xFFFFFFFF:
        raise ValueError(f"message of {len(body)} bytes does not fit the 32-bit length prefix")
    return _LENGTH.pack(len(body)) + body


class _Connection:
    """One framed connection to one socket; used by one thread at a time."""

    __slots__ = ("path", "sock")

    def __init__(self, path: str, deadline: float) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(_remaining(deadline, path))
            self.sock.connect(path)
        except TimeoutError:
            self.sock.close()
            raise TimeoutError(f"vasipc: timed out connecting to {path}") from None
        except OSError as exc:
            self.sock.close()
            reason = "no socket file" if isinstance(exc, FileNotFoundError) else exc.strerror
            raise _Unreachable(f"vasipc: cannot connect to {path}: {reason}") from exc

    def close(self) -> None:
        self.sock.close()

    def looks_alive(self) -> bool:
        """False when the server closed this idle connection (EOF waiting) or it holds bytes
        nobody asked for; one non-blocking peek, so reuse costs no round trip."""
        try:
            self.sock.settimeout(0.0)  # with a timeout set, recv would poll for it first
            peeked = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return not peeked  # b"" is EOF; any data here is out of sync

    def exchange(self, frame: bytes, deadline: float) -> dict[str, Any]:
        """Send one framed request and read its response."""
        try:
            self.sock.settimeout(_remaining(deadline, self.path))
            self.sock.sendall(frame)
        except TimeoutError:
            raise TimeoutError(f"vasipc: timed out sending to {self.path}") from None
        except OSError as exc:
            # The server may have answered and closed without reading the body
            # (message_too_large); that answer is then waiting to be read.
            with contextlib.suppress(OSError, ValueError):
                self.sock.settimeout(min(0.2, _remaining(deadline, self.path)))
                return self._read_response(deadline)
            raise _PeerGone(f"vasipc: connection to {self.path} lost: {exc}") from exc
        return self._read_response(deadline)

    def _read_response(self, deadline: float) -> dict[str, Any]:
        head = self._read_exact(_LENGTH.size, deadline, first=True)
        (length,) = _LENGTH.unpack(head)
        if not 1 <= length <= _MAX_RESPONSE_BYTES:
            raise ConnectionError(f"vasipc: protocol error from {self.path}: "
                                  f"response length {length}")
        body = self._read_exact(length, deadline, first=False)
        try:
            resp = wirejson.loads(body)
        except wirejson.JSONDecodeError as exc:
            raise ConnectionError(f"vasipc: protocol error from {self.path}: {exc}") from None
        if not isinstance(resp, dict):
            raise ConnectionError(f"vasipc: protocol error from {self.path}: "
                                  "response is not a JSON object")
        return resp

    def _read_exact(self, n: int, deadline: float, *, first: bool) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                self.sock.settimeout(_remaining(deadline, self.path))
                chunk = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise TimeoutError(
                    f"vasipc: timed out waiting for a response from {self.path}") from None
            except OSError as exc:
                if first and got == 0:
                    raise _PeerGone(f"vasipc: connection to {self.path} lost: {exc}") from exc
                raise ConnectionError(f"vasipc: connection to {self.path} lost "
                                      f"mid-response: {exc}") from exc
            if chunk == 0:
                if first and got == 0:
                    raise _PeerGone(f"vasipc: {self.path} closed the connection")
                raise ConnectionError(f"vasipc: {self.path} closed the connection mid-response")
            got += chunk
        return buf


def _remaining(deadline: float, path: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"vasipc: timed out talking to {path}")
    return left


# --- one socket: a pool of connections ---------------------------------------------------------

class _Endpoint:
    """The connections of one server socket, and how many requests it has outstanding."""

    def __init__(self, path: str, pool_size: int) -> None:
        self.path = path
        self.pool_size = pool_size
        self.outstanding = 0  # guarded by the Client's routing lock
        self._idle: collections.deque[_Connection] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False

    def call(self, frame: bytes, deadline: float) -> dict[str, Any]:
        conn, reused = self._acquire(deadline)
        try:
            resp = conn.exchange(frame, deadline)
        except _PeerGone:
            conn.close()
            if not reused:
                raise
            # A pooled connection outlived its server (restart, idle timeout). Nothing of
            # the response arrived, and infer is idempotent: retry once on a fresh one.
            conn = _Connection(self.path, deadline)
            try:
                resp = conn.exchange(frame, deadline)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()  # a timeout or a broken stream leaves it out of sync
            raise
        self._release(conn)
        return resp

    def _acquire(self, deadline: float) -> tuple[_Connection, bool]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return _Connection(self.path, deadline), False
            if conn.looks_alive():
                return conn, True
            conn.close()

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def drop_idle(self) -> None:
        """Close the pooled connections (they lead to a server that is going away)."""
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.drop_idle()


# --- the client ------------------------------------------------------------------------------

class Client:
    """A thread-safe client for one or several servers of the same model.

    `socket_path`: one socket path or several (the same model served by several processes);
    each request goes to the socket with the fewest outstanding requests, ties in turn.
    `timeout`: seconds a request may take in all (connect, send, wait, read).
    `pool_size`: idle connections kept per socket; busier moments open extra connections
    that are closed after their response.
    `model_id`: what `infer` sends by default; when None, learned once from the server's `info`.

    A request that cannot reach a socket, or that a draining server answers with
    `shutting_down`, goes to another of the sockets (servers are stateless), unless pinned
    with `socket=`. Connection failures raise the builtin `ConnectionError` /
    `TimeoutError`; an `infer` answered with an `error_code` raises that code's
    `vasipc.errors` class.
    """

    def __init__(self, socket_path: str | Sequence[str], *, timeout: float = 30.0,
                 pool_size: int = 8, model_id: str | None = None) -> None:
        paths = [socket_path] if isinstance(socket_path, str | os.PathLike) else list(socket_path)
        if not paths:
            raise ValueError("Client needs at least one socket path")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if pool_size < 0:
            raise ValueError("pool_size must be >= 0")
        self.timeout = timeout
        self.model_id = model_id
        self._endpoints = [_Endpoint(os.fspath(p), pool_size) for p in paths]
        self._by_path = {ep.path: ep for ep in self._endpoints}
        self._route_lock = threading.Lock()
        self._next_turn = itertools.count()
        self._model_id_lock = threading.Lock()
        self._closed = False

    @property
    def sockets(self) -> list[str]:
        return [ep.path for ep in self._endpoints]

    # -- raw requests --

    def request(self, message: dict[str, Any], timeout: float | None = None, *,
                socket: str | None = None) -> dict[str, Any]:
        """Send one message and return the response as is (no exception on `error_code`).

        `socket` pins the request to one of this client's sockets instead of routing it.
        """
        if self._closed:
            raise ConnectionError("vasipc: client is closed")
        frame = _encode(message)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if socket is not None:
            try:
                candidates = [self._by_path[os.fspath(socket)]]
            except KeyError:
                raise ValueError(f"{socket!r} is not one of this client's sockets") from None
        else:
            candidates = self._endpoints
        refused: list[_Endpoint] = []
        while True:
            endpoint = self._pick([ep for ep in candidates if ep not in refused])
            try:
                resp = endpoint.call(frame, deadline)
            except _Unreachable:
                # Nothing was sent: let another socket of the same model take it.
                refused.append(endpoint)
                if len(refused) == len(candidates):
                    raise
                continue
            finally:
                with self._route_lock:
                    endpoint.outstanding -= 1
            if resp.get("error_code") != "shutting_down":
                return resp
            # A draining server (its socket is gone; pooled connections still reach it):
            # the model is stateless, so another socket of it may answer instead. Later
            # requests connect afresh and find the socket gone.
            endpoint.drop_idle()
            refused.append(endpoint)
            if len(refused) == len(candidates):
                return resp

    def _pick(self, candidates: list[_Endpoint]) -> _Endpoint:
        """The candidate with the fewest outstanding requests (ties in turn), counted in."""
        with self._route_lock:
            least = min(ep.outstanding for ep in candidates)
            tied = [ep for ep in candidates if ep.outstanding == least]
            endpoint = tied[next(self._next_turn) % len(tied)]
            endpoint.outstanding += 1
            return endpoint

    # -- the contract's operations --

    def health(self, *, timeout: float | None = None, socket: str | None = None) -> dict[str, Any]:
        """The server's `health` answer (docs/contract.md 3.2)."""
        return _raise_on_error(self.request({"op": "health"}, timeout, socket=socket))

    def info(self, *, timeout: float | None = None, socket: str | None = None) -> dict[str, Any]:
        """The server's `info` answer (docs/contract.md 3.3)."""
        return _raise_on_error(self.request({"op": "info"}, timeout, socket=socket))

    def infer(
        self,
        frame_reference: str | os.PathLike[str],
        *,
        camera_id: str,
        frame_metadata: dict[str, Any] | None = None,
        timestamp: float | None = None,
        config: dict[str, Any] | None = None,
        deadline_ms: float | None = None,
        request_id: str | int | None = None,
        model_id: str | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """Run the model on one frame (docs/contract.md 3.1) and return its detections.

        `frame_reference`: absolute path of a frame-export directory or raw frame file;
        `frame_metadata` may be omitted for export directories. Raises the
        `vasipc.errors` class of the response's `error_code`.
        """
        message: dict[str, Any] = {
            "op": "infer",
            "frame_reference": os.fspath(frame_reference),
            "frame_metadata": {} if frame_metadata is None else frame_metadata,
            "camera_id": camera_id,
            "model_id": model_id or self.model_id or self._learn_model_id(timeout),
            "timestamp": time.time() if timestamp is None else timestamp,
        }
        if config is not None:
            message["config"] = config
        if deadline_ms is not None:
            message["deadline_ms"] = deadline_ms
        if request_id is not None:
            message["request_id"] = request_id
        return InferResult.from_response(_raise_on_error(self.request(message, timeout)))

    def _learn_model_id(self, timeout: float | None) -> str:
        with self._model_id_lock:
            if self.model_id is None:
                self.model_id = str(self.info(timeout=timeout)["model_id"])
            return self.model_id

    # -- lifetime --

    def close(self) -> None:
        """Close the pooled connections; requests in flight finish, then close theirs."""
        self._closed = True
        for endpoint in self._endpoints:
            endpoint.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.sockets!r}, model_id={self.model_id!r})"


def discover(socket_dir: str | None = None, pattern: str = "vas_model_*.sock",
             timeout: float = 1.0) -> list[ServerInfo]:
    """The live servers whose sockets match `pattern` in `socket_dir` (default: as the
    server's, $VASIPC_SOCKET_DIR or /tmp), sorted by path. Files that are not sockets,
    stale sockets and servers that do not answer `info` in `timeout` are skipped."""
    directory = default_socket_dir() if socket_dir is None else socket_dir
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), pattern))):
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
            conn = _Connection(path, time.monotonic() + timeout)
        except OSError:  # vanished, stale (refused) or unreachable
            continue
        try:
            info = conn.exchange(_encode({"op": "info"}), time.monotonic() + timeout)
        except OSError:
            continue
        finally:
            conn.close()
        if info.get("error_code") is None and info.get("op") == "info":
            found.append(ServerInfo(path, info))
    return found
