"""docs/contract.md section 1 (transport): socket paths, modes, takeover of stale sockets, refusal
of taken paths, model id and path length rules, removal at stop. Real servers, real
sockets."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wire
from serve_cli import assert_refused, exited, health, info, run_serve, spawn

MODEL_ID = "nudenet-320n"


def unique_id(length: int = 24) -> str:
    """A model id nobody else uses, so default paths in /tmp cannot collide."""
    base = f"vt-{uuid.uuid4().hex}-"
    return (base * (length // len(base) + 1))[:length]


@pytest.fixture
def tmp_socket_path() -> Iterator[Callable[..., str]]:
    """Paths under /tmp that are removed after the test, whatever it left there."""
    made: list[str] = []

    def make(model_id: str, directory: str = "/tmp") -> str:
        path = os.path.join(directory, f"vas_model_{model_id}.sock")
        made.append(path)
        return path

    yield make
    for path in made:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(path)


def bound_stale_socket(path: str, listen: bool) -> None:
    """Leave a socket file at `path` that nothing answers on (a crashed server's)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    if listen:
        s.listen(1)
    s.close()  # the file stays


def mode_of(path: str) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    return stat.S_IMODE(st.st_mode)


# --- paths -------------------------------------------------------------------------------------

def test_default_path_and_mode_and_removal_at_stop(server_factory, tmp_socket_path,
                                                   monkeypatch, nudenet_model):
    """Default /tmp/vas_model_{id}.sock (a 64-character id is valid), mode 0600, removed at
    stop; no VASIPC_SOCKET_DIR in the environment."""
    monkeypatch.delenv("VASIPC_SOCKET_DIR", raising=False)
    monkeypatch.delenv("VASIPC_SOCKET", raising=False)
    model_id = unique_id(64)
    path = tmp_socket_path(model_id)
    server = spawn(server_factory, ["--model", nudenet_model, "--model-id", model_id], path)
    assert mode_of(path) == 0o600
    got = info(path)
    assert got["socket"] == path
    assert got["model_id"] == model_id
    assert server.stop(signal.SIGTERM) == 0
    assert not os.path.lexists(path), "the socket file was not removed at stop"


@pytest.mark.slow
def test_socket_dir_option_and_environment(server_factory, tmp_socket_path, monkeypatch,
                                           nudenet_model, tmp_path):
    """--socket-dir DIR and VASIPC_SOCKET_DIR move the default path; the option wins over
    the environment."""
    env_dir, cli_dir = tmp_path / "env", tmp_path / "cli"
    env_dir.mkdir()
    cli_dir.mkdir()
    monkeypatch.setenv("VASIPC_SOCKET_DIR", str(env_dir))
    model_id = unique_id()
    env_path = str(env_dir / f"vas_model_{model_id}.sock")
    cli_path = str(cli_dir / f"vas_model_{model_id}.sock")
    a = spawn(server_factory, ["--model", nudenet_model, "--model-id", model_id], env_path)
    assert info(env_path)["socket"] == env_path
    assert not os.path.lexists(tmp_socket_path(model_id))
    b = spawn(server_factory, ["--model", nudenet_model, "--model-id", model_id,
                               "--socket-dir", str(cli_dir)], cli_path)
    assert info(cli_path)["socket"] == cli_path
    assert health(env_path)["ready"] is True  # the first one is untouched
    assert a.stop() == 0 and b.stop() == 0
    assert not os.path.lexists(env_path) and not os.path.lexists(cli_path)


def test_socket_option_mode_0660_and_107_byte_path(server_factory, monkeypatch, nudenet_model):
    """--socket PATH is used as given (over --socket-dir and the environment), --socket-mode
    0660 applies, and a path of exactly 107 bytes is accepted."""
    monkeypatch.setenv("VASIPC_SOCKET_DIR", str(server_factory.dir / "nowhere"))
    prefix = str(server_factory.dir) + "/s-"
    path = prefix + "x" * (107 - len(prefix.encode()) - len(".sock")) + ".sock"
    assert len(path.encode()) == 107
    server_factory("--socket-mode", "0660", "--socket-dir", "/tmp", socket=path)
    assert mode_of(path) == 0o660
    assert info(path)["socket"] == path


def test_socket_mode_without_leading_zero(server_factory):
    path = server_factory.socket_path("m.sock")
    server_factory("--socket-mode", "640", socket=path)
    assert mode_of(path) == 0o640


# --- what is already at the path ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("listened", [False, True], ids=["bound", "listened"])
def test_stale_socket_is_replaced(server_factory, listened):
    path = server_factory.socket_path("stale.sock")
    bound_stale_socket(path, listen=listened)
    with pytest.raises(ConnectionRefusedError):
        wire.connect(path, timeout=1)
    server_factory(socket=path)
    assert health(path)["ready"] is True
    assert mode_of(path) == 0o600


def test_live_server_is_not_taken_over(server_factory, nudenet_server):
    path = nudenet_server.socket
    before = os.lstat(path)
    second = server_factory(socket=path, wait=False)
    code, err = exited(second)
    assert_refused((code, err), path)
    assert any(w in err.lower() for w in ("already", "listening", "in use", "running")), err
    after = os.lstat(path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert nudenet_server.proc.poll() is None
    assert health(path)["ready"] is True


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "directory", "fifo", "symlink"])
def test_non_socket_at_path_is_left_alone(server_factory, tmp_path, kind):
    path = server_factory.socket_path(f"taken-{kind}.sock")
    if kind == "file":
        Path(path).write_bytes(b"not a socket\n")
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:  # a symlink to a stale socket is not a socket file to remove
        target = str(tmp_path / "target.sock")
        bound_stale_socket(target, listen=False)
        os.symlink(target, path)
    before = os.lstat(path)
    code, err = exited(server_factory(socket=path, wait=False))
    assert_refused((code, err), path)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino, before.st_mode, before.st_mtime_ns)
    if kind == "file":
        assert Path(path).read_bytes() == b"not a socket\n"
    if kind == "symlink":
        assert os.readlink(path) == str(tmp_path / "target.sock")
        assert os.path.lexists(str(tmp_path / "target.sock"))


# --- model id and path length ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model_id", [
    "a" * 65, "", "bad id", "a/b", "a:b", "caf\u00e9", "abc\n", "x*", "../up",
], ids=["65-chars", "empty", "space", "slash", "colon", "non-ascii", "newline", "star", "dotdot"])
def test_invalid_model_id_exits_2(nudenet_model, tmp_path, model_id):
    path = str(tmp_path / "s.sock")
    assert_refused(run_serve("--model", nudenet_model, "--model-id", model_id, "--socket", path),
                   "model id")
    assert not os.path.lexists(path)


def test_invalid_model_id_from_file_stem_exits_2(nudenet_model, tmp_path):
    """Without --model-id the id is the file's stem, and the same rules apply to it."""
    model = tmp_path / "bad name.onnx"
    model.symlink_to(nudenet_model)
    assert_refused(run_serve("--model", str(model), "--socket-dir", str(tmp_path)), "model id")
    assert os.listdir(tmp_path) == ["bad name.onnx"]


@pytest.mark.parametrize("valid", ["A", "a.b_c-D9", "x" * 64])
def test_valid_model_ids_pass_the_id_check(nudenet_model, tmp_path, valid):
    """Valid ids pass the id check: the start then fails on the (too long) path, not the id."""
    path = str(tmp_path) + "/" + "z" * 120
    err = assert_refused(run_serve("--model", nudenet_model, "--model-id", valid,
                                   "--socket", path), "107")
    assert "model id" not in err.lower(), err


@pytest.mark.parametrize("extra", [1, 40])
def test_socket_path_longer_than_107_bytes_exits_2(nudenet_model, tmp_path, extra):
    prefix = str(tmp_path) + "/"
    path = prefix + "y" * (107 + extra - len(prefix.encode()))
    assert len(path.encode()) == 107 + extra
    assert_refused(run_serve("--model", nudenet_model, "--model-id", MODEL_ID, "--socket", path),
                   "107")
    assert not os.path.lexists(path)


def test_long_default_path_from_socket_dir_exits_2(nudenet_model, tmp_path):
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    assert_refused(run_serve("--model", nudenet_model, "--model-id", MODEL_ID,
                             "--socket-dir", str(deep)), "107")
    assert os.listdir(deep) == []


# --- removal at stop ---------------------------------------------------------------------------

def test_socket_removed_at_sigint(server_factory):
    """(SIGTERM: test_default_path_and_mode_and_removal_at_stop)"""
    server = server_factory()
    assert os.path.lexists(server.socket)
    assert server.stop(signal.SIGINT) == 0
    assert not os.path.lexists(server.socket)


@pytest.mark.slow
@pytest.mark.parametrize("replacement", ["file", "socket"])
def test_replaced_socket_file_is_not_removed_at_stop(server_factory, replacement):
    server = server_factory()
    path = server.socket
    os.unlink(path)
    other = None
    if replacement == "file":
        Path(path).write_bytes(b"someone else's\n")
    else:  # another server took the path over meanwhile
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(path)
        other.listen(4)
    try:
        assert server.stop() == 0
        assert os.path.lexists(path), "the server removed a file it did not bind"
        if other is None:
            assert Path(path).read_bytes() == b"someone else's\n"
        else:
            with wire.connect(path, timeout=2):
                pass  # still the replacement's socket
    finally:
        if other is not None:
            other.close()
