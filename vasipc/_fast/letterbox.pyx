# cython: language_level=3
"""Preprocess one frame into one slot of the model's input tensor (docs/contract.md 5.3, 6).

letterbox_into() runs the fused kernel (letterbox_kernel.c): colour conversion at the
bilinear taps only, resize, placement (letterbox, stretch or centre crop: any offset,
negative ones included), pad, /255, per-channel mean/std, written as float32 NCHW (RGB or
BGR planes) straight into the batch. It releases the GIL and reads the frame inside a
SIGBUS guard (sigbus_guard.c), so a frame file truncated under its mapping raises
FrameBusError instead of killing the server. It does OpenCV's fixed-point arithmetic, so
with the defaults its output equals cvtColor -> resize(INTER_LINEAR) ->
copyMakeBorder(114) -> astype(float32) / 255 -> CHW bit for bit (OpenCV 5.0; versions
whose scalar row tails round differently: within 1/255). With antialias=True the resize
is PIL's Image.resize(BILINEAR) instead (torchvision's Resize on a PIL image, as
Ultralytics' classifiers preprocess): bit for bit PIL's, of the RGB uint8 frame the colour
conversion gives. vasipc.preprocess chooses the placement and the parameters per model
family.

letterbox_geometry() gives the placement (Ultralytics' formula); frame_nbytes() and
min_stride() the frame's size rules, shared with the server's frame checks.
copy_frame_guarded() copies a mapped frame's bytes to a staging buffer (the GPU path's
pinned memory) under the same SIGBUS guard, without the GIL.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from operator import index as _index

NV12 = VAS_NV12
I420 = VAS_I420
BGR24 = VAS_BGR24
RGB24 = VAS_RGB24
NV21 = VAS_NV21
BGRA = VAS_BGRA
BGRX = VAS_BGRX
RGBA = VAS_RGBA
RGBX = VAS_RGBX
GRAY8 = VAS_GRAY8
# vasipc.frames.PIXEL_FORMATS, name for name (tests/test_frames.py holds them equal).
FORMAT_CODES = {"NV12": NV12, "I420": I420, "BGR24": BGR24, "RGB24": RGB24, "NV21": NV21,
                "BGRA": BGRA, "BGRx": BGRX, "RGBA": RGBA, "RGBx": RGBX, "GRAY8": GRAY8}
_FORMAT_NAMES = {code: name for name, code in FORMAT_CODES.items()}

# Bounds that keep every size computation far from int overflow in the kernel (the
# server's own limit, --max-frame-dim, defaults to 8192).
cdef enum:
    MAX_DIM = 1 << 20
cdef Py_ssize_t MAX_STRIDE = 0x80000000


class FrameBusError(Exception):
    """The frame's memory vanished while it was read (SIGBUS: the mapped file was
    truncated under the mapping)."""


cdef bint _yuv420(int fmt) noexcept:
    return fmt == VAS_NV12 or fmt == VAS_NV21 or fmt == VAS_I420


cdef Py_ssize_t _min_stride(int fmt, Py_ssize_t width) except -1:
    if fmt < VAS_NV12 or fmt > VAS_GRAY8:
        raise ValueError(f"unknown pixel format code {fmt} ("
                         + ", ".join(f"{name}={code}" for name, code in FORMAT_CODES.items())
                         + ")")
    if width < 0 or width > MAX_STRIDE:
        raise ValueError(f"frame width {width} out of range")
    if fmt == VAS_BGR24 or fmt == VAS_RGB24:
        return 3 * width
    if fmt == VAS_BGRA or fmt == VAS_BGRX or fmt == VAS_RGBA or fmt == VAS_RGBX:
        return 4 * width
    return width  # YUV luma, GRAY8


cdef Py_ssize_t _frame_nbytes(int fmt, Py_ssize_t width, Py_ssize_t height,
                              Py_ssize_t stride) except -1:
    """The frame's size in bytes, after checking that the geometry is valid."""
    cdef Py_ssize_t packed = _min_stride(fmt, width)
    if width < 1 or width > MAX_DIM:
        raise ValueError(f"frame width {width} out of range 1..{MAX_DIM}")
    if height < 1 or height > MAX_DIM:
        raise ValueError(f"frame height {height} out of range 1..{MAX_DIM}")
    if _yuv420(fmt):
        if width % 2 or height % 2:
            raise ValueError(f"{_FORMAT_NAMES[fmt]} needs an even width and height, "
                             f"got {width}x{height}")
    if stride < packed or stride > MAX_STRIDE:
        raise ValueError(f"stride {stride} out of range for a {width}-pixel "
                         f"{_FORMAT_NAMES[fmt]} row (at least {packed})")
    if fmt == VAS_I420 and stride % 2:
        raise ValueError(f"I420 stride must be even (chroma rows are stride/2), got {stride}")
    return <Py_ssize_t>lb_frame_nbytes(fmt, <size_t>width, <size_t>height, <size_t>stride)


def min_stride(int fmt, Py_ssize_t width):
    """Packed row size of the first plane: width (NV12, NV21, I420, GRAY8), 3*width
    (BGR24, RGB24) or 4*width (BGRA, BGRx, RGBA, RGBx).
    ValueError for an unknown format or a negative (or absurd) width; 0 is allowed: this
    is a size rule, frame_nbytes() is the check."""
    return _min_stride(fmt, width)


def frame_nbytes(int fmt, Py_ssize_t width, Py_ssize_t height, Py_ssize_t stride):
    """Bytes the frame occupies from its first byte: NV12/NV21 stride*h*3/2, I420
    stride*h + 2*(stride/2)*(h/2), the packed formats and GRAY8 stride*h. ValueError for
    an invalid geometry (unknown format, size out of range, odd NV12/NV21/I420 size, stride
    too small or odd for I420)."""
    return _frame_nbytes(fmt, width, height, stride)


def letterbox_geometry(src_w, src_h, dst_w, dst_h):
    """(r, new_w, new_h, left, top) placing a src_w x src_h frame in a dst_w x dst_h
    input, as Ultralytics does: r = min(dst_w/src_w, dst_h/src_h), new = round(src*r),
    left = round((dst_w-new_w)/2 - 0.1), top likewise (Python's round). new_w and new_h
    are at least 1, so a 1x5000 frame still has a place."""
    # Untyped on purpose: Python int/float semantics (a C int would divide as integers).
    src_w, src_h, dst_w, dst_h = (_index(src_w), _index(src_h), _index(dst_w), _index(dst_h))
    if src_w < 1 or src_h < 1 or dst_w < 1 or dst_h < 1:
        raise ValueError(f"sizes must be positive: {src_w}x{src_h} -> {dst_w}x{dst_h}")
    r = min(dst_w / src_w, dst_h / src_h)
    new_w = max(1, round(src_w * r))
    new_h = max(1, round(src_h * r))
    left = round((dst_w - new_w) / 2 - 0.1)
    top = round((dst_h - new_h) / 2 - 0.1)
    return r, new_w, new_h, left, top


cdef int _normalization(object mean, object std, float *mean_out,
                        float *inv_std_out) except -1:
    """Per-plane mean and 1/std as the kernel takes them (None: 0 and 1)."""
    cdef double m, sd
    if mean is not None and len(mean) != 3:
        raise ValueError(f"mean must have 3 values, got {len(mean)}")
    if std is not None and len(std) != 3:
        raise ValueError(f"std must have 3 values, got {len(std)}")
    for c in range(3):
        m = 0.0 if mean is None else float(mean[c])
        sd = 1.0 if std is None else float(std[c])
        if not (m - m == 0.0):  # NaN or infinite
            raise ValueError(f"mean must be finite, got {m}")
        if not (sd > 0.0 and sd - sd == 0.0):
            raise ValueError(f"std must be finite and > 0, got {sd}")
        mean_out[c] = <float>m
        inv_std_out[c] = <float>(1.0 / sd)
    return 0


def letterbox_into(src, int fmt, Py_ssize_t width, Py_ssize_t height, Py_ssize_t stride,
                   float[:, :, ::1] out not None, Py_ssize_t new_w, Py_ssize_t new_h,
                   Py_ssize_t left, Py_ssize_t top, *, int threads=1, bint bgr=False,
                   int pad_value=114, mean=None, std=None, bint antialias=False):
    """Preprocess the frame in src into out, a C-contiguous float32 (3, H, W) buffer (a
    batch slot): the frame resized to new_w x new_h and placed with its top-left corner at
    (left, top) of out; left and top may be negative and the resized image larger than
    out (a centre crop): only what lands inside out is computed, the rest of out is the
    pad value. Each value is (v / 255 - mean[c]) * (1 / std[c]) for plane c (mean None:
    0, std None: 1, giving v / 255 in [0, 1] exactly); planes R, G, B, or B, G, R with
    bgr. pad_value (0..255, default 114) is normalized the same way. 1 / std is taken as
    a double rounded to float32, mean as float32.

    The resize is OpenCV's INTER_LINEAR (cv2.resize), or with antialias PIL's
    Image.resize(size, BILINEAR) (Pillow 13's: the vertical pass first when the height
    shrinks by more than twice the width), of the frame as RGB uint8 (YUV converted as
    cv2.cvtColor does, packed pixels' R, G, B bytes, alpha ignored, GRAY8 replicated),
    bit for bit; either way only the rows and
    columns that land inside out are computed.

    src: any object exporting a contiguous readable buffer (FrameView, bytes, mmap, numpy
    uint8 array) whose first byte is the frame's first byte, holding frame_nbytes() bytes.
    threads: split the output rows among this many threads (the calling one and
    threads - 1 from a persistent pool, started on first use and shared by concurrent
    calls: ranges no pool thread is free for run on the calling one; at most one per
    resized row is used). Every thread reads under the SIGBUS guard; the result is the
    same for any count.
    ValueError for an invalid frame geometry, a short buffer, a wrong out, a placement that
    does not overlap out, threads < 1 or > 64, pad_value outside 0..255, mean or std not 3
    finite values, a std <= 0.
    FrameBusError if the frame's memory vanishes while read, in any thread (the GIL is
    released).
    """
    if threads < 1 or threads > LB_MAX_THREADS:
        raise ValueError(f"threads must be in 1..{LB_MAX_THREADS}, got {threads}")
    cdef Py_ssize_t needed = _frame_nbytes(fmt, width, height, stride)
    if out.shape[0] != 3:
        raise ValueError("out must have shape (3, H, W), got "
                         f"{(out.shape[0], out.shape[1], out.shape[2])}")
    cdef Py_ssize_t out_h = out.shape[1], out_w = out.shape[2]
    if out_w < 1 or out_h < 1 or out_w > MAX_DIM or out_h > MAX_DIM:
        raise ValueError(f"out size {out_w}x{out_h} out of range 1..{MAX_DIM}")
    if (new_w < 1 or new_h < 1 or new_w > MAX_DIM or new_h > MAX_DIM
            or left >= out_w or top >= out_h or left + new_w <= 0 or top + new_h <= 0):
        raise ValueError(f"resized image {new_w}x{new_h} at ({left}, {top}) does not overlap "
                         f"out ({out_w}x{out_h})")
    if pad_value < 0 or pad_value > 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value}")
    cdef lb_job job
    _normalization(mean, std, job.mean, job.inv_std)

    cdef Py_buffer view
    cdef void *scratch = NULL
    cdef int rc = VAS_GUARD_OK
    cdef int install_errno = 0
    PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
    try:
        if view.len < needed:
            raise ValueError(f"frame buffer holds {view.len} bytes; a {width}x{height} "
                             f"{_FORMAT_NAMES[fmt]} frame with stride {stride} needs {needed}")
        job.frame = <const unsigned char *>view.buf
        job.format = fmt
        job.width = <int>width
        job.height = <int>height
        job.stride = <size_t>stride
        job.out = &out[0, 0, 0]
        job.out_w = <int>out_w
        job.out_h = <int>out_h
        job.new_w = <int>new_w
        job.new_h = <int>new_h
        job.left = <int>left
        job.top = <int>top
        job.order = LB_BGR if bgr else LB_RGB
        job.filter = LB_ANTIALIAS if antialias else LB_BILINEAR
        job.pad_value = pad_value
        with nogil:
            # Allocated outside the guards: a SIGBUS abandons a worker midway, never a malloc.
            scratch = malloc(lb_scratch_nbytes(&job, threads))
            if scratch != NULL:
                lb_plan(&job, scratch, threads)
                rc = lb_run(&job, &install_errno)
                free(scratch)
    finally:
        PyBuffer_Release(&view)
    if scratch == NULL:
        raise MemoryError()
    if rc == VAS_GUARD_SIGBUS:
        raise FrameBusError("the frame's memory vanished while it was read "
                            "(SIGBUS: file truncated under its mapping)")
    if rc == VAS_GUARD_INSTALL_FAILED:
        raise OSError(install_errno, "cannot install the SIGBUS handler")


# --- the GPU path's staging copy -----------------------------------------------------------

ctypedef struct _copy_job:
    const unsigned char *src
    unsigned char *dst
    size_t nbytes


cdef void _guarded_copy(void *arg) noexcept nogil:
    cdef _copy_job *job = <_copy_job *>arg
    memcpy(job.dst, job.src, job.nbytes)


def copy_frame_guarded(src, size_t dst_address, Py_ssize_t nbytes):
    """Copy the first `nbytes` bytes of `src` (any object exporting a contiguous readable
    buffer: FrameView, mmap, bytes, numpy array) to the host memory at `dst_address` (an
    integer address, e.g. a pinned staging buffer's ``OrtValue.data_ptr()``; the caller
    guarantees `nbytes` writable bytes there), without the GIL and under the SIGBUS guard.

    ValueError if `src` holds fewer than `nbytes` bytes, `nbytes` < 0 or the address is 0.
    FrameBusError if the source's memory vanishes while read (a mapped file truncated
    under its mapping); the destination then holds a partial copy.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if dst_address == 0:
        raise ValueError("dst_address is NULL")
    cdef Py_buffer view
    cdef _copy_job job
    cdef int rc = VAS_GUARD_OK
    cdef int install_errno = 0
    PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
    try:
        if view.len < nbytes:
            raise ValueError(f"source buffer holds {view.len} bytes, {nbytes} requested")
        job.src = <const unsigned char *>view.buf
        job.dst = <unsigned char *>dst_address
        job.nbytes = <size_t>nbytes
        if nbytes:
            with nogil:
                rc = vas_sigbus_guard_run(_guarded_copy, &job)
                if rc == VAS_GUARD_INSTALL_FAILED:
                    install_errno = errno
    finally:
        PyBuffer_Release(&view)
    if rc == VAS_GUARD_SIGBUS:
        raise FrameBusError("the frame's memory vanished while it was copied "
                            "(SIGBUS: file truncated under its mapping)")
    if rc == VAS_GUARD_INSTALL_FAILED:
        raise OSError(install_errno, "cannot install the SIGBUS handler")
