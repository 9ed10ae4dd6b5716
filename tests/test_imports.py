"""What importing vasipc's modules loads: optional pieces stay unloaded until used.

Each check runs in a fresh interpreter (this test process has imported everything already).
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(imports: str, module: str, env: dict[str, str]) -> bool:
    code = f"import sys\n{imports}\nprint({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip() == "True"


def test_a_server_without_metrics_port_never_imports_prometheus_client(child_env):
    # serve and server are all a server without --metrics-port imports; vasipc.check too
    imports = "import vasipc.serve, vasipc.server, vasipc.check, vasipc.client"
    assert not loaded_after(imports, "prometheus_client", child_env)
    # the control: the exposition module does load it
    assert loaded_after("import vasipc.metrics_http", "prometheus_client", child_env)


@pytest.mark.parametrize("module", ["onnxruntime", "vasipc._fast"])
def test_the_client_imports_light(child_env, module):
    assert not loaded_after("import vasipc", module, child_env)


@pytest.mark.parametrize("metrics", [False, True], ids=["no-metrics-port", "metrics-port"])
def test_a_serving_server_imports_prometheus_client_only_for_metrics(
        metrics, server_factory, astronaut_frame, monkeypatch):
    # A real server, started, serving a request and stopped, with every import it made on
    # its stderr (PYTHONPROFILEIMPORTTIME, as -X importtime): also what it imports lazily.
    from vasipc.client import Client

    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    args = ("--metrics-port", "0", "--metrics-host", "127.0.0.1") if metrics else ()
    server = server_factory(*args)
    with Client(server.socket, timeout=60) as client:
        assert client.infer(str(astronaut_frame), camera_id="cam").detections is not None
    assert server.stop() == 0
    imported = {line.rsplit("|", 1)[1].strip() for line in server.stderr_text().splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    assert "vasipc.server" in imported  # the log is there
    assert ("prometheus_client" in imported) is metrics
