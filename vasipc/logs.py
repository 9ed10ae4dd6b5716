"""Logging for the server: text or JSON lines on stderr, and one line per error class.

A server answering thousands of requests a second must not log each failed one: a
misconfigured camera would flood the log with one message repeated. `ErrorLog` logs the
first response of each `error_code` at WARNING with its message, then at most one line
per code per interval (60 s) saying how many more there were; successful requests are
never logged.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s vasipc: %(message)s"
ERROR_LOG_INTERVAL_S = 60.0

# What every LogRecord carries; anything else on a record came from `extra=` and goes into
# the JSON object as a field of its own.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the record's
    extra fields, and `exception` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Send every log record to stderr, one line each (`fmt`: text or json)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class ErrorLog:
    """Logs error responses by class (`error_code`; the server's connections refused at
    accept too, as `peer_not_allowed`): the first at once, the rest as counts.

    `note` is called on the request path (I/O and worker threads): it takes one lock and
    logs only the first of a code. `flush` (the main thread, a few times a second) logs
    each code that had more errors once its interval has passed since its last line.
    Counts still pending at exit are not logged (no second line within the interval);
    /metrics has every error."""

    def __init__(self, logger: logging.Logger, interval_s: float = ERROR_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # code -> [when its last line was logged, errors since, the latest message]
        self._codes: dict[str, list] = {}

    def note(self, code: str, message: str, op: str = "infer") -> None:
        with self._lock:
            state = self._codes.get(code)
            if state is not None:
                state[1] += 1
                state[2] = message
                return
            self._codes[code] = [self._clock(), 0, message]
        self._log.warning("%s: %s (first %s error; more are counted, one line per %g s)",
                          code, message, code, self._interval,
                          extra={"error_code": code, "op": op})

    def flush(self) -> None:
        now = self._clock()
        due = []
        with self._lock:
            for code, state in self._codes.items():
                if state[1] and now - state[0] >= self._interval:
                    due.append((code, state[1], now - state[0], state[2]))
                    state[0], state[1] = now, 0
        for code, count, span, message in due:
            self._log.warning("%d more %s error(s) in the last %.0f s; latest: %s",
                              count, code, span, message,
                              extra={"error_code": code, "count": count})
