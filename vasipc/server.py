"""The server: request dispatch, responses, drain (docs/contract.md 2, 3, 7).

One I/O thread runs `_fast.connloop.ConnectionLoop` (epoll: accept, read, frame, write
for every connection) and calls `_on_message` once per complete message. `health`,
`info` and bad requests are answered right there; `infer` requests go to the batcher,
and whichever worker thread completes one writes its response through the connection
(`Connection.send_response`), so a request crosses threads once on its way in and not
at all on its way out. The loop writes each connection's responses in request order
and reads ahead up to PIPELINE_DEPTH requests, so pipelined requests batch together.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from vasipc import __version__, wirejson
from vasipc._fast.connloop import Connection, ConnectionLoop
from vasipc._fast.framing import json_depth_exceeds
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
from vasipc.logs import ErrorLog
from vasipc.metrics import Stats, op_label
from vasipc.model import LoadedModel
from vasipc.schema import (
    error_response,
    has_inexact_ints,
    parse_infer,
    parse_op,
    request_id_of,
)

log = logging.getLogger("vasipc")
_now = time.perf_counter

MAX_JSON_DEPTH = 64
PIPELINE_DEPTH = 64      # requests one connection may have unanswered before we stop reading ahead
WRITE_TIMEOUT_S = 30.0   # a client that never reads its responses is dropped after this
FLUSH_TIMEOUT_S = 2.0    # at exit: how long answered responses may take to reach their clients


def framing_hint(length: int, max_message_bytes: int) -> str:
    """What a refused length prefix most likely was, for its error message: JSON sent with
    no prefix (the four bytes are printable ASCII, `{"op`), or a length written
    little-endian (byte-swapped it is a size the server takes); else ""."""
    prefix = length.to_bytes(4, "big")
    if all(0x20 <= b <= 0x7E or b in b"\t\n\r" for b in prefix):  # JSON text, whitespace too
        return (f"; the length prefix reads as the text {prefix.decode('ascii')!r}: each message "
                "needs a 4-byte big-endian length before its JSON")
    swapped = int.from_bytes(prefix, "little")
    if 1 <= swapped <= max_message_bytes:
        return (f"; byte-swapped the prefix is {swapped}: if it was written little-endian, "
                "it must be big-endian (network byte order)")
    return ""


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
    # Who may connect (SO_PEERCRED's uid or gid); both empty: whoever the socket's mode lets in.
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()


class Server:
    def __init__(self, model: LoadedModel, config: ServerConfig) -> None:
        self.config = config
        self.model_id = model.spec.model_id
        self.started = time.monotonic()
        self.draining = False
        self.fatal: str | None = None
        self.requests_total = 0
        self.reload_counts = {"ok": 0, "failed": 0}  # hot reloads, by outcome
        self._lock = threading.Lock()
        self._unanswered: set[Pending] = set()  # infer requests accepted, response not yet written
        self._refusal: VasipcError | None = None  # set once: every later answer is this error
        self.stats = Stats()  # responses by op and code, stage timings (vasipc.metrics)
        self.error_log = ErrorLog(log)  # one log line per error class, not per request
        opener = FrameOpener(FrameRoots(list(config.frame_roots)), config.max_frame_dim)
        self.batcher = Batcher(model, opener, max_queue=config.max_queue,
                               batch_timeout_s=config.batch_timeout_us / 1e6,
                               respond=self._respond, on_fatal=self._on_fatal,
                               preprocess_threads=config.preprocess_threads,
                               on_batch=self.stats.batch)
        self.listener: Listener | None = None
        self._loop: ConnectionLoop | None = None
        self._io_thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        return self.batcher.model

    def swap_model(self, model: LoadedModel) -> LoadedModel:
        """Hot reload: serve `model` from the next batch on; returns the model it replaces.
        One reference assignment: a batch reads `batcher.model` once when it starts, so
        the batches in flight finish on the old session."""
        if model.spec.model_id != self.model_id:
            raise ValueError(f"model id {model.spec.model_id} is not {self.model_id}")
        old = self.batcher.model
        self.batcher.set_model(model)
        return old

    def record_reload(self, ok: bool) -> None:
        with self._lock:
            self.reload_counts["ok" if ok else "failed"] += 1

    def start(self) -> None:
        """Bind the socket (the model is already loaded and warm) and start serving."""
        cfg = self.config
        self.listener = Listener(cfg.socket_path, cfg.socket_mode)
        self.batcher.start()
        self._loop = ConnectionLoop(
            self.listener.sock.fileno(), self._on_message, self._on_bad_length,
            max_message_bytes=cfg.max_message_bytes, read_timeout=cfg.read_timeout,
            idle_timeout=cfg.idle_timeout, write_timeout=WRITE_TIMEOUT_S,
            max_connections=cfg.max_connections, pipeline_depth=PIPELINE_DEPTH,
            allow_uids=cfg.allow_uids, allow_gids=cfg.allow_gids, on_refused=self._on_refused)
        self._io_thread = threading.Thread(target=self._serve_io, name="vasipc-io", daemon=True)
        self._io_thread.start()

    def _serve_io(self) -> None:
        """The I/O loop's thread. The loop survives what a connection does (its callbacks'
        errors close that connection); if the loop itself fails, nothing is served any
        more, so the server stops being ready and exits 1 like after a session error."""
        try:
            self._loop.run()
        except Exception as exc:
            log.exception("the connection loop failed")
            if not self.draining:
                self._on_fatal(f"the connection loop failed: {exc!r}")

    def stop_listening(self) -> None:
        if self._loop is not None:
            self._loop.stop_accepting()  # the loop lets go of the fd before it is closed
        if self.listener is not None:
            self.listener.close()

    def drain(self) -> int:
        """SIGTERM/SIGINT: stop accepting, answer what is in flight, close. Returns the exit code.

        In flight: every request the clients had sent when the drain began, those still
        buffered beyond the pipeline depth included (`ConnectionLoop.mark_drain`); the
        mark comes before `draining`, so no request read before it is refused."""
        loop = self._loop
        if loop is not None:
            loop.mark_drain()
        self.draining = True
        self.stop_listening()
        deadline = time.monotonic() + self.config.drain_timeout

        def pending() -> bool:
            return bool(self.in_flight() or (loop is not None and loop.held_messages))

        while pending() and time.monotonic() < deadline and self.fatal is None:
            time.sleep(0.005)
        if self.fatal is not None:  # the session failed while draining: docs/contract.md 7's exit 1
            return self.abort()
        code = 0
        if pending():
            code = 1
            if loop is not None:
                loop.release_held()  # still buffered: refused as they are dispatched
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
        """Answer every unanswered request with `err`, atomically with respect to the
        workers: from here on a worker's answer loses (see `_respond`), so a connection
        never gets a late normal answer after an earlier request was refused."""
        with self._lock:
            self._refusal = err
            held = [p for p in self._unanswered if p.claim()]
        held.sort(key=lambda p: p.arrival)
        md = self._metadata(self.model, {})
        for p in held:
            p.fulfil(error_response(err, p.msg, self.model_id, dict(md)))

    def _close_connections(self) -> None:
        if self._loop is not None:
            self._loop.close_all(FLUSH_TIMEOUT_S)  # answered responses are written first

    def _on_fatal(self, text: str) -> None:
        log.error("model session unusable: %s", text.splitlines()[0] if text else "?")
        self.fatal = text or "session error"

    def in_flight(self) -> int:
        return len(self._unanswered)

    def connections(self) -> int:
        """Open client connections."""
        loop = self._loop
        return loop.connections if loop is not None else 0

    def refused_connections(self) -> dict[str, int]:
        """Connections closed at accept, never answered, by reason (ConnectionLoop.refused)."""
        loop = self._loop
        return loop.refused if loop is not None else {"peer": 0, "max_connections": 0}

    def ready(self) -> bool:
        """Loaded and warm (a Server exists only then), not draining, no fatal error."""
        return not self.draining and self.fatal is None

    def _count_error(self, op: str, err: VasipcError) -> None:
        self.stats.count(op, err.code)
        self.error_log.note(err.code, err.message, op)

    # ---- the connection loop's callbacks (I/O thread) ---------------------------------
    def _on_refused(self, uid: int, gid: int, pid: int) -> None:
        # A client that keeps reconnecting must not flood the log: the first refusal is
        # logged at once, the rest as a count once a minute, like error responses.
        self.error_log.note("peer_not_allowed", f"refused a connection from uid {uid} gid {gid} "
                            f"pid {pid}: not in --allow-uid / --allow-gid", op="connect")

    def _on_bad_length(self, conn: Connection, slot: int, length: int) -> bytes:
        limit = self.config.max_message_bytes
        if length == 0:
            err: VasipcError = InvalidMessage("length prefix is 0")
        else:
            err = MessageTooLarge(f"message of {length} bytes exceeds max_message_bytes {limit}"
                                  + framing_hint(length, limit))
        self._count_error("unknown", err)
        return self._encode(error_response(err, None, self.model_id, self._metadata(self.model, {})))

    def _on_message(self, conn: Connection, slot: int, body: bytes) -> bytes | None:
        try:
            return self._dispatch(conn, slot, body)
        except Exception as exc:  # a bug of ours: answer `internal` and keep serving
            log.exception("dispatching a request failed")
            return self._error(InternalError(f"internal error: {exc}"), None)

    def _dispatch(self, conn: Connection, slot: int, body: bytes) -> bytes | None:
        arrival = _now()
        if json_depth_exceeds(body, MAX_JSON_DEPTH):
            return self._error(InvalidMessage(f"JSON nested deeper than {MAX_JSON_DEPTH}"), None, arrival)
        try:
            msg = wirejson.loads_fast(body)
        except wirejson.JSONDecodeError as exc:
            return self._error(InvalidMessage(f"body is not valid UTF-8 JSON: {exc}"), None, arrival)
        if type(msg) is not dict:
            return self._error(InvalidMessage("the JSON body must be an object"), None, arrival)
        if has_inexact_ints(msg):
            msg = wirejson.loads_exact(body)
        try:
            op = parse_op(msg)
            if op == "health":
                self.stats.count(op, "ok")
                return self._encode(self._with_request_id(self._health(), msg))
            if op == "info":
                self.stats.count(op, "ok")
                return self._encode(self._with_request_id(self._info(), msg))
            self.requests_total += 1  # only this (the I/O) thread writes it
            model = self.model
            req = parse_infer(msg, self.model_id, self.batcher.opener.is_raw_file,
                              model.num_classes, model.class_ids)
            if (self.draining and not conn.read_before_drain) or self.fatal is not None:
                raise ShuttingDown("the server is shutting down")
        except VasipcError as err:
            return self._error(err, msg, arrival)
        p = Pending(msg, req, arrival)
        # the worker that completes it writes it (possibly before this call returns)
        p.on_complete = lambda done: self._deliver(conn, slot, done)
        with self._lock:
            self._unanswered.add(p)
        try:
            self.batcher.submit(p)
        except VasipcError as err:
            self._respond(p, err, {}, self.model)
        except Exception as exc:  # it is in _unanswered: answer it, or drain would wait for it
            log.exception("queueing a request failed")
            self._respond(p, InternalError(f"internal error: {exc}"), {}, self.model)
        return None

    def _deliver(self, conn: Connection, slot: int, p: Pending) -> None:
        """Write a completed infer response (on the completing thread)."""
        try:
            resp = p.response
            md = resp.get("metadata")
            if md is not None:
                md["total_ms"] = (_now() - p.arrival) * 1e3
            # recorded before it is written: a client that has its answer sees it counted
            if resp["error_code"] is None:
                self.stats.infer_ok(md)
            else:
                self.stats.count("infer", resp["error_code"])
                self.error_log.note(resp["error_code"], resp["error"])
            conn.send_response(slot, self._encode(resp))
        finally:
            with self._lock:
                self._unanswered.discard(p)

    # ---- responses -------------------------------------------------------------------
    @staticmethod
    def _encode(resp: dict) -> bytes:
        return wirejson.dumps(resp)

    @staticmethod
    def _with_request_id(resp: dict, msg: dict) -> dict:
        if "request_id" in msg:
            resp["request_id"] = request_id_of(msg)
        return resp

    def _error(self, err: VasipcError, msg: dict | None, arrival: float | None = None) -> bytes:
        self._count_error(op_label(msg), err)
        md = self._metadata(self.model, {})
        if arrival is not None:
            md["total_ms"] = (_now() - arrival) * 1e3
        return self._encode(error_response(err, msg, self.model_id, md))

    def _metadata(self, model: LoadedModel, stage: dict) -> dict:
        md = {"preprocess_ms": 0.0, "inference_ms": 0.0, "postprocess_ms": 0.0, "queue_ms": 0.0,
              "total_ms": 0.0, "batch_size": 0, "model_version": model.spec.model_version,
              "device": model.device.name}
        md.update(stage)
        return md

    def _respond(self, p: Pending, result: dict | VasipcError, stage: dict,
                 model: LoadedModel) -> None:
        with self._lock:  # the claim and the refusal check are one step (_fail_unanswered)
            if not p.claim():
                return
            if self._refusal is not None:
                result = self._refusal
        md = self._metadata(model, stage)
        if isinstance(result, VasipcError):
            p.fulfil(error_response(result, p.msg, self.model_id, md))
            return
        req = p.request
        resp = {
            "model_id": req.model_id, "camera_id": req.camera_id,
            "frame_id": result["frame_id"], "detections": result["detections"],
            "metadata": md, "error": None, "error_code": None, "request_id": req.request_id,
        }
        if "classifications" in result:
            resp["classifications"] = result["classifications"]
        p.fulfil(resp)

    def _health(self) -> dict:
        ready = self.ready()
        return {
            "op": "health", "status": "ok" if ready else "draining", "ready": ready,
            "model_id": self.model_id,
            # ms resolution; int arithmetic: round(x, 3) goes through dtoa and costs 1 µs
            "uptime_s": int((time.monotonic() - self.started) * 1000 + 0.5) / 1000,
            "in_flight": self.in_flight(), "requests_total": self.requests_total,
        }

    def _info(self) -> dict:
        m = self.model
        return {
            "op": "info", "protocol_version": 1, "server_version": __version__,
            "model_id": self.model_id, "model_name": m.spec.model_name,
            "model_version": m.spec.model_version, **m.head.info(),
            "input": {"width": m.input_width, "height": m.input_height},
            "classes": list(m.class_names), "max_batch_size": m.max_batch,
            "socket": self.config.socket_path, "preprocess": m.preprocess,
            **m.backend.describe(),  # backend, runtime_version, device, precision, streams, providers
        }
