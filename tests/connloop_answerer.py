"""The callbacks the connection-loop fuzz runs with (tests/test_connloop.py's Hypothesis
fuzz and tests/fuzz/fuzz_connloop.py): an answer derived from each request, given three
ways, so that the loop's ordering of answers is what is tested."""

from __future__ import annotations

import queue
import random
import threading

from vasipc._fast import connloop

MODES = ["sync", "inside", "deferred", "mixed"]
BURST_WAIT_S = 0.0001


def answer_for(slot: int, body: bytes) -> bytes:
    # The body, twice: big bodies make answers big enough to fill the socket (its send
    # buffer is about 200 KiB) and take the loop's partial write and out-buffer paths
    # when the client reads late.
    return b"%d:" % slot + body + body


def bad_answer_for(slot: int, length: int) -> bytes:
    return b"bad %d @%d" % (length, slot)


class Answerer:
    """on_message / on_bad_length. `mode` (it may change between inputs) "sync": return
    the answer; "inside": send_response() it from inside the callback; "deferred": hand it
    to the worker thread, which answers what is pending in random order; "mixed": one of
    the three per message. Problems are collected in `errors`."""

    def __init__(self, mode: str = "sync", seed: int = 0) -> None:
        self.mode = mode
        self.rng = random.Random(seed)  # used on the loop thread only
        self.work: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.worker = threading.Thread(target=self._answer_pending,
                                       args=(random.Random(seed + 1),), daemon=True)
        self.worker.start()

    def on_message(self, conn: connloop.Connection, slot: int, body: bytes) -> bytes | None:
        way = self.mode if self.mode != "mixed" else self.rng.choice(MODES[:3])
        if way == "sync":
            return answer_for(slot, body)
        if way == "inside":
            if not conn.send_response(slot, answer_for(slot, body)):
                self.errors.append(f"send_response({slot}) inside on_message: False")
            return None
        self.work.put((conn, slot, body))
        return None

    def on_bad_length(self, conn: connloop.Connection, slot: int, length: int) -> bytes:
        return bad_answer_for(slot, length)

    def _answer_pending(self, rng: random.Random) -> None:
        pending: list[tuple[connloop.Connection, int, bytes]] = []
        while True:
            try:
                # Gather what comes in a burst, then answer one at random. The wait is short:
                # at pipeline depth 1 every message pays it (1 ms made long streams take
                # seconds, most of a fuzz run's time).
                item = self.work.get(timeout=BURST_WAIT_S if pending else None)
            except queue.Empty:
                conn, slot, body = pending.pop(rng.randrange(len(pending)))
                try:
                    if not conn.send_response(slot, answer_for(slot, body)):
                        self.errors.append(f"send_response({slot}) from the worker: False")
                except Exception as exc:  # reported by the input that owns the connection
                    self.errors.append(f"send_response({slot}) from the worker: {exc!r}")
                continue
            if item is None:
                return
            pending.append(item)

    def stop(self, timeout: float = 10.0) -> None:
        self.work.put(None)
        self.worker.join(timeout)
