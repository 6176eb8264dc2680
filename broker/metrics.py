"""The broker's Prometheus metrics (docs/operations.md lists them; deploy/ dashboards use them).

Label children are bound once per dispatch entry (broker.dispatch) so the hot path never looks
a label set up; only `observe()` runs per call, and what runs per call or per frame is a
hyperbroker.fastmetrics family: no lock, no bucket scan.
"""

from __future__ import annotations

from hyperbroker.runtime.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    MetricSet,
)

BROKER = MetricSet("broker")

CALL_DURATION = Histogram(
    "hyperbroker_broker_call_duration_seconds",
    "Broker time per call, frame received to result queued, by handler, function and outcome",
    ["handler", "function", "outcome"],
    buckets=LATENCY_BUCKETS,
    registry=BROKER,
)
CALLS_IN_FLIGHT = Gauge("hyperbroker_broker_calls_in_flight", "Calls being handled",
                        registry=BROKER)
HANDLER_ERRORS = Counter(
    "hyperbroker_broker_handler_errors_total", "Handler exceptions turned into fallbacks",
    ["handler"],
    registry=BROKER,
)
DUPLICATE_CALLS = Counter(
    "hyperbroker_broker_duplicate_calls_total",
    "Re-sent calls answered from the vCPU's last-result record or joined to the running one",
    registry=BROKER,
)
DIVERGENT_RESULTS = Counter(
    "hyperbroker_broker_divergent_results_total",
    "Results the guest never saw (its agent had answered with the fallback), handed to the "
    "handler to undo",
    registry=BROKER,
)
HOSTS_ABANDONED = Counter(
    "hyperbroker_broker_hosts_abandoned_total",
    "Hosts this broker stopped serving because another broker took them over (fenced) or a "
    "store write failed (store); their calls in flight got the agent's fallback",
    ["reason"],
    registry=BROKER,
)
for _reason in ("fenced", "store"):
    HOSTS_ABANDONED.labels(_reason)  # exported as 0 before the first one
LEASES_HELD = Gauge("hyperbroker_broker_host_leases", "Hosts whose lease this broker holds",
                    registry=BROKER)
AGENTS_CONNECTED = Gauge("hyperbroker_broker_agents_connected", "Agent streams open",
                         registry=BROKER)
VMS = Gauge("hyperbroker_broker_vms", "VMs registered with this broker", registry=BROKER)
FRAMES = Counter("hyperbroker_broker_frames_total", "Stream frames", ["direction"], registry=BROKER)
FRAMES_IN = FRAMES.labels("in")
FRAMES_OUT = FRAMES.labels("out")
BATCH_SIZE = Histogram(
    "hyperbroker_broker_batch_size", "Calls per received frame",
    buckets=BATCH_BUCKETS,
    registry=BROKER,
)
MEMORY_REQUESTS = Counter(
    "hyperbroker_broker_memory_requests_total", "Guest-memory reads sent to agents",
    registry=BROKER,
)
MEMORY_BYTES = Counter(
    "hyperbroker_broker_memory_bytes_total", "Guest-memory bytes moved", ["direction"],
    registry=BROKER,
)
MEMORY_READ_BYTES = MEMORY_BYTES.labels("read")
MEMORY_WRITE_BYTES = MEMORY_BYTES.labels("write")
RATE_LIMITED = Counter(
    "hyperbroker_broker_rate_limited_total",
    "Calls answered with their rule's fallback because their VM exceeded its call rate",
    registry=BROKER,
)
POLICY_VERSION = Gauge("hyperbroker_broker_policy_version", "Current policy version",
                       registry=BROKER)
ADMIN_AUDIT = Counter(
    "hyperbroker_broker_admin_audit_total",
    "Admin API audit records: refused calls and policy applies, by method and decision "
    "(refused, applied, invalid)",
    ["method", "decision"],
    registry=BROKER,
)
MALFORMED_REASONS = ("undecodable", "no_hello", "bad_hello", "call_records", "unknown_vm",
                     "bad_request")
_MALFORMED = Counter(
    "hyperbroker_broker_malformed_total",
    "Bad input from peers, refused (each logged within the peer's log budget): a message that "
    "is not its method's request type (undecodable), a stream whose first frame is no hello "
    "(no_hello) or whose hello is refused (bad_hello), call bytes that are not whole records "
    "(call_records), a call for a VM or vCPU its host does not have (unknown_vm), an Admin "
    "request with a field out of range (bad_request)",
    ["reason"],
    registry=BROKER,
)
MALFORMED = {reason: _MALFORMED.labels(reason) for reason in MALFORMED_REASONS}
