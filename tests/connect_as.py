"""Connect to a vasipc socket as another user and ask `health` (tests/test_allow_peer.py).

`python connect_as.py UID GID GROUPS SOCKET` (run as root; GROUPS: comma-separated
supplementary gids, may be empty) drops to those ids, connects, sends one `health`
request and prints one JSON line: pid (what the server's SO_PEERCRED sees), answer (the
response, or null), received (bytes read), closed (EOF or reset before a whole answer),
error (connect refused, timeout: text, or null).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys

import wire


def ask_health(path: str) -> dict:
    out: dict = {"pid": os.getpid(), "answer": None, "received": 0, "closed": False, "error": None}
    try:
        with wire.connect(path, timeout=20.0) as s:
            # closed before the request went out: the reads below say so
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                wire.send(s, {"op": "health"})
            got = bytearray()
            while len(got) < 4 or len(got) < 4 + struct.unpack(">I", got[:4])[0]:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    out["closed"] = True
                    break
                got += chunk
            out["received"] = len(got)
            if not out["closed"]:
                out["answer"] = json.loads(got[4:])
    except (OSError, ValueError) as exc:  # a timeout is an OSError too
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    uid, gid, groups, path = sys.argv[1:5]
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(int(gid))
    os.setuid(int(uid))  # last: afterwards nothing may change the ids back
    assert (os.geteuid(), os.getegid()) == (int(uid), int(gid))
    print(json.dumps(ask_health(path)))


if __name__ == "__main__":
    main()
