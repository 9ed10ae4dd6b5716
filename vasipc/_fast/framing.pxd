# Declarations of vasipc._fast.framing, for modules that cimport the reader.
# The implementation and the reasons behind it are in framing.pyx.

from libc.stdint cimport int64_t


cdef class _RecvBlock:
    # One malloc'd receive buffer. Message bodies are exported from it as read-only
    # buffers; it lives until the reader and every exported body have let go of it.
    cdef char *data
    cdef Py_ssize_t capacity
    cdef Py_ssize_t exports        # live Py_buffer exports (memoryviews on a body)
    cdef Py_ssize_t export_start   # the range the next __getbuffer__ exports
    cdef Py_ssize_t export_len


cdef class MessageReader:
    cdef int fd
    cdef Py_ssize_t max_message_bytes
    cdef _RecvBlock block
    cdef Py_ssize_t start          # first unconsumed byte in block
    cdef Py_ssize_t end            # one past the last received byte in block
    cdef int64_t last_recv_ns      # when the bytes at [start, end) last grew
    cdef object last_view          # the memoryview read_message returned last
    cdef bint busy                 # a read_message call is in progress

    cdef object _read_message(self, double idle_timeout, double read_timeout)
    cdef int _check_whole(self, int status, Py_ssize_t total,
                          double read_timeout) except -1
    cdef int _forget_last_view(self) except -1
    cdef int _resize(self, Py_ssize_t capacity) except -1
    cdef int _reserve(self, Py_ssize_t want) except -1
    cdef int _fill(self, Py_ssize_t want, int64_t deadline_ns) except -1
