"""Opening a request's frame: confinement, validation, zero-copy mapping (CONTRACT 5).

`open_frame` resolves `frame_reference`, refuses anything outside the frame roots or
that is not a regular file / directory, checks every size before a pixel is touched, and
returns an `OpenFrame` whose `view` is a read-only mmap (no copy). The caller closes it
as soon as the kernel has read the pixels. Checks follow the contract's precedence:
frame_forbidden, frame_not_found, unsupported_format, frame_invalid, frame_changed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from vasipc._fast.frameview import FrameView
from vasipc._fast.letterbox import frame_nbytes, min_stride
from vasipc.errors import (
    FrameChanged,
    FrameForbidden,
    FrameInvalid,
    FrameNotFound,
    InvalidRequest,
    UnsupportedFormat,
)
from vasipc.frames import HEADER_SIZE, PIXEL_FORMATS, FrameHeader, parse_format
from vasipc.schema import FrameMetadata

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FORMAT_NAMES = {code: name for name, code in PIXEL_FORMATS.items()}
_CHROMA_FORMATS = (PIXEL_FORMATS["NV12"], PIXEL_FORMATS["I420"])


@dataclass(slots=True)
class OpenFrame:
    """A validated frame, mapped read-only. `close()` releases the mapping."""

    view: FrameView
    pixel_format: int
    width: int
    height: int
    stride: int
    frame_id: int | None
    meta_identity: tuple[int, int, int] | None = None  # (dev, ino, mtime_ns) of frame.meta
    dir_fd: int = -1

    def check_unchanged(self) -> None:
        """frame_changed if frame.meta was replaced since it was read (torn read)."""
        if self.dir_fd < 0:
            return
        try:
            # followed: a frame.meta symlink (allowed inside the roots) was fstat'ed via its target
            st = os.stat("frame.meta", dir_fd=self.dir_fd)
        except FileNotFoundError:
            raise FrameChanged("frame.meta vanished while the frame was read",
                               frame_id=self.frame_id) from None
        if (st.st_dev, st.st_ino, st.st_mtime_ns) != self.meta_identity:
            raise FrameChanged("frame.meta was replaced while the frame was read",
                               frame_id=self.frame_id)

    def close(self) -> None:
        self.view.close()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


class FrameRoots:
    """The directories frames may be read from, resolved once at start."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = tuple(os.path.realpath(r) for r in roots)

    def contains(self, real_path: str) -> bool:
        return any(real_path == r or real_path.startswith(r.rstrip("/") + "/") for r in self.roots)

    def _confined(self, path: str) -> str:
        real = os.path.realpath(path)
        if not self.contains(real):
            raise FrameForbidden(f"{path} is outside the frame roots")
        return real

    def open_confined(self, path: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
        """Open `path` read-only without following a final symlink, confined to the roots.

        The resolved name is checked before the open, and the opened file's own name
        (/proc/self/fd) after it, so a symlink swapped in between cannot lead out.
        Returns (fd, fstat) of a regular file or directory; anything else is forbidden.
        """
        full = path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = self._confined(full)
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            raise FrameNotFound(f"{full} does not exist") from None
        except NotADirectoryError:
            raise FrameNotFound(f"{full} does not exist") from None
        except PermissionError:
            raise FrameForbidden(f"{full} is not readable") from None
        except OSError as exc:  # a name too long cannot exist; a symlink loop leads nowhere
            if exc.errno == errno.ENAMETOOLONG:
                raise FrameNotFound(f"{full} does not exist: {exc.strerror}") from None
            if exc.errno == errno.ELOOP:
                raise FrameForbidden(f"{full} is a symlink loop") from None
            raise
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise FrameForbidden(f"{full} is not a regular file or directory")
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except FileNotFoundError:
            raise FrameNotFound(f"{full} vanished while it was opened") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM):
                raise FrameForbidden(f"{full} cannot be opened safely: {exc.strerror}") from None
            raise
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise FrameForbidden(f"{full} is not a regular file or directory")
            if not self.contains(os.readlink(f"/proc/self/fd/{fd}")):
                raise FrameForbidden(f"{full} leads outside the frame roots")
        except BaseException:
            os.close(fd)
            raise
        return fd, st


def _format_code(name: str) -> int:
    try:
        return parse_format(name)
    except ValueError:
        raise UnsupportedFormat(f"pixel format {name!r} is not supported "
                                f"(NV12, I420, BGR24, RGB24)") from None


def _metadata_format(name: str) -> int | None:
    try:
        return parse_format(name)
    except ValueError:
        return None


def _check_geometry(fmt: int, width: int, height: int, stride: int | None, max_dim: int,
                    frame_id: int | None) -> tuple[int, int]:
    """Validate sizes; return (stride, the frame's byte count). stride None: packed rows."""
    def bad(why: str) -> FrameInvalid:
        return FrameInvalid(why, frame_id=frame_id)

    if width <= 0 or height <= 0:
        raise bad(f"frame size {width}x{height} has a zero dimension")
    if width > max_dim or height > max_dim:
        raise bad(f"frame size {width}x{height} exceeds --max-frame-dim {max_dim}")
    if fmt in _CHROMA_FORMATS and (width % 2 or height % 2):
        raise bad(f"{_FORMAT_NAMES[fmt]} needs even width and height, got {width}x{height}")
    if stride is None:
        stride = min_stride(fmt, width)
    if stride < min_stride(fmt, width):
        raise bad(f"stride {stride} is smaller than a row of {width} {_FORMAT_NAMES[fmt]} pixels")
    if fmt == PIXEL_FORMATS["I420"] and stride % 2:
        raise bad(f"I420 stride must be even, got {stride}")
    try:
        return stride, frame_nbytes(fmt, width, height, stride)
    except (ValueError, OverflowError):  # rows of 2 GiB or more: no file holds that frame
        raise bad(f"stride {stride} is too large") from None


def _map(fd: int, offset: int, nbytes: int, frame_id: int | None) -> FrameView:
    try:
        return FrameView(fd, offset, nbytes)
    except OSError as exc:
        raise FrameChanged(f"frame could not be mapped: {exc.strerror}", frame_id=frame_id) from None


class FrameOpener:
    """Turns (frame_reference, frame_metadata) into an OpenFrame, or a contract error."""

    def __init__(self, roots: FrameRoots, max_frame_dim: int) -> None:
        self.roots = roots
        self.max_frame_dim = max_frame_dim

    def is_raw_file(self, ref: str) -> bool:
        """True for a regular file inside the roots (decides which metadata is required).

        Outside the roots the answer is False, so that a probe learns nothing there and
        gets frame_forbidden later.
        """
        try:
            return stat.S_ISREG(os.stat(ref).st_mode) and self.roots.contains(os.path.realpath(ref))
        except (OSError, ValueError):
            return False

    def open(self, ref: str, md: FrameMetadata) -> OpenFrame:
        fd, st = self.roots.open_confined(ref)
        try:
            if stat.S_ISDIR(st.st_mode):
                return self._open_export_dir(fd, ref, md)
            return self._open_raw(fd, st, ref, md)
        finally:
            os.close(fd)

    def _open_raw(self, fd: int, st: os.stat_result, ref: str, md: FrameMetadata) -> OpenFrame:
        if md.width is None or md.height is None or md.format is None:
            raise InvalidRequest("a raw frame file needs frame_metadata width, height and format",
                                 frame_id=md.frame_id)
        fmt = _format_code(md.format)
        stride, nbytes = _check_geometry(fmt, md.width, md.height, md.stride, self.max_frame_dim,
                                         md.frame_id)
        offset = md.offset or 0
        if st.st_size < offset + nbytes:
            raise FrameInvalid(f"{ref} holds {st.st_size} bytes, the frame needs "
                               f"{nbytes} from offset {offset}", frame_id=md.frame_id)
        view = _map(fd, offset, nbytes, md.frame_id)
        return OpenFrame(view, fmt, md.width, md.height, stride, md.frame_id)

    def _open_export_dir(self, dfd: int, ref: str, md: FrameMetadata) -> OpenFrame:
        meta_fd, meta_st = self._open_member(dfd, ref, "frame.meta")
        try:
            if not stat.S_ISREG(meta_st.st_mode):
                raise FrameForbidden(f"{ref}/frame.meta is not a regular file")
            raw = os.pread(meta_fd, HEADER_SIZE, 0)
        finally:
            os.close(meta_fd)
        if len(raw) < HEADER_SIZE:
            raise FrameInvalid(f"{ref}/frame.meta is {len(raw)} bytes, expected {HEADER_SIZE}")
        hdr = FrameHeader.unpack(raw)
        fid = hdr.frame_id
        if hdr.version < 1:
            raise FrameInvalid(f"frame.meta version {hdr.version} is not supported", frame_id=fid)
        if hdr.pixel_format not in _FORMAT_NAMES:
            raise UnsupportedFormat(f"frame.meta pixel_format {hdr.pixel_format} is not supported",
                                    frame_id=fid)
        # The header is authoritative: a frame_metadata.format it does not match, even one
        # this server cannot read, is a mismatch (frame_invalid), not the frame's format.
        if md.format is not None and _metadata_format(md.format) != hdr.pixel_format:
            raise FrameInvalid(f"frame_metadata.format {md.format!r} differs from the header's "
                               f"{_FORMAT_NAMES[hdr.pixel_format]}", frame_id=fid)
        for key in ("width", "height", "stride"):
            given = getattr(md, key)
            if given is not None and given != getattr(hdr, key):
                raise FrameInvalid(f"frame_metadata.{key} {given} differs from the header's "
                                   f"{getattr(hdr, key)}", frame_id=fid)
        _, nbytes = _check_geometry(hdr.pixel_format, hdr.width, hdr.height, hdr.stride,
                                    self.max_frame_dim, fid)
        if hdr.data_size < nbytes:
            raise FrameInvalid(f"header data_size {hdr.data_size} is smaller than the frame "
                               f"({nbytes} bytes)", frame_id=fid)
        if md.frame_id is not None and md.frame_id != fid:
            raise FrameChanged(f"frame_metadata.frame_id {md.frame_id} differs from the header's "
                               f"{fid}", frame_id=fid)
        data_fd, data_st = self._open_member(dfd, ref, "frame.data", fid)
        try:
            if not stat.S_ISREG(data_st.st_mode):
                raise FrameForbidden(f"{ref}/frame.data is not a regular file", frame_id=fid)
            if data_st.st_size < nbytes:
                raise FrameInvalid(f"{ref}/frame.data holds {data_st.st_size} bytes, the frame "
                                   f"needs {nbytes}", frame_id=fid)
            view = _map(data_fd, 0, nbytes, fid)
        finally:
            os.close(data_fd)
        frame = OpenFrame(view, hdr.pixel_format, hdr.width, hdr.height, hdr.stride, fid,
                          (meta_st.st_dev, meta_st.st_ino, meta_st.st_mtime_ns), os.dup(dfd))
        try:
            frame.check_unchanged()  # right after mapping (CONTRACT 5.1)
        except BaseException:
            frame.close()
            raise
        return frame

    def _open_member(self, dfd: int, ref: str, name: str,
                     frame_id: int | None = None) -> tuple[int, os.stat_result]:
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            raise FrameNotFound(f"{ref} has no {name}", frame_id=frame_id) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise FrameForbidden(f"{ref}/{name} cannot be opened: {exc.strerror}",
                                     frame_id=frame_id) from None
            # A symlink: allowed only while it stays inside the roots.
            return self.roots.open_confined(name, dir_fd=dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise FrameForbidden(f"{ref}/{name} is not a regular file", frame_id=frame_id)
        return fd, st
