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
