"""FrameView: one frame's bytes in a file, mapped read-only and shared without a copy.

This module's one job: turn (fd, offset, length) into a read-only buffer that numpy
and the C kernels read in place, and that stays mapped exactly as long as something
uses it. Opening the file, checking its type and size, and deciding what the bytes
mean belong to the caller (vasipc/frame_source.py); a file truncated under the
mapping is sigbus_guard's business.
"""

from cpython.buffer cimport PyBUF_WRITABLE
from libc.errno cimport errno
from libc.stdint cimport uintptr_t
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, mmap, munmap
from posix.types cimport off_t
from posix.unistd cimport _SC_PAGESIZE, sysconf

from vasipc._fast.readonly_buffer cimport fill_readonly_buffer

import os

cdef extern from "<sys/mman.h>" nogil:
    enum: MADV_WILLNEED
    int madvise(void *addr, size_t length, int advice)

# off_t is 64 bits on every platform this builds for (Linux x86-64/aarch64).
cdef long long OFF_T_MAX = 0x7FFFFFFFFFFFFFFF
cdef long long PAGE_BYTES = sysconf(_SC_PAGESIZE)


cdef class FrameView:
    """The bytes [offset, offset + length) of an open file, mapped read-only.

    Exports a read-only 1-D uint8 buffer of exactly `length` bytes, so
    np.frombuffer(view, np.uint8) reads the file's pages in place. The fd may be
    closed right after construction; the mapping does not need it.
    """

    def __cinit__(self, int fd, long long offset, Py_ssize_t length):
        cdef long long aligned
        cdef size_t map_len
        cdef void *base
        cdef int error = 0
        self.data = NULL
        self.map_base = NULL
        self.map_len = 0
        self.exports = 0
        self.length = 0
        if length <= 0:
            raise ValueError(f"a FrameView needs length > 0, not {length}")
        if offset < 0:
            raise ValueError(f"a FrameView needs offset >= 0, not {offset}")
        if offset > OFF_T_MAX - length:
            raise OverflowError(f"offset {offset} + length {length} overflows off_t")
        # mmap wants a page-aligned file offset: map from the page holding the first
        # byte and expose the sub-range.
        aligned = offset - offset % PAGE_BYTES
        map_len = <size_t>(offset - aligned) + <size_t>length
        with nogil:
            base = mmap(NULL, map_len, PROT_READ, MAP_SHARED, fd, <off_t>aligned)
            if base == MAP_FAILED:
                error = errno
            else:
                # Kernels read the frame from start to end right away. On a file that
                # is not in the page cache (a frame root on disk), WILLNEED starts
                # reading all of it now instead of page by page on faults; on tmpfs
                # (/dev/shm) it costs one cheap syscall. MAP_POPULATE, which maps
                # every page up front, measured slower than faulting on tmpfs.
                madvise(base, map_len, MADV_WILLNEED)
        if base == MAP_FAILED:
            raise OSError(error, os.strerror(error))
        self.map_base = base
        self.map_len = map_len
        self.data = <const unsigned char *>base + (offset - aligned)
        self.length = length

    def __dealloc__(self):
        # No export can be alive here: each one holds a reference to self.
        if self.map_base != NULL:
            munmap(self.map_base, self.map_len)

    cdef int _unmap(self) except -1:
        cdef void *base = self.map_base
        cdef size_t map_len = self.map_len
        self.map_base = NULL
        self.data = NULL
        with nogil:
            munmap(base, map_len)
        return 0

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.map_base == NULL:
            raise ValueError("FrameView is closed")
        if flags & PyBUF_WRITABLE:
            raise BufferError("FrameView is read-only")
        fill_readonly_buffer(view, <char *>self.data, self.length, flags)
        view.obj = self
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    @property
    def address(self):
        """The integer address of the frame's first byte, for kernels taking pointers."""
        if self.map_base == NULL:
            raise ValueError("FrameView is closed")
        return <uintptr_t>self.data

    @property
    def closed(self):
        return self.map_base == NULL

    def close(self):
        """Unmap. Idempotent; refused (BufferError) while a buffer export is alive,
        since unmapping under it would turn a later read into a crash."""
        if self.map_base == NULL:
            return
        if self.exports > 0:
            raise BufferError(
                f"cannot close a FrameView while {self.exports} exported buffer(s) "
                "(memoryview, numpy array) still use it")
        self._unmap()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
