"""FrameView (vasipc._fast.frameview): a read-only, zero-copy mmap of one frame's bytes,
on real files in /dev/shm."""

from __future__ import annotations

import ctypes
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vasipc._fast.frameview import FrameView

PAGE = os.sysconf("SC_PAGESIZE")
PYBUF_SIMPLE, PYBUF_WRITABLE = 0, 1
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@pytest.fixture
def frame_file() -> Iterator[tuple[Path, bytes]]:
    """A file of 3 pages + 123 random bytes in /dev/shm, removed after the test."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path("/dev/shm") / f"vasipc-frameview-{os.getpid()}-{uuid.uuid4().hex}"
    data = np.random.default_rng(7).integers(0, 256, 3 * PAGE + 123, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    try:
        yield path, data
    finally:
        path.unlink(missing_ok=True)


def open_frame(path: Path) -> int:
    return os.open(path, OPEN_FLAGS)


def map_frame(path: Path, offset: int, length: int) -> FrameView:
    """Open, map, close the fd at once: the way the server uses it."""
    fd = open_frame(path)
    try:
        return FrameView(fd, offset, length)
    finally:
        os.close(fd)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapping_count() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def maps_file(path: Path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (0, 3 * PAGE + 123), (1, 100), (PAGE - 1, 2), (PAGE, PAGE), (PAGE + 1, 2 * PAGE),
     (3 * PAGE + 122, 1), (777, 3 * PAGE + 123 - 777)],
)
def test_maps_the_exact_byte_range(frame_file, offset, length):
    path, data = frame_file
    view = map_frame(path, offset, length)
    assert view.length == length
    assert bytes(memoryview(view)) == data[offset : offset + length]
    array = np.frombuffer(view, np.uint8)
    assert array.shape == (length,)
    assert array.ctypes.data == view.address  # zero copy: numpy reads the mapping itself
    assert array.tobytes() == data[offset : offset + length]
    del array
    view.close()


def test_buffer_is_read_only(frame_file):
    path, _ = frame_file
    with map_frame(path, 5, 100) as view:
        array = np.frombuffer(view, np.uint8)
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 1
        with pytest.raises(ValueError):
            array.flags.writeable = True
        mv = memoryview(view)
        assert mv.readonly and mv.format == "B" and mv.ndim == 1 and mv.shape == (100,)
        with pytest.raises(TypeError):
            mv[0] = 1
        del array
        mv.release()


def get_buffer(obj: object, flags: int) -> None:
    """PyObject_GetBuffer(obj, flags) through the C API, released at once if granted."""
    view = ctypes.create_string_buffer(256)  # room for a Py_buffer
    api = ctypes.pythonapi
    api.PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
    api.PyBuffer_Release.argtypes = [ctypes.c_void_p]
    api.PyObject_GetBuffer(obj, view, flags)  # PyDLL: a set error is raised here
    api.PyBuffer_Release(view)


def test_writable_buffer_request_fails(frame_file):
    path, _ = frame_file
    with map_frame(path, 0, 100) as view:
        get_buffer(view, PYBUF_SIMPLE)
        with pytest.raises(BufferError):
            get_buffer(view, PYBUF_WRITABLE)
        with pytest.raises(TypeError):
            ctypes.c_char.from_buffer(view)  # ctypes asks for a writable buffer too
        view.close()  # every export above was released


def test_the_file_is_never_written(frame_file):
    path, data = frame_file
    with map_frame(path, 0, len(data)) as view:
        bytes(memoryview(view))
    assert path.read_bytes() == data


def test_close_is_idempotent_and_ends_the_mapping(frame_file):
    path, _ = frame_file
    view = map_frame(path, 0, 10)
    assert maps_file(path)
    assert not view.closed
    view.close()
    assert view.closed
    assert not maps_file(path)
    view.close()
    with pytest.raises(ValueError):
        memoryview(view)
    with pytest.raises(ValueError):
        _ = view.address


def test_close_with_a_live_export_raises(frame_file):
    path, _ = frame_file
    view = map_frame(path, 0, 10)
    array = np.frombuffer(view, np.uint8)
    with pytest.raises(BufferError):
        view.close()
    assert array[0] == array[0]  # still mapped and readable
    del array
    view.close()
    assert view.closed


def test_context_manager_closes(frame_file):
    path, _ = frame_file
    with map_frame(path, 0, 10) as view:
        assert isinstance(view, FrameView)
    assert view.closed


def test_export_keeps_the_mapping_after_the_view_is_dropped(frame_file):
    path, data = frame_file
    array = np.frombuffer(map_frame(path, 3, 50), np.uint8)
    assert maps_file(path)
    assert array.tobytes() == data[3:53]
    del array
    assert not maps_file(path)  # the last export gone: unmapped by __dealloc__


def test_fd_can_be_closed_right_after_construction(frame_file):
    path, data = frame_file
    fd = open_frame(path)
    view = FrameView(fd, PAGE + 9, 1000)
    os.close(fd)
    with pytest.raises(OSError):
        os.fstat(fd)
    assert bytes(memoryview(view)) == data[PAGE + 9 : PAGE + 1009]
    view.close()


def test_no_fd_or_mapping_leaks_over_2000_cycles(frame_file):
    path, data = frame_file
    fds, maps = fd_count(), mapping_count()
    for i in range(2000):
        view = map_frame(path, i % (2 * PAGE), 1 + i % PAGE)
        arr = np.frombuffer(view, np.uint8)
        assert arr[0] == data[i % (2 * PAGE)]
        del arr
        if i % 2:
            view.close()
        del view  # the other half is unmapped by __dealloc__
    assert fd_count() == fds
    assert mapping_count() <= maps + 4  # slack for the allocator; a leak would add 2000


@pytest.mark.parametrize("length", [0, -1])
def test_length_must_be_positive(frame_file, length):
    path, _ = frame_file
    with pytest.raises(ValueError):
        map_frame(path, 0, length)


def test_negative_offset_refused(frame_file):
    path, _ = frame_file
    with pytest.raises(ValueError):
        map_frame(path, -1, 10)


def test_mmap_failure_is_an_oserror(frame_file):
    path, _ = frame_file
    fd = open_frame(path)
    os.close(fd)
    with pytest.raises(OSError) as info:
        FrameView(fd, 0, 10)
    assert info.value.errno == errno.EBADF
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            FrameView(dir_fd, 0, 10)
    finally:
        os.close(dir_fd)


def test_offset_overflow_refused(frame_file):
    path, _ = frame_file
    with pytest.raises(OverflowError):
        map_frame(path, 2**63 - 5, 10)


def test_init_twice_and_no_arguments_are_refused(frame_file):
    path, data = frame_file
    view = map_frame(path, 0, 10)
    fd = open_frame(path)
    try:
        with pytest.raises(ValueError, match="already mapped"):
            view.__init__(fd, 0, 10)
    finally:
        os.close(fd)
    assert bytes(memoryview(view)) == data[:10]  # the first mapping is untouched
    view.close()
    with pytest.raises(TypeError):
        FrameView()
    empty = FrameView.__new__(FrameView)  # never mapped: closed, and dealloc is harmless
    assert empty.closed
    with pytest.raises(ValueError):
        memoryview(empty)
