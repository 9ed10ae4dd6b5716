"""Helpers for contract tests that start `python -m vasipc.serve` with arbitrary options.

`ServerLauncher` (conftest) always passes --model and --socket; the section 1, 7 and 8
suites also need servers without them (default socket paths, --model-dir, --models-root)
and command lines that must fail. Environment variables for a child are set with
pytest's `monkeypatch.setenv` before it starts (children copy `os.environ`).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import wire
from conftest import REPO_ROOT, ServerLauncher, ServerProcess, _child_env

SERVE = [sys.executable, "-m", "vasipc.serve"]


def run_serve(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run the server to completion (for command lines that must fail at start)."""
    return subprocess.run([*SERVE, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", cwd=REPO_ROOT, env=_child_env(),
                          timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess | tuple[int, str], *needles: str,
                   max_lines: int = 2) -> str:
    """docs/contract.md 8: exit code 2, a usage line and one error line at most, no traceback."""
    code, err = ((result.returncode, result.stderr)
                 if isinstance(result, subprocess.CompletedProcess) else result)
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, expected 2; stderr:\n{err}"
    assert 1 <= len(lines) <= max_lines, f"expected 1-{max_lines} stderr lines, got:\n{err}"
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in stderr:\n{err}"
    return err


def spawn(launcher: ServerLauncher, args: list[str], socket: str,
          wait: bool = True) -> ServerProcess:
    """Start `python -m vasipc.serve *args` (exactly these options) expecting it on `socket`;
    the launcher kills it at teardown."""
    index = len(launcher.servers)
    server = ServerProcess([*SERVE, *args], socket, launcher.dir / f"server_{index}.stderr")
    launcher.servers.append(server)
    if wait:
        server.wait_ready()
    return server


def exited(server: ServerProcess, timeout: float = 60.0) -> tuple[int, str]:
    """Wait for a server that must fail at start: (exit code, stderr)."""
    try:
        code = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError(f"server still running after {timeout} s: {server.args}\n"
                             f"{server.stderr_text()}") from None
    return code, server.stderr_text()


def info(path: str) -> dict[str, Any]:
    resp = wire.roundtrip(path, {"op": "info"})
    assert resp.get("op") == "info", resp
    return resp


def health(path: str) -> dict[str, Any]:
    resp = wire.roundtrip(path, {"op": "health"})
    assert resp.get("op") == "health", resp
    return resp
