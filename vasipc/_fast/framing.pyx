"""Length-prefixed message I/O on a stream socket (docs/contract.md section 2).

This module's one job: move messages, each a uint32 big-endian length N then N bytes,
between a connected SOCK_STREAM socket and Python, with the GIL released around every
call that can block, so one stalled peer never holds up another connection. What the
bytes mean (JSON, requests, error responses) is the caller's business; the one content
check here, `json_depth_exceeds`, exists because no JSON library exposes the contract's
nesting limit cheaply.

Every recv and send passes MSG_DONTWAIT and waits in poll(), so the fd's own
O_NONBLOCK flag is left as the caller set it: a Python socket object wrapping the same
fd keeps working as it was configured.
"""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.errno cimport EAGAIN, ECONNABORTED, ECONNRESET, EINTR, EPIPE, errno
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy, memmove, memset
from posix.uio cimport iovec

from vasipc._fast.monotonic cimport monotonic_ns
from vasipc._fast.sockets cimport MSG_DONTWAIT, MSG_NOSIGNAL, msghdr, recv, sendmsg
from vasipc._fast.readonly_buffer cimport fill_readonly_buffer

import os

cdef extern from "<poll.h>" nogil:
    ctypedef unsigned long nfds_t
    struct pollfd:
        int fd
        short events
        short revents
    enum: POLLIN
    enum: POLLOUT
    int poll(pollfd *fds, nfds_t nfds, int timeout)

cdef enum:
    PREFIX_BYTES = 4
    # A fresh receive buffer. Small requests pipelined by a client arrive in one recv;
    # the memory is only touched as far as messages reach, so idle connections cost
    # little resident memory.
    BLOCK_BYTES = 65536
    # After a message this large, an empty buffer goes back to BLOCK_BYTES, so a
    # thousand connections that each once sent 10 MiB do not keep 10 GiB.
    SHRINK_ABOVE = 1 << 20
    # Below this a depth scan is cheaper than releasing and taking back the GIL.
    DEPTH_SCAN_NOGIL_ABOVE = 1 << 16

cdef enum IOStatus:
    IO_DONE
    IO_EOF
    IO_TIMEOUT
    IO_ERROR

# A timeout beyond this many seconds (inf included) means "wait for ever".
cdef double FOREVER_S = 1e9
cdef int POLL_MAX_MS = 0x7FFFFFFF


class FramingError(Exception):
    """Base of every framing failure; after any of them but IdleTimeout the connection
    is in an unknown state and should be closed."""


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

    def __init__(self, length, limit):
        super().__init__(f"message of {length} bytes exceeds max_message_bytes={limit}")
        self.length = length
        self.limit = limit


class SendTimeout(FramingError, TimeoutError):
    """send_message could not write the whole message within its timeout."""


cdef int64_t deadline_after(double timeout_s, int64_t start_ns) except? -2:
    """The monotonic deadline `timeout_s` after `start_ns`; -1 for no deadline."""
    if timeout_s != timeout_s:
        raise ValueError("a timeout must be a number of seconds, not NaN")
    if timeout_s <= 0 or timeout_s > FOREVER_S:
        return -1
    return start_ns + <int64_t>(timeout_s * 1e9)


cdef IOStatus wait_fd(int fd, short events, int64_t deadline_ns, int *error) noexcept nogil:
    """Wait in poll() until fd is ready for `events` or the deadline passes.

    IO_DONE: ready, which includes POLLHUP/POLLERR/POLLNVAL: the recv or send that
    follows reports them, after reading whatever data is still queued. IO_TIMEOUT.
    IO_ERROR: poll failed, error[0] says why.
    """
    cdef pollfd entry
    cdef int64_t left_ns
    cdef int timeout_ms
    cdef int ready
    entry.fd = fd
    entry.events = events
    while True:
        timeout_ms = -1
        if deadline_ns >= 0:
            left_ns = deadline_ns - monotonic_ns()
            if left_ns <= 0:
                return IO_TIMEOUT
            # Round up: waking a fraction of a millisecond early would spin.
            if left_ns // 1000000 >= POLL_MAX_MS:
                timeout_ms = POLL_MAX_MS
            else:
                timeout_ms = <int>((left_ns + 999999) // 1000000)
        entry.revents = 0
        ready = poll(&entry, 1, timeout_ms)
        if ready > 0:
            return IO_DONE
        if ready < 0 and errno != EINTR:
            error[0] = errno
            return IO_ERROR
        # 0 (the deadline, or the POLL_MAX_MS cap, passed) or EINTR: check the time again.


cdef IOStatus recv_at_least(int fd, char *buf, Py_ssize_t room, Py_ssize_t need,
                            int64_t deadline_ns, Py_ssize_t *received,
                            int *error) noexcept nogil:
    """recv into buf[:room] until `need` bytes have arrived (need <= room).

    Each recv asks for all the room there is, so messages pipelined behind the
    wanted one come in the same syscall. `received` counts the bytes that arrived
    whatever the outcome: they are real data even when EOF or an error follows.
    """
    cdef ssize_t n
    cdef IOStatus status
    received[0] = 0
    while received[0] < need:
        n = recv(fd, buf + received[0], <size_t>(room - received[0]), MSG_DONTWAIT)
        if n > 0:
            received[0] += n
        elif n == 0:
            return IO_EOF
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:  # == EWOULDBLOCK on Linux
            status = wait_fd(fd, POLLIN, deadline_ns, error)
            if status != IO_DONE:
                return status
        else:
            error[0] = errno
            return IO_ERROR
    return IO_DONE


cdef IOStatus send_all(int fd, const uint8_t *body, size_t body_len,
                       int64_t deadline_ns, int *error) noexcept nogil:
    """Write the length prefix and the body with sendmsg, resuming partial writes."""
    cdef uint8_t prefix[4]
    cdef iovec parts[2]
    cdef msghdr msg
    cdef ssize_t n
    cdef size_t sent
    cdef IOStatus status
    prefix[0] = <uint8_t>(body_len >> 24)
    prefix[1] = <uint8_t>(body_len >> 16)
    prefix[2] = <uint8_t>(body_len >> 8)
    prefix[3] = <uint8_t>body_len
    parts[0].iov_base = prefix
    parts[0].iov_len = PREFIX_BYTES
    parts[1].iov_base = <void *>body
    parts[1].iov_len = body_len
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = parts
    msg.msg_iovlen = 2
    while msg.msg_iovlen > 0:
        # MSG_NOSIGNAL: a closed peer gives EPIPE here, never SIGPIPE to the process.
        n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
        if n > 0:
            sent = <size_t>n
            while msg.msg_iovlen > 0 and sent >= msg.msg_iov[0].iov_len:
                sent -= msg.msg_iov[0].iov_len
                msg.msg_iov += 1
                msg.msg_iovlen -= 1
            if msg.msg_iovlen > 0:
                msg.msg_iov[0].iov_base = <char *>msg.msg_iov[0].iov_base + sent
                msg.msg_iov[0].iov_len -= sent
        elif n < 0 and errno == EINTR:
            continue
        elif n == 0 or errno == EAGAIN:
            status = wait_fd(fd, POLLOUT, deadline_ns, error)
            if status != IO_DONE:
                return status
        else:
            error[0] = errno
            return IO_ERROR
    return IO_DONE


# The depth scan looks bytes up in these tables and skips runs of uninteresting ones
# without further branches: most of a JSON body is neither a bracket nor a quote.
cdef uint8_t STRUCTURAL[256]   # outside strings: 1 for [ {, 2 for ] }, 3 for "
cdef uint8_t STRING_STOP[256]  # inside strings: 1 for " and \
memset(STRUCTURAL, 0, sizeof(STRUCTURAL))
memset(STRING_STOP, 0, sizeof(STRING_STOP))
STRUCTURAL[c'['] = STRUCTURAL[c'{'] = 1
STRUCTURAL[c']'] = STRUCTURAL[c'}'] = 2
STRUCTURAL[c'"'] = 3
STRING_STOP[c'"'] = STRING_STOP[c'\\'] = 1


cdef bint depth_exceeds(const uint8_t *text, Py_ssize_t size,
                        Py_ssize_t max_depth) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t depth = 0
    cdef uint8_t kind
    while True:
        while i < size and STRUCTURAL[text[i]] == 0:
            i += 1
        if i >= size:
            return False
        kind = STRUCTURAL[text[i]]
        i += 1
        if kind == 1:
            depth += 1
            if depth > max_depth:
                return True
        elif kind == 2:
            depth -= 1
        else:
            # A string: on to its closing quote. A backslash escapes the byte after
            # it, so \" and \\ neither end nor extend the string.
            while True:
                while i < size and STRING_STOP[text[i]] == 0:
                    i += 1
                if i >= size:
                    return False
                i += 1
                if text[i - 1] == c'"':
                    break
                i += 1


cdef inline bint is_peer_gone(int error) noexcept nogil:
    return error == ECONNRESET or error == EPIPE or error == ECONNABORTED


cdef object os_error(int error):
    # OSError(errno, text) picks the matching subclass (BrokenPipeError, ...).
    return OSError(error, os.strerror(error))


cdef class _RecvBlock:
    """A receive buffer that message bodies are exported from.

    The reader and every memoryview on a body hold it, so a reader that has to grow
    or compact while a body is still in use moves to a fresh block instead, and the
    bytes under that body never change.
    """

    def __cinit__(self, Py_ssize_t capacity):
        self.data = <char *>PyMem_Malloc(<size_t>capacity)
        if self.data == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.exports = 0

    def __dealloc__(self):
        PyMem_Free(self.data)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("message bodies are read-only")
        fill_readonly_buffer(view, self.data + self.export_start, self.export_len, flags)
        view.obj = self
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1


cdef class MessageReader:
    """Reads the messages of one connection, one at a time.

    The body comes back as a read-only memoryview into the reader's buffer: no copy,
    and no allocation in steady state but the memoryview object itself. One reader
    serves one thread at a time.
    """

    def __cinit__(self, int fd, Py_ssize_t max_message_bytes):
        if fd < 0:
            raise ValueError(f"fd must be a file descriptor, not {fd}")
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, not {max_message_bytes}")
        self.fd = fd
        self.max_message_bytes = max_message_bytes
        self.block = _RecvBlock(BLOCK_BYTES)
        self.start = 0
        self.end = 0
        self.last_recv_ns = 0
        self.last_view = None
        self.busy = False

    def read_message(self, double idle_timeout, double read_timeout):
        """The body of the next message, or None on a clean EOF between messages.

        The view is valid until the next read_message call, which releases it (using
        it afterwards raises ValueError); anything holding its own export of it (a
        slice, np.frombuffer) keeps the bytes alive and unchanged. Timeouts are in
        seconds; <= 0 or inf means none. idle_timeout runs until the first byte of the
        message, read_timeout from that byte until the message is whole.
        """
        if self.busy:
            raise RuntimeError("read_message is already running on this reader")
        self.busy = True
        try:
            return self._read_message(idle_timeout, read_timeout)
        finally:
            self.busy = False

    cdef object _read_message(self, double idle_timeout, double read_timeout):
        cdef int status
        cdef const uint8_t *prefix
        cdef Py_ssize_t length, total
        cdef object body
        cdef int64_t idle_deadline = deadline_after(idle_timeout, monotonic_ns())
        cdef int64_t read_deadline = deadline_after(read_timeout, 0)  # refuses NaN now

        self._forget_last_view()
        if self.end == self.start:
            if self.block.exports == 0:
                self.start = self.end = 0
                if self.block.capacity > SHRINK_ABOVE:
                    self._resize(BLOCK_BYTES)
            status = self._fill(1, idle_deadline)
            if status == IO_EOF:
                return None
            if status == IO_TIMEOUT:
                raise IdleTimeout(f"no message within {idle_timeout:g} s")

        # The bytes already buffered arrived with the last recv, so that is when
        # this message's first byte came.
        read_deadline = deadline_after(read_timeout, self.last_recv_ns)
        if self.end - self.start < PREFIX_BYTES:
            self._check_whole(self._fill(PREFIX_BYTES, read_deadline), PREFIX_BYTES,
                              read_timeout)
        prefix = <const uint8_t *>self.block.data + self.start
        length = ((<Py_ssize_t>prefix[0] << 24) | (<Py_ssize_t>prefix[1] << 16)
                  | (<Py_ssize_t>prefix[2] << 8) | <Py_ssize_t>prefix[3])
        if length == 0:
            self.start += PREFIX_BYTES
            raise ZeroLength("message length prefix is 0")
        if length > self.max_message_bytes:
            self.start += PREFIX_BYTES
            raise TooLarge(length, self.max_message_bytes)
        total = PREFIX_BYTES + length
        if self.end - self.start < total:
            self._check_whole(self._fill(total, read_deadline), total, read_timeout)

        self.block.export_start = self.start + PREFIX_BYTES
        self.block.export_len = length
        body = PyMemoryView_FromObject(self.block)
        self.start += total
        self.last_view = body
        return body

    cdef int _check_whole(self, int status, Py_ssize_t total,
                          double read_timeout) except -1:
        if status == IO_EOF:
            raise ConnectionClosed(
                f"peer closed the connection {self.end - self.start} bytes into a "
                f"{total}-byte message")
        if status == IO_TIMEOUT:
            raise ReadTimeout(
                f"message not whole within {read_timeout:g} s of its first byte "
                f"({self.end - self.start} of {total} bytes)")
        return 0

    cdef int _forget_last_view(self) except -1:
        # Release the previous body so the buffer under it can be reused in place.
        # A memoryview that has been exported again (np.frombuffer on it) refuses;
        # then the block stays with that export and _reserve moves to a new one.
        if self.last_view is not None:
            try:
                self.last_view.release()
            except BufferError:
                pass
            self.last_view = None
        return 0

    cdef int _resize(self, Py_ssize_t capacity) except -1:
        # Only while nothing is exported from the block: realloc may move it.
        cdef char *data = <char *>PyMem_Realloc(self.block.data, <size_t>capacity)
        if data == NULL:
            raise MemoryError()
        self.block.data = data
        self.block.capacity = capacity
        return 0

    cdef int _reserve(self, Py_ssize_t want) except -1:
        """Make room for a message of `want` bytes starting at self.start."""
        cdef Py_ssize_t unread = self.end - self.start
        cdef Py_ssize_t capacity = self.block.capacity
        cdef _RecvBlock fresh
        if self.start + want <= capacity and self.end < capacity:
            return 0
        if want > capacity:
            # Whole blocks: the slack takes in the start of a pipelined next message.
            capacity = (want + BLOCK_BYTES - 1) // BLOCK_BYTES * BLOCK_BYTES
        if self.block.exports == 0:
            if self.start > 0:
                memmove(self.block.data, self.block.data + self.start, <size_t>unread)
            if capacity != self.block.capacity:
                self._resize(capacity)
        else:
            # A body still points into this block: leave the block to it.
            fresh = _RecvBlock(capacity)
            memcpy(fresh.data, self.block.data + self.start, <size_t>unread)
            self.block = fresh
        self.start = 0
        self.end = unread
        return 0

    cdef int _fill(self, Py_ssize_t want, int64_t deadline_ns) except -1:
        """Receive until `want` bytes from self.start are buffered, EOF or the deadline."""
        cdef IOStatus status
        cdef Py_ssize_t received = 0
        cdef int error = 0
        cdef char *at
        cdef Py_ssize_t room, need
        self._reserve(want if want > PREFIX_BYTES else PREFIX_BYTES)
        at = self.block.data + self.end
        room = self.block.capacity - self.end
        need = want - (self.end - self.start)
        with nogil:
            status = recv_at_least(self.fd, at, room, need, deadline_ns, &received, &error)
        if received > 0:
            self.end += received
            self.last_recv_ns = monotonic_ns()
        if status == IO_ERROR:
            if is_peer_gone(error):
                raise ConnectionClosed(f"connection reset by peer ({os.strerror(error)})")
            raise os_error(error)
        return status

    def buffered(self):
        """Bytes received and not yet returned: the start of a pipelined next message."""
        return self.end - self.start

    def readable_now(self):
        """True when read_message would find data (or EOF, or an error) without waiting."""
        cdef pollfd entry
        cdef int ready
        if self.end > self.start:
            return True
        entry.fd = self.fd
        entry.events = POLLIN
        while True:
            entry.revents = 0
            ready = poll(&entry, 1, 0)
            if ready >= 0:
                return ready > 0
            if errno != EINTR:
                raise os_error(errno)


def send_message(int fd, body, double timeout):
    """Write one message (length prefix, then body) to a stream socket.

    Waits in poll() with the GIL released while the peer's receive buffer is full;
    timeout (seconds, <= 0 or inf for none) bounds the whole message. Raises
    ConnectionClosed when the peer is gone and SendTimeout (a TimeoutError) when
    the time runs out; a part of the message may have been written by then.
    """
    cdef Py_buffer data
    cdef IOStatus status
    cdef int error = 0
    cdef int64_t deadline = deadline_after(timeout, monotonic_ns())
    PyObject_GetBuffer(body, &data, PyBUF_SIMPLE)
    try:
        if data.len == 0:
            raise ValueError("a message body cannot be empty (docs/contract.md 2: N >= 1)")
        if <size_t>data.len > 0xFFFFFFFFu:
            raise ValueError(f"a message body of {data.len} bytes does not fit a uint32 prefix")
        with nogil:
            status = send_all(fd, <const uint8_t *>data.buf, <size_t>data.len, deadline, &error)
    finally:
        PyBuffer_Release(&data)
    if status == IO_TIMEOUT:
        raise SendTimeout(f"message not sent within {timeout:g} s")
    if status == IO_ERROR:
        if is_peer_gone(error):
            raise ConnectionClosed(f"peer gone while sending ({os.strerror(error)})")
        raise os_error(error)


def json_depth_exceeds(body, Py_ssize_t max_depth=64):
    """True when [ and { nest deeper than max_depth outside JSON strings.

    Only the depth is checked; the JSON parser judges everything else, so malformed
    text may answer either way.
    """
    cdef Py_buffer data
    cdef bint exceeds
    PyObject_GetBuffer(body, &data, PyBUF_SIMPLE)
    try:
        if data.len > DEPTH_SCAN_NOGIL_ABOVE:
            with nogil:
                exceeds = depth_exceeds(<const uint8_t *>data.buf, data.len, max_depth)
        else:
            exceeds = depth_exceeds(<const uint8_t *>data.buf, data.len, max_depth)
    finally:
        PyBuffer_Release(&data)
    return exceeds
