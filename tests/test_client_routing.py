"""vasipc.Client's routing over several sockets of one model (docs/scaling.md), exactly:
each request goes to a socket with the fewest requests outstanding from this client, ties
in turn, and a request that failed (timed out, or found no server) gives its count back.

The servers are fakes whose answers the test releases one by one, so every choice is
made against known counts; tests/test_client.py covers the same client against real
servers."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import orjson
import pytest

from vasipc.client import Client


class GatedServer:
    """A fake server on a Unix socket that answers each request (with its name) only when
    a permit is released for it, or at once once opened."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self.arrived = 0
        self._permits = 0
        self._open = False
        self._cond = threading.Condition()
        self._conns: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                head = conn.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                body = conn.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
                with self._cond:
                    self.arrived += 1
                    self._cond.notify_all()
                    while not self._open and self._permits == 0:
                        self._cond.wait()
                    if not self._open:
                        self._permits -= 1
                out = orjson.dumps({"op": orjson.loads(body).get("op"), "server": self.name})
                conn.sendall(struct.pack(">I", len(out)) + out)

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._permits += n
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        self.open()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept; close alone would not
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def gated(tmp_path) -> Iterator[Callable[[], GatedServer]]:
    servers: list[GatedServer] = []

    def start(path: str | None = None) -> GatedServer:
        name = f"s{len(servers)}"
        server = GatedServer(path or str(tmp_path / f"{name}.sock"), name)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


class Load:
    """Requests sent from threads through one client; `send` returns once the request
    has reached a server (so that the next choice sees it counted)."""

    def __init__(self, client: Client, servers: list[GatedServer]) -> None:
        self.client = client
        self.servers = servers
        self.answers: list[str] = []
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def arrivals(self) -> list[int]:
        return [s.arrived for s in self.servers]

    def send(self, socket_path: str | None = None) -> None:
        before = sum(self.arrivals())

        def run() -> None:
            try:
                self.answers.append(self.client.request({"op": "health"}, socket=socket_path)["server"])
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)
        wait_for(lambda: sum(self.arrivals()) == before + 1, "the request to reach a server")

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, self.errors


def test_each_request_goes_to_a_socket_with_the_fewest_outstanding(gated):
    a, b, c = gated(), gated(), gated()
    with Client([a.path, b.path, c.path], timeout=10) as client:
        load = Load(client, [a, b, c])
        for _ in range(3):
            load.send(a.path)  # pinned requests count as outstanding too
        load.send(b.path)
        assert load.arrivals() == [3, 1, 0]
        # Outstanding 3/1/0: five more fill the least loaded sockets up to a's three, one
        # at a time (c, then b and c by turns); round robin or random would send some to a.
        for _ in range(5):
            load.send()
        assert load.arrivals() == [3, 3, 3]
        a.release(2)  # two of a's answers: outstanding 1/3/3
        wait_for(lambda: len(load.answers) == 2, "a's two answers")
        load.send()
        load.send()
        assert load.arrivals() == [5, 3, 3]
        load.send()  # 3/3/3 again: any of them
        assert sum(load.arrivals()) == 12
        for server in (a, b, c):
            server.open()
        load.join()
    assert Counter(load.answers) == {s.name: s.arrived for s in (a, b, c)}


def test_ties_are_taken_in_turn(gated):
    servers = [gated() for _ in range(3)]
    for server in servers:
        server.open()
    with Client([s.path for s in servers], timeout=10) as client:
        answers = [client.request({"op": "health"})["server"] for _ in range(9)]
    assert [s.arrived for s in servers] == [3, 3, 3]
    assert answers[:3] == answers[3:6] == answers[6:]  # a fixed rotation


def test_a_timed_out_request_gives_its_count_back(gated):
    slow, fast = gated(), gated()
    fast.open()
    with Client([slow.path, fast.path], timeout=10) as client:
        with pytest.raises(TimeoutError):
            client.request({"op": "health"}, 0.3, socket=slow.path)
        slow.open()  # answers from now on; the timed-out request is no longer counted
        answers = [client.request({"op": "health"})["server"] for _ in range(4)]
    assert sorted(answers) == ["s0", "s0", "s1", "s1"]


def test_a_missing_socket_is_skipped_and_used_again_once_it_is_back(gated, tmp_path):
    later = str(tmp_path / "later.sock")
    up = gated()
    up.open()
    with Client([later, up.path], timeout=10) as client:
        # Nothing listens at `later`: each request that picks it first finds no server
        # (nothing sent) and goes to the other socket.
        assert [client.request({"op": "health"})["server"] for _ in range(4)] == ["s0"] * 4
        back = gated(later)  # a server (re)starts on the missing path
        back.open()
        answers = [client.request({"op": "health"})["server"] for _ in range(4)]
    assert sorted(answers) == ["s0", "s0", "s1", "s1"]
    back.close()  # its socket file stays, refusing connections: every socket unreachable
    with Client([later], timeout=2) as client, pytest.raises(ConnectionError, match=re.escape(later)):
        client.request({"op": "health"})
