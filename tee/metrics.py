"""Prometheus metrics of the TEE service (hyperbroker_tee_backend_*), with bounded labels.

Labels are TA names (the installed TAs, a fixed set per process), RPC method names and result
names from tee.gp (a fixed enum plus 'other'). Children are cached so a request does not build
label tuples.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Gauge, Histogram

# Microsecond-range buckets up to seconds (DESIGN.md "Observability").
BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
           5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)

SESSIONS = Gauge("hyperbroker_tee_backend_sessions", "Sessions open in the TEE service", ["ta"])
VMS = Gauge("hyperbroker_tee_backend_vms", "VM incarnations registered with the TEE service")
REQUESTS = Counter("hyperbroker_tee_backend_requests_total",
                   "TEE-backend RPCs answered, by method and result", ["method", "result"])
TA_SECONDS = Histogram("hyperbroker_tee_backend_ta_seconds",
                       "Time spent in trusted-application entry points", ["ta", "entry"],
                       buckets=BUCKETS)


@cache
def sessions(ta: str) -> Gauge:
    return SESSIONS.labels(ta)


@cache
def requests(method: str, result: str) -> Counter:
    return REQUESTS.labels(method, result)


@cache
def ta_seconds(ta: str, entry: str) -> Histogram:
    return TA_SECONDS.labels(ta, entry)
