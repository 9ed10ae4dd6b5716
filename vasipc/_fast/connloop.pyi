"""Every client connection of a listening socket, served by one epoll thread. See connloop.pyx."""

from collections.abc import Callable, Iterable

from typing_extensions import disjoint_base

@disjoint_base
class Connection:
    """One accepted client connection, owned by its ConnectionLoop."""
    def send_response(self, slot: int, body: bytes) -> bool:
        """Answer request `slot` of this connection (body = the JSON bytes; the loop adds the
        4-byte big-endian length prefix). Thread-safe (callers hold the GIL). Responses are
        written in slot order: a slot answered before an earlier one waits for it. Returns
        False (and drops the body) if the connection is already closed, else True. A slot
        may be answered once; a second answer for the same slot raises ValueError."""
    @property
    def closed(self) -> bool: ...
    @property
    def read_before_drain(self) -> bool:
        """During on_message: whether this message was read whole before mark_drain()
        (always True before it)."""

@disjoint_base
class ConnectionLoop:
    def __init__(self, listen_fd: int,
                 on_message: Callable[[Connection, int, bytes], bytes | None],
                 on_bad_length: Callable[[Connection, int, int], bytes], *,
                 max_message_bytes: int, read_timeout: float, idle_timeout: float,
                 write_timeout: float, max_connections: int, pipeline_depth: int,
                 allow_uids: Iterable[int] = (), allow_gids: Iterable[int] = (),
                 on_refused: Callable[[int, int, int], None] | None = None) -> None:
        """With allow_uids or allow_gids, a client whose SO_PEERCRED uid is in neither
        allow_uids nor its gid in allow_gids is closed at accept, before a byte is read or
        written, and on_refused(uid, gid, pid) is called (the loop thread; -1 for ids the
        kernel would not give: such a client is refused too)."""
    def run(self) -> None:
        """Serve until close_all() (call it in a dedicated thread). Exceptions raised by the
        callbacks are logged (logging.getLogger("vasipc").exception) and the connection that
        caused them is closed; the loop goes on."""
    def stop_accepting(self) -> None:
        """Thread-safe. When it returns, the loop never touches listen_fd again (the caller
        then closes it). Existing connections go on being served."""
    def mark_drain(self) -> None:
        """Thread-safe. What every client has sent until now counts as read before the drain:
        it is read into the buffers, and each complete message then buffered (within the
        pipeline depth or beyond it) is dispatched later with `read_before_drain` True;
        anything arriving afterwards with False."""
    def release_held(self) -> None:
        """Thread-safe. The drain gave up: messages still held are dispatched with
        `read_before_drain` False."""
    @property
    def held_messages(self) -> int:
        """Messages read before mark_drain() and not dispatched yet, on open connections."""
    def close_all(self, flush_timeout: float) -> None:
        """Thread-safe. Stop reading everywhere, write what is owed AND already answered
        (give up after flush_timeout seconds), close every connection, and make run() return.
        Blocks until run() has returned (or returns at once if run() never started)."""
    @property
    def connections(self) -> int:
        """Open connections now."""
    @property
    def refused(self) -> dict[str, int]:
        """Connections closed at accept, unanswered, by reason: "peer" (not allowed) and
        "max_connections" (the cap was reached)."""
