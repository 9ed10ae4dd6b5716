"""A lint over the compiled core's own sources (vasipc/_fast/*.c, *.h, *.pyx, *.pxi).

Two textual rules, cheap enough to run with every test run, written for every module
in vasipc/_fast, present and future:

1. Paired calls: a file that acquires a resource also releases it (mmap/munmap,
   malloc/free, PyMem_Malloc/PyMem_Free, open/close, PyObject_GetBuffer/PyBuffer_Release,
   ...). It does not prove every path releases; it catches the release that was
   never written.
2. GIL-free code calls no Python API: the body of every `with nogil:` block and
   `nogil` function in .pyx/.pxi, and every Py_BEGIN_ALLOW_THREADS region in C.
   Cython rejects most Python operations there itself; this catches C-API functions
   declared nogil by mistake, `raise`, and `print`.

Comments and string literals are blanked before matching, so prose never trips a rule.
The rules are tested on small made-up sources at the end of this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

FAST = Path(__file__).resolve().parents[1] / "vasipc" / "_fast"
SUFFIXES = (".c", ".h", ".pyx", ".pxi")
CYTHON_SUFFIXES = (".pyx", ".pxi")

_NOT_AFTER = r"(?<![\w.])(?<!->)"  # a free function, not a method, a field or a longer name


def _call(*names: str) -> re.Pattern[str]:
    return re.compile(_NOT_AFTER + r"(?:" + "|".join(names) + r")\s*\(")


@dataclass(frozen=True)
class Pair:
    what: str
    acquire: re.Pattern[str]
    release: re.Pattern[str]


PAIRS = (
    Pair("mmap without munmap", _call("mmap", "mmap64", "mremap"), _call("munmap")),
    Pair("malloc/calloc/realloc without free",
         _call("malloc", "calloc", "realloc", "reallocarray", "aligned_alloc",
               "posix_memalign", "strdup", "strndup"),
         _call("free")),
    Pair("PyMem_Malloc without PyMem_Free",
         _call("PyMem_Malloc", "PyMem_Calloc", "PyMem_Realloc", "PyMem_New", "PyMem_Resize"),
         _call("PyMem_Free", "PyMem_Del")),
    Pair("PyMem_RawMalloc without PyMem_RawFree",
         _call("PyMem_RawMalloc", "PyMem_RawCalloc", "PyMem_RawRealloc"),
         _call("PyMem_RawFree")),
    Pair("PyObject_Malloc without PyObject_Free",
         _call("PyObject_Malloc", "PyObject_Calloc", "PyObject_Realloc"),
         _call("PyObject_Free", "PyObject_Del")),
    Pair("a file descriptor opened without close",
         _call("open", "open64", "openat", "creat", "dup", "dup3", "socket", "socketpair",
               "accept", "accept4", "eventfd", "memfd_create", "timerfd_create",
               "epoll_create", "epoll_create1", "shm_open"),
         _call("close")),
    Pair("fopen without fclose", _call("fopen", "fdopen", "tmpfile"), _call("fclose")),
    Pair("PyObject_GetBuffer without PyBuffer_Release",
         _call("PyObject_GetBuffer"), _call("PyBuffer_Release")),
    Pair("PyGILState_Ensure without PyGILState_Release",
         _call("PyGILState_Ensure"), _call("PyGILState_Release")),
    Pair("PyEval_SaveThread without PyEval_RestoreThread",
         _call("PyEval_SaveThread"), _call("PyEval_RestoreThread")),
    Pair("pthread_mutex_lock without pthread_mutex_unlock",
         _call("pthread_mutex_lock", "pthread_mutex_trylock"), _call("pthread_mutex_unlock")),
)

# Python C-API names that need no GIL.
_GIL_FREE_API = re.compile(
    r"PyMem_Raw\w+|PyThread_\w+|Py_UNREACHABLE|Py_MIN|Py_MAX|Py_ABS|Py_ARRAY_LENGTH|"
    r"Py_UNUSED|Py_BEGIN_ALLOW_THREADS|Py_END_ALLOW_THREADS|Py_BLOCK_THREADS|"
    r"Py_UNBLOCK_THREADS|PyGILState_Ensure|Py_LL|Py_ULL"
)
_PY_API_CALL = re.compile(r"(?<![\w.])(Py[A-Za-z]*_\w+|_Py\w+)\s*\(")
_PYTHON_ONLY = re.compile(r"(?<![\w.])(raise|print\s*\(|yield|await|import)\b")


# ---- blanking comments and strings ---------------------------------------------------

def _blank(match: re.Match[str]) -> str:
    # Keep newlines (line numbers) and the quotes; blank the rest.
    text = match.group(0)
    return "".join(ch if ch == "\n" else " " for ch in text)


_C_NOISE = re.compile(
    r"/\*.*?\*/|//[^\n]*|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)
_PY_NOISE = re.compile(
    r"#[^\n]*"
    r"|[rRbBuUfFcC]{0,2}(?:\"\"\"(?:\\.|[^\\])*?\"\"\"|'''(?:\\.|[^\\])*?''')"
    r"|[rRbBuUfFcC]{0,2}(?:\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*')",
    re.S)


def strip_noise(text: str, suffix: str) -> str:
    if suffix in CYTHON_SUFFIXES:
        text = _PY_NOISE.sub(_blank, text)
        return _drop_extern_blocks(text)
    text = re.sub(r"^\s*#\s*include[^\n]*", "", text, flags=re.M)
    return _C_NOISE.sub(_blank, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_after(lines: list[str], header: int, header_indent: int) -> range:
    """Line numbers of the indented block that follows the line `header`."""
    end = header + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > header_indent):
        end += 1
    return range(header + 1, end)


def _drop_extern_blocks(text: str) -> str:
    # `cdef extern from` blocks declare functions; a declaration is not a call.
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if re.match(r"\s*cdef\s+extern\b", line):
            for j in [i, *_block_after(lines, i, _indent(line))]:
                lines[j] = ""
    return "\n".join(lines)


# ---- rule 1: paired calls ------------------------------------------------------------

def unpaired_calls(text: str, suffix: str) -> list[str]:
    code = strip_noise(text, suffix)
    if suffix in CYTHON_SUFFIXES:
        # Python's own open() in `with open(...)` closes itself; a `def open` is a name.
        code = re.sub(r"\b(with\s+open|def\s+\w+)\s*\(", " (", code)
    problems = []
    for pair in PAIRS:
        found = pair.acquire.search(code)
        if found and not pair.release.search(code):
            line = code.count("\n", 0, found.start()) + 1
            problems.append(f"line {line}: {pair.what}")
    return problems


# ---- rule 2: no Python API without the GIL -------------------------------------------

def _nogil_regions_cython(code: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every `with nogil` block and nogil function body,
    less any `with gil` block nested in them."""
    lines = code.split("\n")
    regions = []
    i = 0
    while i < len(lines):
        line = lines[i]
        header_end = None
        if re.match(r"\s*with\s+(cython\.)?nogil\b", line):
            header_end = i
        elif re.match(r"\s*c(p)?def\b", line) and "(" in line:
            # A function signature, perhaps over several lines, up to its colon.
            j, depth = i, 0
            while j < len(lines):
                depth += lines[j].count("(") - lines[j].count(")")
                if depth <= 0 and lines[j].rstrip().endswith(":"):
                    break
                j += 1
            signature = " ".join(lines[i : j + 1])
            if j < len(lines) and re.search(r"\)\s*[^()]*\bnogil\b[^()]*:\s*$", signature):
                header_end = j
        if header_end is not None:
            body = _block_after(lines, header_end, _indent(line))
            kept: list[str] = []
            skip_below = None
            for k in body:
                text = lines[k]
                if skip_below is not None and (not text.strip() or _indent(text) > skip_below):
                    kept.append("")
                    continue
                skip_below = None
                if re.match(r"\s*with\s+(cython\.)?gil\b", text):
                    skip_below = _indent(text)
                    kept.append("")
                    continue
                kept.append(text)
            regions.append((body.start + 1, kept))
        i += 1
    return regions


def _nogil_regions_c(code: str) -> list[tuple[int, list[str]]]:
    regions = []
    for m in re.finditer(r"Py_BEGIN_ALLOW_THREADS(.*?)Py_END_ALLOW_THREADS", code, re.S):
        regions.append((code.count("\n", 0, m.start()) + 1, m.group(1).split("\n")))
    return regions


def python_api_without_gil(text: str, suffix: str) -> list[str]:
    code = strip_noise(text, suffix)
    if suffix in CYTHON_SUFFIXES:
        regions = _nogil_regions_cython(code)
        forbidden = (_PY_API_CALL, _PYTHON_ONLY)
    else:
        regions = _nogil_regions_c(code)
        forbidden = (_PY_API_CALL,)
    problems = []
    for first_line, lines in regions:
        for offset, line in enumerate(lines):
            for pattern in forbidden:
                for m in pattern.finditer(line):
                    name = m.group(0).rstrip("( ")
                    if _GIL_FREE_API.fullmatch(name):
                        continue
                    problems.append(f"line {first_line + offset}: {name} without the GIL")
    return problems


# ---- the lint, over every source in vasipc/_fast -------------------------------------

def _sources() -> list[Path]:
    paths = []
    for path in sorted(FAST.iterdir()):
        if path.suffix not in SUFFIXES:
            continue
        if path.suffix == ".c" and path.read_text(errors="replace").startswith(
                "/* Generated by Cython"):
            continue  # Cython's output from an in-tree cythonize, not our code
        paths.append(path)
    return paths


SOURCES = _sources()


def test_there_are_sources_to_lint():
    assert any(p.name == "framing.pyx" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_calls_are_paired(path):
    assert unpaired_calls(path.read_text(), path.suffix) == []


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_python_api_without_the_gil(path):
    assert python_api_without_gil(path.read_text(), path.suffix) == []


# ---- the rules themselves, on made-up sources ----------------------------------------

@pytest.mark.parametrize(("source", "suffix", "expected"), [
    ("void *p = mmap(0, n, PROT_READ, MAP_SHARED, fd, 0);", ".c", ["mmap without munmap"]),
    ("void *p = mmap(0, n, 1, 1, fd, 0); munmap(p, n);", ".c", []),
    ("char *s = malloc(4);", ".c", ["malloc/calloc/realloc without free"]),
    ("char *s = malloc(4); free(s);", ".c", []),
    ("int fd = open(path, O_RDONLY);", ".c", ["a file descriptor opened without close"]),
    ("cdef char *p = <char *>PyMem_Malloc(8)", ".pyx", ["PyMem_Malloc without PyMem_Free"]),
    ("cdef char *p = <char *>PyMem_Malloc(8)\nPyMem_Free(p)", ".pyx", []),
    ("PyObject_GetBuffer(o, &b, 0)", ".pyx", ["PyObject_GetBuffer without PyBuffer_Release"]),
    ("PyObject_GetBuffer(o, &b, 0)\nPyBuffer_Release(&b)", ".pyx", []),
    # prose, strings, declarations and Python's own open() do not count
    ("/* we mmap( here */ // malloc(\nconst char *s = \"open(\";", ".c", []),
    ("# mmap(\nx = 'malloc(' + \"\"\"open(\n\"\"\"", ".pyx", []),
    ('cdef extern from "<sys/mman.h>":\n    void *mmap(void *a, size_t n)\nx = 1', ".pyx", []),
    ("with open(path) as f:\n    pass\ndef open(self):\n    pass", ".pyx", []),
    ("self.sock.open(x)\nos.open(p, 0)", ".pyx", []),
    ("s->open(x); munmapped(p);", ".c", []),
])
def test_pair_rule(source, suffix, expected):
    assert [p.split(": ", 1)[1] for p in unpaired_calls(source, suffix)] == expected


@pytest.mark.parametrize(("source", "suffix", "expected"), [
    ("with nogil:\n    n = recv(fd, buf, 10, 0)\nx = PyLong_FromLong(n)", ".pyx", []),
    ("with nogil:\n    n = recv(fd, buf, 10, 0)\n    Py_INCREF(o)", ".pyx", ["Py_INCREF"]),
    ("with nogil:\n    if n < 0:\n        raise OSError()", ".pyx", ["raise"]),
    ("with nogil:\n    p = PyMem_RawMalloc(4)\n    with gil:\n        raise ValueError()\n"
     "    PyMem_RawFree(p)", ".pyx", []),
    ("cdef int f(int fd,\n           int n) noexcept nogil:\n    return PyErr_Occurred()\n"
     "y = PyErr_Occurred()", ".pyx", ["PyErr_Occurred"]),
    ("cdef int f(int fd) except -1:\n    return PyErr_Occurred() != NULL", ".pyx", []),
    ("with nogil:\n    x = 1  # raise nothing, PyErr_Occurred( in a comment\n"
     "    s = 'print(1)'", ".pyx", []),
    ("Py_BEGIN_ALLOW_THREADS\n n = read(fd, b, 1);\n Py_DECREF(o);\nPy_END_ALLOW_THREADS\n"
     "Py_DECREF(o);", ".c", ["Py_DECREF"]),
])
def test_gil_rule(source, suffix, expected):
    found = python_api_without_gil(source, suffix)
    assert [p.split(": ", 1)[1].split(" without")[0] for p in found] == expected
