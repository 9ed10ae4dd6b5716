"""The `--metrics-port` endpoint: Prometheus `/metrics` and the HTTP probes.

`ServerCollector` turns what vasipc.metrics.Stats recorded, and gauges read from the live
server, into metric families when Prometheus scrapes. `MetricsServer` serves `/metrics`,
`/healthz` (200 while the process runs) and `/readyz` (200 only while the server is ready:
the model loaded and warm, not draining, no fatal session error; the socket `health` op's
`ready`). It starts before the model loads and is given the server with `attach` once the
server is serving. Only this module imports prometheus_client, and serve.py imports it only
when metrics are served.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vasipc.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S, STAGES

if TYPE_CHECKING:
    from vasipc.server import Server


def _histogram(name: str, doc: str, bounds: tuple, counts: np.ndarray, total: float,
               labels: dict[str, str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    """Per-bucket counts (the last one +Inf) as cumulative Prometheus buckets."""
    cumulative = np.cumsum(counts).tolist()
    buckets = [(repr(float(b)), c) for b, c in zip(bounds, cumulative, strict=False)]
    buckets.append(("+Inf", cumulative[-1]))
    if family is None:
        family = HistogramMetricFamily(name, doc, labels=list(labels or ()))
    family.add_metric(list((labels or {}).values()), buckets, total)
    return family


class ServerCollector(Collector):
    """The server's metrics, built at scrape time from `Stats` and the live server."""

    def __init__(self, holder: MetricsServer) -> None:
        self._holder = holder

    def collect(self) -> Iterator[Metric]:
        server = self._holder.server
        if server is None:  # still loading: only the process collector has something
            return
        snap = server.stats.snapshot()
        requests = CounterMetricFamily("vasipc_requests", "Responses by op and error_code "
                                       "(ok: success).", labels=["op", "error_code"])
        for (op, code), n in sorted(snap["counts"].items()):
            requests.add_metric([op, code], n)
        yield requests

        latency, sums = snap["latency"], snap["latency_sum_ms"] / 1e3
        stages = None
        for i, stage in enumerate(STAGES):
            stages = _histogram("vasipc_stage_duration_seconds",
                                "Time of each stage of successful infer requests (metadata "
                                "*_ms).", LATENCY_BUCKETS_S, latency[i], sums[i],
                                {"stage": stage}, stages)
        yield stages
        yield _histogram("vasipc_request_duration_seconds", "Successful infer requests, last "
                         "byte read to response written (metadata total_ms).",
                         LATENCY_BUCKETS_S, latency[len(STAGES)], sums[len(STAGES)])

        batches = snap["batch_sizes"]  # batches run, by size
        sizes = np.arange(len(batches))
        bucket_of = np.searchsorted(np.asarray(BATCH_BUCKETS), sizes, side="left")
        per_bucket = np.bincount(bucket_of, weights=batches, minlength=len(BATCH_BUCKETS) + 1)
        yield _histogram("vasipc_batch_size", "Batches run, by the number of requests in them.",
                         BATCH_BUCKETS, per_bucket.astype(np.int64),
                         float((batches * sizes).sum()))

        for name, doc, value in (
            ("vasipc_queue_depth", "Infer requests waiting in the queue.", server.batcher.queued()),
            ("vasipc_in_flight_requests", "Infer requests read and not yet answered.",
             server.in_flight()),
            ("vasipc_open_connections", "Open client connections.", server.connections()),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        refused = CounterMetricFamily("vasipc_connections_refused", "Connections closed at accept, "
                                      "never answered, by reason (peer: not in --allow-uid / "
                                      "--allow-gid; max_connections: at the cap).", labels=["reason"])
        for reason, n in sorted(server.refused_connections().items()):
            refused.add_metric([reason], n)
        yield refused
        # one writer at a time (the batcher's fill role), read atomically here
        yield CounterMetricFamily("vasipc_frame_read_bytes", "Bytes of frames mapped and read.",
                                  value=server.batcher.frame_bytes_read)

        model = server.model  # read now: a reload shows the new version
        yield InfoMetricFamily("vasipc_model", "The model being served.", value={
            "model_id": server.model_id, "model_version": str(model.spec.model_version),
            "providers": ",".join(model.providers), "device": model.device.name,
            "backend": model.backend.name, "precision": model.backend.precision,
            "streams": str(model.streams),
            "architecture": model.head.architecture, "task": model.head.task})
        reloads = CounterMetricFamily("vasipc_reloads", "Model reloads by result.",
                                      labels=["result"])
        counts = server.reload_counts
        for result in ("ok", "failed"):
            reloads.add_metric([result], counts.get(result, 0))
        yield reloads


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 10.0  # a probe or scrape that stalls mid-request does not keep its thread

    def do_GET(self) -> None:  # the http.server API names it
        path = self.path.split("?", 1)[0]
        holder = self.server.holder
        if path == "/metrics":
            self._answer(200, generate_latest(holder.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._answer(200, b"ok\n")
        elif path == "/readyz":
            ready = holder.ready()
            self._answer(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
        else:
            self._answer(404, b"not found\n")

    def _answer(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no line per scrape or probe


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    holder: MetricsServer

    def server_bind(self) -> None:
        # HTTPServer's would look up the host's FQDN (a DNS query, slow without a network)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The metrics and probe endpoints, bound at construction (OSError if the address is
    taken or invalid); `start` serves them on a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.server: Server | None = None
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(ServerCollector(self))
        self._http = (_HTTPServer6 if ":" in host else _HTTPServer)((host, port), _Handler)
        self._http.holder = self

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return host, port

    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        threading.Thread(target=self._http.serve_forever, name="vasipc-metrics",
                         daemon=True).start()

    def attach(self, server: Server) -> None:
        """The server is serving: metrics and readiness come from it from now on."""
        self.server = server

    def ready(self) -> bool:
        server = self.server
        return server is not None and server.ready()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
