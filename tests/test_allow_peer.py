"""Who may connect (docs/contract.md 1 and 8): `--allow-uid` / `--allow-gid` (and
VASIPC_ALLOW_UID / VASIPC_ALLOW_GID) check each client's SO_PEERCRED at accept; a client
whose uid and gid match neither list is closed without a byte written, counted in
/metrics and logged at most once a minute. Real servers and real sockets; the clients
are subprocesses (tests/connect_as.py) that drop root's privileges to other ids before
they connect, so those tests need root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_cli import assert_refused, run_serve
from test_metrics import metrics_url, scrape, val

HERE = Path(__file__).resolve().parent
NOBODY = 65534   # a uid and gid of their own
STRANGER = 4242  # a uid and gid that no list names
GROUP = 12345    # the gid --allow-gid names

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the clients switch to "
                                "other uids and gids (setuid) before they connect")


def connect_as(socket_path: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> dict:
    """One `health` request from a process running as uid:gid (see connect_as.py)."""
    proc = subprocess.run([sys.executable, str(HERE / "connect_as.py"), str(uid), str(gid),
                           ",".join(map(str, groups)), socket_path],
                          capture_output=True, text=True, timeout=60, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_served(result: dict) -> None:
    answer = result["answer"]
    assert answer is not None and answer["op"] == "health" and answer["ready"] is True, result


def assert_refused_unanswered(result: dict) -> None:
    """Connected (the socket's mode let it in), then closed before a single byte came."""
    assert result["error"] is None and result["closed"] and result["received"] == 0, result


@pytest.fixture
def launcher(server_factory):
    """server_factory whose directory other users may pass through (its sockets' own mode
    is then the first gate)."""
    os.chmod(server_factory.dir, 0o711)
    return server_factory


@needs_root
def test_only_listed_uids_and_gids_are_served(launcher):
    # root is not listed: wait for the startup line instead of a health check
    server = launcher("--socket-mode", "0666", "--allow-uid", str(NOBODY), "--allow-gid",
                      str(GROUP), "--metrics-port", "0", "--metrics-host", "127.0.0.1", wait=False)
    base = metrics_url(server)
    sock = server.socket

    assert_served(connect_as(sock, NOBODY, NOBODY))           # by uid
    assert_served(connect_as(sock, STRANGER, GROUP))          # by (primary) gid
    root = connect_as(sock, 0, 0)
    assert_refused_unanswered(root)
    assert_refused_unanswered(connect_as(sock, STRANGER, STRANGER))
    # SO_PEERCRED carries the effective gid only: a supplementary group does not count
    assert_refused_unanswered(connect_as(sock, STRANGER, STRANGER, groups=(GROUP,)))
    assert_served(connect_as(sock, NOBODY, NOBODY))           # refusals change nothing for others

    samples = scrape(base)
    assert val(samples, "vasipc_connections_refused_total", reason="peer") == 3
    assert val(samples, "vasipc_connections_refused_total", reason="max_connections") == 0
    assert ("vasipc_connections_refused_total", (("reason", "max_connections"),)) in samples
    logged = [line for line in server.stderr_text().splitlines() if "peer_not_allowed" in line]
    assert logged, server.stderr_text()
    assert f"uid 0 gid 0 pid {root['pid']}" in logged[0], logged
    assert len(logged) < 3, f"each refusal logged on its own line:\n{logged}"
    assert server.proc.poll() is None
    assert server.stop() == 0


@needs_root
def test_allow_uid_from_the_environment_lets_root_in_when_listed(launcher, monkeypatch):
    monkeypatch.setenv("VASIPC_ALLOW_UID", f"{NOBODY},0")
    server = launcher("--socket-mode", "0666")  # its health check connects as root
    assert_served(connect_as(server.socket, 0, 0))
    assert_served(connect_as(server.socket, NOBODY, NOBODY))
    assert_refused_unanswered(connect_as(server.socket, STRANGER, STRANGER))


@needs_root
def test_the_command_line_list_replaces_the_environments(launcher, monkeypatch):
    monkeypatch.setenv("VASIPC_ALLOW_UID", str(NOBODY))
    server = launcher("--socket-mode", "0666", "--allow-uid", "0")
    assert_served(connect_as(server.socket, 0, 0))
    assert_refused_unanswered(connect_as(server.socket, NOBODY, NOBODY))


@needs_root
def test_socket_mode_is_the_first_gate(launcher):
    # 0600 (the default): another user cannot even connect, whatever the allow-lists say
    server = launcher("--allow-uid", "0", "--allow-uid", str(NOBODY))
    result = connect_as(server.socket, NOBODY, NOBODY)
    assert result["error"] and result["error"].startswith("PermissionError"), result
    assert_served(connect_as(server.socket, 0, 0))


@pytest.mark.parametrize("args", [
    ("--allow-uid", "abc"), ("--allow-uid", "-1"), ("--allow-gid", "1.5"),
    ("--allow-gid", "4294967295"), ("--allow-uid", ""),
], ids=lambda a: " ".join(a) or "empty")
def test_bad_ids_are_exit_2(nudenet_model, args):
    assert_refused(run_serve("--model", nudenet_model, *args), args[0])


@pytest.mark.parametrize("var, text", [("VASIPC_ALLOW_UID", "0,abc"), ("VASIPC_ALLOW_GID", "-5")])
def test_bad_ids_from_the_environment_name_the_variable(nudenet_model, monkeypatch, var, text):
    monkeypatch.setenv(var, text)
    assert_refused(run_serve("--model", nudenet_model), f"{var}={text}")
