"""The contract's JSON nesting limit, checked on a framed body before it is parsed. See framing.pyx."""

from typing_extensions import Buffer

def json_depth_exceeds(body: Buffer, max_depth: int = 64) -> bool: ...
