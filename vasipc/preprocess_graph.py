"""Preprocessing as an ONNX graph, for GPU serving (issue 4; every family: issue 10).

On a GPU the frame should travel to the device as its raw bytes (NV12 is 1.5 bytes a
pixel against the 12 bytes a pixel of the float tensor) and colour conversion, resize,
padding and normalisation should run there. This module builds that work as a small
ONNX graph that ONNX Runtime runs before the model, from standard opset-17 ops that ORT
implements on both the CPU and the CUDA execution providers (opset 18 for an antialiased
``Resize``), so that it needs no new dependency and is tested here on the CPU provider.

One graph per pixel format, model input size and :class:`~vasipc.preprocess.Preprocess`
(resize mode, channel order, mean/std, pad value: what the C kernel takes); the frame
geometry is a runtime input, so one session serves every camera resolution:

- ``frame``: uint8 ``[N]``, the frame's bytes exactly as in the file (docs/contract.md 5.3):
  ``height`` rows of ``stride`` bytes, then the chroma rows for NV12 / NV21 / I420. Bytes
  past the frame's end are ignored.
- ``geometry``: int64 ``[7]``: ``width, height, stride, new_w, new_h, left, top``
  (:data:`GEOMETRY_FIELDS`), the last four from ``Preprocess.placement`` (a centre crop's
  left/top are negative and its resized image overhangs the input).
- ``images``: float32 ``[1, 3, in_h, in_w]``: the model's input (docs/contract.md 6), RGB or BGR
  planes, each ``(v / 255 - mean) / std``.

The graph follows the contract's OpenCV reference in float: BT.601 limited-range YUV ->
RGB with each chroma sample covering its 2x2 luma block (a nearest 2x ``Resize`` of the
chroma terms), rounded and clamped to 0..255 as cvtColor's uint8 output is; then bilinear
``Resize`` (``half_pixel``, no antialias: INTER_LINEAR's source positions); then ``/ 255``,
a ``Slice`` of what lies inside the input (centre crop only), ``Pad`` with
``pad_value / 255``, and ``(x - mean) * (1 / std)`` per plane (left out when mean is 0 and
std 1). The plane order costs nothing: YUV's colour coefficients and a packed frame's
byte gather are written in the wanted order (a packed pixel's alpha or padding byte is
never gathered; GRAY8's one byte is gathered three times). It matches the CPU kernel
(``_fast.letterbox``) within the contract's tolerance, not bit for bit.

``filter: antialias`` (PIL's resize, the classifiers') is ``Resize`` with ``antialias=1``
(opset 18) and ``exclude_outside=1`` (PIL renormalizes the weights at the image's
edges): the same triangle filter widened by the downscale factor, but in float and in
one step, where PIL rounds its 22-bit fixed-point passes to uint8 after each one (and
picks their order). Measured against the kernel: within 1/255 everywhere, mean about
0.25/255.

:class:`PreprocessSession` runs the graph by itself: for tests, and as the reference for
the integration. Serving on CUDA (feeding the frame through IO binding straight from the
mapped file, keeping ``images`` on the device for the model, or merging this graph into
the model's) is a later step, the lead's.

``onnx`` is needed only to build the graph; it is imported on use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vasipc.frames import FORMAT_NAMES, NV12, NV21, PACKED_LAYOUTS
from vasipc.preprocess import LETTERBOX, Preprocess

if TYPE_CHECKING:
    import onnx

OPSET = 17
OPSET_ANTIALIAS = 18  # Resize's antialias attribute
GEOMETRY_FIELDS = ("width", "height", "stride", "new_w", "new_h", "left", "top")
INPUT_FRAME, INPUT_GEOMETRY, OUTPUT = "frame", "geometry", "images"

# OpenCV's YUV420 -> RGB coefficients (color_yuv.simd.hpp: 20-bit fixed point), as floats.
_YUV_SCALE = float(1 << 20)
_CY = 1220542 / _YUV_SCALE
_CUB, _CUG = 2116026 / _YUV_SCALE, -409993 / _YUV_SCALE
_CVG, _CVR = -852492 / _YUV_SCALE, 1673527 / _YUV_SCALE


class _GraphBuilder:
    """Nodes and initializers of one graph, with generated names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0
        self._ints: dict[tuple[int, ...], str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        name = self._name(hint)
        self.initializers.append(self._numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, *values: int) -> str:
        """An int64 [len(values)] constant, shared by all its uses."""
        if values not in self._ints:
            self._ints[values] = self.const(list(values), np.int64, "i")
        return self._ints[values]

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs: Any) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(self._helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def slice(self, data: str, starts: str, ends: str, axes: Sequence[int],
              steps: Sequence[int] | None = None) -> str:
        inputs = [data, starts, ends, self.ints(*axes)]
        if steps is not None:
            inputs.append(self.ints(*steps))
        return self.op("Slice", *inputs)


def build_preprocess_graph(pixel_format: int, in_w: int, in_h: int,
                           preprocess: Preprocess = LETTERBOX) -> onnx.ModelProto:
    """The preprocessing graph for frames in `pixel_format` (a
    ``vasipc.frames.PIXEL_FORMATS`` code), a model input of `in_w` x `in_h` and
    `preprocess` (see the module docstring)."""
    try:
        from onnx import TensorProto, checker, helper
    except ImportError:
        raise RuntimeError("the preprocessing graph needs the onnx package: "
                           "pip install 'vasipc[gpu]' (or onnx)") from None

    if pixel_format not in FORMAT_NAMES:
        raise ValueError(f"unknown pixel format code {pixel_format}")
    if in_w < 1 or in_h < 1:
        raise ValueError(f"model input size {in_w}x{in_h} must be positive")

    g = _GraphBuilder()
    f32 = np.float32
    # The geometry, each field a [1] int64 tensor.
    field = {name: g.slice(INPUT_GEOMETRY, g.ints(i), g.ints(i + 1), [0])
             for i, name in enumerate(GEOMETRY_FIELDS)}
    width, height, stride = field["width"], field["height"], field["stride"]
    zero = g.ints(0)
    luma_bytes = g.op("Mul", stride, height)
    bgr = preprocess.channel_order == "bgr"

    if pixel_format in PACKED_LAYOUTS:
        # [height, stride] rows -> [height, width, bytes] -> [bytes, height, width] -> the
        # three wanted channels' planes.
        nbytes, channels = PACKED_LAYOUTS[pixel_format]
        rows = g.op("Reshape", g.slice(INPUT_FRAME, zero, luma_bytes, [0]),
                    g.op("Concat", height, stride, axis=0))
        hwc = g.op("Reshape", g.slice(rows, zero, g.op("Mul", width, g.ints(nbytes)), [1]),
                   g.op("Concat", height, width, g.ints(nbytes), axis=0))
        chw = g.op("Transpose", hwc, perm=[2, 0, 1])
        planes = channels[::-1] if bgr else channels
        if planes != (0, 1, 2) or nbytes != 3:  # not the bytes as they are
            chw = g.op("Gather", chw, g.ints(*planes), axis=0)
        rgb = g.op("Cast", g.op("Unsqueeze", chw, g.ints(0)), to=TensorProto.FLOAT)
    else:
        one, two = g.ints(1), g.ints(2)
        half_w, half_h = g.op("Div", width, two), g.op("Div", height, two)
        # Luma term max(Y - 16, 0) * 1.164 (OpenCV clamps Y below 16): [1, 1, height, width].
        y_rows = g.op("Reshape", g.slice(INPUT_FRAME, zero, luma_bytes, [0]),
                      g.op("Concat", height, stride, axis=0))
        y = g.op("Cast", g.slice(y_rows, zero, width, [1]), to=TensorProto.FLOAT)
        y = g.op("Reshape", y, g.op("Concat", one, one, height, width, axis=0))
        y_term = g.op("Mul", g.op("Relu", g.op("Sub", y, g.const(16, f32))), g.const(_CY, f32))
        # Chroma terms (R, G, B, or B, G, R) at chroma resolution: [3, height/2, width/2].
        u_coeff, v_coeff = (0.0, _CUG, _CUB), (_CVR, _CVG, 0.0)
        if bgr:
            u_coeff, v_coeff = u_coeff[::-1], v_coeff[::-1]
        if pixel_format in (NV12, NV21):
            # [height/2, width/2, 2] interleaved U, V (NV21: V, U), centred on 128, times
            # [2, 3].
            uv_end = g.op("Add", luma_bytes, g.op("Mul", stride, half_h))
            # (The stride may be odd: cut the rows to `width` bytes before pairing them.)
            uv = g.op("Reshape", g.slice(INPUT_FRAME, luma_bytes, uv_end, [0]),
                      g.op("Concat", half_h, stride, axis=0))
            uv = g.op("Reshape", g.slice(uv, zero, width, [1]),
                      g.op("Concat", half_h, half_w, two, axis=0))
            uv = g.op("Cast", uv, to=TensorProto.FLOAT)
            uv = g.op("Sub", uv, g.const(128, f32))
            pair = [u_coeff, v_coeff] if pixel_format == NV12 else [v_coeff, u_coeff]
            chroma = g.op("MatMul", uv, g.const(pair, f32))
            chroma = g.op("Transpose", chroma, perm=[2, 0, 1])
        else:
            # U and V planes [1, height/2, width/2], each times its [3, 1, 1] coefficients.
            chroma_stride = g.op("Div", stride, two)
            plane = g.op("Mul", chroma_stride, half_h)
            u_end = g.op("Add", luma_bytes, plane)
            v_end = g.op("Add", u_end, plane)
            shape = g.op("Concat", one, half_h, chroma_stride, axis=0)
            terms = []
            for begin, end, coeff in ((luma_bytes, u_end, u_coeff), (u_end, v_end, v_coeff)):
                c = g.slice(g.op("Reshape", g.slice(INPUT_FRAME, begin, end, [0]), shape),
                            zero, half_w, [2])
                c = g.op("Sub", g.op("Cast", c, to=TensorProto.FLOAT), g.const(128, f32))
                terms.append(g.op("Mul", c, g.const(np.reshape(coeff, (3, 1, 1)), f32)))
            chroma = g.op("Add", *terms)
        # Each chroma sample covers its 2x2 luma block (nearest upsampling, as OpenCV's
        # YUV420 conversion): [1, 3, height, width], plus the luma term.
        chroma = g.op("Resize", g.op("Unsqueeze", chroma, zero), "",
                      g.const([1, 1, 2, 2], f32), mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        rgb = g.op("Add", y_term, chroma)
        # cvtColor's uint8 result: round and clamp.
        rgb = g.op("Clip", g.op("Round", rgb), g.const(0, f32), g.const(255, f32))

    new_w, new_h = field["new_w"], field["new_h"]
    left, top = field["left"], field["top"]
    sizes = g.op("Concat", g.ints(1, 3), new_h, new_w, axis=0)
    antialias = ({"antialias": 1, "exclude_outside": 1} if preprocess.filter == "antialias"
                 else {})
    resized = g.op("Resize", rgb, "", "", sizes, mode="linear",
                   coordinate_transformation_mode="half_pixel", **antialias)
    scaled = g.op("Div", resized, g.const(255, f32))
    if preprocess.resize == "center_crop":
        # Only a centre crop places the image at negative offsets or past the input's
        # edges: keep resized rows/columns [max(-top, 0), min(new_h, in_h - top)), ...
        crop_y, crop_x = (g.op("Max", g.op("Neg", v), zero) for v in (top, left))
        end_y = g.op("Min", new_h, g.op("Sub", g.ints(in_h), top))
        end_x = g.op("Min", new_w, g.op("Sub", g.ints(in_w), left))
        scaled = g.slice(scaled, g.op("Concat", crop_y, crop_x, axis=0),
                         g.op("Concat", end_y, end_x, axis=0), [2, 3])
        # ... which land at output (max(top, 0), max(left, 0)), new_* now what is kept
        top, left = g.op("Add", top, crop_y), g.op("Add", left, crop_x)
        new_h, new_w = g.op("Sub", end_y, crop_y), g.op("Sub", end_x, crop_x)
    bottom = g.op("Sub", g.op("Sub", g.ints(in_h), new_h), top)
    right = g.op("Sub", g.op("Sub", g.ints(in_w), new_w), left)
    pads = g.op("Concat", g.ints(0, 0), top, left, g.ints(0, 0), bottom, right, axis=0)
    pad_value = g.const(np.float32(preprocess.pad_value) / np.float32(255), f32)
    padded = g.op("Pad", scaled, pads, pad_value, mode="constant")
    if preprocess.mean != (0.0, 0.0, 0.0) or preprocess.std != (1.0, 1.0, 1.0):
        # (x - mean) * (1 / std) with the kernel's float32 constants
        mean = g.const(np.reshape(preprocess.mean, (1, 3, 1, 1)), f32)
        inv_std = g.const(np.reshape([1.0 / v for v in preprocess.std], (1, 3, 1, 1)), f32)
        padded = g.op("Mul", g.op("Sub", padded, mean), inv_std)
    g.nodes[-1].output[0] = OUTPUT  # the last node's result is the graph's output

    graph = helper.make_graph(
        g.nodes, f"vasipc_preprocess_fmt{pixel_format}_{in_w}x{in_h}_{preprocess.resize}",
        [helper.make_tensor_value_info(INPUT_FRAME, TensorProto.UINT8, ["frame_bytes"]),
         helper.make_tensor_value_info(INPUT_GEOMETRY, TensorProto.INT64, [len(GEOMETRY_FIELDS)])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, 3, in_h, in_w])],
        initializer=g.initializers)
    opset = OPSET_ANTIALIAS if antialias else OPSET
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="vasipc")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    checker.check_model(model, full_check=True)
    return model


def geometry_input(width: int, height: int, stride: int,
                   placement: tuple[int, int, int, int]) -> np.ndarray:
    """The ``geometry`` input for a frame (see GEOMETRY_FIELDS), from its placement
    ``(new_w, new_h, left, top)`` (``Preprocess.placement``)."""
    return np.array([width, height, stride, *placement], dtype=np.int64)


class PreprocessSession:
    """An ONNX Runtime session of one preprocessing graph: ``run`` takes a frame's bytes
    and returns the model's input tensor ``[1, 3, in_h, in_w]``."""

    def __init__(self, pixel_format: int, in_w: int, in_h: int,
                 providers: Sequence[Any] = ("CPUExecutionProvider",),
                 sess_options: Any = None, preprocess: Preprocess = LETTERBOX) -> None:
        import onnxruntime as ort

        self.pixel_format, self.in_w, self.in_h = pixel_format, in_w, in_h
        self.preprocess = preprocess
        model = build_preprocess_graph(pixel_format, in_w, in_h, preprocess)
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=sess_options,
                                            providers=list(providers))

    def geometry(self, width: int, height: int, stride: int) -> np.ndarray:
        """The ``geometry`` input for a frame (see GEOMETRY_FIELDS)."""
        _, placement = self.preprocess.placement(width, height, self.in_w, self.in_h)
        return geometry_input(width, height, stride, placement)

    def run(self, frame_bytes: np.ndarray, width: int, height: int, stride: int) -> np.ndarray:
        """Preprocess one frame: `frame_bytes` a uint8 1-D array (a view is used as is, not
        copied), holding at least the frame's bytes. ValueError on a bad size or stride."""
        from vasipc._fast.letterbox import frame_nbytes

        needed = frame_nbytes(self.pixel_format, width, height, stride)
        if (not isinstance(frame_bytes, np.ndarray) or frame_bytes.dtype != np.uint8
                or frame_bytes.ndim != 1):
            raise ValueError("frame_bytes must be a 1-D uint8 array")
        if frame_bytes.size < needed:
            raise ValueError(f"frame buffer holds {frame_bytes.size} bytes, needs {needed}")
        feeds = {INPUT_FRAME: frame_bytes[:needed],
                 INPUT_GEOMETRY: self.geometry(width, height, stride)}
        return self.session.run([OUTPUT], feeds)[0]
