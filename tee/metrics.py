"""Prometheus metrics of the TEE service (hyperbroker_tee_backend_*), with bounded labels.

Labels are TA names (the installed TAs, a fixed set per process), RPC method names and result
names from tee.gp (a fixed enum plus 'other'). Children are cached so a request does not build
label tuples.
"""

from __future__ import annotations

from functools import cache

from hyperbroker.runtime.metrics import (
    LATENCY_BUCKETS,
    Counter,
    CounterChild,
    Gauge,
    GaugeChild,
    Histogram,
    HistogramChild,
    MetricSet,
)

TEE_SERVICE = MetricSet("tee-serve")

SESSIONS = Gauge("hyperbroker_tee_backend_sessions", "Sessions open in the TEE service", ["ta"],
                 registry=TEE_SERVICE)
VMS = Gauge("hyperbroker_tee_backend_vms", "VM incarnations registered with the TEE service",
            registry=TEE_SERVICE)
REQUESTS = Counter("hyperbroker_tee_backend_requests_total",
                   "TEE-backend RPCs answered, by method and result", ["method", "result"],
                   registry=TEE_SERVICE)
TA_SECONDS = Histogram("hyperbroker_tee_backend_ta_seconds",
                       "Time spent in trusted-application entry points", ["ta", "entry"],
                       buckets=LATENCY_BUCKETS, registry=TEE_SERVICE)


@cache
def sessions(ta: str) -> GaugeChild:
    return SESSIONS.labels(ta)


@cache
def requests(method: str, result: str) -> CounterChild:
    return REQUESTS.labels(method, result)


@cache
def ta_seconds(ta: str, entry: str) -> HistogramChild:
    return TA_SECONDS.labels(ta, entry)
