"""Opening a request's frame: confinement, validation, zero-copy mapping (docs/contract.md 5).

`open_frame` resolves `frame_reference`, refuses anything outside the frame roots or
that is not a regular file / directory, checks every size before a pixel is touched, and
returns an `OpenFrame` whose `view` is a read-only mmap (no copy). The caller closes it
as soon as the kernel has read the pixels. Checks follow the contract's precedence:
frame_forbidden, frame_not_found, unsupported_format, frame_invalid, frame_changed.

Two paths lead to an OpenFrame. The fast path (`FrameOpener._open_fast`) serves the
common, successful case in a few syscalls (frameview.open_fast / map_member, one GIL
release each); it never produces an error. Whenever any of its steps meets anything
but success, it closes what it opened and the slow path (`_open_slow`, the original
resolve-check-open sequence) runs from the start and decides the exact error code, so
codes and their precedence are the slow path's alone. Why a fast success is a slow
success with the same file: see `FrameRoots.names_inside`.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from vasipc._fast.frameview import FrameView, map_member, open_fast, probe_type, stat_identity
from vasipc._fast.letterbox import frame_nbytes, min_stride
from vasipc.errors import (
    FrameChanged,
    FrameForbidden,
    FrameInvalid,
    FrameNotFound,
    InvalidRequest,
    UnsupportedFormat,
    VasipcError,
)
from vasipc.frames import (
    FORMAT_NAMES,
    HEADER_SIZE,
    HEADER_STRUCT,
    I420,
    PIXEL_FORMATS,
    YUV420_FORMATS,
    parse_format,
)
from vasipc.schema import FrameMetadata

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_META, _DATA = "frame.meta", "frame.data"
_META_B, _DATA_B = os.fsencode(_META), os.fsencode(_DATA)
_OFF_T_MAX = 2**63 - 1


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
            # followed: a frame.meta symlink (allowed inside the roots) was fstat'ed via its
            # target. stat_identity is os.stat(_META, dir_fd=...)'s (dev, ino, mtime_ns).
            identity = stat_identity(self.dir_fd, _META_B)
        except FileNotFoundError:
            raise FrameChanged("frame.meta vanished while the frame was read",
                               frame_id=self.frame_id) from None
        if identity != self.meta_identity:
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
        self._prefixes = tuple(r.rstrip("/") + "/" for r in self.roots)

    def contains(self, real_path: str) -> bool:
        return real_path in self.roots or real_path.startswith(self._prefixes)

    def names_inside(self, path: str) -> bool:
        """Whether `path`, read as a plain name, lies inside the roots: it is a root or
        starts with one followed by "/", and no component is "." or "..".

        This is what makes the fast path's success imply the slow path's. The fast path
        opens such a path only with openat2(RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        O_NOFOLLOW), which fails unless no component, the last and the roots' own
        included, is a symlink. A path with no symlink and no dot component resolves to
        the name itself, less empty components and a trailing "/": realpath(path) is
        that name (the roots are stored as realpaths), so contains(realpath(path)) holds
        by the same rule, and the file opened is the one the slow path would lstat and
        open at realpath(path) (the same inode, reached by the same names; opening it
        worked, so the slow path's open of that name works: no symlink for O_NOFOLLOW to
        refuse, the same permission checks). The fast path also requires, as the slow
        path does, a regular file or directory (O_DIRECTORY, or an lstat before the
        open, so a FIFO or device is never opened; fstat after it), and it opens frame.meta and
        frame.data exactly as the slow path's _open_member does. Nothing outside the
        roots is ever opened, not even for a moment: the name is checked before the open
        and the kernel refuses every symlink that could lead elsewhere. Any other case
        (a symlink anywhere, "..", a root named through a symlink, openat2 missing)
        is refused and goes to the slow path, which resolves and decides.
        """
        if not (path.startswith(self._prefixes) or path in self.roots):
            return False
        if "/." in path:  # rare: only then split (".hidden" names pass)
            return not any(part in (".", "..") for part in path.split("/"))
        return True

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
                                f"({', '.join(PIXEL_FORMATS)}, or FFmpeg's and GStreamer's "
                                f"names for them)") from None


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
    if fmt in YUV420_FORMATS and (width % 2 or height % 2):
        raise bad(f"{FORMAT_NAMES[fmt]} needs even width and height, got {width}x{height}")
    if stride is None:
        stride = min_stride(fmt, width)
    if stride < min_stride(fmt, width):
        raise bad(f"stride {stride} is smaller than a row of {width} {FORMAT_NAMES[fmt]} pixels")
    if fmt == I420 and stride % 2:
        raise bad(f"I420 stride must be even, got {stride}")
    try:
        return stride, frame_nbytes(fmt, width, height, stride)
    except (ValueError, OverflowError):  # rows of 2 GiB or more: no file holds that frame
        raise bad(f"stride {stride} is too large") from None


def _check_header(raw: bytes, md: FrameMetadata, ref: str,
                  max_dim: int) -> tuple[int, int, int, int, int, int]:
    """Validate frame.meta's bytes against frame_metadata, in the contract's order:
    (pixel_format, width, height, stride, frame_id, the frame's byte count), or the
    contract error. Shared by both paths. (FrameHeader's fields, without building one.)"""
    if len(raw) < HEADER_SIZE:
        raise FrameInvalid(f"{ref}/frame.meta is {len(raw)} bytes, expected {HEADER_SIZE}")
    (version, _, fid, _, width, height, fmt, stride,
     data_size) = HEADER_STRUCT.unpack_from(raw)
    if version < 1:
        raise FrameInvalid(f"frame.meta version {version} is not supported", frame_id=fid)
    if fmt not in FORMAT_NAMES:
        raise UnsupportedFormat(f"frame.meta pixel_format {fmt} is not supported",
                                frame_id=fid)
    # The header is authoritative: a frame_metadata.format it does not match, even one
    # this server cannot read, is a mismatch (frame_invalid), not the frame's format.
    if md.format is not None and _metadata_format(md.format) != fmt:
        raise FrameInvalid(f"frame_metadata.format {md.format!r} differs from the header's "
                           f"{FORMAT_NAMES[fmt]}", frame_id=fid)
    for key, value in (("width", width), ("height", height), ("stride", stride)):
        given = getattr(md, key)
        if given is not None and given != value:
            raise FrameInvalid(f"frame_metadata.{key} {given} differs from the header's "
                               f"{value}", frame_id=fid)
    _, nbytes = _check_geometry(fmt, width, height, stride, max_dim, fid)
    if data_size < nbytes:
        raise FrameInvalid(f"header data_size {data_size} is smaller than the frame "
                           f"({nbytes} bytes)", frame_id=fid)
    if md.frame_id is not None and md.frame_id != fid:
        raise FrameChanged(f"frame_metadata.frame_id {md.frame_id} differs from the header's "
                           f"{fid}", frame_id=fid)
    return fmt, width, height, stride, fid, nbytes


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
        if self.roots.names_inside(ref):
            # Not a regular file (os.stat's answer, as below): False. A regular file at a
            # name inside the roots with no symlink in it (see names_inside): True.
            try:
                mode = probe_type(os.fsencode(ref))
            except (UnicodeError, ValueError):
                mode = -1
            if mode >= 0:
                return mode == stat.S_IFREG
        try:
            return stat.S_ISREG(os.stat(ref).st_mode) and self.roots.contains(os.path.realpath(ref))
        except (OSError, ValueError):
            return False

    def open(self, ref: str, md: FrameMetadata) -> OpenFrame:
        frame = self._open_fast(ref, md)
        if frame is not None:
            return frame
        return self._open_slow(ref, md)

    def _open_fast(self, ref: str, md: FrameMetadata) -> OpenFrame | None:
        """The common case in two C calls; None whenever it is not a success, with nothing
        left open (the slow path then decides). Never raises a contract error."""
        if not self.roots.names_inside(ref):
            return None
        try:
            path = os.fsencode(ref)
        except UnicodeError:
            return None
        # A raw file's mapping, when frame_metadata describes a valid one; an export dir
        # ignores it. Anything short of that leaves a raw file to the slow path's errors.
        fmt = stride = None
        raw_offset = raw_nbytes = 0
        if md.width is not None and md.height is not None and md.format is not None:
            fmt = _metadata_format(md.format)
            if fmt is not None:
                try:
                    stride, nbytes = _check_geometry(fmt, md.width, md.height, md.stride,
                                                     self.max_frame_dim, md.frame_id)
                except FrameInvalid:
                    pass
                else:
                    offset = md.offset or 0
                    if 0 <= offset <= _OFF_T_MAX - nbytes:
                        raw_offset, raw_nbytes = offset, nbytes
        got = open_fast(path, _META_B, raw_offset, raw_nbytes)
        if got is None:
            return None
        view, dfd, raw, meta_identity = got
        if view is not None:  # a raw file, mapped as _open_raw would have
            return OpenFrame(view, fmt, md.width, md.height, stride, md.frame_id)
        try:
            try:
                fmt, width, height, stride, fid, nbytes = _check_header(
                    raw, md, ref, self.max_frame_dim)
            except VasipcError:
                os.close(dfd)
                return None
            mapped = map_member(dfd, _DATA_B, nbytes, _META_B)
            if mapped is None:
                os.close(dfd)
                return None
            view, identity = mapped
            if identity != meta_identity:  # replaced meanwhile: the slow path reads anew
                view.close()
                os.close(dfd)
                return None
        except BaseException:
            os.close(dfd)
            raise
        # dfd is the frame's own now, for check_unchanged (no dup: nothing else holds it).
        return OpenFrame(view, fmt, width, height, stride, fid, meta_identity, dfd)

    def _open_slow(self, ref: str, md: FrameMetadata) -> OpenFrame:
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
        # Without an offset the file is the frame: a size that differs means the metadata
        # describes another frame (a 1080p file read as 720p would give wrong pixels).
        if offset == 0 and st.st_size != nbytes:
            raise FrameInvalid(f"{ref} holds {st.st_size} bytes, a {md.width}x{md.height} "
                               f"{FORMAT_NAMES[fmt]} frame is {nbytes} (without an offset "
                               f"the file must be exactly one frame)", frame_id=md.frame_id)
        view = _map(fd, offset, nbytes, md.frame_id)
        return OpenFrame(view, fmt, md.width, md.height, stride, md.frame_id)

    def _open_export_dir(self, dfd: int, ref: str, md: FrameMetadata) -> OpenFrame:
        meta_fd, meta_st = self._open_member(dfd, ref, _META)
        try:
            if not stat.S_ISREG(meta_st.st_mode):
                raise FrameForbidden(f"{ref}/frame.meta is not a regular file")
            raw = os.pread(meta_fd, HEADER_SIZE, 0)
        finally:
            os.close(meta_fd)
        fmt, width, height, stride, fid, nbytes = _check_header(raw, md, ref,
                                                                self.max_frame_dim)
        data_fd, data_st = self._open_member(dfd, ref, _DATA, fid)
        try:
            if not stat.S_ISREG(data_st.st_mode):
                raise FrameForbidden(f"{ref}/frame.data is not a regular file", frame_id=fid)
            if data_st.st_size < nbytes:
                raise FrameInvalid(f"{ref}/frame.data holds {data_st.st_size} bytes, the frame "
                                   f"needs {nbytes}", frame_id=fid)
            view = _map(data_fd, 0, nbytes, fid)
        finally:
            os.close(data_fd)
        frame = OpenFrame(view, fmt, width, height, stride, fid,
                          (meta_st.st_dev, meta_st.st_ino, meta_st.st_mtime_ns), os.dup(dfd))
        try:
            frame.check_unchanged()  # right after mapping (docs/contract.md 5.1)
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
