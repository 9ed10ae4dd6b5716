"""The compiled core of vasipc (Cython + C). Built by CMake; see build.py.

There is no pure-Python fallback in the product: a missing extension is a broken install,
and it fails here, loudly, naming the module and how to build it.
"""

try:
    from vasipc._fast import connloop, decode, frameview, framing, letterbox, masks  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a broken install only
    raise ImportError(
        f"vasipc's compiled core is missing or broken ({exc}). Install the package with "
        "`pip install .` or build it in place with `python build.py`."
    ) from exc
