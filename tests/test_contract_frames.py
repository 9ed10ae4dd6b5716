"""docs/contract.md section 5: frame-export directories, raw frame files, pixel formats, header
checks, confinement to the frame roots, torn reads, and the server's hands-off treatment of
frames (no writes, no leaked fds or mappings); real /dev/shm files against real servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import wire
from contract_util import (
    FORMATS,
    MODEL_ID,
    assert_error,
    assert_ok,
    assert_serving,
    changed_in_flight,
    gray,
    infer,
    raw_4k_truncated_in_flight,
    write_dir,
    write_meta,
    write_raw,
)

from vasipc import frames
from vasipc.frames import BGR24, I420, NV12, RGB24

FACE_FEMALE = 1


@pytest.fixture(scope="module")
def sock(nudenet_server) -> str:
    return nudenet_server.socket


@pytest.fixture(scope="module")
def astro(astronaut_rgb) -> np.ndarray:
    return astronaut_rgb


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vasipc-frames-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def astro_dir(root, astro) -> Path:
    return write_dir(root / "astronaut", astro, "NV12", frame_id=42)


def _has_face(resp: dict) -> bool:
    return FACE_FEMALE in [d["class_id"] for d in assert_ok(resp)]


def _face_box(resp: dict) -> list[float]:
    faces = [d for d in assert_ok(resp) if d["class_id"] == FACE_FEMALE]
    assert faces, resp
    return faces[0]["bbox"]


# --- 5.1 frame-export directories and 5.3 formats -------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("padded", [False, True])
def test_export_dir_formats(sock, root, astro, fmt, padded):
    w = astro.shape[1]
    stride = None
    if padded:
        stride = frames.packed_stride(w, fmt) + 64
    path = write_dir(root / f"dir-{fmt}-{padded}", astro, fmt, stride=stride, frame_id=1000 + 7)
    resp = infer(sock, path)
    assert _has_face(resp), resp
    assert resp["frame_id"] == 1007


@pytest.mark.parametrize(("fmt", "extra"), [("NV12", 1), ("BGR24", 1), ("RGB24", 2),
                                           ("I420", 2)])
def test_unaligned_strides(sock, root, astro, fmt, extra):
    """Any stride >= the row size is valid (even for I420): odd ones, non-multiples of 3."""
    stride = frames.packed_stride(astro.shape[1], fmt) + extra
    packed = _face_box(infer(sock, write_dir(root / f"packed-{fmt}", astro, fmt)))
    padded = _face_box(infer(sock, write_dir(root / f"odd-{fmt}", astro, fmt, stride=stride)))
    assert padded == pytest.approx(packed, abs=1e-4)


def test_export_dir_large_frame_id(sock, root, astro):
    path = write_dir(root / "big-id", astro, "BGR24", frame_id=2**64 - 1)
    resp = infer(sock, path)
    assert_ok(resp)
    assert resp["frame_id"] == 2**64 - 1
    assert_ok(infer(sock, path, {"frame_id": 2**64 - 1}))
    assert_error(infer(sock, path, {"frame_id": 2**64 - 2}), "frame_changed")


def test_formats_agree(sock, root, astro):
    """Every colour encoding of one picture gives the same face box (the server decodes each
    format as 5.3 defines it: BGR vs RGB order, NV12 vs NV21 vs I420 chroma layout, 3 or 4
    bytes a pixel). GRAY8 loses the colour: it still finds the face."""
    colour = [fmt for fmt in FORMATS if fmt != "GRAY8"]
    boxes = {fmt: _face_box(infer(sock, write_dir(root / f"agree-{fmt}", astro, fmt)))
             for fmt in colour}
    for fmt in colour:
        assert boxes[fmt] == pytest.approx(boxes["RGB24"], abs=0.01), boxes
    assert _has_face(infer(sock, write_dir(root / "agree-GRAY8", astro, "GRAY8")))


def test_swapped_channels_change_the_result(sock, root, astro):
    """Sanity of the test above: labelling RGB bytes as BGR changes what the model sees."""
    h, w = astro.shape[:2]
    path = root / "swapped"
    frames.write_frame_dir(path, frames.encode_frame(astro, "RGB24"), width=w, height=h,
                           pixel_format="BGR24")
    right = infer(sock, write_dir(root / "unswapped", astro, "RGB24"))
    wrong = infer(sock, path)
    a = [(d["class_id"], round(d["confidence"], 3)) for d in assert_ok(right)]
    b = [(d["class_id"], round(d["confidence"], 3)) for d in assert_ok(wrong)]
    assert a != b


def test_frame_metadata_may_be_empty_and_is_compared_when_given(sock, astro_dir):
    assert_ok(infer(sock, astro_dir, {}))
    full = {"width": 512, "height": 512, "format": "NV12", "stride": 512, "frame_id": 42}
    assert_ok(infer(sock, astro_dir, full))
    assert_ok(infer(sock, astro_dir, {"format": "nv12"}))  # case-insensitive
    # keys other than width/height/format/stride/frame_id are ignored for directories
    assert_ok(infer(sock, astro_dir, {"offset": 12345, "timestamp": 1.0, "camera": "x"}))


@pytest.mark.parametrize(("md", "code"), [
    ({"width": 510}, "frame_invalid"),
    ({"height": 514}, "frame_invalid"),
    ({"format": "I420"}, "frame_invalid"),
    ({"format": "RGB"}, "frame_invalid"),
    ({"format": "YUYV"}, "frame_invalid"),  # differs from the header (authoritative)
    ({"stride": 576}, "frame_invalid"),
    ({"width": 0}, "frame_invalid"),
    ({"frame_id": 41}, "frame_changed"),
    ({"frame_id": 0}, "frame_changed"),
    ({"width": 512, "height": 512, "frame_id": 43}, "frame_changed"),
])
def test_frame_metadata_mismatch(sock, astro_dir, md, code):
    resp = infer(sock, astro_dir, md)
    assert_error(resp, code)
    assert resp["frame_id"] == 42


def test_header_version_above_one_is_accepted(sock, root, astro):
    path = write_dir(root / "v2", astro, "RGB24", frame_id=9)
    h, w = astro.shape[:2]
    write_meta(path, version=7, frame_id=9, width=w, height=h, pixel_format=RGB24,
               stride=w * 3, data_size=w * h * 3)
    assert _has_face(infer(sock, path))


def test_data_file_larger_than_the_frame_is_fine(sock, root, astro):
    h, w = astro.shape[:2]
    data = np.concatenate([frames.encode_frame(astro, "RGB24"), np.zeros(4096, np.uint8)])
    frames.write_frame_dir(root / "long", data, width=w, height=h, pixel_format="RGB24",
                           frame_id=3)
    assert _has_face(infer(sock, root / "long"))


def _w(h: int = 64, w: int = 64, fmt: int = RGB24, **kw: int) -> dict:
    stride = kw.pop("stride", w * 3 if fmt in (RGB24, BGR24) else w)
    fields = {"width": w, "height": h, "pixel_format": fmt, "stride": stride,
              "data_size": frames.frame_size(w, h, fmt, max(stride, 1)) if w and h else 0}
    fields.update(kw)
    return fields


HEADER_CASES = {
    "version 0": (_w(version=0), "frame_invalid"),
    "width 0": (_w(width=0), "frame_invalid"),
    "height 0": (_w(height=0), "frame_invalid"),
    "stride 0": (_w(stride=0), "frame_invalid"),
    "odd width NV12": (_w(64, 63, NV12, stride=64), "frame_invalid"),
    "odd height NV12": (_w(63, 64, NV12), "frame_invalid"),
    "odd width I420": (_w(64, 63, I420, stride=64), "frame_invalid"),
    "odd height I420": (_w(63, 64, I420), "frame_invalid"),
    "stride too small BGR24": (_w(fmt=BGR24, stride=191), "frame_invalid"),
    "stride too small NV12": (_w(fmt=NV12, stride=62), "frame_invalid"),
    "stride odd I420": (_w(fmt=I420, stride=65), "frame_invalid"),
    "data_size too small": (_w(data_size=64 * 64 * 3 - 1), "frame_invalid"),
    "data_size 0": (_w(data_size=0), "frame_invalid"),
    "file shorter than frame": (_w(128, 128), "frame_invalid"),
    "width above max dim": (_w(2, 8194, NV12, stride=8194), "frame_invalid"),
    "height above max dim": (_w(8194, 2, NV12, stride=2), "frame_invalid"),
    "stride 2**32-1": (_w(stride=2**32 - 1, data_size=2**64 - 1), "frame_invalid"),
    "all sizes 2**32-1": (_w(width=2**32 - 1, height=2**32 - 1, stride=2**32 - 1,
                             data_size=2**64 - 1), "frame_invalid"),
    "pixel_format 10": (_w(pixel_format=10), "unsupported_format"),
    "pixel_format 99": (_w(pixel_format=99), "unsupported_format"),
    "pixel_format 2**32-1": (_w(pixel_format=2**32 - 1), "unsupported_format"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_checks(sock, root, case):
    fields, code = HEADER_CASES[case]
    path = root / f"hdr-{case.replace(' ', '_')}"
    path.mkdir()
    nbytes = 8194 * 3 if "max dim" in case else 64 * 64 * 3
    (path / "frame.data").write_bytes(bytes(nbytes))
    write_meta(path, frame_id=77, **fields)
    resp = infer(sock, path)
    assert_error(resp, code)
    assert resp["frame_id"] == 77


def test_max_dim_boundary_is_allowed(sock, root):
    """8192 wide (the default --max-frame-dim) is allowed, 8194 is not (above)."""
    path = root / "wide"
    frames.write_frame_dir(path, bytes(8192 * 3), width=8192, height=2, pixel_format="NV12")
    assert_ok(infer(sock, path))


def test_short_frame_meta_is_invalid(sock, root):
    path = write_dir(root / "short-meta", gray(), "RGB24")
    (path / "frame.meta").write_bytes(frames.FrameHeader(1, 1, 1, 64, 64, RGB24, 192,
                                                         64 * 64 * 3).pack()[:40])
    assert_error(infer(sock, path), "frame_invalid")


@pytest.mark.slow
def test_max_frame_dim_option(server_factory, shm_dir):
    server = server_factory("--max-frame-dim", "100")
    ok = write_dir(shm_dir / "ok", gray(100, 100), "NV12")
    big = write_dir(shm_dir / "big", gray(2, 102), "NV12")
    assert_ok(infer(server.socket, ok))
    assert_error(infer(server.socket, big), "frame_invalid")
    raw = shm_dir / "raw"
    md = write_raw(raw, gray(102, 2), "RGB24")
    assert_error(infer(server.socket, raw, md), "frame_invalid")


# --- 5.2 raw frame files -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_file_ring_with_stride_and_offset(sock, root, astro, fmt):
    """Three frames in one file at unaligned offsets, rows padded: each read by its offset."""
    h, w = astro.shape[:2]
    stride = frames.packed_stride(w, fmt) + 32
    size = frames.frame_size(w, h, fmt, stride)
    mirrored = np.ascontiguousarray(astro[:, ::-1])
    pictures = [astro, gray(h, w), mirrored]
    path = root / f"ring-{fmt}.raw"
    offsets = [100 + i * (size + 333) for i in range(3)]
    for pic, off in zip(pictures, offsets, strict=True):
        write_raw(path, pic, fmt, stride=stride, offset=off)
    md = {"width": w, "height": h, "format": fmt, "stride": stride}
    first = infer(sock, path, {**md, "offset": offsets[0], "frame_id": 0})
    second = infer(sock, path, {**md, "offset": offsets[1], "frame_id": 1})
    third = infer(sock, path, {**md, "offset": offsets[2], "frame_id": 2})
    assert [r["frame_id"] for r in (first, second, third)] == [0, 1, 2]
    assert assert_ok(second) == []  # the flat gray frame
    a, c = _face_box(first), _face_box(third)
    assert c == pytest.approx([1 - a[2], a[1], 1 - a[0], a[3]], abs=0.02)


def test_raw_file_defaults(sock, root, astro):
    """stride defaults to the packed row size, offset to 0."""
    path = root / "plain.bgr"
    md = write_raw(path, astro, "BGR24")
    del md["offset"]
    assert _has_face(infer(sock, path, md))


# Each name a pipeline may send (ours, FFmpeg's pix_fmt, GStreamer's format, any case) and
# the format it names.
FORMAT_SPELLINGS = {
    "bgr": "BGR24", "RGB": "RGB24", "Bgr24": "BGR24", "rgb24": "RGB24", "nv12": "NV12",
    "i420": "I420", "I420": "I420", "yuv420p": "I420", "nv21": "NV21", "NV21": "NV21",
    "bgra": "BGRA", "BGRA": "BGRA", "bgr0": "BGRx", "BGRx": "BGRx", "rgba": "RGBA",
    "RGBA": "RGBA", "rgb0": "RGBx", "RGBx": "RGBx", "gray": "GRAY8", "GRAY8": "GRAY8",
    "gray8": "GRAY8",
}


@pytest.mark.parametrize("name", list(FORMAT_SPELLINGS))
def test_raw_format_names_are_case_insensitive_with_aliases(sock, root, astro, name):
    path = root / f"alias-{name}"
    md = write_raw(path, astro, FORMAT_SPELLINGS[name])
    md["format"] = name
    assert _has_face(infer(sock, path, md))


@pytest.mark.parametrize("fmt", ["YUYV", "P010", "ARGB", "", "gray16le", "BGR 24"])
def test_raw_unknown_format_is_unsupported(sock, root, fmt):
    path = root / "fmt.raw"
    write_raw(path, gray(), "RGB24")
    resp = infer(sock, path, {"width": 64, "height": 64, "format": fmt, "frame_id": 4})
    assert_error(resp, "unsupported_format")
    assert resp["frame_id"] == 4


@pytest.mark.parametrize("missing", ["width", "height", "format"])
def test_raw_file_needs_width_height_format(sock, root, missing):
    path = root / "needs.raw"
    write_raw(path, gray(), "RGB24")
    md = {"width": 64, "height": 64, "format": "RGB24"}
    del md[missing]
    assert_error(infer(sock, path, md), "invalid_request")


RAW_INVALID = {
    "width 0": {"width": 0},
    "height 0": {"height": 0},
    "odd width NV12": {"format": "NV12", "width": 63, "stride": 64},
    "odd height I420": {"format": "I420", "height": 63},
    "stride too small": {"stride": 191},
    "stride odd I420": {"format": "I420", "stride": 65},
    "odd height NV21": {"format": "nv21", "height": 63},
    "odd width NV21": {"format": "NV21", "width": 63, "stride": 64},
    "stride too small BGRx": {"format": "bgr0", "stride": 255},
    "stride too small GRAY8": {"format": "gray", "stride": 63},
    "file shorter than frame": {"height": 65},
    "file shorter than offset + frame": {"offset": 1},
    "offset past the end": {"offset": 10**6},
    "width above max dim": {"width": 8194, "height": 1, "stride": 8194 * 3},
    "width 2**63-1": {"width": 2**63 - 1},
    "height 2**64-1": {"height": 2**64 - 1},
    "stride 2**31+1": {"stride": 2**31 + 1, "height": 1},
    "stride 2**40": {"stride": 2**40},
    "stride 2**64-1": {"stride": 2**64 - 1},
    "offset 2**63": {"offset": 2**63},
}


@pytest.mark.parametrize("case", list(RAW_INVALID))
def test_raw_file_checks(sock, root, case):
    path = root / "exact.raw"
    write_raw(path, gray(), "RGB24")
    md = {"width": 64, "height": 64, "format": "RGB24", "frame_id": 11, **RAW_INVALID[case]}
    resp = infer(sock, path, md)
    assert_error(resp, "frame_invalid")
    assert resp["frame_id"] == 11


def test_raw_offset_exactly_at_the_end_minus_frame(sock, root):
    path = root / "offset.raw"
    write_raw(path, gray(), "RGB24", offset=5000)
    assert_ok(infer(sock, path, {"width": 64, "height": 64, "format": "RGB24",
                                 "offset": 5000}))


@pytest.mark.parametrize("offset", [None, 0])
def test_raw_file_without_offset_is_exactly_one_frame(sock, root, offset):
    """A 1080p NV12 file described as 720p is frame_invalid naming both sizes (it used to
    answer 0 detections); a file one byte longer than its frame too. With an offset the
    file may hold more than offset + the frame."""
    path = root / f"1080p-{offset}.nv12"
    write_raw(path, gray(1080, 1920), "NV12")
    md = {"width": 1280, "height": 720, "format": "NV12", "frame_id": 7}
    if offset is not None:
        md["offset"] = offset
    resp = assert_error(infer(sock, path, md), "frame_invalid")
    assert resp["frame_id"] == 7
    assert str(1920 * 1080 * 3 // 2) in resp["error"] and str(1280 * 720 * 3 // 2) in resp["error"]

    longer = root / f"longer-{offset}.rgb"
    write_raw(longer, gray(), "RGB24")
    with open(longer, "ab") as f:
        f.write(b"\0")
    md = {"width": 64, "height": 64, "format": "RGB24"}
    if offset is not None:
        md["offset"] = offset
    resp = assert_error(infer(sock, longer, md), "frame_invalid")
    assert str(64 * 64 * 3 + 1) in resp["error"] and str(64 * 64 * 3) in resp["error"]
    os.truncate(longer, 64 * 64 * 3)  # exactly one frame again: served
    assert_ok(infer(sock, longer, md))


def test_raw_file_with_offset_may_hold_more(sock, root):
    path = root / "tail.rgb"
    write_raw(path, gray(), "RGB24", offset=10)
    with open(path, "ab") as f:
        f.write(bytes(4096))
    assert_ok(infer(sock, path, {"width": 64, "height": 64, "format": "RGB24", "offset": 10}))


def test_empty_raw_file_is_invalid(sock, root):
    path = root / "empty.raw"
    path.write_bytes(b"")
    assert_error(infer(sock, path, {"width": 2, "height": 2, "format": "NV12"}),
                 "frame_invalid")


# --- confinement -------------------------------------------------------------------------------

RAW_MD = {"width": 64, "height": 64, "format": "RGB24"}


@pytest.fixture(scope="module")
def outside() -> Iterator[Path]:
    """A directory outside the frame roots with a valid raw frame and a valid export dir."""
    path = Path(tempfile.mkdtemp(prefix="vasipc-outside-", dir="/tmp"))
    try:
        write_raw(path / "frame.rgb", gray(), "RGB24")
        write_dir(path / "dir", gray(), "RGB24")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_path_outside_the_roots_is_forbidden(sock, outside):
    assert_error(infer(sock, outside / "frame.rgb", RAW_MD), "frame_forbidden")
    assert_error(infer(sock, outside / "dir"), "frame_forbidden")
    assert_error(infer(sock, "/etc/passwd", RAW_MD), "frame_forbidden")
    assert_error(infer(sock, "/", RAW_MD), "frame_forbidden")
    assert_error(infer(sock, "/dev/shmx/frame", RAW_MD), "frame_forbidden")  # prefix only
    assert_error(infer(sock, "/dev/zero", RAW_MD), "frame_forbidden")


@pytest.mark.parametrize("ref", ["/dev/shm/../etc/passwd", "/dev/shm/../../etc/passwd",
                                 "/dev/shm/./../tmp", "/dev/shm/x/../../etc/shadow"])
def test_dotdot_traversal_is_forbidden(sock, ref):
    assert_error(infer(sock, ref, RAW_MD), "frame_forbidden")


def test_symlinks_leaving_the_roots_are_forbidden(sock, root, outside):
    links = root / "links"
    links.mkdir(exist_ok=True)
    cases = {"passwd": "/etc/passwd", "tmp-file": str(outside / "frame.rgb"),
             "tmp-dir": str(outside / "dir"), "relative-out": "../../../etc/passwd",
             "dangling-out": "/tmp/vasipc-no-such-file"}
    for name, target in cases.items():
        with contextlib.suppress(FileNotFoundError):
            (links / name).unlink()
        (links / name).symlink_to(target)
    for name in cases:
        md = {} if name == "tmp-dir" else RAW_MD
        assert_error(infer(sock, links / name, md), "frame_forbidden")
    # a directory reached through a symlinked parent directory
    (links / "parent").symlink_to(outside)
    assert_error(infer(sock, links / "parent" / "dir"), "frame_forbidden")
    assert_error(infer(sock, links / "parent" / "frame.rgb", RAW_MD), "frame_forbidden")


def test_symlinks_inside_the_roots_are_allowed(sock, root, astro_dir):
    links = root / "inlinks"
    links.mkdir()
    (links / "dir").symlink_to(astro_dir)
    raw = root / "target.rgb"
    write_raw(raw, gray(), "RGB24")
    (links / "raw").symlink_to("../target.rgb")
    assert _has_face(infer(sock, links / "dir"))
    assert_ok(infer(sock, links / "raw", RAW_MD))
    # members of an export dir may be symlinks that stay inside the roots
    member_dir = links / "members"
    member_dir.mkdir()
    (member_dir / "frame.meta").symlink_to(astro_dir / "frame.meta")
    (member_dir / "frame.data").symlink_to(astro_dir / "frame.data")
    assert _has_face(infer(sock, member_dir))


def test_fifo_is_forbidden_without_blocking(sock, root):
    """A fifo with no writer is never opened for reading (that would block the server: the
    request's 30 s socket timeout, a hang guard, would end the test)."""
    fifo = root / "frame.fifo"
    os.mkfifo(fifo)
    assert_error(infer(sock, fifo, RAW_MD), "frame_forbidden")
    assert_error(infer(sock, fifo, {}), "frame_forbidden")
    assert_serving(sock)


def test_other_special_files_are_forbidden(sock, root):
    import socket as socketlib

    path = root / "frame.sock"
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        s.bind(str(path))
        assert_error(infer(sock, path, RAW_MD), "frame_forbidden")
    finally:
        s.close()


@pytest.mark.parametrize("member", ["frame.meta", "frame.data"])
@pytest.mark.parametrize("kind", ["fifo", "symlink-out", "symlink-dev"])
def test_member_special_files_are_forbidden(sock, root, astro, member, kind):
    path = write_dir(root / f"member-{member}-{kind}", astro, "RGB24")
    (path / member).unlink()
    if kind == "fifo":
        os.mkfifo(path / member)
    elif kind == "symlink-out":
        (path / member).symlink_to("/etc/passwd")
    else:
        (path / member).symlink_to("/dev/zero")
    assert_error(infer(sock, path), "frame_forbidden")


@pytest.mark.parametrize("missing", ["frame.meta", "frame.data", "both"])
def test_export_dir_without_members_is_not_found(sock, root, astro, missing):
    path = write_dir(root / f"missing-{missing}", astro, "RGB24")
    for name in ("frame.meta", "frame.data"):
        if missing in (name, "both"):
            (path / name).unlink()
    resp = infer(sock, path)
    assert_error(resp, "frame_not_found")


def test_nonexistent_path_inside_the_roots_is_not_found(sock, root):
    assert_error(infer(sock, root / "nope", RAW_MD), "frame_not_found")
    assert_error(infer(sock, root / "nope" / "deeper", RAW_MD), "frame_not_found")
    assert_error(infer(sock, "/dev/shm/vasipc-definitely-missing-frame"), "frame_not_found")
    raw = root / "a-file"
    write_raw(raw, gray(), "RGB24")
    assert_error(infer(sock, raw / "child", RAW_MD), "frame_not_found")  # ENOTDIR
    # names no file system holds (ENAMETOOLONG) do not exist either
    assert_error(infer(sock, root / ("n" * 300), RAW_MD), "frame_not_found")
    assert_error(infer(sock, root / "/".join(["d" * 200] * 30), RAW_MD), "frame_not_found")


def test_symlink_loop_is_forbidden(sock, root):
    """A symlink loop resolves to no regular file or directory."""
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    assert_error(infer(sock, root / "loop-a", RAW_MD), "frame_forbidden")
    assert_error(infer(sock, root / "loop-a" / "frame", RAW_MD), "frame_forbidden")
    assert_serving(sock)


def test_dangling_symlink_inside_the_roots_is_not_found(sock, root):
    link = root / "dangling"
    link.symlink_to(root / "no-such-target")
    assert_error(infer(sock, link, RAW_MD), "frame_not_found")


@pytest.mark.slow
def test_extra_frame_root(server_factory, shm_dir):
    extra = Path(tempfile.mkdtemp(prefix="vasipc-root-"))
    sibling = Path(tempfile.mkdtemp(prefix="vasipc-sibling-"))
    try:
        server = server_factory("--frame-root", str(extra), "--frame-root", "/dev/shm")
        write_dir(extra / "f", gray(), "RGB24", frame_id=5)
        write_dir(sibling / "f", gray(), "RGB24", frame_id=5)
        write_dir(shm_dir / "f", gray(), "RGB24", frame_id=5)
        resp = infer(server.socket, extra / "f")
        assert_ok(resp)
        assert resp["frame_id"] == 5
        assert_ok(infer(server.socket, shm_dir / "f"))
        assert_error(infer(server.socket, sibling / "f"), "frame_forbidden")
        assert_error(infer(server.socket, str(extra) + "x/f"), "frame_forbidden")
        # `..` out of the extra root
        assert_error(infer(server.socket, extra / ".." / sibling.name / "f"),
                     "frame_forbidden")
    finally:
        shutil.rmtree(extra, ignore_errors=True)
        shutil.rmtree(sibling, ignore_errors=True)


def test_default_root_forbids_other_dirs(sock):
    extra = Path(tempfile.mkdtemp(prefix="vasipc-root-"))
    try:
        write_dir(extra / "f", gray(), "RGB24")
        assert_error(infer(sock, extra / "f"), "frame_forbidden")
    finally:
        shutil.rmtree(extra, ignore_errors=True)


# --- frames changing under the reader ----------------------------------------------------------

def test_raw_file_truncated_while_read(nudenet_server, root):
    """A raw frame file shrunk while its request is in flight (at a different point of the
    server's read each time) answers normally or with frame_changed / frame_invalid, never a
    crash; shrunk before the request it is frame_invalid; restored it answers normally."""
    sock = nudenet_server.socket
    path = root / "4k.nv12"
    codes, md = raw_4k_truncated_in_flight(sock, path)
    assert set(codes) <= {None, "frame_changed", "frame_invalid"}, codes
    assert nudenet_server.proc.poll() is None, nudenet_server.stderr_text()[-2000:]
    assert_serving(sock)
    size = path.stat().st_size
    for shrunk in (0, 4096, size // 3, size // 2):
        os.truncate(path, shrunk)
        assert_error(infer(sock, path, md), "frame_invalid")
    os.truncate(path, size)
    assert_ok(infer(sock, path, md))


def test_export_data_truncated_while_read(nudenet_server, root):
    """The same through a frame-export directory: frame.data shrinks under the mapping."""
    sock = nudenet_server.socket
    w, h = 3840, 2160
    size = frames.frame_size(w, h, "NV12")
    path = root / "4k-dir"
    frames.write_frame_dir(path, bytes(size), width=w, height=h, pixel_format="NV12",
                           frame_id=8)
    data = path / "frame.data"
    answers = changed_in_flight(sock, path, None, 20,
                                lambda i: os.truncate(data, (i * 7919) % size),
                                lambda: os.truncate(data, size))
    codes = [r["error_code"] for r in answers]
    assert set(codes) <= {None, "frame_changed", "frame_invalid"}, codes
    assert nudenet_server.proc.poll() is None, nudenet_server.stderr_text()[-2000:]
    assert_serving(sock)
    os.truncate(data, size // 2)
    assert_error(infer(sock, path), "frame_invalid")
    os.truncate(data, size)
    resp = infer(sock, path)
    assert_ok(resp)
    assert resp["frame_id"] == 8


def test_header_replaced_between_reads(nudenet_server, root, astro):
    """A header replaced (atomically) while its request is in flight: the answer is the frame
    before or after the change, whole, or frame_changed; never a mix."""
    sock = nudenet_server.socket
    path = write_dir(root / "swapping", astro, "NV12", frame_id=1)
    h, w = astro.shape[:2]
    size = frames.frame_size(w, h, "NV12")

    def replace_header(frame_id: int) -> None:
        write_meta(path, frame_id=frame_id, width=w, height=h, pixel_format=NV12, stride=w,
                   data_size=size)

    # request i is sent under frame i + 1 and frame i + 2 replaces it in flight
    answers = changed_in_flight(sock, path, None, 20, lambda i: replace_header(i + 2),
                                lambda: None)
    for i, r in enumerate(answers):
        if r["error_code"] is None:
            assert r["frame_id"] in (i + 1, i + 2), (i, r)
            assert FACE_FEMALE in [d["class_id"] for d in r["detections"]]
        else:
            assert_error(r, "frame_changed")
    assert nudenet_server.proc.poll() is None, nudenet_server.stderr_text()[-2000:]
    replace_header(100)  # between requests a header is read whole
    assert infer(sock, path)["frame_id"] == 100
    assert_serving(sock)


def test_frame_replaced_whole_between_requests(sock, root, astro):
    """A writer replacing the export between requests: each request sees one whole frame."""
    path = root / "replaced"
    for i in range(5):
        pic = astro if i % 2 == 0 else gray(*astro.shape[:2])
        write_dir(path, pic, "I420", frame_id=100 + i)
        resp = infer(sock, path)
        assert resp["frame_id"] == 100 + i
        assert (FACE_FEMALE in [d["class_id"] for d in assert_ok(resp)]) == (i % 2 == 0)


# --- hands off: no writes, no leaks ------------------------------------------------------------

def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _shm_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/dev/shm" in line)


def _settled(pid: int, baseline: int, count) -> int:
    """`count(pid)` once it is back to `baseline`, or after 30 s (a hang guard)."""
    deadline = time.monotonic() + 30
    while True:
        n = count(pid)
        if n <= baseline or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def test_no_fd_or_mapping_leaks(nudenet_server, root, astro):
    sock = nudenet_server.socket
    pid = nudenet_server.pid
    dir_ok = write_dir(root / "leak-dir", astro, "NV12", frame_id=5)
    raw_ok = root / "leak.raw"
    md_ok = write_raw(raw_ok, astro, "I420", offset=4096)
    short = root / "leak-short"
    write_dir(short, gray(), "RGB24")
    write_meta(short, width=64, height=64, pixel_format=RGB24, stride=192,
               data_size=64 * 64 * 3)
    (short / "frame.data").write_bytes(bytes(100))
    fmt10 = write_dir(root / "leak-fmt10", gray(), "RGB24")
    write_meta(fmt10, width=64, height=64, pixel_format=10, stride=192, data_size=64 * 64 * 3)
    cases = [
        (dir_ok, {}, None),
        (dir_ok, {"frame_id": 6}, "frame_changed"),
        (raw_ok, md_ok, None),
        (raw_ok, {**md_ok, "offset": 10**7}, "frame_invalid"),
        (short, {}, "frame_invalid"),
        (fmt10, {}, "unsupported_format"),
        (root / "leak-missing", {}, "frame_not_found"),
        (root / "links-leak", {}, "frame_forbidden"),
    ]
    (root / "links-leak").symlink_to("/etc")
    for ref, md, code in cases:  # warm up (lazy imports, thread pools)
        assert infer(sock, ref, md)["error_code"] == code
    fds, maps = _fd_count(pid), _shm_maps(pid)
    with wire.connect(sock, 30) as s:  # pooled
        for i in range(100):
            ref, md, code = cases[i % len(cases)]
            wire.send(s, wire.infer_request(str(ref), MODEL_ID, md))
            assert wire.recv(s)["error_code"] == code
    for i in range(100):  # connect-per-request
        ref, md, code = cases[i % len(cases)]
        assert infer(sock, ref, md)["error_code"] == code
    assert _settled(pid, fds, _fd_count) <= fds
    assert _settled(pid, maps, _shm_maps) <= maps


def test_server_never_writes_to_frames(sock, root, astro):
    d = write_dir(root / "ro-dir", astro, "NV12", frame_id=3)
    raw = root / "ro.raw"
    md = write_raw(raw, astro, "BGR24")
    files = [d / "frame.meta", d / "frame.data", raw]
    for f in files:
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    before = {f: (f.read_bytes(), os.stat(f).st_mtime_ns, os.stat(f).st_ino) for f in files}
    for _ in range(5):
        assert_ok(infer(sock, d))
        assert_ok(infer(sock, raw, md))
        assert_error(infer(sock, d, {"frame_id": 4}), "frame_changed")
    after = {f: (f.read_bytes(), os.stat(f).st_mtime_ns, os.stat(f).st_ino) for f in files}
    assert after == before
    assert sorted(p.name for p in d.iterdir()) == ["frame.data", "frame.meta"]


def test_nothing_is_held_after_the_response(nudenet_server, root, astro):
    """No fd or mapping of a frame survives its response (docs/contract.md 5: no reference past
    the response), so a writer can delete or reuse it at once."""
    sock, pid = nudenet_server.socket, nudenet_server.pid
    d = write_dir(root / "gone", astro, "RGB24")
    raw = root / "gone.raw"
    md = write_raw(raw, astro, "NV12")
    assert_ok(infer(sock, d))
    assert_ok(infer(sock, raw, md))
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    with open(f"/proc/{pid}/maps") as f:
        held += f.read().splitlines()
    assert not [h for h in held if str(d) in h or str(raw) in h], held
    shutil.rmtree(d)
    assert_error(infer(sock, d), "frame_not_found")
