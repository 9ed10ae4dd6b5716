"""The server: connections, request dispatch, drain (CONTRACT 2, 3, 7).

One thread per connection reads length-prefixed messages with the GIL released
(`_fast.framing`), answers `health` / `info` / invalid requests at once, and hands
`infer` requests to the batcher. Responses leave in request order; a connection reads
ahead while earlier requests are in the queue, so pipelined requests batch together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from vasipc import __version__, wirejson
from vasipc._fast.framing import (
    ConnectionClosed,
    FramingError,
    MessageReader,
    TooLarge,
    ZeroLength,
    json_depth_exceeds,
    send_message,
)
from vasipc.batcher import Batcher, Pending
from vasipc.errors import (
    InternalError,
    InvalidMessage,
    MessageTooLarge,
    ShuttingDown,
    VasipcError,
)
from vasipc.frame_source import FrameOpener, FrameRoots
from vasipc.listener import Listener
from vasipc.model import LoadedModel
from vasipc.schema import error_response, parse_infer, parse_op, request_id_of

log = logging.getLogger("vasipc")
_now = time.perf_counter

MAX_JSON_DEPTH = 64
# accept() failures that pass (a connection reset while queued, fds or memory short for a
# moment): wait a little and accept again instead of giving up on the listener
_ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EINTR, errno.EMFILE, errno.ENFILE,
                     errno.ENOBUFS, errno.ENOMEM, errno.EPROTO, errno.EPERM}
PIPELINE_DEPTH = 64      # requests one connection may have queued before we stop reading ahead
WRITE_TIMEOUT_S = 30.0   # a client that never reads its responses is dropped after this


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket_path: str
    socket_mode: int = 0o600
    frame_roots: tuple[str, ...] = ("/dev/shm",)
    max_message_bytes: int = 10 * 1024 * 1024
    read_timeout: float = 10.0
    idle_timeout: float = 300.0
    drain_timeout: float = 10.0
    max_frame_dim: int = 8192
    batch_timeout_us: int = 0
    max_queue: int = 1024
    max_connections: int = 1024
    preprocess_threads: int = 1  # letterbox_into threads per frame, where the kernel has them


class Server:
    def __init__(self, model: LoadedModel, config: ServerConfig) -> None:
        self.config = config
        self.model_id = model.spec.model_id
        self.started = time.monotonic()
        self.draining = False
        self.fatal: str | None = None
        self.requests_total = 0
        self._lock = threading.Lock()
        self._unanswered: set[Pending] = set()  # infer requests accepted, response not yet written
        self._connections: set[socket.socket] = set()
        opener = FrameOpener(FrameRoots(list(config.frame_roots)), config.max_frame_dim)
        self.batcher = Batcher(model, opener, max_queue=config.max_queue,
                               batch_timeout_s=config.batch_timeout_us / 1e6,
                               respond=self._respond, on_fatal=self._on_fatal,
                               preprocess_threads=config.preprocess_threads)
        self.listener: Listener | None = None
        self._accept_thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        return self.batcher.model

    def start(self) -> None:
        """Bind the socket (the model is already loaded and warm) and start serving."""
        self.listener = Listener(self.config.socket_path, self.config.socket_mode)
        self.batcher.start()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="vasipc-accept",
                                               daemon=True)
        self._accept_thread.start()

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def drain(self) -> int:
        """SIGTERM/SIGINT: stop accepting, answer what is in flight, close. Returns the exit code."""
        self.draining = True
        self.stop_listening()
        deadline = time.monotonic() + self.config.drain_timeout
        while self.in_flight() and time.monotonic() < deadline and self.fatal is None:
            time.sleep(0.005)
        code = 0
        if self.in_flight():
            code = 1
            self._fail_unanswered(ShuttingDown("the server is shutting down (drain timeout)"))
        self.batcher.stop()
        self._close_connections()
        return code

    def abort(self) -> int:
        """A sticky session error: answer what we hold with `internal` and exit 1."""
        self.draining = True
        self.stop_listening()
        self._fail_unanswered(InternalError(f"the model session failed: {self.fatal}"))
        self.batcher.stop()
        self._close_connections()
        return 1

    def _fail_unanswered(self, err: VasipcError) -> None:
        with self._lock:
            held = list(self._unanswered)
        for p in held:
            self._respond(p, err, {}, self.model)
        deadline = time.monotonic() + 2.0  # let connection threads write them
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.005)

    def _close_connections(self) -> None:
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def _on_fatal(self, text: str) -> None:
        log.error("model session unusable: %s", text.splitlines()[0] if text else "?")
        self.fatal = text or "session error"

    def in_flight(self) -> int:
        return len(self._unanswered)

    # ---- connections -----------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self.listener is not None
        failing = False
        while True:
            try:
                conn = self.listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT and not self.draining:
                    if not failing:
                        log.warning("accept failed (%s); retrying", exc.strerror)
                    failing = True
                    time.sleep(0.05)
                    continue
                return  # listener closed
            failing = False
            with self._lock:
                full = len(self._connections) >= self.config.max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve_connection, args=(conn,),
                                 name="vasipc-conn", daemon=True).start()
            except RuntimeError:  # no thread for it: close it, as over the cap
                with self._lock:
                    self._connections.discard(conn)
                conn.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        cfg = self.config
        fd = conn.fileno()
        reader = MessageReader(fd, cfg.max_message_bytes)
        pending: deque[Pending] = deque()
        reading = True  # false after EOF, a framing error, or a message that closes the connection
        try:
            while reading or pending:
                while pending and pending[0].done():
                    if not self._send(fd, pending.popleft()):
                        return
                if reading and (not pending or (len(pending) < PIPELINE_DEPTH
                                                and reader.readable_now())):
                    p, reading = self._read_one(reader)
                    if p is not None:
                        pending.append(p)
                elif pending:
                    pending[0].wait()
        finally:
            for p in pending:  # connection lost with answers owed: nobody to write them to
                self._forget(p)
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _read_one(self, reader: MessageReader) -> tuple[Pending | None, bool]:
        """Read and dispatch one message: (its Pending or None, whether to keep reading)."""
        cfg = self.config
        try:
            body = reader.read_message(cfg.idle_timeout, cfg.read_timeout)
        except ZeroLength:
            return self._immediate(InvalidMessage("length prefix is 0"), None), False
        except TooLarge as exc:
            return self._immediate(MessageTooLarge(
                f"message of {exc.length} bytes exceeds max_message_bytes "
                f"{cfg.max_message_bytes}"), None), False
        except (FramingError, ConnectionClosed, OSError):
            return None, False  # stalled, idle, or gone: closed without a response
        if body is None:
            return None, False
        return self._dispatch(body, _now()), True

    def _send(self, fd: int, p: Pending) -> bool:
        resp = p.response
        assert resp is not None
        md = resp.get("metadata")
        if md is not None:
            md["total_ms"] = (_now() - p.arrival) * 1e3
        try:
            send_message(fd, wirejson.dumps(resp), WRITE_TIMEOUT_S)
            return True
        except (FramingError, OSError, TimeoutError):
            return False
        finally:
            self._forget(p)

    def _forget(self, p: Pending) -> None:
        if p.request is not None:
            with self._lock:
                self._unanswered.discard(p)

    # ---- requests --------------------------------------------------------------------
    def _immediate(self, result: dict | VasipcError, msg: dict | None,
                   arrival: float | None = None) -> Pending:
        p = Pending(msg if msg is not None else {}, None, arrival or _now())
        if isinstance(result, VasipcError):
            result = error_response(result, msg, self.model_id, self._metadata(self.model, {}))
        elif msg is not None and "request_id" in msg:
            result["request_id"] = request_id_of(msg)
        p.complete(result)
        return p

    def _dispatch(self, body: memoryview, arrival: float) -> Pending:
        if json_depth_exceeds(body, MAX_JSON_DEPTH):
            return self._immediate(InvalidMessage(f"JSON nested deeper than {MAX_JSON_DEPTH}"),
                                   None, arrival)
        try:
            msg = wirejson.loads(body)
        except wirejson.JSONDecodeError as exc:
            return self._immediate(InvalidMessage(f"body is not valid UTF-8 JSON: {exc}"), None,
                                   arrival)
        if type(msg) is not dict:
            return self._immediate(InvalidMessage("the JSON body must be an object"), None, arrival)
        try:
            op = parse_op(msg)
            if op == "health":
                return self._immediate(self._health(), msg, arrival)
            if op == "info":
                return self._immediate(self._info(), msg, arrival)
            with self._lock:
                self.requests_total += 1
            req = parse_infer(msg, self.model_id, self.batcher.opener.is_raw_file)
            if self.draining or self.fatal is not None:
                raise ShuttingDown("the server is shutting down")
        except VasipcError as err:
            return self._immediate(err, msg, arrival)
        p = Pending(msg, req, arrival)
        with self._lock:
            self._unanswered.add(p)
        try:
            self.batcher.submit(p)
        except VasipcError as err:
            self._respond(p, err, {}, self.model)
        return p

    def _metadata(self, model: LoadedModel, stage: dict) -> dict:
        md = {"preprocess_ms": 0.0, "inference_ms": 0.0, "postprocess_ms": 0.0, "queue_ms": 0.0,
              "total_ms": 0.0, "batch_size": 0, "model_version": model.spec.model_version,
              "device": model.device.name}
        md.update(stage)
        return md

    def _respond(self, p: Pending, result: dict | VasipcError, stage: dict,
                 model: LoadedModel) -> None:
        md = self._metadata(model, stage)
        if isinstance(result, VasipcError):
            p.complete(error_response(result, p.msg, self.model_id, md))
            return
        req = p.request
        p.complete({
            "model_id": req.model_id, "camera_id": req.camera_id,
            "frame_id": result["frame_id"], "detections": result["detections"],
            "metadata": md, "error": None, "error_code": None, "request_id": req.request_id,
        })

    def _health(self) -> dict:
        ready = not self.draining and self.fatal is None
        return {
            "op": "health", "status": "ok" if ready else "draining", "ready": ready,
            "model_id": self.model_id, "uptime_s": round(time.monotonic() - self.started, 3),
            "in_flight": self.in_flight(), "requests_total": self.requests_total,
        }

    def _info(self) -> dict:
        m = self.model
        return {
            "op": "info", "protocol_version": 1, "server_version": __version__,
            "model_id": self.model_id, "model_name": m.spec.model_name,
            "model_version": m.spec.model_version, "task": "detect",
            "input": {"width": m.input_width, "height": m.input_height},
            "classes": list(m.class_names), "providers": list(m.providers),
            "max_batch_size": m.max_batch, "socket": self.config.socket_path,
            "device": m.device.name,
        }
