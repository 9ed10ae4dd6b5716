"""The listening Unix socket: path rules, stale-socket takeover, removal (docs/contract.md 1)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

MAX_SOCKET_PATH_BYTES = 107


class StartupError(RuntimeError):
    """A condition that stops the server from starting (exit code 2)."""


def default_socket_path(model_id: str, socket_dir: str | None) -> str:
    return os.path.join(socket_dir or "/tmp", f"vas_model_{model_id}.sock")


def check_socket_path(path: str) -> None:
    """Refuse a path that is too long, or taken by a live server or by a non-socket."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise StartupError(f"socket path {path!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise StartupError(f"a server is already listening on {path}")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):  # nobody listens: the file is stale
        return False
    except OSError:  # no permission, a full backlog: someone may listen; never remove it
        return True
    finally:
        probe.close()


class Listener:
    """A bound, listening socket that removes its file at close only if it is still ours."""

    def __init__(self, path: str, mode: int, backlog: int = 1024) -> None:
        check_socket_path(path)
        try:
            os.unlink(path)  # stale (checked above)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StartupError(f"cannot remove the stale socket {path}: {exc.strerror}") from None
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which the socket is wider than 0600
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"a server is already listening on {path}") from None
            raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        st = os.lstat(path)
        self._identity = (st.st_dev, st.st_ino)
        self.sock.listen(backlog)

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        return conn

    def close(self) -> None:
        """Stop listening (wakes a blocked accept) and remove the file if it is still ours."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
