# Declarations of vasipc._fast.frameview, for kernels that cimport FrameView and read
# its bytes without going through Python. The implementation is in frameview.pyx.


cdef class FrameView:
    cdef const unsigned char *data   # the frame's first byte; NULL once closed
    cdef readonly Py_ssize_t length  # bytes in the frame
    cdef void *map_base              # what mmap returned (page aligned, at or before data)
    cdef size_t map_len
    cdef Py_ssize_t exports          # live Py_buffer exports; close() waits for none

    cdef int _unmap(self) except -1
