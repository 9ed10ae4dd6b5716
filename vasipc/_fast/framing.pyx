"""The contract's JSON nesting limit, checked on a framed body before it is parsed.

This module's one job: `json_depth_exceeds`, which tells whether [ and { nest deeper
than a limit outside JSON strings (docs/contract.md 2: a body nested deeper than 64
is `invalid_message`). It exists because no JSON library exposes a nesting limit cheaply;
the connection loop (connloop) frames the messages, and the parser judges the rest.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t
from libc.string cimport memset

cdef enum:
    # Below this a depth scan is cheaper than releasing and taking back the GIL.
    DEPTH_SCAN_NOGIL_ABOVE = 1 << 16


# The depth scan looks bytes up in these tables and skips runs of uninteresting ones
# without further branches: most of a JSON body is neither a bracket nor a quote.
cdef uint8_t STRUCTURAL[256]   # outside strings: 1 for [ {, 2 for ] }, 3 for "
cdef uint8_t STRING_STOP[256]  # inside strings: 1 for " and \
memset(STRUCTURAL, 0, sizeof(STRUCTURAL))
memset(STRING_STOP, 0, sizeof(STRING_STOP))
STRUCTURAL[c'['] = STRUCTURAL[c'{'] = 1
STRUCTURAL[c']'] = STRUCTURAL[c'}'] = 2
STRUCTURAL[c'"'] = 3
STRING_STOP[c'"'] = STRING_STOP[c'\\'] = 1


cdef bint depth_exceeds(const uint8_t *text, Py_ssize_t size,
                        Py_ssize_t max_depth) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t depth = 0
    cdef uint8_t kind
    while True:
        while i < size and STRUCTURAL[text[i]] == 0:
            i += 1
        if i >= size:
            return False
        kind = STRUCTURAL[text[i]]
        i += 1
        if kind == 1:
            depth += 1
            if depth > max_depth:
                return True
        elif kind == 2:
            depth -= 1
        else:
            # A string: on to its closing quote. A backslash escapes the byte after
            # it, so \" and \\ neither end nor extend the string.
            while True:
                while i < size and STRING_STOP[text[i]] == 0:
                    i += 1
                if i >= size:
                    return False
                i += 1
                if text[i - 1] == c'"':
                    break
                i += 1


def json_depth_exceeds(body, Py_ssize_t max_depth=64):
    """True when [ and { nest deeper than max_depth outside JSON strings.

    Only the depth is checked; the JSON parser judges everything else, so malformed
    text may answer either way.
    """
    cdef Py_buffer data
    cdef bint exceeds
    PyObject_GetBuffer(body, &data, PyBUF_SIMPLE)
    try:
        if data.len > DEPTH_SCAN_NOGIL_ABOVE:
            with nogil:
                exceeds = depth_exceeds(<const uint8_t *>data.buf, data.len, max_depth)
        else:
            exceeds = depth_exceeds(<const uint8_t *>data.buf, data.len, max_depth)
    finally:
        PyBuffer_Release(&data)
    return exceeds
