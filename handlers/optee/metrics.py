"""Prometheus metrics of the OP-TEE proxy (hyperbroker_tee_*), with bounded label sets.

`ta` is a name from tee.uuids.WELL_KNOWN or the handler's `ta_names` config, else "other";
`command` one of the six OP-TEE message commands; `code` and `origin` names from tee.gp (fixed
enums plus "other"); `reason` a BackendUnavailable reason (timeout, unavailable, protocol, or a
gRPC status name). Children are cached so a call does not build label tuples.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Gauge, Histogram

from hyperbroker.tee.gp import origin_name, result_name

# Microsecond-range buckets up to seconds (DESIGN.md "Observability").
BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
           5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

SESSIONS = Gauge("hyperbroker_tee_sessions_open", "TEE sessions open through the proxy", ["ta"])
CALL_SECONDS = Histogram(
    "hyperbroker_tee_call_seconds",
    "Time per OP-TEE message: part=proxy in the handler, part=backend waiting for the TEE service",
    ["command", "part"], buckets=BUCKETS)
ERRORS = Counter("hyperbroker_tee_errors_total",
                 "TEE errors given to guests in messages, by result code and origin",
                 ["code", "origin"])
SMC_ERRORS = Counter("hyperbroker_tee_smc_errors_total",
                     "OP-TEE SMC-level errors given to guests (a0), by return code", ["code"])
BACKEND_FAILURES = Counter("hyperbroker_tee_backend_failures_total",
                           "TEE-backend calls that got no answer", ["command", "reason"])
YIELDS = Counter("hyperbroker_tee_yields_total",
                 "Messages that returned to the guest with a foreign-interrupt RPC to finish later")
THREADS = Gauge("hyperbroker_tee_threads_running",
                "OP-TEE messages being served by the TEE backend, across VMs")


@cache
def sessions(ta: str) -> Gauge:
    return SESSIONS.labels(ta)


@cache
def call_seconds(command: str, part: str) -> Histogram:
    return CALL_SECONDS.labels(command, part)


def error(code: int, origin: int) -> Counter:
    """Keyed by names, not raw codes: a TA may return any 32-bit value."""
    return _error(result_name(code), origin_name(origin))


@cache
def _error(code: str, origin: str) -> Counter:
    return ERRORS.labels(code, origin)


@cache
def smc_error(name: str) -> Counter:
    return SMC_ERRORS.labels(name)


@cache
def backend_failure(command: str, reason: str) -> Counter:
    return BACKEND_FAILURES.labels(command, reason)
