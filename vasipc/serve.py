"""`python -m vasipc.serve`: the model server's command line (docs/contract.md 8).

Precedence of settings: command line, then environment (`VASIPC_<OPTION>`, e.g.
VASIPC_SOCKET_DIR, VASIPC_MAX_BATCH; VASIPC_FRAME_ROOT is a colon-separated list), then
model.yaml, then the defaults. Any problem before serving is one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from vasipc import cli

PROG = "vasipc.serve"
USAGE = ("python -m vasipc.serve (--model PATH | --model-dir DIR | --models-root DIR "
         "--model-id ID) [options]")

log = logging.getLogger("vasipc")


class CliError(Exception):
    """A startup problem reported as one line, exit code 2."""


def _ranged(kind: Callable, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        if kind is float and v != v:  # NaN
            raise argparse.ArgumentTypeError(f"invalid value {text!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{text} must be <= {hi}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _mode(text: str) -> int:
    try:
        v = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid octal mode {text!r}") from None
    if not 0 <= v <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} out of range (000-777)")
    return v


def _preprocess(text: str) -> str:
    from vasipc.device_path import PREPROCESS_MODES
    if text not in PREPROCESS_MODES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from auto, cpu, graph)")
    return text


def build_parser() -> argparse.ArgumentParser:
    from vasipc.backends.base import BACKENDS, PRECISIONS

    p = cli.Parser(prog=PROG, usage=USAGE, description="Serve a YOLO-style ONNX detector on a Unix socket.")

    def opt(flag: str, **kw) -> None:
        """An option that falls back to VASIPC_<OPTION> (a bad value there names it)."""
        p.add_env_argument(flag, "VASIPC_" + flag.lstrip("-").replace("-", "_").upper(), **kw)

    src = p.add_argument_group("model (exactly one of --model, --model-dir, --models-root)")
    src.add_argument("--model", metavar="PATH", help="ONNX file to serve")
    src.add_argument("--model-dir", metavar="DIR", help="directory with model.yaml")
    src.add_argument("--models-root", metavar="DIR", help="serve DIR/<model-id>/")
    opt("--model-id", metavar="ID", help="id callers address (default: model.yaml, else file stem)")
    opt("--model-version", metavar="V", help="version subdirectory (default: highest)")
    opt("--labels", metavar="FILE", help="class names, one per line")
    opt("--socket", metavar="PATH", help="socket path (default /tmp/vas_model_{id}.sock)")
    opt("--socket-dir", metavar="DIR", help="directory of the default socket path")
    opt("--socket-mode", metavar="MODE", type=_mode, help="socket file mode (default 0600)")
    p.add_argument("--frame-root", metavar="DIR", action="append",
                   help="where frames may be read from (repeatable; default /dev/shm)")
    opt("--device", type=cli.device,
        help="auto | cpu | cuda[:N] | gpu[:N] (an Intel GPU, --backend openvino) (default auto)")
    opt("--conf", type=_ranged(float, 0, 1), help="confidence threshold (default 0.25)")
    opt("--iou", type=_ranged(float, 0, 1), help="NMS IoU threshold (default 0.45)")
    opt("--max-detections", type=_ranged(int, 0), help="default 300")
    opt("--max-message-bytes", type=_ranged(int, 1), help="default 10 MiB")
    opt("--read-timeout", type=_ranged(float, 0, lo_open=True), help="seconds (default 10)")
    opt("--idle-timeout", type=_ranged(float, 0, lo_open=True), help="seconds (default 300)")
    opt("--drain-timeout", type=_ranged(float, 0), help="seconds (default 10)")
    opt("--max-frame-dim", type=_ranged(int, 1), help="default 8192")
    opt("--max-batch", type=_ranged(int, 1), help="default 1 on CPU, 16 on CUDA")
    opt("--backend", type=cli.choice("backend", BACKENDS),
        help="the runtime: auto (default: onnxruntime; openvino for bf16 and int8 on CPU, "
             "tensorrt for fp16 on a GPU), onnxruntime, openvino or tensorrt")
    opt("--precision", type=cli.choice("precision", PRECISIONS),
        help="auto (default: the model's own, int8 for a quantized model, else fp32; fp16 on "
             "tensorrt), fp32, fp16, bf16 (openvino, CPUs with BF16) or int8 (a model made "
             "by vasipc quantize)")
    opt("--streams", type=_ranged(int, 1),
        help="inference runs in flight at once (default: the backend's choice for the device; "
             "1 gives one run all the threads, the lowest latency at concurrency 1)")
    opt("--threads", type=_ranged(int, 1),
        help="inference threads in all, split between the streams (default: the CPUs this "
             "process may use)")
    opt("--cache-dir", metavar="DIR",
        help="compiled engines (tensorrt; default $XDG_CACHE_HOME/vasipc/tensorrt)")
    opt("--preprocess-threads", type=_ranged(int, 1),
        help="threads letterboxing one frame (default 1; used where the kernel supports it)")
    opt("--preprocess", metavar="{auto,cpu,graph}", type=_preprocess,
        help="where frames are letterboxed: cpu (the C kernel, on the host), graph (an ONNX "
             "graph on the model's device, frames uploaded raw, IO-bound runs) or auto "
             "(default: graph on CUDA, cpu on CPU)")
    opt("--batch-timeout-us", type=_ranged(int, 0), help="default 0")
    opt("--max-queue", type=_ranged(int, 1), help="default 1024")
    opt("--max-connections", type=_ranged(int, 1), help="default 1024")
    peer_id = _ranged(int, 0, 2**32 - 2)  # uid_t / gid_t; all ones is "no id"
    opt("--allow-uid", metavar="UID", action="append", type=peer_id,
        help="serve only clients whose uid (SO_PEERCRED) is UID, or whose gid is an "
             "--allow-gid; others are closed at accept, unanswered (repeatable; default: "
             "whoever the socket's mode lets in)")
    opt("--allow-gid", metavar="GID", action="append", type=peer_id,
        help="serve clients whose (effective, not supplementary) gid is GID (repeatable)")
    opt("--watch", action="store_true",
        help="reload when the weights, model.yaml, labels or version directories "
             "change (SIGHUP always reloads)")
    opt("--watch-interval", type=_ranged(float, 0, lo_open=True),
        help="seconds between --watch polls (default 2)")
    opt("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
        help="default INFO")
    opt("--log-format", choices=["text", "json"], type=str.lower,
        help="text (default) or json: one JSON object per line")
    opt("--metrics-port", metavar="PORT", type=_ranged(int, 0, 65535),
        help="serve /metrics, /healthz, /readyz over HTTP on PORT (0: a free one); "
             "default: no HTTP server")
    opt("--metrics-host", metavar="HOST", help="address of the metrics port (default 0.0.0.0)")
    return p


def _pick(*values):
    return next((v for v in values if v is not None), None)


def _resolve_source(args: argparse.Namespace):
    from vasipc import model_yaml as my

    given = [a for a in ("model", "model_dir", "models_root") if getattr(args, a)]
    if len(given) != 1:
        raise CliError("exactly one of --model, --model-dir, --models-root is required")
    if args.model:
        return my.from_model_file(args.model)
    if args.model_dir:
        return my.from_model_dir(args.model_dir)
    if not args.model_id:
        raise CliError("--models-root needs --model-id")
    if not my.MODEL_ID_RE.match(args.model_id):
        raise CliError(f"invalid model id {args.model_id!r}: 1-64 characters of [A-Za-z0-9._-]")
    return my.from_models_root(args.models_root, args.model_id, args.model_version)


def _model_id(args: argparse.Namespace, source) -> str:
    """The id callers address: --model-id, else model.yaml's, else the weights' stem (not
    model_name: docs/contract.md 8)."""
    from vasipc.model_yaml import model_id_for

    return model_id_for(source, args.model_id)


class ModelLoader:
    """Resolves the model source and loads it, at start and again on every reload: the
    source is read afresh each time (a new model.yaml, a new version directory), while the
    model id (hence the socket) and the device stay what the server started with."""

    def __init__(self, args: argparse.Namespace, model_id: str, device) -> None:
        self.args = args
        self.model_id = model_id
        self.device = device
        self.source = None  # the source of the model being served (what --watch follows)

    def __call__(self, source=None):
        from vasipc.model import load_model
        from vasipc.model_yaml import model_spec

        args = self.args
        if source is None:
            source = _resolve_source(args)
            model_id = _model_id(args, source)
            if model_id != self.model_id:
                raise CliError(f"the model id changed from {self.model_id} to {model_id}; "
                               "a reload cannot change it (the socket is named after it)")
        spec = model_spec(source, self.device, self.model_id, device_arg=args.device,
                          labels=args.labels, conf=args.conf, iou=args.iou,
                          max_detections=args.max_detections, threads=args.threads,
                          backend=args.backend, precision=args.precision, streams=args.streams,
                          cache_dir=args.cache_dir, preprocess=args.preprocess or "auto")
        model = load_model(spec, self.device, args.max_batch, args.preprocess or "auto")
        self.source = source
        return model

    def watched_files(self) -> list[str]:
        """What --watch polls: the weights, labels and model.yaml files the model may come
        from, and the directories whose new entries (a new version, a new .onnx) count."""
        args = self.args
        paths = [p for p in (args.model, args.labels) if p]
        for d in self._model_dirs():
            paths += [d, os.path.join(d, "model.yaml")]
        if self.source is not None:
            paths += [p for p in (self.source.weights, self.source.class_names_file) if p]
        return sorted(set(paths))

    def _model_dirs(self) -> list[str]:
        args = self.args
        if args.model_dir:
            return [args.model_dir]
        if not args.models_root:
            return []
        from vasipc.model_yaml import version_dirs

        base = os.path.join(args.models_root, self.model_id)
        if args.model_version:  # pinned: a new version directory is not this model's news
            return [os.path.join(base, args.model_version)]
        return [base, *(os.path.join(base, v) for v in version_dirs(base))]


def _start_metrics(args: argparse.Namespace):
    """The HTTP metrics and probe server, serving already, or None without --metrics-port."""
    if args.metrics_port is None:
        return None
    from vasipc.metrics_http import MetricsServer

    metrics = MetricsServer(args.metrics_host or "0.0.0.0", args.metrics_port)
    metrics.start()
    return metrics


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vasipc import logs
    logs.setup(args.log_level or "INFO", args.log_format or "text")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hup = threading.Event()  # a reload asked for; SIGHUP's default action would kill us
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    try:  # before the model loads: /healthz answers and /readyz says 503 during a long load
        metrics = _start_metrics(args)
    except OSError as exc:
        print(f"{PROG}: error: cannot serve metrics on {args.metrics_host or '0.0.0.0'}:"
              f"{args.metrics_port}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    from vasipc.backends import select_device
    from vasipc.listener import StartupError, check_socket_path, default_socket_path
    from vasipc.model import ModelError
    from vasipc.model_yaml import ModelSourceError
    from vasipc.reload import Reloader, file_signature
    from vasipc.runtime import RuntimeUnavailable

    try:
        source = _resolve_source(args)
        model_id = _model_id(args, source)
        socket_path = args.socket or default_socket_path(model_id, args.socket_dir)
        check_socket_path(socket_path)
        env_roots = os.environ.get("VASIPC_FRAME_ROOT", "")
        roots = args.frame_root or [r for r in env_roots.split(":") if r]
        given = "--frame-root" if args.frame_root else f"VASIPC_FRAME_ROOT={env_roots}:"
        roots = roots or ["/dev/shm"]
        for r in roots:
            if not os.path.isdir(r):
                raise CliError(f"{given} {r} is not a directory")
        device = select_device(args.backend or source.backend or "auto", args.device or "auto")
        load = ModelLoader(args, model_id, device)
        load.source = source  # watched from before the load: a change during it is seen
        watched = file_signature(load.watched_files()) if args.watch else None
        model = load(source)
        spec = model.spec
    except (CliError, ModelSourceError, ModelError, RuntimeUnavailable, StartupError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if stop.is_set():
        return 0

    from vasipc.server import Server, ServerConfig

    config = ServerConfig(
        socket_path=socket_path,
        socket_mode=_pick(args.socket_mode, 0o600),
        frame_roots=tuple(roots),
        max_message_bytes=_pick(args.max_message_bytes, 10 * 1024 * 1024),
        read_timeout=_pick(args.read_timeout, 10.0),
        idle_timeout=_pick(args.idle_timeout, 300.0),
        drain_timeout=_pick(args.drain_timeout, 10.0),
        max_frame_dim=_pick(args.max_frame_dim, 8192),
        batch_timeout_us=_pick(args.batch_timeout_us, 0),
        max_queue=_pick(args.max_queue, 1024),
        max_connections=_pick(args.max_connections, 1024),
        preprocess_threads=_pick(args.preprocess_threads, 1),
        allow_uids=frozenset(args.allow_uid or ()),
        allow_gids=frozenset(args.allow_gid or ()),
    )
    server = Server(model, config)
    try:
        server.start()
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if metrics is not None:
        metrics.attach(server)  # /readyz follows the server's readiness from now on
    if config.allow_uids or config.allow_gids:
        allowed = ([f"uid {u}" for u in sorted(config.allow_uids)]
                   + [f"gid {g}" for g in sorted(config.allow_gids)])
        log.info("serving only clients of %s (SO_PEERCRED); others are closed unanswered",
                 ", ".join(allowed))
    if source.ignored_keys:  # not refused (the format may grow), but a typo should show
        log.warning("model.yaml keys not in the onboarding format, ignored: %s",
                    ", ".join(source.ignored_keys))
    if source.ignored_versions:  # a `latest` link is fine; a `v3` that never serves is not
        log.info("only numeric directory names are versions; not versions: %s",
                 ", ".join(source.ignored_versions))
    log.info("serving model %s (%s, version %s) on %s: input %dx%d, %d classes, device %s, "
             "backend %s %s, precision %s, %d stream(s), providers %s, max batch %d (runs at "
             "%s), preprocess %s, batch timeout %d us, frame roots %s, metrics %s",
             model_id, spec.model_name, spec.model_version, socket_path, model.input_width,
             model.input_height, model.num_classes, device.name, model.backend.name,
             model.backend.version, model.backend.precision, model.streams,
             ",".join(model.providers),
             model.max_batch, "/".join(map(str, model.batch_sizes)),
             model.preprocess + (f" (staging {model.device_path.staging_kind})"
                                 if model.device_path is not None else ""),
             config.batch_timeout_us, ":".join(roots),
             metrics.url() if metrics is not None else "off",
             extra={"model_id": model_id, "model_version": spec.model_version,  # json fields
                    "providers": list(model.providers), "device": device.name,
                    "backend": model.backend.name, "precision": model.backend.precision,
                    "streams": model.streams,
                    "socket": socket_path, "max_batch": model.max_batch})
    reloader = Reloader(load, server, trigger=hup, initial=watched,
                        watched=load.watched_files if args.watch else None,
                        interval=_pick(args.watch_interval, 2.0))
    reloader.start()
    while not stop.wait(0.2):
        server.error_log.flush()  # the per-class error counts whose interval has passed
        server.stats.fold()  # here, not on a response's way out
        if server.fatal is not None:
            code = server.abort()
            log.error("exiting after a session error")
            return code
    reloader.stop()
    log.info("draining: %d request(s) in flight", server.in_flight())
    code = server.drain()
    log.info("stopped (exit %d)", code)
    return code


def main(argv: Sequence[str] | None = None) -> None:
    code = run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # daemon threads (a blocked accept, a session run) must not hold up exit


if __name__ == "__main__":
    main()
