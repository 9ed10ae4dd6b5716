"""Every client connection of a listening socket, served by one epoll thread (docs/contract.md 2).

This module's one job: accept connections, read and frame their messages (a uint32
big-endian length N, then N bytes), and write the answers back in request order, all
from a single I/O thread that calls Python once per complete message. What the bytes
mean is the callbacks' business.

One thread instead of one per connection because, with many connections, handing the
GIL between blocked reader threads costs more than the requests themselves.

Threading rule: ALL connection and loop state is read and changed only with the GIL
held. The loop thread releases the GIL only inside epoll_wait; threads answering with
Connection.send_response hold it. So the GIL is the one lock, and there is no mutex
here. The loop thread can still lose the GIL whenever it runs Python code (a callback,
a finalizer run by the garbage collector), and another thread may then close a
connection and free its buffers: after every such call the code checks `is_closed`
again and never keeps a pointer into a buffer across it. Every other syscall is
non-blocking and short, so making it with the GIL held costs nothing worth saving.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.pythread cimport PyThread_get_thread_ident
from libc.errno cimport (
    EAGAIN,
    ECONNABORTED,
    EINTR,
    EMFILE,
    ENFILE,
    ENOBUFS,
    ENOENT,
    ENOMEM,
    EPROTO,
    errno,
)
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.uio cimport iovec
from posix.unistd cimport close, read, write

from vasipc._fast.monotonic cimport monotonic_ns
from vasipc._fast.sockets cimport (
    MSG_DONTWAIT,
    MSG_NOSIGNAL,
    SO_PEERCRED,
    SOCK_CLOEXEC,
    SOCK_NONBLOCK,
    SOL_SOCKET,
    accept4,
    getsockopt,
    msghdr,
    recv,
    send,
    sendmsg,
    socklen_t,
    ucred,
)

import logging
import os
import threading

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum: EPOLLIN
    enum: EPOLLOUT
    enum: EPOLLERR
    enum: EPOLLHUP
    enum: EPOLL_CTL_ADD
    enum: EPOLL_CTL_MOD
    enum: EPOLL_CTL_DEL
    enum: EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/eventfd.h>" nogil:
    enum: EFD_NONBLOCK
    enum: EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef enum:
    PREFIX_BYTES = 4
    # A connection's first read buffer: a burst of pipelined small requests fits.
    READ_START_BYTES = 16384
    # An emptied read buffer larger than this goes back to READ_START_BYTES, so a
    # connection that once sent a big message does not keep its memory.
    READ_SHRINK_ABOVE = 65536
    # An emptied out buffer larger than this is freed, for the same reason.
    OUT_KEEP_BYTES = 65536
    # mark_drain reads what a client has sent into its buffer up to this size; beyond
    # it, bytes stay in the socket and count as sent after the drain began.
    DRAIN_READ_MAX_BYTES = 16777216
    MAX_EVENTS = 256
    # Accepts per listener event: the rest of the backlog waits one loop turn, so a
    # connect storm never starves the connections already open.
    ACCEPT_BATCH = 64
    # Timeouts are checked this often, and the listener rests this long after running
    # out of fds (level-triggered epoll would otherwise report it ready in a spin).
    TICK_MS = 50
    # epoll_data.u64 of the two fixed fds; connections get ids from FIRST_CONN_KEY on,
    # never reused, so an event harvested for a connection closed meanwhile finds no
    # connection instead of whichever one now has its fd number.
    LISTEN_KEY = 0
    WAKE_KEY = 1
    FIRST_CONN_KEY = 2

cdef int64_t TICK_NS = TICK_MS * 1000000
# A timeout beyond this many seconds (inf included) means "none".
cdef double FOREVER_S = 1e9

log = logging.getLogger("vasipc")


cdef int64_t timeout_ns(str name, double seconds) except? -2:
    """`seconds` in nanoseconds; -1 (no timeout) for <= 0 or beyond FOREVER_S."""
    if seconds != seconds:
        raise ValueError(f"{name} must be a number of seconds, not NaN")
    if seconds <= 0 or seconds > FOREVER_S:
        return -1
    return <int64_t>(seconds * 1e9)


cdef inline Py_ssize_t read_prefix(const char *p) noexcept nogil:
    cdef const uint8_t *b = <const uint8_t *>p
    return ((<Py_ssize_t>b[0] << 24) | (<Py_ssize_t>b[1] << 16)
            | (<Py_ssize_t>b[2] << 8) | <Py_ssize_t>b[3])


cdef inline void write_prefix(uint8_t *p, size_t n) noexcept nogil:
    p[0] = <uint8_t>(n >> 24)
    p[1] = <uint8_t>(n >> 16)
    p[2] = <uint8_t>(n >> 8)
    p[3] = <uint8_t>n


cdef object os_error(int error):
    # OSError(errno, text) picks the matching subclass (BlockingIOError, ...).
    return OSError(error, os.strerror(error))


cdef class ConnectionLoop


cdef class Connection:
    """One accepted client connection, owned by its ConnectionLoop."""

    cdef ConnectionLoop loop
    cdef int fd
    cdef uint64_t key              # its epoll_data.u64 and its key in loop.conns
    cdef bint is_closed
    cdef bint read_done            # EOF, a bad length, or close_all: never read again
    cdef bint resume_queued        # in loop.resumes
    cdef uint32_t armed            # the epoll events registered now
    # Input: unconsumed bytes are rbuf[rstart:rend].
    cdef char *rbuf
    cdef Py_ssize_t rcap, rstart, rend
    # Output not yet taken by the socket: obuf[ostart:oend].
    cdef char *obuf
    cdef Py_ssize_t ocap, ostart, oend
    # Slots: next_slot is the next request's, head_slot the next one to write; the ones
    # between are "owed". Answers that came before their turn wait in `early`.
    cdef long long next_slot, head_slot
    cdef dict early
    cdef int64_t partial_since_ns  # when the partial message at rstart started; 0: none
    cdef int64_t last_activity_ns  # last byte read or answer written
    cdef int64_t last_write_ns     # last write progress while output is pending
    # Drain (mark_drain): the complete messages buffered when it began, not dispatched
    # yet, and whether the message being dispatched now is one of them (or came earlier).
    cdef long long held_msgs
    cdef bint before_drain

    def __cinit__(self):
        self.fd = -1
        self.early = {}

    def __dealloc__(self):
        # Only a loop that vanished without close_all leaves an fd open here.
        if self.fd >= 0:
            close(self.fd)
        PyMem_Free(self.rbuf)
        PyMem_Free(self.obuf)

    def send_response(self, long long slot, bytes body not None):
        """Answer request `slot` of this connection (body = the JSON bytes; the loop adds
        the 4-byte big-endian length prefix). Thread-safe (callers hold the GIL).
        Responses are written in slot order: a slot answered before an earlier one waits
        for it. Returns False (and drops the body) if the connection is already closed,
        else True. A slot may be answered once; a second answer raises ValueError."""
        if self.is_closed:
            return False
        self.check_slot(slot)
        self.loop.answer(self, slot, body)
        return True

    @property
    def closed(self):
        return self.is_closed

    @property
    def read_before_drain(self):
        """During on_message: whether this message was read whole before mark_drain()
        (always True before it). Messages that arrive later are the drain's business."""
        return self.before_drain

    cdef inline long long owed(self) noexcept:
        return self.next_slot - self.head_slot

    cdef int check_slot(self, long long slot) except -1:
        if slot >= self.next_slot or slot < 0:
            raise ValueError(f"slot {slot} is not a request of this connection")
        if slot < self.head_slot or slot in self.early:
            raise ValueError(f"slot {slot} was already answered")
        return 0

    cdef int resize_read(self, Py_ssize_t capacity) except -1:
        cdef char *grown = <char *>PyMem_Realloc(self.rbuf, <size_t>capacity)
        if grown == NULL:
            raise MemoryError()
        self.rbuf = grown
        self.rcap = capacity
        return 0

    cdef int append_out(self, const char *data, Py_ssize_t n) except -1:
        cdef Py_ssize_t size = self.oend - self.ostart
        cdef Py_ssize_t capacity = self.ocap
        cdef char *grown
        if self.oend + n > self.ocap:
            # Compact first; grow (doubling, so appends stay linear) only if still short.
            if self.ostart > 0:
                memmove(self.obuf, self.obuf + self.ostart, <size_t>size)
                self.ostart = 0
                self.oend = size
            if size + n > capacity:
                capacity = max(size + n, 2 * capacity, <Py_ssize_t>4096)
                grown = <char *>PyMem_Realloc(self.obuf, <size_t>capacity)
                if grown == NULL:
                    raise MemoryError()
                self.obuf = grown
                self.ocap = capacity
        memcpy(self.obuf + self.oend, data, <size_t>n)
        self.oend += n
        return 0


cdef class ConnectionLoop:
    """Accepts on `listen_fd` and serves every connection from the thread in run()."""

    cdef int listen_fd
    cdef int epfd
    cdef int wakefd
    cdef object on_message
    cdef object on_bad_length
    cdef Py_ssize_t max_message_bytes
    cdef int64_t read_timeout_ns, idle_timeout_ns, write_timeout_ns, flush_deadline_ns
    cdef Py_ssize_t max_connections
    cdef long long pipeline_depth
    # Who may connect: a peer whose SO_PEERCRED uid or gid is in one of these; both
    # empty lets everyone in (the socket file's mode is then the only gate).
    cdef frozenset allow_uids, allow_gids
    cdef object on_refused
    cdef long long refused_peer     # closed at accept: the peer is not allowed
    cdef long long refused_full     # closed at accept: max_connections are open
    cdef dict conns                 # key -> open Connection
    cdef list resumes               # connections whose depth limit lifted, to dispatch
    cdef uint64_t next_key
    cdef bint accepting             # stop_accepting not called yet
    cdef bint listen_armed          # listen_fd is in the epoll set
    cdef int64_t listen_retry_ns    # when to re-arm after running out of fds
    cdef bint run_started, closing, close_started, finished
    cdef bint drain_marked          # mark_drain() was called
    cdef int in_dispatch            # on_message calls running now (0 or 1: the loop thread)
    cdef unsigned long loop_thread
    cdef object done                # threading.Event, set when run() returns

    def __cinit__(self, *args, **kwargs):
        self.epfd = -1
        self.wakefd = -1

    def __init__(self, int listen_fd, on_message, on_bad_length, *,
                 Py_ssize_t max_message_bytes, double read_timeout, double idle_timeout,
                 double write_timeout, Py_ssize_t max_connections, long long pipeline_depth,
                 allow_uids=(), allow_gids=(), on_refused=None):
        cdef int flags
        cdef epoll_event ev
        if listen_fd < 0:
            raise ValueError(f"listen_fd must be a file descriptor, not {listen_fd}")
        if not callable(on_message) or not callable(on_bad_length):
            raise TypeError("on_message and on_bad_length must be callable")
        if not 1 <= max_message_bytes <= 0xFFFFFFFF:
            raise ValueError(f"max_message_bytes must be in 1..2**32-1, not {max_message_bytes}")
        if max_connections < 1 or pipeline_depth < 1:
            raise ValueError("max_connections and pipeline_depth must be >= 1")
        if on_refused is not None and not callable(on_refused):
            raise TypeError("on_refused must be callable")
        if self.epfd >= 0:
            raise RuntimeError("ConnectionLoop.__init__ called twice")
        self.listen_fd = listen_fd
        self.on_message = on_message
        self.on_bad_length = on_bad_length
        self.max_message_bytes = max_message_bytes
        self.read_timeout_ns = timeout_ns("read_timeout", read_timeout)
        self.idle_timeout_ns = timeout_ns("idle_timeout", idle_timeout)
        self.write_timeout_ns = timeout_ns("write_timeout", write_timeout)
        self.max_connections = max_connections
        self.pipeline_depth = pipeline_depth
        self.allow_uids = frozenset(allow_uids)
        self.allow_gids = frozenset(allow_gids)
        self.on_refused = on_refused
        self.conns = {}
        self.resumes = []
        self.next_key = FIRST_CONN_KEY
        self.done = threading.Event()

        # accept4 on a blocking listener would stall every connection when a client
        # that made it ready went away before the accept.
        flags = fcntl(listen_fd, F_GETFL)
        if flags < 0 or fcntl(listen_fd, F_SETFL, flags | O_NONBLOCK) < 0:
            raise os_error(errno)
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise os_error(errno)
        self.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wakefd < 0:
            raise os_error(errno)
        ev.events = EPOLLIN
        ev.data.u64 = WAKE_KEY
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wakefd, &ev) < 0:
            raise os_error(errno)
        self.accepting = True
        self.set_listener(True)

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        if self.wakefd >= 0:
            close(self.wakefd)

    @property
    def connections(self):
        return len(self.conns)

    @property
    def refused(self):
        """Connections closed at accept, unanswered, by reason."""
        return {"peer": self.refused_peer, "max_connections": self.refused_full}

    def run(self):
        """Serve until close_all(); call it in a dedicated thread."""
        if self.run_started:
            raise RuntimeError("ConnectionLoop.run() was already called")
        self.run_started = True
        self.loop_thread = PyThread_get_thread_ident()
        try:
            if not self.finished:
                self.serve()
        finally:
            self.shut_down()
            self.done.set()

    def stop_accepting(self):
        """Thread-safe; afterwards the loop never touches listen_fd again."""
        # The loop accepts only with the GIL held and checks `accepting` right before
        # each accept4, so once this returns no accept can follow; an event for the
        # listener that epoll_wait already harvested is ignored by the same check.
        self.accepting = False
        if self.epfd >= 0:
            self.set_listener(False)

    def mark_drain(self):
        """Thread-safe. What every client has sent until now counts as read before the
        drain: the listen backlog is accepted, what the sockets hold is read into the
        buffers (up to DRAIN_READ_MAX_BYTES a connection), and each complete message
        buffered then, within the pipeline depth or beyond it, is later dispatched with
        `read_before_drain` True; anything that arrives afterwards with False.
        `held_messages` counts those not dispatched yet. Call it before stop_accepting."""
        cdef Connection conn
        if self.drain_marked:
            return
        # Clients still in the listen backlog connected before the drain too.
        while self.accept_ready(monotonic_ns()):
            pass
        self.drain_marked = True
        for conn in list(self.conns.values()):
            if conn.is_closed or conn.read_done:
                continue
            self.read_available(conn)
            if conn.rend > conn.rstart and conn.partial_since_ns == 0:
                conn.partial_since_ns = monotonic_ns()  # read_timeout runs for these bytes too
            conn.held_msgs = self.complete_messages(conn)
            if conn.held_msgs and self.wants_input(conn):
                self.queue_resume(conn)  # the sockets' data was taken: no event will come

    def release_held(self):
        """Thread-safe. The drain gave up (timeout): messages still held count as read
        after it (`read_before_drain` False) when they are dispatched."""
        cdef Connection conn
        for conn in self.conns.values():
            conn.held_msgs = 0

    @property
    def held_messages(self):
        """Messages read before mark_drain() and not dispatched yet, on open connections,
        plus the one on_message is handling now: from the moment a message leaves the
        buffer until on_message returns, this counts it (a drain must not miss it)."""
        cdef Connection conn
        cdef long long n = self.in_dispatch
        for conn in self.conns.values():
            if not conn.is_closed:
                n += conn.held_msgs
        return n

    def close_all(self, double flush_timeout):
        """Thread-safe: flush answered output (up to flush_timeout s), close everything,
        and wait until run() has returned."""
        cdef int64_t flush_ns = timeout_ns("flush_timeout", flush_timeout)
        if not self.closing:
            self.closing = True
            if flush_timeout <= 0:
                self.flush_deadline_ns = monotonic_ns()  # flush nothing: give up at once
            elif flush_ns < 0:
                self.flush_deadline_ns = -1
            else:
                self.flush_deadline_ns = monotonic_ns() + flush_ns
            self.stop_accepting()
        if not self.run_started:
            self.shut_down()
            return
        self.wake()
        if PyThread_get_thread_ident() != self.loop_thread:
            self.done.wait()  # releases the GIL, which the loop needs to finish

    # --- the loop ------------------------------------------------------------------

    cdef int serve(self) except -1:
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, error, timeout_ms
        cdef int epfd = self.epfd
        cdef int64_t now
        cdef int64_t next_scan_ns = 0
        while True:
            # With no connection and a listener that needs no re-arming there is
            # nothing to time out: sleep until an fd or the eventfd wakes us.
            if (not self.conns and not self.closing
                    and (self.listen_armed or not self.accepting)):
                timeout_ms = -1
            else:
                timeout_ms = TICK_MS
            with nogil:
                n = epoll_wait(epfd, events, MAX_EVENTS, timeout_ms)
                error = errno
            if n < 0:
                if error != EINTR:
                    raise os_error(error)
                n = 0
            now = monotonic_ns()
            for i in range(n):
                self.on_event(events[i].data.u64, events[i].events, now)
            self.run_resumes(now)
            if self.closing:
                if not self.close_started:
                    self.begin_close()
                if not self.conns or (self.flush_deadline_ns >= 0
                                      and monotonic_ns() >= self.flush_deadline_ns):
                    return 0
            if now >= next_scan_ns:
                self.scan(now)
                next_scan_ns = now + TICK_NS

    cdef int on_event(self, uint64_t key, uint32_t events, int64_t now) except -1:
        cdef uint64_t drained
        cdef Connection conn
        if key == WAKE_KEY:
            read(self.wakefd, &drained, sizeof(drained))
            return 0
        if key == LISTEN_KEY:
            return self.accept_ready(now)
        found = self.conns.get(key)
        if found is None:
            return 0  # closed after epoll_wait harvested this event
        conn = <Connection>found
        if events & (EPOLLOUT | EPOLLERR | EPOLLHUP) and conn.oend > conn.ostart:
            self.on_writable(conn, now)
        if not conn.is_closed and events & (EPOLLIN | EPOLLERR | EPOLLHUP) \
                and self.wants_input(conn):
            self.on_readable(conn, now)
        if not conn.is_closed and events & (EPOLLERR | EPOLLHUP) \
                and not self.wants_input(conn):
            # HUP on a stream socket: the peer closed both ways, so no answer can reach
            # it; and HUP cannot be masked, so waiting would spin.
            self.close_conn(conn)
        return 0

    cdef int run_resumes(self, int64_t now) except -1:
        cdef Connection conn
        cdef list batch
        while self.resumes:
            batch = self.resumes
            self.resumes = []
            for conn in batch:
                conn.resume_queued = False
                if not conn.is_closed:
                    self.dispatch(conn)
                    self.settle(conn)
        return 0

    cdef int scan(self, int64_t now) except -1:
        """Close connections past a timeout; re-arm a resting listener."""
        cdef Connection conn
        if self.accepting and not self.listen_armed and now >= self.listen_retry_ns:
            try:
                self.set_listener(True)
            except OSError:
                log.exception("could not re-arm the listener; trying again")
                self.listen_retry_ns = now + TICK_NS
        for conn in list(self.conns.values()):
            if conn.is_closed:
                continue
            if conn.oend > conn.ostart:
                if 0 <= self.write_timeout_ns < now - conn.last_write_ns:
                    self.close_conn(conn)
                    continue
            if conn.partial_since_ns > 0:
                if 0 <= self.read_timeout_ns < now - conn.partial_since_ns:
                    self.close_conn(conn)
            elif conn.owed() == 0 and conn.rend == conn.rstart and conn.oend == conn.ostart:
                if 0 <= self.idle_timeout_ns < now - conn.last_activity_ns:
                    self.close_conn(conn)
        return 0

    cdef int begin_close(self) except -1:
        cdef Connection conn
        self.close_started = True
        self.stop_accepting()
        for conn in list(self.conns.values()):
            if not conn.is_closed:
                conn.read_done = True
                conn.rstart = conn.rend = 0
                conn.partial_since_ns = 0
                self.settle(conn)  # closes at once what has nothing left to write
        return 0

    cdef int shut_down(self) except -1:
        cdef Connection conn
        self.finished = True
        self.accepting = False
        self.listen_armed = False
        for conn in list(self.conns.values()):
            self.close_conn(conn)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        if self.wakefd >= 0:
            close(self.wakefd)
            self.wakefd = -1
        return 0

    cdef int wake(self) except -1:
        cdef uint64_t one = 1
        if self.wakefd >= 0:
            write(self.wakefd, &one, sizeof(one))  # EAGAIN: the counter is already set
        return 0

    # --- accepting -----------------------------------------------------------------

    cdef int set_listener(self, bint armed) except -1:
        cdef epoll_event ev
        if armed == self.listen_armed:
            return 0
        ev.events = EPOLLIN
        ev.data.u64 = LISTEN_KEY
        if armed:
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.listen_fd, &ev) < 0:
                raise os_error(errno)
        elif epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd, NULL) < 0 and errno != ENOENT:
            raise os_error(errno)
        self.listen_armed = armed
        return 0

    cdef int accept_ready(self, int64_t now) except -1:
        """Accept up to ACCEPT_BATCH clients; 1 if the batch ran out (more may wait)."""
        cdef int fd, error, attempt
        for attempt in range(ACCEPT_BATCH):
            if not (self.accepting and self.listen_armed):
                return 0
            fd = accept4(self.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                error = errno
                if error == EAGAIN:
                    return 0
                if error == EINTR or error == ECONNABORTED or error == EPROTO:
                    continue  # that one client is gone; the next may be waiting
                if not (error == EMFILE or error == ENFILE or error == ENOBUFS
                        or error == ENOMEM):
                    log.error("accept on fd %d failed: %s", self.listen_fd, os.strerror(error))
                # The clients stay in the backlog; try again after a tick.
                self.set_listener(False)
                self.listen_retry_ns = now + TICK_NS
                return 0
            if (self.allow_uids or self.allow_gids) and not self.peer_allowed(fd):
                continue
            if len(self.conns) >= self.max_connections:
                close(fd)
                self.refused_full += 1
                continue
            try:
                self.add_conn(fd, now)
            except (OSError, MemoryError):
                # One client the loop cannot take; the Connection's __dealloc__ closes fd.
                log.exception("could not register a new connection; closing it")
        return 1

    cdef bint peer_allowed(self, int fd) except -1:
        """Whether the client just accepted on `fd` may connect: its uid or gid (SO_PEERCRED,
        its effective ids when it connected) is allowed. If not, `fd` is closed before a
        byte is read or written, counted, and on_refused(uid, gid, pid) is told (-1 each
        where the kernel would not say: refused too)."""
        cdef ucred cred
        cdef socklen_t size = sizeof(cred)
        cdef long long uid = -1, gid = -1, pid = -1
        if getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &size) == 0:
            uid, gid, pid = cred.uid, cred.gid, cred.pid
            if uid in self.allow_uids or gid in self.allow_gids:
                return True
        close(fd)
        self.refused_peer += 1
        if self.on_refused is not None:
            try:
                self.on_refused(uid, gid, pid)
            except Exception:
                log.exception("on_refused failed")
        return False

    cdef int add_conn(self, int fd, int64_t now) except -1:
        cdef epoll_event ev
        cdef Connection conn = Connection.__new__(Connection)
        conn.loop = self
        conn.fd = fd  # owned from here: closed by close_conn or __dealloc__
        conn.key = self.next_key
        self.next_key += 1
        conn.last_activity_ns = now
        conn.resize_read(READ_START_BYTES)
        ev.events = EPOLLIN
        ev.data.u64 = conn.key
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise os_error(errno)
        conn.armed = EPOLLIN
        self.conns[conn.key] = conn
        return 0

    # --- one connection --------------------------------------------------------------

    cdef inline bint wants_input(self, Connection conn) noexcept:
        return not conn.read_done and conn.owed() < self.pipeline_depth

    cdef int settle(self, Connection conn) except -1:
        """Close `conn` if it is done, else register the epoll events it needs now."""
        cdef epoll_event ev
        cdef uint32_t want = 0
        cdef int error
        if conn.is_closed:
            return 0
        if conn.read_done and conn.oend == conn.ostart \
                and (conn.owed() == 0 or self.close_started):
            return self.close_conn(conn)
        if self.wants_input(conn):
            want |= EPOLLIN
        if conn.oend > conn.ostart:
            want |= EPOLLOUT
        if want != conn.armed:
            ev.events = want
            ev.data.u64 = conn.key
            if epoll_ctl(self.epfd, EPOLL_CTL_MOD, conn.fd, &ev) < 0:
                # Not expected for a registered fd; a connection epoll cannot watch
                # would hang, so it goes.
                error = errno
                log.error("epoll_ctl(MOD) failed: %s; closing the connection",
                          os.strerror(error))
                return self.close_conn(conn)
            conn.armed = want
        return 0

    cdef int close_conn(self, Connection conn) except -1:
        if conn.is_closed:
            return 0
        conn.is_closed = True
        if self.epfd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, conn.fd, NULL)
        close(conn.fd)
        conn.fd = -1
        PyMem_Free(conn.rbuf)
        conn.rbuf = NULL
        conn.rcap = conn.rstart = conn.rend = 0
        PyMem_Free(conn.obuf)
        conn.obuf = NULL
        conn.ocap = conn.ostart = conn.oend = 0
        conn.early.clear()
        del self.conns[conn.key]
        return 0

    cdef int on_readable(self, Connection conn, int64_t now) except -1:
        """One recv into the read buffer, then every complete message to on_message."""
        cdef Py_ssize_t need
        cdef ssize_t n
        cdef int error = 0
        # Messages held back by the depth limit go first: the read below may bring
        # EOF, which drops what is left in the buffer as a partial message. (EPOLLIN is
        # re-armed as soon as an answer lifts the limit, possibly before the resume.)
        self.dispatch(conn)
        if conn.is_closed or not self.wants_input(conn):
            return self.settle(conn)
        if conn.rstart > 0:
            memmove(conn.rbuf, conn.rbuf + conn.rstart, <size_t>(conn.rend - conn.rstart))
            conn.rend -= conn.rstart
            conn.rstart = 0
        if conn.rend >= PREFIX_BYTES:
            # dispatch() has accepted this length, so it is within max_message_bytes.
            need = PREFIX_BYTES + read_prefix(conn.rbuf)
            if need > conn.rcap:
                try:
                    conn.resize_read(need)
                except MemoryError:
                    log.error("no memory for a %d-byte message; closing the connection", need)
                    return self.close_conn(conn)
        if conn.rend >= conn.rcap:
            return 0  # unreachable: a partial message always leaves room
        while True:
            n = recv(conn.fd, conn.rbuf + conn.rend, <size_t>(conn.rcap - conn.rend), MSG_DONTWAIT)
            error = errno
            if n >= 0 or error != EINTR:
                break
        if n > 0:
            conn.rend += n
            conn.last_activity_ns = now
            self.dispatch(conn)
        elif n == 0:
            # EOF: a partial message can never be finished; whole ones are still owed
            # their answers (half-closed clients read them), then settle() closes.
            conn.read_done = True
            conn.rstart = conn.rend = 0
            conn.partial_since_ns = 0
        elif error != EAGAIN:
            return self.close_conn(conn)
        return self.settle(conn)

    cdef int read_available(self, Connection conn) except -1:
        """Read what the socket holds into the buffer, without waiting (mark_drain). EOF
        and errors are left for on_readable to meet again."""
        cdef Py_ssize_t size, capacity
        cdef ssize_t n
        while not conn.is_closed:
            if conn.rstart > 0:
                size = conn.rend - conn.rstart
                memmove(conn.rbuf, conn.rbuf + conn.rstart, <size_t>size)
                conn.rstart = 0
                conn.rend = size
            if conn.rend >= conn.rcap:
                if conn.rcap >= DRAIN_READ_MAX_BYTES:
                    return 0
                capacity = min(2 * conn.rcap, <Py_ssize_t>DRAIN_READ_MAX_BYTES)
                try:
                    conn.resize_read(max(capacity, conn.rcap))
                except MemoryError:
                    return 0
            n = recv(conn.fd, conn.rbuf + conn.rend, <size_t>(conn.rcap - conn.rend), MSG_DONTWAIT)
            if n > 0:
                conn.rend += n
            elif n < 0 and errno == EINTR:
                continue
            else:
                return 0
        return 0

    cdef long long complete_messages(self, Connection conn) noexcept:
        """The complete, well-sized messages at the start of the buffer (a bad length
        ends the count: it is answered and the connection closed)."""
        cdef Py_ssize_t at = conn.rstart, length
        cdef long long n = 0
        while conn.rend - at >= PREFIX_BYTES:
            length = read_prefix(conn.rbuf + at)
            if length == 0 or length > self.max_message_bytes \
                    or conn.rend - at - PREFIX_BYTES < length:
                break
            at += PREFIX_BYTES + length
            n += 1
        return n

    cdef int dispatch(self, Connection conn) except -1:
        """Hand the buffered complete messages to on_message, in order, within the
        pipeline depth."""
        cdef Py_ssize_t avail, length
        cdef long long slot
        cdef bytes body
        while self.wants_input(conn):
            avail = conn.rend - conn.rstart
            if avail < PREFIX_BYTES:
                break
            length = read_prefix(conn.rbuf + conn.rstart)
            slot = conn.next_slot
            if length == 0 or length > self.max_message_bytes:
                # Answered, then closed: the body is never read, nor anything after it.
                conn.next_slot += 1
                conn.read_done = True
                conn.rstart = conn.rend = 0
                conn.partial_since_ns = 0
                return self.call_bad_length(conn, slot, length)
            if avail < PREFIX_BYTES + length:
                break
            try:
                body = PyBytes_FromStringAndSize(conn.rbuf + conn.rstart + PREFIX_BYTES, length)
            except MemoryError:  # as on_readable: this connection goes, the loop goes on
                log.error("no memory for a %d-byte message; closing the connection", length)
                return self.close_conn(conn)
            conn.rstart += PREFIX_BYTES + length
            # held messages come first in the buffer, so they are dispatched first
            conn.before_drain = not self.drain_marked or conn.held_msgs > 0
            if conn.held_msgs > 0:
                conn.held_msgs -= 1
            conn.partial_since_ns = 0
            conn.next_slot += 1
            self.call_on_message(conn, slot, body)
            if conn.is_closed:
                return 0
        if conn.rstart == conn.rend:
            conn.rstart = conn.rend = 0
            if conn.rcap > READ_SHRINK_ABOVE:
                conn.resize_read(READ_START_BYTES)
        # read_timeout runs from a message's first byte, but only while we read: a
        # message left behind by the depth limit is our stall, not the client's.
        if not self.wants_input(conn) or conn.rend == conn.rstart:
            conn.partial_since_ns = 0
        elif conn.partial_since_ns == 0:
            conn.partial_since_ns = monotonic_ns()
        return 0

    cdef int call_on_message(self, Connection conn, long long slot, bytes body) except -1:
        self.in_dispatch += 1
        try:
            answer = self.on_message(conn, slot, body)
            if answer is not None and not conn.is_closed:
                if not isinstance(answer, bytes):
                    raise TypeError(f"on_message returned {type(answer).__name__}, not bytes or None")
                conn.check_slot(slot)
                self.answer(conn, slot, answer)
        except Exception:
            log.exception("on_message failed; closing its connection")
            self.close_conn(conn)
        finally:
            self.in_dispatch -= 1
        return 0

    cdef int call_bad_length(self, Connection conn, long long slot, Py_ssize_t length) except -1:
        try:
            answer = self.on_bad_length(conn, slot, length)
            if not conn.is_closed:
                if not isinstance(answer, bytes):
                    raise TypeError(f"on_bad_length returned {type(answer).__name__}, not bytes")
                self.answer(conn, slot, answer)
        except Exception:
            log.exception("on_bad_length failed; closing its connection")
            self.close_conn(conn)
        return 0

    cdef int answer(self, Connection conn, long long slot, bytes body) except -1:
        """Record the answer to `slot` (checked by the caller) and write every answer
        whose turn has come."""
        cdef bint was_full = conn.owed() >= self.pipeline_depth
        cdef int64_t now
        cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
        if size == 0 or <size_t>size > 0xFFFFFFFFu:  # docs/contract.md 2: 1 <= N, and N fits a uint32
            raise ValueError(f"an answer of {size} bytes cannot be framed")
        if slot != conn.head_slot:
            conn.early[slot] = body
            return 0
        now = monotonic_ns()
        while True:
            self.write_answer(conn, body, now)
            conn.head_slot += 1
            if conn.is_closed or not conn.early or conn.head_slot not in conn.early:
                break
            body = conn.early.pop(conn.head_slot)
        if conn.is_closed:
            return 0
        if was_full and not conn.read_done and conn.owed() < self.pipeline_depth:
            self.queue_resume(conn)
        return self.settle(conn)

    cdef int queue_resume(self, Connection conn) except -1:
        # Messages may be sitting in the read buffer with no new byte to come to wake
        # the loop, and on_message must run on the loop thread: queue, and wake it.
        if conn.resume_queued:
            return 0
        conn.resume_queued = True
        self.resumes.append(conn)
        if PyThread_get_thread_ident() != self.loop_thread:
            self.wake()
        return 0

    cdef int write_answer(self, Connection conn, bytes body, int64_t now) except -1:
        """Send prefix + body; what the socket does not take goes to the out buffer."""
        cdef uint8_t prefix[4]
        cdef iovec parts[2]
        cdef msghdr msg
        cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
        cdef const char *data = PyBytes_AS_STRING(body)
        cdef ssize_t sent = 0
        cdef int error
        write_prefix(prefix, <size_t>size)
        if conn.oend > conn.ostart:
            # Earlier output is still queued: this answer goes behind it.
            return self.queue_out(conn, <const char *>prefix, 0, data, size)
        parts[0].iov_base = prefix
        parts[0].iov_len = PREFIX_BYTES
        parts[1].iov_base = <void *>data
        parts[1].iov_len = <size_t>size
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = parts
        msg.msg_iovlen = 2
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        while True:
            # MSG_NOSIGNAL: a gone peer gives EPIPE here, never SIGPIPE to the process.
            sent = sendmsg(conn.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
            error = errno
            if sent >= 0 or error != EINTR:
                break
        if sent < 0:
            if error != EAGAIN:
                return self.close_conn(conn)  # EPIPE, ECONNRESET...: owed answers are lost
            sent = 0
        if sent > 0:
            conn.last_activity_ns = now
        if sent == PREFIX_BYTES + size:
            return 0
        conn.last_write_ns = now  # the write_timeout clock starts with pending output
        return self.queue_out(conn, <const char *>prefix, sent, data, size)

    cdef int queue_out(self, Connection conn, const char *prefix, Py_ssize_t sent,
                       const char *data, Py_ssize_t size) except -1:
        """Copy what is left of prefix + body after `sent` bytes to the out buffer."""
        try:
            if sent < PREFIX_BYTES:
                conn.append_out(prefix + sent, PREFIX_BYTES - sent)
                sent = PREFIX_BYTES
            conn.append_out(data + (sent - PREFIX_BYTES), size - (sent - PREFIX_BYTES))
        except MemoryError:
            # The stream would have a hole in it: the connection cannot go on.
            log.error("no memory for a %d-byte answer; closing the connection", size)
            return self.close_conn(conn)
        return 0

    cdef int on_writable(self, Connection conn, int64_t now) except -1:
        cdef ssize_t sent
        cdef int error
        while True:
            sent = send(conn.fd, conn.obuf + conn.ostart, <size_t>(conn.oend - conn.ostart),
                        MSG_NOSIGNAL | MSG_DONTWAIT)
            error = errno
            if sent >= 0 or error != EINTR:
                break
        if sent < 0:
            if error != EAGAIN:
                return self.close_conn(conn)
            return 0
        conn.ostart += sent
        conn.last_write_ns = now
        conn.last_activity_ns = now
        if conn.ostart == conn.oend:
            conn.ostart = conn.oend = 0
            if conn.ocap > OUT_KEEP_BYTES:
                PyMem_Free(conn.obuf)
                conn.obuf = NULL
                conn.ocap = 0
        return self.settle(conn)
