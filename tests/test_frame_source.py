"""FrameOpener's two paths (vasipc/frame_source.py): the fast path serves only the plain
successful case; every case it refuses gives exactly the slow path's error code, and no
fd or mapping is left behind either way."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vasipc import frames
from vasipc._fast.frameview import FrameView, openat2_available, probe_type, stat_identity
from vasipc.errors import (
    FrameChanged,
    FrameForbidden,
    FrameInvalid,
    FrameNotFound,
    InvalidRequest,
    UnsupportedFormat,
)
from vasipc.frame_source import FrameOpener, FrameRoots, OpenFrame
from vasipc.frames import FrameHeader
from vasipc.schema import FrameMetadata

W, H = 64, 48
NV12_BYTES = W * H * 3 // 2
RAW_MD = FrameMetadata(width=W, height=H, format="NV12")
EMPTY = FrameMetadata()

needs_openat2 = pytest.mark.skipif(not openat2_available(),
                                   reason="openat2 unavailable: every open takes the slow path")


def pixels(seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, NV12_BYTES, dtype=np.uint8).tobytes()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps_under(path: Path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if str(path) in line)


@pytest.fixture
def root(shm_dir: Path) -> Path:
    """The only frame root of `opener`: a fresh directory in /dev/shm."""
    return shm_dir


@pytest.fixture
def outside() -> Iterator[Path]:
    """Outside the roots: a raw frame and an export dir."""
    path = Path(tempfile.mkdtemp(prefix="vasipc-outside-", dir="/dev/shm"))
    frames.write_raw_frame(path / "frame.raw", pixels())
    frames.write_frame_dir(path / "dir", pixels(), width=W, height=H, pixel_format="NV12",
                           frame_id=9)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def opener(root: Path) -> FrameOpener:
    return FrameOpener(FrameRoots([str(root)]), 8192)


def export_dir(path: Path, frame_id: int = 7, seed: int = 1) -> Path:
    frames.write_frame_dir(path, pixels(seed), width=W, height=H, pixel_format="NV12",
                           frame_id=frame_id)
    return path


def outcome(call) -> tuple:
    """What a FrameOpener call gives: ("ok", fields, bytes) or ("error", type, frame_id)."""
    try:
        frame = call()
    except (FrameForbidden, FrameNotFound, FrameInvalid, FrameChanged, UnsupportedFormat,
            InvalidRequest) as exc:
        return ("error", type(exc), exc.frame_id)
    try:
        fields = (frame.pixel_format, frame.width, frame.height, frame.stride, frame.frame_id)
        return ("ok", fields, bytes(memoryview(frame.view)))
    finally:
        frame.close()


def assert_same_as_slow(opener: FrameOpener, ref: Path | str, md: FrameMetadata,
                        *, fast_refuses: bool) -> tuple:
    """open() gives what the slow path alone gives; the fast path refuses (None) exactly
    when expected; nothing is left open or mapped."""
    ref = str(ref)
    fds, maps = fd_count(), maps_under(Path(ref).parent)
    fast = opener._open_fast(ref, md)
    if openat2_available():
        assert (fast is None) == fast_refuses
    if fast is not None:
        fast.close()
    assert fd_count() == fds
    got = outcome(lambda: opener.open(ref, md))
    assert fd_count() == fds
    want = outcome(lambda: opener._open_slow(ref, md))
    assert fd_count() == fds
    assert maps_under(Path(ref).parent) == maps
    assert got == want
    return got


# --- the plain cases: served by the fast path, same result as the slow path ----------------

@needs_openat2
def test_export_dir_on_the_fast_path(opener, root):
    path = export_dir(root / "cam" / "f1", frame_id=11, seed=3)
    got = assert_same_as_slow(opener, path, EMPTY, fast_refuses=False)
    assert got == ("ok", (frames.NV12, W, H, W, 11), pixels(3))
    # metadata that agrees with the header is compared and accepted
    md = FrameMetadata(width=W, height=H, format="nv12", stride=W, frame_id=11)
    assert assert_same_as_slow(opener, path, md, fast_refuses=False) == got
    assert assert_same_as_slow(opener, str(path) + "/", EMPTY, fast_refuses=False) == got
    assert assert_same_as_slow(opener, str(path).replace("/cam/", "//cam//"), EMPTY,
                               fast_refuses=False) == got


@needs_openat2
def test_raw_file_on_the_fast_path(opener, root):
    single = root / "one.raw"
    frames.write_raw_frame(single, pixels(4))
    got = assert_same_as_slow(opener, single, RAW_MD, fast_refuses=False)
    assert got == ("ok", (frames.NV12, W, H, W, None), pixels(4))
    ring = root / "ring.raw"
    frames.write_raw_frame(ring, pixels(5), offset=NV12_BYTES + 100)
    frames.write_raw_frame(ring, pixels(6), offset=1)
    md = FrameMetadata(width=W, height=H, format="NV12", offset=NV12_BYTES + 100, frame_id=3)
    got = assert_same_as_slow(opener, ring, md, fast_refuses=False)
    assert got == ("ok", (frames.NV12, W, H, W, 3), pixels(5))
    md = FrameMetadata(width=W, height=H, format="NV12", offset=1)
    assert assert_same_as_slow(opener, ring, md, fast_refuses=False)[2] == pixels(6)


@needs_openat2
@pytest.mark.parametrize("size", [NV12_BYTES - 1, NV12_BYTES + 1, 2 * NV12_BYTES])
@pytest.mark.parametrize("offset", [None, 0])
def test_raw_file_without_offset_is_exactly_one_frame(opener, root, size, offset):
    """docs/contract.md 5.2: without an offset (or with 0) the file is the frame; any
    other size is frame_invalid on both paths (the fast one refuses)."""
    path = root / "sized.raw"
    path.write_bytes(bytes(size))
    md = FrameMetadata(width=W, height=H, format="NV12", offset=offset, frame_id=5)
    assert assert_same_as_slow(opener, path, md, fast_refuses=True) == ("error", FrameInvalid, 5)


@needs_openat2
def test_fast_frame_is_zero_copy_and_keeps_only_the_dir_fd(opener, root):
    path = export_dir(root / "zc")
    fds = fd_count()
    frame = opener._open_fast(str(path), EMPTY)
    assert isinstance(frame, OpenFrame) and isinstance(frame.view, FrameView)
    assert fd_count() == fds + 1  # the export dir, for check_unchanged; no dup
    assert os.path.samestat(os.fstat(frame.dir_fd), os.stat(path))
    array = np.frombuffer(frame.view, np.uint8)
    assert array.ctypes.data == frame.view.address and not array.flags.writeable
    assert maps_under(path) == 1
    del array
    frame.check_unchanged()
    frame.close()
    assert fd_count() == fds and maps_under(path) == 0 and frame.dir_fd == -1


def test_root_itself_and_dot_names(opener, root):
    """A root named exactly, and names with dots that are not "." or ".."."""
    assert_same_as_slow(opener, root, EMPTY, fast_refuses=True)  # a dir without frame.meta
    export_dir(root / ".hidden" / "f..x", frame_id=5)
    got = assert_same_as_slow(opener, root / ".hidden" / "f..x", EMPTY, fast_refuses=False)
    assert got[0] == "ok"


# --- what the fast path refuses: the slow path's code, exactly --------------------------

def test_symlink_final_component_inside_the_roots_is_allowed(opener, root):
    target = export_dir(root / "target")
    (root / "link").symlink_to(target)
    got = assert_same_as_slow(opener, root / "link", EMPTY, fast_refuses=True)
    assert got[0] == "ok"
    raw = root / "a.raw"
    frames.write_raw_frame(raw, pixels())
    (root / "raw-link").symlink_to("a.raw")
    assert assert_same_as_slow(opener, root / "raw-link", RAW_MD, fast_refuses=True)[0] == "ok"


def test_symlink_dir_component_inside_the_roots_is_allowed(opener, root):
    export_dir(root / "real" / "f")
    (root / "alias").symlink_to(root / "real")
    assert assert_same_as_slow(opener, root / "alias" / "f", EMPTY, fast_refuses=True)[0] == "ok"


def test_symlink_dir_component_leading_outside_is_forbidden(opener, root, outside):
    (root / "out").symlink_to(outside)
    for ref, md in [(root / "out" / "dir", EMPTY), (root / "out" / "frame.raw", RAW_MD),
                    (root / "out" / "missing", EMPTY), (root / "out" / "missing", RAW_MD)]:
        got = assert_same_as_slow(opener, ref, md, fast_refuses=True)
        assert got == ("error", FrameForbidden, None)


def test_final_symlink_leading_outside_is_forbidden(opener, root, outside):
    (root / "dir-out").symlink_to(outside / "dir")
    (root / "raw-out").symlink_to(outside / "frame.raw")
    (root / "dangling-out").symlink_to(outside / "no-such-file")
    for ref, md in [(root / "dir-out", EMPTY), (root / "raw-out", RAW_MD),
                    (root / "dangling-out", RAW_MD)]:
        got = assert_same_as_slow(opener, ref, md, fast_refuses=True)
        assert got == ("error", FrameForbidden, None)


def test_paths_outside_the_roots_are_forbidden(opener, root, outside):
    for ref, md in [(outside / "dir", EMPTY), (outside / "frame.raw", RAW_MD),
                    (f"{root}/../{outside.name}/dir", EMPTY), (f"{root}x", EMPTY),
                    (f"{root}/./../{outside.name}/frame.raw", RAW_MD), ("/etc/passwd", RAW_MD)]:
        got = assert_same_as_slow(opener, ref, md, fast_refuses=True)
        assert got == ("error", FrameForbidden, None)


def test_dotdot_staying_inside_is_allowed(opener, root):
    export_dir(root / "a" / "f")
    (root / "b").mkdir()
    got = assert_same_as_slow(opener, f"{root}/b/../a/./f", EMPTY, fast_refuses=True)
    assert got[0] == "ok"


def test_missing_inside_is_not_found(opener, root):
    raw = root / "file.raw"
    frames.write_raw_frame(raw, pixels())
    for ref, md in [(root / "nope", EMPTY), (root / "nope", RAW_MD), (root / "no" / "deeper", EMPTY),
                    (raw / "child", RAW_MD), (root / ("n" * 300), RAW_MD)]:
        got = assert_same_as_slow(opener, ref, md, fast_refuses=True)
        assert got == ("error", FrameNotFound, None)
    (root / "dangling").symlink_to(root / "no-such-target")
    got = assert_same_as_slow(opener, root / "dangling", RAW_MD, fast_refuses=True)
    assert got == ("error", FrameNotFound, None)


def test_fifo_socket_and_loop_are_forbidden(opener, root):
    os.mkfifo(root / "fifo")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    for ref, md in [(root / "fifo", EMPTY), (root / "fifo", RAW_MD), (root / "loop-a", RAW_MD)]:
        got = assert_same_as_slow(opener, ref, md, fast_refuses=True)
        assert got == ("error", FrameForbidden, None)


@pytest.mark.parametrize("member", ["frame.meta", "frame.data"])
def test_member_symlink_inside_the_roots_is_allowed(opener, root, member):
    target = export_dir(root / "target", frame_id=12)
    path = export_dir(root / "members", frame_id=12)
    (path / member).unlink()
    (path / member).symlink_to(target / member)
    got = assert_same_as_slow(opener, path, EMPTY, fast_refuses=True)
    assert got[0] == "ok" and got[1][-1] == 12


@pytest.mark.parametrize("member", ["frame.meta", "frame.data"])
@pytest.mark.parametrize("kind", ["fifo", "symlink-out", "missing"])
def test_member_special_or_missing(opener, root, outside, member, kind):
    path = export_dir(root / "m", frame_id=13)
    (path / member).unlink()
    if kind == "fifo":
        os.mkfifo(path / member)
    elif kind == "symlink-out":
        (path / member).symlink_to(outside / "dir" / member)
    got = assert_same_as_slow(opener, path, EMPTY, fast_refuses=True)
    want = FrameNotFound if kind == "missing" else FrameForbidden
    # (the slow path's open_confined, which judges a member symlink, knows no frame_id)
    frame_id = 13 if member == "frame.data" and kind != "symlink-out" else None
    assert got == ("error", want, frame_id)


def write_meta(path: Path, **fields) -> None:
    values = dict(version=1, frame_id=7, timestamp_ns=1, width=W, height=H,
                  pixel_format=frames.NV12, stride=W, data_size=NV12_BYTES)
    values.update(fields)
    (path / "frame.meta").write_bytes(FrameHeader(**values).pack())


@pytest.mark.parametrize(("fields", "md", "code"), [
    ({"version": 0}, EMPTY, FrameInvalid),
    ({"pixel_format": 10}, EMPTY, UnsupportedFormat),
    ({"width": 0}, EMPTY, FrameInvalid),
    ({"width": 63}, EMPTY, FrameInvalid),
    ({"data_size": 10}, EMPTY, FrameInvalid),
    ({"height": H * 2, "data_size": NV12_BYTES * 2}, EMPTY, FrameInvalid),  # data too short
    ({}, FrameMetadata(frame_id=8), FrameChanged),
    ({}, FrameMetadata(width=W + 2), FrameInvalid),
    ({}, FrameMetadata(format="BGR24"), FrameInvalid),
    ({}, FrameMetadata(format="YUYV", frame_id=8), FrameInvalid),
])
def test_header_errors(opener, root, fields, md, code):
    path = export_dir(root / "h")
    write_meta(path, **fields)
    got = assert_same_as_slow(opener, path, md, fast_refuses=True)
    assert got == ("error", code, 7)


def test_short_meta_is_invalid(opener, root):
    path = export_dir(root / "short")
    (path / "frame.meta").write_bytes(bytes(63))
    assert assert_same_as_slow(opener, path, EMPTY, fast_refuses=True) == (
        "error", FrameInvalid, None)


@pytest.mark.parametrize(("md", "code"), [
    (FrameMetadata(width=W, height=H), InvalidRequest),
    (FrameMetadata(width=W, height=H, format="YUYV"), UnsupportedFormat),
    (FrameMetadata(width=W + 1, height=H, format="NV12"), FrameInvalid),
    (FrameMetadata(width=W, height=H, format="NV12", offset=1), FrameInvalid),
    (FrameMetadata(width=W, height=H, format="NV12", offset=2**63), FrameInvalid),
    (FrameMetadata(width=W, height=H, format="NV12", stride=2**40), FrameInvalid),
])
def test_raw_errors(opener, root, md, code):
    path = root / "r.raw"
    frames.write_raw_frame(path, pixels())
    got = assert_same_as_slow(opener, path, md, fast_refuses=True)
    assert got == ("error", code, md.frame_id)


# --- frame.meta replaced -------------------------------------------------------------------

@pytest.mark.parametrize("path_kind", ["fast", "slow"])
def test_meta_replaced_after_mapping_is_frame_changed(opener, root, path_kind):
    path = export_dir(root / "swap", frame_id=1)
    fds = fd_count()
    open_ = opener._open_fast if path_kind == "fast" else opener._open_slow
    frame = open_(str(path), EMPTY)
    if frame is None:
        pytest.skip("openat2 unavailable")
    frame.check_unchanged()
    export_dir(path, frame_id=2)  # a writer replaced the frame (rename: a new inode)
    with pytest.raises(FrameChanged) as info:
        frame.check_unchanged()
    assert info.value.frame_id == 1
    frame.close()
    frame = open_(str(path), EMPTY)
    assert frame.frame_id == 2
    (path / "frame.meta").unlink()
    with pytest.raises(FrameChanged, match="vanished"):
        frame.check_unchanged()
    frame.close()
    assert fd_count() == fds


@needs_openat2
def test_meta_replaced_between_read_and_map_falls_back(opener, root, monkeypatch):
    """The fast path's own post-map check refuses; the slow path then reads anew."""
    import vasipc.frame_source as fs

    path = export_dir(root / "race", frame_id=1)
    real_map_member = fs.map_member

    def replacing_map_member(*args):
        export_dir(path, frame_id=2)
        return real_map_member(*args)

    monkeypatch.setattr(fs, "map_member", replacing_map_member)
    fds = fd_count()
    assert opener._open_fast(str(path), EMPTY) is None
    assert fd_count() == fds and maps_under(path) == 0
    frame = opener.open(str(path), EMPTY)
    assert frame.frame_id == 2  # the fast try saw 1 then a new meta; the slow path reads 2
    frame.close()
    assert fd_count() == fds


# --- is_raw_file ---------------------------------------------------------------------------

def test_is_raw_file(opener, root, outside):
    raw = root / "r.raw"
    frames.write_raw_frame(raw, pixels())
    export_dir(root / "d")
    os.mkfifo(root / "fifo")
    (root / "raw-link").symlink_to(raw)
    (root / "out").symlink_to(outside)
    (root / "raw-out").symlink_to(outside / "frame.raw")
    cases = {raw: True, root / "d": False, root / "fifo": False, root / "raw-link": True,
             root / "out" / "frame.raw": False, root / "raw-out": False,
             outside / "frame.raw": False, root / "missing": False, root: False,
             f"{root}/d/../r.raw": True, f"{root}/r.raw/": False}
    fds = fd_count()
    for ref, want in cases.items():
        assert opener.is_raw_file(str(ref)) is want, ref
    assert opener.is_raw_file("/dev/shm/\udcff-no-such") is False
    assert fd_count() == fds


# --- the C helpers -------------------------------------------------------------------------

@needs_openat2
def test_probe_type_and_stat_identity(root):
    raw = root / "r.raw"
    raw.write_bytes(b"x")
    (root / "link").symlink_to(raw)
    assert probe_type(os.fsencode(raw)) == 0o100000
    assert probe_type(os.fsencode(root)) == 0o040000
    assert probe_type(os.fsencode(root / "link")) == -1  # a symlink to a file: refused
    (root / "dlink").symlink_to(root)
    os.mkfifo(root / "fifo")
    assert probe_type(os.fsencode(root / "dlink")) == 0o040000  # not a file: stat's type
    assert probe_type(os.fsencode(root / "fifo")) == 0o010000  # (not opened at all)
    assert probe_type(os.fsencode(root / "missing")) == -1
    assert probe_type(b"/dev/shm/a\0b") == -1
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.stat("link", dir_fd=dfd)
        assert stat_identity(dfd, b"link") == (st.st_dev, st.st_ino, st.st_mtime_ns)
        os.utime(raw, ns=(0, -1_500_000_001))  # before 1970: the same arithmetic as os.stat
        st = os.stat(raw)
        assert stat_identity(dfd, b"r.raw") == (st.st_dev, st.st_ino, st.st_mtime_ns)
        with pytest.raises(FileNotFoundError):
            stat_identity(dfd, b"missing")
    finally:
        os.close(dfd)


def test_no_fd_or_mapping_leaks_over_many_opens(opener, root, outside):
    path = export_dir(root / "leak")
    raw = root / "leak.raw"
    frames.write_raw_frame(raw, pixels())
    (root / "out").symlink_to(outside)
    cases = [(path, EMPTY), (raw, RAW_MD), (path, FrameMetadata(frame_id=1)),
             (root / "out" / "dir", EMPTY), (root / "missing", EMPTY)]
    fds = fd_count()
    for i in range(500):
        ref, md = cases[i % len(cases)]
        try:
            frame = opener.open(str(ref), md)
        except (FrameChanged, FrameForbidden, FrameNotFound):
            continue
        frame.check_unchanged()
        frame.close()
    assert fd_count() == fds
    assert maps_under(root) == 0
