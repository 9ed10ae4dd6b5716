"""The JSON codec of the wire, shared by server and client.

orjson, chosen by measurement (bench/RESULTS.md: fastest to decode and encode our
messages, and it rejects NaN, invalid UTF-8 and trailing data as RFC 8259 wants). Its one
gap: integers beyond 64 bits, which JSON allows (a `request_id` may have 128 digits),
decode to floats and do not encode; those rare bodies go through the standard library.
"""

from __future__ import annotations

import contextlib
import json
import re

import orjson

JSONDecodeError = orjson.JSONDecodeError
_LONG_DIGITS = re.compile(rb"[0-9]{20}")  # may be an integer beyond 64 bits


def loads(body: bytes | memoryview) -> object:
    msg = orjson.loads(body)
    if _LONG_DIGITS.search(body):  # orjson reads integers beyond 64 bits as floats: keep them
        with contextlib.suppress(ValueError):  # exact (> 4300 digits: keep orjson's float)
            msg = json.loads(bytes(body))
    return msg


def loads_fast(body: bytes | memoryview) -> object:
    """orjson alone: integers beyond 64 bits come back as floats. For callers that check
    the fields they read (`schema.has_inexact_ints`) and fall back to `loads_exact`."""
    return orjson.loads(body)


def loads_exact(body: bytes | memoryview) -> object:
    """Every integer exact (the standard library), for the rare body that needs it."""
    try:
        return json.loads(bytes(body))
    except ValueError:  # > 4300 digits: Python refuses the int; orjson's float it is
        return orjson.loads(body)


def dumps(obj: object) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits (an echoed request_id)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
