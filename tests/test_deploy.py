"""The deployment files: Dockerfiles linted by hadolint, Kubernetes manifests validated
offline against the API schemas (strict: unknown fields rejected), and what no linter
sees: the server's arguments parse with vasipc.serve's own parser, probes hit /healthz and
/readyz on its --metrics-port, sockets and frames are shared by path, users and groups
line up, the grace period outlasts the drain. No Docker engine, no cluster."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from vasipc.listener import default_socket_path
from vasipc.serve import build_parser

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are for (native sidecars: 1.29)
DOCKERFILES = sorted(p for p in REPO.glob("Dockerfile*") if p.is_file())
MANIFESTS = sorted(p for p in K8S_DIR.glob("*.y*ml") if p.is_file())
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}
SERVER_ENTRY = ["python", "-m", "vasipc.serve"]
DEFAULT_DRAIN_TIMEOUT = 10.0  # vasipc.serve's default
DEFAULT_GRACE = 30  # Kubernetes' default terminationGracePeriodSeconds


def test_the_deployment_files_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.gpu"}
    assert {p.name for p in MANIFESTS} >= {"sidecar.yaml", "daemonset-gpu.yaml",
                                            "pipeline-on-node.yaml"}


def _tool(name: str) -> str:
    """A console script of the test extra: next to this Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (next to {sys.executable} or on PATH): "
                    "pip install -e '.[test]'")
    return found


# --- Dockerfiles ------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path, tmp_path: Path):
    # The strictest threshold: any finding fails; ignores are inline, each with its reason.
    # No user configuration (HADOLINT_* variables, ~/.config/hadolint.yaml) takes part.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style",
                           str(dockerfile)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The stages of a Dockerfile, each a list of (INSTRUCTION, arguments), continuation
    lines joined and comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    text = re.sub(r"\\\n(?:[ \t]*#[^\n]*\n)*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append([])
        elif not stages:
            continue  # ARG before the first FROM
        stages[-1].append((word, rest.strip()))
    return stages


def _last(stage: list[tuple[str, str]], word: str) -> str | None:
    found = [rest for w, rest in stage if w == word]
    return found[-1] if found else None


def image_user(path: Path) -> tuple[int, int]:
    """The final stage's USER as (uid, gid); numeric, so that runAsNonRoot can check it."""
    user = _last(dockerfile_stages(path)[-1], "USER")
    assert user is not None, f"{path.name}: the final stage has no USER (it would run as root)"
    m = re.fullmatch(r"(\d+):(\d+)", user)
    assert m, f"{path.name}: USER {user!r} is not numeric uid:gid (runAsNonRoot cannot verify a name)"
    return int(m[1]), int(m[2])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_a_wheel_and_runs_the_server_as_non_root(dockerfile: Path):
    stages = dockerfile_stages(dockerfile)
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build, final = stages[0], stages[-1]
    assert re.search(r"\bAS\s+build\b", dockerfile.read_text()), "the first stage is named build"
    assert any(w == "RUN" and "pip wheel" in r and "--no-deps" in r for w, r in build)
    uid, gid = image_user(dockerfile)
    assert uid != 0 and gid != 0

    def exec_form(word: str) -> list[str]:
        rest = _last(final, word)
        if rest is None:
            return []
        value = json.loads(rest)  # the shell form would put sh, not the server, at PID 1
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value

    command = exec_form("ENTRYPOINT") + exec_form("CMD")
    assert command[:3] in (SERVER_ENTRY, ["python3", "-m", "vasipc.serve"]), command
    # The wheel comes from the build stage; the runtime has exactly one onnxruntime.
    runs = " ".join(r for w, r in final if w == "RUN")
    assert "from=build" in runs.replace(" ", "") or any(
        w == "COPY" and "--from=build" in r for w, r in final)
    extra = "gpu" if dockerfile.name.endswith(".gpu") else "cpu"
    other = {"gpu": "cpu", "cpu": "gpu"}[extra]
    assert f"[{extra}]" in runs and f"[{other}]" not in runs
    if extra == "cpu":
        assert "onnxruntime-gpu" not in runs


def dockerignore_excludes(rules: list[str], path: str) -> bool:
    """Whether the build context leaves `path` out: .dockerignore's last matching rule
    wins, `!` re-includes, a rule matching a directory covers what is under it."""
    excluded = False
    parts = PurePosixPath(path).parts
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        regex = "".join(
            "(?:.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*"
            else "[^/]" if tok == "?" else re.escape(tok)
            for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern.strip("/")))
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_sources_and_no_build_output():
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    needed = ["pyproject.toml", "CMakeLists.txt", "README.md",  # pyproject's readme
              "vasipc/serve.py", "vasipc/_fast/modules.cmake", "vasipc/_fast/connloop.pyx",
              "vasipc/_fast/letterbox_kernel.c", "vasipc/_fast/letterbox_kernel.h"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "vasipc" / "_fast").glob("*.p*")
               if p.suffix in (".pyx", ".pxd")]
    for path in needed:
        assert not dockerignore_excludes(rules, path), f"{path} is left out of the build context"
    for path in [".git/HEAD", "build/cp311/CMakeCache.txt", ".venv-ci/bin/python",
                 ".gpu/yolov8n-640-random.onnx", "bench/out/e2e-1.txt", "tests/test_deploy.py",
                 "vasipc/_fast/connloop.cpython-311-x86_64-linux-gnu.so",  # an in-place build
                 "vasipc/__pycache__/serve.cpython-312.pyc"]:
        assert dockerignore_excludes(rules, path), f"{path} goes into the build context"


# --- Kubernetes manifests ---------------------------------------------------------------------

def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_validate(manifest: Path):
    import kubernetes_validate

    docs = load_docs(manifest)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.path))
            pytest.fail(f"{manifest.name}: {doc.get('kind')}/{doc['metadata'].get('name')}: "
                        f"{where}: {exc.message}")


def test_strict_validation_rejects_what_it_should():
    """The validator is no rubber stamp: an unknown field and a wrong type both fail."""
    import kubernetes_validate

    doc = next(d for d in load_docs(K8S_DIR / "sidecar.yaml") if d["kind"] == "Deployment")
    typo = copy.deepcopy(doc)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    wrong = copy.deepcopy(doc)
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def pod_specs(path: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, workload, pod spec) of every workload in a manifest."""
    out = []
    for doc in load_docs(path):
        if doc["kind"] in WORKLOAD_KINDS:
            out.append((f"{path.name}:{doc['metadata']['name']}", doc, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            out.append((f"{path.name}:{doc['metadata']['name']}", doc, doc["spec"]))
    return out


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def is_server(container: dict[str, Any]) -> bool:
    """A vasipc server: the vasipc image run with its entrypoint (only args given)."""
    return "vasipc" in container["image"] and "command" not in container


def servers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in containers(pod) if is_server(c)]


def effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    value = (container.get("securityContext") or {}).get(key)
    return value if value is not None else (pod.get("securityContext") or {}).get(key)


def mount_of(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume mount that holds `path` in this container (the deepest one)."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") or "/"
        if (path == mp or path.startswith(mp + "/")) and (
                best is None or len(mp) > len(best["mountPath"])):
            best = m
    return best


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == name)


class Server:
    """A server container's settings, as vasipc.serve's parser reads its args and env."""

    def __init__(self, where: str, container: dict[str, Any], monkeypatch) -> None:
        for key in list(os.environ):
            if key.startswith("VASIPC_"):
                monkeypatch.delenv(key)
        for var in container.get("env", []):
            if var["name"].startswith("VASIPC_"):
                monkeypatch.setenv(var["name"], var["value"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                self.args = build_parser().parse_args([str(a) for a in container.get("args", [])])
            except SystemExit:
                pytest.fail(f"{where}: {container['name']}'s args do not parse with "
                            f"vasipc.serve.build_parser(): {err.getvalue().strip()}")
        a = self.args
        # The manifests name every shared path themselves rather than lean on image defaults.
        assert a.socket or a.socket_dir, f"{where}: {container['name']}: no --socket/--socket-dir"
        self.socket = a.socket or default_socket_path(a.model_id, a.socket_dir)
        self.socket_dir = os.path.dirname(self.socket)
        env_roots = [r for r in os.environ.get("VASIPC_FRAME_ROOT", "").split(":") if r]
        self.frame_roots = a.frame_root or env_roots or ["/dev/shm"]
        self.drain_timeout = a.drain_timeout if a.drain_timeout is not None else DEFAULT_DRAIN_TIMEOUT

    def serves(self, uid: int | None, gid: int | None) -> bool:
        """Whether --allow-uid / --allow-gid (VASIPC_ALLOW_UID / _GID) let a client running
        as uid:gid in; without them the socket's mode alone decides."""
        uids, gids = self.args.allow_uid or [], self.args.allow_gid or []
        return not (uids or gids) or uid in uids or gid in gids


def all_servers(monkeypatch):
    found = []
    for manifest in MANIFESTS:
        for where, workload, pod in pod_specs(manifest):
            for c in servers(pod):
                found.append((where, workload, pod, c, Server(where, c, monkeypatch)))
    assert found, "no vasipc server container in deploy/kubernetes/"
    return found


def test_server_containers(monkeypatch):
    uid, gid = image_user(REPO / "Dockerfile")
    assert image_user(REPO / "Dockerfile.gpu") == (uid, gid)
    for where, _, pod, c, s in all_servers(monkeypatch):
        name = f"{where}: {c['name']}"
        a = s.args
        assert a.models_root and a.model_id, f"{name}: serves --models-root/--model-id"
        m = mount_of(c, a.models_root)
        assert m is not None and m.get("readOnly"), f"{name}: the models volume, read-only"
        assert a.log_format == "json", name
        assert a.socket_mode == 0o660, f"{name}: --socket-mode 0660 (owner and group)"
        assert isinstance((pod.get("securityContext") or {}).get("fsGroup"), int), \
            f"{name}: a common fsGroup"
        assert effective(pod, c, "runAsNonRoot") is True, name
        assert effective(pod, c, "runAsUser") == uid and effective(pod, c, "runAsGroup") == gid, \
            f"{name}: runs as the image's user {uid}:{gid}"
        grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        assert grace > s.drain_timeout, f"{name}: grace {grace} s <= drain timeout {s.drain_timeout} s"
        m = mount_of(c, s.socket_dir)
        assert m is not None and not m.get("readOnly"), f"{name}: {s.socket_dir} is a writable volume"
        for root in s.frame_roots:
            assert mount_of(c, root) is not None, f"{name}: frame root {root} is no volume"
        gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if (a.device or "auto").startswith("cuda"):
            assert gpus >= 1, f"{name}: --device {a.device} without an nvidia.com/gpu limit"
        elif a.device == "cpu":
            assert gpus == 0, name
        if c in pod.get("initContainers", []):
            assert c.get("restartPolicy") == "Always", \
                f"{name}: a server in initContainers must be a sidecar (restartPolicy: Always)"


def test_probes_hit_the_metrics_port(monkeypatch):
    for where, _, _, c, s in all_servers(monkeypatch):
        name = f"{where}: {c['name']}"
        port = s.args.metrics_port
        assert port, f"{name}: no --metrics-port"
        assert s.args.metrics_host in (None, "0.0.0.0", "::"), \
            f"{name}: --metrics-host {s.args.metrics_host}: the kubelet probes the Pod's IP"
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        assert port in named.values(), f"{name}: --metrics-port {port} is not a containerPort"
        for probe, paths in (("livenessProbe", {"/healthz"}), ("readinessProbe", {"/readyz"}),
                             ("startupProbe", {"/healthz", "/readyz"})):
            if probe == "startupProbe" and probe not in c:
                continue
            assert probe in c, f"{name}: no {probe}"
            get = c[probe].get("httpGet")
            assert get, f"{name}: {probe} is not an httpGet"
            assert get["path"] in paths, f"{name}: {probe} on {get['path']}"
            target = named.get(get["port"]) if isinstance(get["port"], str) else get["port"]
            assert target == port, f"{name}: {probe} on port {get['port']}, metrics on {port}"


def test_servers_of_one_pod_do_not_collide(monkeypatch):
    by_pod: dict[str, list[Server]] = {}
    for where, _, _, _, s in all_servers(monkeypatch):
        by_pod.setdefault(where, []).append(s)
    for where, group in by_pod.items():
        ports = [s.args.metrics_port for s in group]
        sockets = [s.socket for s in group]
        assert len(set(ports)) == len(ports), f"{where}: metrics ports {ports} (one netns)"
        assert len(set(sockets)) == len(sockets), f"{where}: sockets {sockets}"


def _one_workload(manifest: str, kind: str, monkeypatch):
    found = [(w, pod) for where, w, pod in pod_specs(K8S_DIR / manifest) if w["kind"] == kind]
    assert len(found) == 1, f"{manifest}: one {kind}"
    workload, pod = found[0]
    return workload, pod, [(c, Server(manifest, c, monkeypatch)) for c in servers(pod)]


def test_sidecar_pod_shares_sockets_and_shm_in_memory(monkeypatch):
    _, pod, srv = _one_workload("sidecar.yaml", "Deployment", monkeypatch)
    assert len(srv) == 1
    server, s = srv[0]
    others = [c for c in containers(pod) if not is_server(c)]
    assert others, "the pipeline container beside the server"
    for pipeline in others:
        name = f"sidecar.yaml: {pipeline['name']}"
        shared = {"socket dir": s.socket_dir, "/dev/shm": "/dev/shm",
                  **{f"frame root {r}": r for r in s.frame_roots}}
        for what, path in shared.items():
            ms, mp = mount_of(server, path), mount_of(pipeline, path)
            assert ms is not None and mp is not None, f"{name}: {what} not mounted in both"
            assert ms["name"] == mp["name"] and ms["mountPath"] == mp["mountPath"], \
                f"{name}: {what} is not the same volume at the same path (paths travel as strings)"
            vol = volume(pod, ms["name"])
            assert (vol.get("emptyDir") or {}).get("medium") == "Memory", \
                f"{name}: {what} volume is not an emptyDir with medium: Memory"
        assert not (mount_of(pipeline, s.socket_dir) or {}).get("readOnly")
        env = {v["name"]: v.get("value") for v in pipeline.get("env", [])}
        assert env.get("VASIPC_SOCKET_DIR") == s.socket_dir, f"{name}: the client's socket dir"
        # Two users: the group (fsGroup, socket mode 0660) is what lets the pipeline in.
        assert effective(pod, pipeline, "runAsNonRoot") is True, name
        assert effective(pod, pipeline, "runAsUser") not in (None, 0,
                                                               effective(pod, server, "runAsUser"))
        assert s.serves(effective(pod, pipeline, "runAsUser"), effective(pod, pipeline, "runAsGroup")), \
            f"{name}: the server's --allow-uid / --allow-gid leave the pipeline out"


def test_daemonset_shares_host_paths_with_the_node_pipelines(monkeypatch):
    ds, pod, srv = _one_workload("daemonset-gpu.yaml", "DaemonSet", monkeypatch)
    assert len(srv) >= 2, "one server per GPU"
    assert len({s.args.device for _, s in srv}) == 1  # each container sees its own GPU as cuda:0
    assert (ds["spec"]["updateStrategy"].get("rollingUpdate") or {}).get("maxSurge", 0) == 0, \
        "a surge Pod's server would find the old one answering on its socket and exit 2"
    uid, gid = image_user(REPO / "Dockerfile.gpu")
    host: dict[str, str] = {}  # container path -> host path
    for c, s in srv:
        for path in (s.socket_dir, *s.frame_roots):
            m = mount_of(c, path)
            hp = volume(pod, m["name"]).get("hostPath")
            assert hp, f"daemonset-gpu.yaml: {c['name']}: {path} is not a hostPath"
            host[m["mountPath"]] = hp["path"]
    # The host directories are made the server's, group-shared (hostPath ignores fsGroup).
    prep = [c for c in containers(pod) if "command" in c]
    assert prep, "an init container that sets the host directories' owner and mode"
    script = " ".join(prep[0]["command"])
    assert f"{uid}:{gid}" in script and "2770" in script
    for path in host:
        assert path in script, f"{path} is not prepared"

    client_pod = pod_specs(K8S_DIR / "pipeline-on-node.yaml")[0][2]
    assert client_pod.get("nodeSelector") == pod.get("nodeSelector")
    assert gid in client_pod["securityContext"].get("supplementalGroups", []), \
        "the node pipeline joins the servers' group"
    (pipeline,) = client_pod["containers"]
    user = effective(client_pod, pipeline, "runAsUser"), effective(client_pod, pipeline, "runAsGroup")
    for c, s in srv:
        assert s.serves(*user), f"daemonset-gpu.yaml: {c['name']}'s allow-lists leave the pipeline out"
    for path, host_path in host.items():
        m = mount_of(pipeline, path)
        assert m is not None and m["mountPath"] == path, f"pipeline: {path} not mounted"
        assert volume(client_pod, m["name"])["hostPath"]["path"] == host_path
