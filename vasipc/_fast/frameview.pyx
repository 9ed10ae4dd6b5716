"""FrameView: one frame's bytes in a file, mapped read-only and shared without a copy.

This module's one job: turn (fd, offset, length) into a read-only buffer that numpy
and the C kernels read in place, and that stays mapped exactly as long as something
uses it. Deciding what the bytes mean belongs to the caller (vasipc/frame_source.py);
a file truncated under the mapping is sigbus_guard's business.

It also holds the syscall sequences of frame_source's fast path (`open_fast`,
`map_member`, `probe_type`, `stat_identity`): each runs a fixed series of syscalls
with the GIL released once, and reports either success or "refused" (None), never an
error code. Every decision (confinement by name, header validation, error codes)
stays in frame_source, which takes its slow path whenever these refuse.
"""

from cpython.buffer cimport PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_SetFromErrno
from libc.errno cimport EMFILE, ENFILE, ENOMEM, errno
from libc.stdint cimport uintptr_t
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, mmap, munmap
from posix.stat cimport S_ISDIR, S_ISREG, fstat, fstatat, lstat, stat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport _SC_PAGESIZE, close, pread, sysconf

from vasipc._fast.readonly_buffer cimport fill_readonly_buffer

import os

cdef extern from "<sys/mman.h>" nogil:
    enum: MADV_WILLNEED
    int madvise(void *addr, size_t length, int advice)

cdef extern from *:
    """
    #include <fcntl.h>
    #include <sys/syscall.h>
    #include <unistd.h>

    /* openat2(2) (Linux 5.6), called through syscall(2): glibc has no wrapper before
       2.38 and <linux/openat2.h> may be missing, so the struct and flags are spelled
       out here; they are kernel ABI. */
    #ifndef SYS_openat2
    #define SYS_openat2 437
    #endif
    struct vas_open_how { unsigned long long flags, mode, resolve; };
    #define VAS_RESOLVE_NO_MAGICLINKS 0x02ULL
    #define VAS_RESOLVE_NO_SYMLINKS 0x04ULL
    static int vas_openat2_nosymlinks(int dirfd, const char *path, int flags) {
        struct vas_open_how how;
        how.flags = (unsigned long long)(unsigned int)flags;
        how.mode = 0;
        how.resolve = VAS_RESOLVE_NO_SYMLINKS | VAS_RESOLVE_NO_MAGICLINKS;
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    }
    /* the frame_source open flags, O_PATH for probes */
    #define VAS_OPEN_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    #define VAS_OPEN_DIR_FLAGS (VAS_OPEN_FLAGS | O_DIRECTORY)
    #define VAS_PROBE_FLAGS (O_PATH | O_CLOEXEC)
    """
    int AT_FDCWD
    int VAS_OPEN_FLAGS
    int VAS_OPEN_DIR_FLAGS
    int VAS_PROBE_FLAGS
    int openat(int dirfd, const char *path, int flags) nogil
    int vas_openat2_nosymlinks(int dirfd, const char *path, int flags) nogil

# off_t is 64 bits on every platform this builds for (Linux x86-64/aarch64).
cdef long long OFF_T_MAX = 0x7FFFFFFFFFFFFFFF
cdef long long PAGE_BYTES = sysconf(_SC_PAGESIZE)
cdef Py_ssize_t HEADER_BYTES = 64  # frame.meta's header (docs/contract.md 5.1); more is not read

# openat2 with RESOLVE_NO_SYMLINKS is what makes the fast path safe; a kernel before
# 5.6, or a seccomp filter that refuses it (ENOSYS, or EPERM from older Docker
# profiles), leaves the fast path off and every open on the slow path.
cdef int openat2_state = -1  # -1 not probed, 0 unavailable, 1 usable


cdef bint _openat2_usable() noexcept nogil:
    global openat2_state
    cdef int fd
    if openat2_state < 0:
        fd = vas_openat2_nosymlinks(AT_FDCWD, "/", VAS_PROBE_FLAGS)
        if fd >= 0:
            close(fd)
            openat2_state = 1
        elif errno != EMFILE and errno != ENFILE and errno != ENOMEM:
            # ENOSYS, EPERM (seccomp), or anything else: "/" always opens otherwise. Out of
            # fds or memory says nothing about openat2: probe again next time.
            openat2_state = 0
    return openat2_state == 1


cdef struct Mapping:
    void *base
    size_t map_len
    const unsigned char *data


cdef inline void _no_mapping(Mapping *m) noexcept nogil:
    m.base = NULL
    m.map_len = 0
    m.data = NULL


cdef int _map_range(int fd, long long offset, Py_ssize_t length, Mapping *m) noexcept nogil:
    """mmap [offset, offset + length) of fd read-only: 0, or the errno. The caller has
    checked length > 0, offset >= 0 and offset + length <= OFF_T_MAX."""
    # mmap wants a page-aligned file offset: map from the page holding the first
    # byte and expose the sub-range.
    cdef long long aligned = offset - offset % PAGE_BYTES
    cdef size_t map_len = <size_t>(offset - aligned) + <size_t>length
    cdef void *base = mmap(NULL, map_len, PROT_READ, MAP_SHARED, fd, <off_t>aligned)
    if base == MAP_FAILED:
        return errno
    # Kernels read the frame from start to end right away. On a file that is not in
    # the page cache (a frame root on disk), WILLNEED starts reading all of it now
    # instead of page by page on faults; on tmpfs (/dev/shm) it costs one cheap
    # syscall. MAP_POPULATE, which maps every page up front, measured slower than
    # faulting on tmpfs.
    madvise(base, map_len, MADV_WILLNEED)
    m.base = base
    m.map_len = map_len
    m.data = <const unsigned char *>base + (offset - aligned)
    return 0


cdef FrameView _adopt(Mapping *m, Py_ssize_t length):
    """A FrameView owning the mapping m (unmapped here if the object cannot be made)."""
    cdef FrameView view
    try:
        view = FrameView.__new__(FrameView)
    except BaseException:
        munmap(m.base, m.map_len)
        raise
    view.map_base = m.base
    view.map_len = m.map_len
    view.data = m.data
    view.length = length
    return view


cdef object _identity(struct_stat *st):
    """(st_dev, st_ino, st_mtime_ns) as os.stat computes them (Python ints, exact)."""
    return (<unsigned long long>st.st_dev, <unsigned long long>st.st_ino,
            <object>(<long long>st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec)


cdef class FrameView:
    """The bytes [offset, offset + length) of an open file, mapped read-only.

    Exports a read-only 1-D uint8 buffer of exactly `length` bytes, so
    np.frombuffer(view, np.uint8) reads the file's pages in place. The fd may be
    closed right after construction; the mapping does not need it.
    """

    def __cinit__(self, *args, **kwargs):
        # Only a consistent empty state here: __init__ maps, and _adopt (the fast path)
        # hands over a mapping it made itself.
        self.data = NULL
        self.map_base = NULL
        self.map_len = 0
        self.exports = 0
        self.length = 0

    def __init__(self, int fd, long long offset, Py_ssize_t length):
        cdef Mapping m
        cdef int error
        _no_mapping(&m)
        if self.map_base != NULL:
            raise ValueError("FrameView is already mapped")
        if length <= 0:
            raise ValueError(f"a FrameView needs length > 0, not {length}")
        if offset < 0:
            raise ValueError(f"a FrameView needs offset >= 0, not {offset}")
        if offset > OFF_T_MAX - length:
            raise OverflowError(f"offset {offset} + length {length} overflows off_t")
        with nogil:
            error = _map_range(fd, offset, length, &m)
        if error:
            raise OSError(error, os.strerror(error))
        self.map_base = m.base
        self.map_len = m.map_len
        self.data = m.data
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


# --- frame_source's fast path ------------------------------------------------------------
# Syscall sequences only. Each returns None when any step fails or meets anything but the
# plain case, after closing what it opened; frame_source then runs its slow path from the
# start, which decides the error code. None of these ever decides one.

def openat2_available():
    """Whether openat2(RESOLVE_NO_SYMLINKS) works here (else open_fast always refuses)."""
    cdef bint usable
    with nogil:
        usable = _openat2_usable()
    return usable


def open_fast(bytes path, bytes meta_name, long long raw_offset, Py_ssize_t raw_length):
    """Open `path` with no symlink anywhere in it, and read or map what the caller needs.

    `path` must already be known (by name) to lie inside the frame roots, with no `.` or
    `..` component: openat2(RESOLVE_NO_SYMLINKS) then guarantees the file opened is the
    one that name denotes. Nothing but a regular file or directory is ever opened (a FIFO
    or device is not opened at all, as on the slow path): with raw_length 0 only a
    directory can succeed, so the open says O_DIRECTORY; else an lstat comes first.

    A regular file: [raw_offset, raw_offset + raw_length) mapped when raw_length > 0 and
    the file holds it (at raw_offset 0: when it is exactly raw_length bytes, docs/contract.md
    5.2) -> (FrameView, -1, None, None).
    A directory: `meta_name` in it opened (not through a symlink), a regular file, its
    first 64 bytes read -> (None, dir_fd, header, meta identity (dev, ino, mtime_ns)); the
    caller owns dir_fd. None: refused, nothing left open.
    """
    cdef const char *c_path = path
    cdef const char *c_meta = meta_name
    cdef struct_stat lst, st, mst
    cdef unsigned char header[64]
    cdef Mapping m
    cdef int fd = -1, mfd = -1, kind = 0  # kind: 0 refused, 1 raw mapped, 2 dir + header
    cdef ssize_t got
    _no_mapping(&m)
    if b"\0" in path or b"\0" in meta_name:
        return None
    if raw_length > 0 and (raw_offset < 0 or raw_offset > OFF_T_MAX - raw_length):
        raw_length = 0
    with nogil:
        if not _openat2_usable():
            pass
        elif raw_length <= 0:
            fd = vas_openat2_nosymlinks(AT_FDCWD, c_path, VAS_OPEN_DIR_FLAGS)
        elif lstat(c_path, &lst) == 0 and (S_ISREG(lst.st_mode) or S_ISDIR(lst.st_mode)):
            fd = vas_openat2_nosymlinks(AT_FDCWD, c_path, VAS_OPEN_FLAGS)
        if fd >= 0:
            if fstat(fd, &st) != 0 or (raw_length > 0 and (st.st_dev != lst.st_dev
                                                           or st.st_ino != lst.st_ino)):
                pass  # replaced between lstat and open: refused
            elif S_ISREG(st.st_mode):
                if (raw_length > 0 and st.st_size >= raw_offset + raw_length
                        and (raw_offset > 0 or st.st_size == raw_length)
                        and _map_range(fd, raw_offset, raw_length, &m) == 0):
                    kind = 1
            elif S_ISDIR(st.st_mode):
                mfd = openat(fd, c_meta, VAS_OPEN_FLAGS)
                if mfd >= 0:
                    if fstat(mfd, &mst) == 0 and S_ISREG(mst.st_mode):
                        got = pread(mfd, header, HEADER_BYTES, 0)
                        if got == HEADER_BYTES:
                            kind = 2
                    close(mfd)
            if kind != 2:
                close(fd)
                fd = -1
    if kind == 1:
        return (_adopt(&m, raw_length), -1, None, None)
    if kind == 2:
        try:
            return (None, fd, PyBytes_FromStringAndSize(<char *>header, HEADER_BYTES),
                    _identity(&mst))
        except BaseException:
            close(fd)
            raise
    return None


def map_member(int dir_fd, bytes name, Py_ssize_t length, bytes recheck_name):
    """Map [0, length) of the regular file `name` in dir_fd (not through a symlink), then
    stat `recheck_name` there (following a symlink, as os.stat does).

    -> (FrameView, identity of recheck_name (dev, ino, mtime_ns)); None: refused, nothing
    left open or mapped.
    """
    cdef const char *c_name = name
    cdef const char *c_recheck = recheck_name
    cdef struct_stat st, rst
    cdef Mapping m
    cdef int fd, ok = 0
    _no_mapping(&m)
    if length <= 0 or b"\0" in name or b"\0" in recheck_name:
        return None
    with nogil:
        fd = openat(dir_fd, c_name, VAS_OPEN_FLAGS)
        if fd >= 0:
            if (fstat(fd, &st) == 0 and S_ISREG(st.st_mode) and st.st_size >= length
                    and _map_range(fd, 0, length, &m) == 0):
                ok = 1
            close(fd)
        if ok:
            # right after mapping: the caller compares this with what it read
            if fstatat(dir_fd, c_recheck, &rst, 0) != 0:
                munmap(m.base, m.map_len)
                ok = 0
    if not ok:
        return None
    return (_adopt(&m, length), _identity(&rst))


def probe_type(bytes path):
    """The file type bits (st_mode & S_IFMT) of `path`: stat(2)'s, symlinks followed as
    os.stat does, when that is not a regular file; S_IFREG only when the same file also
    opens with no symlink anywhere in the path (openat2 with O_PATH: nothing is really
    opened). -1: refused (stat failed, a symlink in the path, openat2 missing)."""
    cdef const char *c_path = path
    cdef struct_stat st, pst
    cdef int fd = -1
    cdef long mode = -1
    if b"\0" in path:
        return -1
    with nogil:
        if stat(c_path, &st) == 0:
            if not S_ISREG(st.st_mode):
                mode = st.st_mode & 0o170000
            elif _openat2_usable():
                fd = vas_openat2_nosymlinks(AT_FDCWD, c_path, VAS_PROBE_FLAGS)
                if fd >= 0:
                    if (fstat(fd, &pst) == 0 and S_ISREG(pst.st_mode)
                            and pst.st_dev == st.st_dev and pst.st_ino == st.st_ino):
                        mode = pst.st_mode & 0o170000
                    close(fd)
    return mode


def stat_identity(int dir_fd, bytes name):
    """(st_dev, st_ino, st_mtime_ns) of `name` in dir_fd, following a symlink: what
    os.stat(name, dir_fd=dir_fd) gives, without building a stat_result. OSError on
    failure (FileNotFoundError when it is gone)."""
    cdef const char *c_name = name
    cdef struct_stat st
    cdef int rc
    if b"\0" in name:
        raise ValueError("embedded null byte")
    with nogil:
        rc = fstatat(dir_fd, c_name, &st, 0)
    if rc != 0:
        PyErr_SetFromErrno(OSError)
        return None
    return _identity(&st)
