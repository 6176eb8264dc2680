"""Prometheus metrics of the OP-TEE proxy (hyperbroker_tee_*), with bounded label sets.

`ta` is a name from tee.uuids.WELL_KNOWN or the handler's `ta_names` config, else "other";
`command` one of the six OP-TEE message commands; `code` and `origin` names from tee.gp (fixed
enums plus "other"); `reason` a BackendUnavailable reason (timeout, unavailable, protocol, or a
gRPC status name). Children are cached so a call does not build label tuples.
"""

from __future__ import annotations

from functools import cache

from hyperbroker.handlers.api import HANDLER_METRICS
from hyperbroker.runtime.metrics import (
    LATENCY_BUCKETS,
    Counter,
    CounterChild,
    Gauge,
    GaugeChild,
    Histogram,
    HistogramChild,
)
from hyperbroker.tee.gp import origin_name, result_name

SESSIONS = Gauge("hyperbroker_tee_sessions_open", "TEE sessions open through the proxy", ["ta"],
                 registry=HANDLER_METRICS)
CALL_SECONDS = Histogram(
    "hyperbroker_tee_call_seconds",
    "Time per OP-TEE message: part=proxy in the handler, part=backend waiting for the TEE service",
    ["command", "part"], buckets=LATENCY_BUCKETS, registry=HANDLER_METRICS)
ERRORS = Counter("hyperbroker_tee_errors_total",
                 "TEE errors given to guests in messages, by result code and origin",
                 ["code", "origin"], registry=HANDLER_METRICS)
SMC_ERRORS = Counter("hyperbroker_tee_smc_errors_total",
                     "OP-TEE SMC-level errors given to guests (a0), by return code", ["code"],
                     registry=HANDLER_METRICS)
BACKEND_FAILURES = Counter("hyperbroker_tee_backend_failures_total",
                           "TEE-backend calls that got no answer", ["command", "reason"],
                           registry=HANDLER_METRICS)
YIELDS = Counter("hyperbroker_tee_yields_total",
                 "Messages that returned to the guest with a foreign-interrupt RPC to finish later",
                 registry=HANDLER_METRICS)
THREADS = Gauge("hyperbroker_tee_threads_running",
                "OP-TEE messages being served by the TEE backend, across VMs",
                registry=HANDLER_METRICS)


@cache
def sessions(ta: str) -> GaugeChild:
    return SESSIONS.labels(ta)


@cache
def call_seconds(command: str, part: str) -> HistogramChild:
    return CALL_SECONDS.labels(command, part)


def error(code: int, origin: int) -> CounterChild:
    """Keyed by names, not raw codes: a TA may return any 32-bit value."""
    return _error(result_name(code), origin_name(origin))


@cache
def _error(code: str, origin: str) -> CounterChild:
    return ERRORS.labels(code, origin)


@cache
def smc_error(name: str) -> CounterChild:
    return SMC_ERRORS.labels(name)


@cache
def backend_failure(command: str, reason: str) -> CounterChild:
    return BACKEND_FAILURES.labels(command, reason)
