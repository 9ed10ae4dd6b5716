# letterbox.pxd: the C API behind letterbox.pyx (the fused kernel and the SIGBUS guard),
# for cimport by other _fast modules (the GPU path reuses the guard).
from libc.stdint cimport int32_t, uint8_t


cdef extern from "letterbox_kernel.h" nogil:
    enum:
        VAS_NV12
        VAS_I420
        VAS_BGR24
        VAS_RGB24
        VAS_NV21
        VAS_BGRA
        VAS_BGRX
        VAS_RGBA
        VAS_RGBX
        VAS_GRAY8

    enum:
        LB_RGB
        LB_BGR

    enum:
        LB_BILINEAR
        LB_ANTIALIAS

    ctypedef struct lb_job:
        const uint8_t *frame
        int format
        int width
        int height
        size_t stride
        float *out
        int out_w
        int out_h
        int new_w
        int new_h
        int left
        int top
        int order
        int filter
        float mean[3]
        float inv_std[3]
        int pad_value

    size_t lb_frame_nbytes(int format, size_t width, size_t height, size_t stride)
    enum:
        LB_MAX_THREADS

    size_t lb_scratch_nbytes(const lb_job *job, int threads)
    void lb_plan(lb_job *job, void *scratch, int threads)
    int lb_run(lb_job *job, int *install_errno)


cdef extern from "sigbus_guard.h" nogil:
    ctypedef void (*vas_guarded_fn)(void *arg) noexcept nogil

    enum:
        VAS_GUARD_OK
        VAS_GUARD_SIGBUS
        VAS_GUARD_INSTALL_FAILED

    int vas_sigbus_guard_run(vas_guarded_fn fn, void *arg)
