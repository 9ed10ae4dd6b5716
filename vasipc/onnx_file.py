"""What an ONNX file says about itself, read without a runtime: metadata and operator types.

Every backend reports the same facts for the same file (ONNX Runtime's `get_modelmeta()`
exists, OpenVINO drops `metadata_props`), and the `onnx` package is not a serving
dependency, so the few fields needed are read straight from the protobuf wire format:
`ModelProto.metadata_props` (field 14) and the `op_type` of the main graph's nodes
(`ModelProto.graph` 7 -> `GraphProto.node` 1 -> `NodeProto.op_type` 4). Everything else,
the weights included, is skipped by its length, on a read-only mapping of the file.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

# ONNX operators that only a quantized (int8) graph contains
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                           "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})


class OnnxFileError(ValueError):
    """Not an ONNX protobuf this reader can walk."""


@dataclass(frozen=True, slots=True)
class OnnxSummary:
    metadata: dict[str, str]
    op_types: frozenset[str]

    @property
    def quantized(self) -> bool:
        return not self.op_types.isdisjoint(QUANTIZED_OPS)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxFileError("truncated or malformed protobuf varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, value) of each field of one message: ints for varints and fixed
    widths, memoryviews for length-delimited fields."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise OnnxFileError("truncated protobuf field")
            value, pos = buf[pos:pos + n], pos + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        else:
            raise OnnxFileError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", "replace")


def summarize(buf: memoryview) -> OnnxSummary:
    metadata: dict[str, str] = {}
    ops: set[str] = set()
    for number, value in _fields(buf):
        if number == 14 and isinstance(value, memoryview):  # metadata_props
            entry = {k: _text(v) for k, v in _fields(value) if isinstance(v, memoryview)}
            if 1 in entry:
                metadata[entry[1]] = entry.get(2, "")
        elif number == 7 and isinstance(value, memoryview):  # graph
            for g_number, node in _fields(value):
                if g_number == 1 and isinstance(node, memoryview):
                    ops.update(_text(v) for n, v in _fields(node)
                               if n == 4 and isinstance(v, memoryview))
    return OnnxSummary(metadata, frozenset(ops))


def read_summary(path: str) -> OnnxSummary:
    """The metadata and operator types of the ONNX file at `path`; OnnxFileError or
    OSError when it cannot be read as one."""
    problem = None
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise OnnxFileError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return summarize(view)
            except OnnxFileError as exc:  # its traceback would pin views of the mapping
                problem = str(exc)
            finally:
                view.release()
    raise OnnxFileError(problem)
