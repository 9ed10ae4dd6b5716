# Filling a read-only 1-D uint8 buffer export (FrameView's mapping of a frame file).

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES


cdef inline void fill_readonly_buffer(Py_buffer *view, char *data, Py_ssize_t size,
                                      int flags) noexcept:
    """Lay out `view` as PyBuffer_FillInfo does, without touching view.obj (Cython owns it)."""
    view.buf = data
    view.len = size
    view.readonly = 1
    view.itemsize = 1
    view.format = NULL
    if flags & PyBUF_FORMAT:
        view.format = "B"
    view.ndim = 1
    # shape and strides point into the Py_buffer itself, which lives as long as the export.
    view.shape = NULL
    if (flags & PyBUF_ND) == PyBUF_ND:
        view.shape = &view.len
    view.strides = NULL
    if (flags & PyBUF_STRIDES) == PyBUF_STRIDES:
        view.strides = &view.itemsize
    view.suboffsets = NULL
    view.internal = NULL
