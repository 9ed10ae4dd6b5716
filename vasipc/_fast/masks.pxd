# masks.pxd: the C API behind masks.pyx (instance masks inside their boxes, mask_kernel.h).

cdef extern from "mask_kernel.h" nogil:
    enum:
        MK_RLE
        MK_POLYGON

    ctypedef struct mk_protos:
        const char *data
        Py_ssize_t c_stride
        Py_ssize_t y_stride
        Py_ssize_t x_stride
        int channels
        int height
        int width

    ctypedef struct mk_geometry:
        int top
        int left
        int in_h
        int in_w
        int src_w
        int src_h
        float scale_x
        float scale_y

    ctypedef struct mk_box:
        int x0
        int x1
        int y0
        int y1
        int cx0
        int cx1
        int cy0
        int cy1

    int mk_geometry_init(mk_geometry *g, int proto_h, int proto_w, int src_w, int src_h)
    void mk_box_init(mk_box *b, const mk_geometry *g, const float *xyxy)
    size_t mk_scratch_nbytes(const mk_geometry *g, const mk_box *b, int format)
    size_t mk_rle(const mk_geometry *g, const mk_protos *p, const char *coeffs,
                  Py_ssize_t coeff_stride, const mk_box *b, void *scratch, const char **counts)
    size_t mk_polygon(const mk_geometry *g, const mk_protos *p, const char *coeffs,
                      Py_ssize_t coeff_stride, const mk_box *b, void *scratch)
    void mk_polygon_points(const mk_geometry *g, const mk_box *b, const void *scratch,
                           float *points)
