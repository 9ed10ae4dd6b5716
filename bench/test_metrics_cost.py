"""What metrics recording adds to each response, against recording with prometheus_client's
own metrics per request (the obvious design). The measurement behind `vasipc.metrics.Stats`
(append a tuple per response, fold into buckets with numpy every 1024 and at each scrape).

    python -m pytest bench/test_metrics_cost.py --benchmark-only

Per successful `infer` the server records five timings (four stages and the total) and a
count; per other response (health, info, an error) a count. Batch sizes are recorded once
per batch, not per response.
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from vasipc.logs import ErrorLog
from vasipc.metrics import LATENCY_BUCKETS_S, STAGES, Stats

MD = {"preprocess_ms": 0.41, "inference_ms": 6.1, "postprocess_ms": 0.1, "queue_ms": 0.02,
      "total_ms": 6.9, "batch_size": 1, "model_version": "1", "device": "cpu"}


class _PerRequestPrometheus:
    """The library's metrics, observed per request (what Stats replaces)."""

    def __init__(self) -> None:
        reg = CollectorRegistry()
        self.requests = Counter("req", "", ["op", "error_code"], registry=reg)
        self.stage = Histogram("stage_seconds", "", ["stage"], buckets=LATENCY_BUCKETS_S,
                               registry=reg)
        self.total = Histogram("total_seconds", "", buckets=LATENCY_BUCKETS_S, registry=reg)
        self.stages = [self.stage.labels(s) for s in STAGES]
        self.ok = self.requests.labels("infer", "ok")

    def infer_ok(self, md: dict) -> None:
        for child, key in zip(self.stages, ("queue_ms", "preprocess_ms", "inference_ms",
                                            "postprocess_ms"), strict=True):
            child.observe(md[key] / 1e3)
        self.total.observe(md["total_ms"] / 1e3)
        self.ok.inc()


@pytest.mark.benchmark(group="record a successful infer")
@pytest.mark.parametrize("impl", ["vasipc Stats", "prometheus_client per request"])
def test_record_infer(benchmark, impl):
    rec = Stats() if impl == "vasipc Stats" else _PerRequestPrometheus()
    benchmark(rec.infer_ok, MD)


@pytest.mark.benchmark(group="record another response")
def test_record_count(benchmark):
    benchmark(Stats().count, "health", "ok")


@pytest.mark.benchmark(group="record another response")
def test_error_log_repeat(benchmark):
    """An error of a class already logged: counted, not logged."""
    log = ErrorLog(logging.getLogger("bench-metrics"))
    log.note("frame_not_found", "first")
    benchmark(log.note, "frame_not_found", "again")
