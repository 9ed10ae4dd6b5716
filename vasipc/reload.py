"""Hot reload: load a new model beside the serving one, warm it up, swap it in.

A reload is asked for by SIGHUP or, with `--watch`, by a change of the files the model
comes from (weights, model.yaml, labels, version directories). One background thread
does the work, so serving never waits for it: it loads and warms up the new model (the
same `load_model` as at start, every batch size included), then swaps one reference
(`Server.swap_model`). A batch captures its model when it starts, so requests already in
a batch finish on the old session and later ones run on the new one; each response's
`metadata.model_version` says which. A model that fails to load or warm up is refused
with one log line and the old one keeps serving.

Watching polls: a weights file being copied changes on every poll, so a change is acted
on only once the files have stayed the same for one more interval (a half-written file
is not loaded). A signature that failed to load is not retried until it changes again
(or a SIGHUP asks).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from vasipc.errors import first_line

if TYPE_CHECKING:
    from vasipc.model import LoadedModel
    from vasipc.server import Server

log = logging.getLogger("vasipc")


def file_signature(paths: Iterable[str]) -> dict[str, tuple | None]:
    """What a watcher compares: path -> (inode, size, mtime), None for a missing path (a
    directory's mtime moves when an entry is added, removed or renamed, so a new version
    directory shows)."""
    sig: dict[str, tuple | None] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            sig[path] = None
            continue
        sig[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return sig


class Reloader:
    """The reload thread of one server.

    load() returns a loaded, warmed-up model or raises. watched() (its paths stat'ed
    every `interval` seconds) turns on watching; `initial` is their file_signature taken
    before the serving model was loaded (a change during the load is seen). `trigger` is
    the Event a SIGHUP handler sets.
    """

    def __init__(self, load: Callable[[], LoadedModel], server: Server, *,
                 trigger: threading.Event | None = None,
                 watched: Callable[[], list[str]] | None = None, interval: float = 2.0,
                 initial: dict[str, tuple | None] | None = None) -> None:
        self._load = load
        self._server = server
        self._trigger = trigger or threading.Event()
        self._watched = watched
        self._interval = interval
        self._initial = initial or {}  # the signature taken before the serving model loaded
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="vasipc-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._trigger.set()

    def request(self) -> None:
        """Ask for a reload (async-signal safe enough: one Event.set)."""
        self._trigger.set()

    def _run(self) -> None:
        watching = self._watched is not None
        last = self._initial  # the files as they were when the serving model was loaded
        seen = last  # the newest poll, acted on once it has held for an interval
        while True:
            asked = self._trigger.wait(self._interval if watching else None)
            if self._stopped:
                return
            sig = self._signature() if watching else {}
            if asked:
                self._trigger.clear()
                reason = "SIGHUP"
            else:
                # Each poll is a debug line, so a test can wait for polls instead of time.
                log.debug("watch poll: %s", "no change" if sig == last else "a change")
                if sig == last or sig != seen:
                    seen = sig  # unchanged, or still changing: look again next interval
                    continue
                reason = "a watched file changed"
            self._reload(reason)
            # A model that failed is not retried until its files change again. A new model
            # may come from other files (a new version directory, a new labels file): they
            # join the watch as they are now; the files watched before keep the state the
            # load started from, so a change made during the load is still seen.
            now = self._signature() if watching else {}
            last = seen = {path: sig.get(path, state) for path, state in now.items()}

    def _signature(self) -> dict[str, tuple | None]:
        try:
            return file_signature(self._watched())
        except OSError as exc:  # an unreadable directory is a state too, compared as such
            return {"": ("error", str(exc))}

    def _reload(self, reason: str) -> None:
        server = self._server
        if server.draining:
            return
        t0 = time.monotonic()
        try:
            model = self._load()
        except Exception as exc:
            log.error("reload refused (%s): %s; still serving version %s", reason,
                      first_line(exc), server.model.spec.model_version,
                      extra={"reload": "failed", "model_version": server.model.spec.model_version})
            server.record_reload(False)
            return
        if server.draining or self._stopped:  # SIGTERM came during the load: not worth a swap
            log.info("reload (%s) dropped: the server is stopping", reason)
            return
        old = server.swap_model(model)
        log.info("reloaded (%s): version %s -> %s, providers %s, loaded and warmed up in %.2f s",
                 reason, old.spec.model_version, model.spec.model_version,
                 ",".join(model.providers), time.monotonic() - t0,
                 extra={"reload": "ok", "model_version": model.spec.model_version,
                        "previous_version": old.spec.model_version})
        server.record_reload(True)
