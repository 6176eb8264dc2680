"""The agent's Prometheus metrics; children bound once so the hot path only observes, and the
per-call ones are hyperbroker.fastmetrics families (no lock, no bucket scan)."""

from __future__ import annotations

import errno

from hyperbroker.kvm import errno_name
from hyperbroker.runtime.metrics import LATENCY_BUCKETS, Counter, Gauge, Histogram, MetricSet

AGENT = MetricSet("agent")

CALL_DURATION = Histogram(
    "hyperbroker_agent_call_duration_seconds",
    "Call received from the VMM to result sent back, by who answered and outcome",
    ["source", "outcome"],
    buckets=LATENCY_BUCKETS,
    registry=AGENT,
)
SOURCES = ("broker", "agent", "fallback")
OUTCOMES = ("ok", "guest_error", "denied", "fallback", "internal_error")
OBSERVE = {
    (s, o): CALL_DURATION.labels(s, o).observe for s in SOURCES for o in OUTCOMES
}
IN_FLIGHT = Gauge("hyperbroker_agent_calls_in_flight", "Calls waiting for the broker",
                  registry=AGENT)
FALLBACKS = Counter("hyperbroker_agent_fallbacks_total", "Calls answered with the rule's fallback",
                    ["reason"], registry=AGENT)
FALLBACK_DEADLINE = FALLBACKS.labels("deadline")
FALLBACK_DISCONNECTED = FALLBACKS.labels("disconnected")
FALLBACK_REJECTED = FALLBACKS.labels("rejected")
_REJECTED = Counter("hyperbroker_agent_vms_rejected_total",
                    "VMs whose forwarded calls get their rules' fallbacks from now on: the broker "
                    "rejected the registration (broker) or KVM refused filter records (filter)",
                    ["reason"], registry=AGENT)
VMS_REJECTED = {reason: _REJECTED.labels(reason) for reason in ("broker", "filter")}
DIVERGENT = Counter("hyperbroker_agent_divergent_results_total",
                    "Broker results that arrived after the call was answered with its fallback",
                    registry=AGENT)
STREAM_UP = Gauge("hyperbroker_agent_broker_stream_up", "1 while the broker stream is open",
                  registry=AGENT)
RECONNECTS = Counter("hyperbroker_agent_reconnects_total", "Broker streams re-opened",
                     registry=AGENT)
BROKER_SILENT = Counter("hyperbroker_agent_broker_silent_total",
                        "Broker streams given up: no welcome, or no frame (not even a keepalive "
                        "echo), within --broker-silence", registry=AGENT)
VMS = Gauge("hyperbroker_agent_vms", "VMs registered on this host", registry=AGENT)
VMM_CONNECTIONS = Gauge("hyperbroker_agent_vmm_connections", "VMM sockets connected",
                        registry=AGENT)
PROTOCOL_ERRORS = Counter("hyperbroker_agent_protocol_errors_total",
                          "Frames from VMMs refused, by errno name", ["code"], registry=AGENT)
# Exported as 0 from the start: every errno the agent refuses a VMM frame with.
PROTOCOL_ERROR = {code: PROTOCOL_ERRORS.labels(errno_name(code)) for code in (
    errno.EPROTO, errno.EBADMSG, errno.EPROTONOSUPPORT, errno.EMSGSIZE, errno.EINVAL,
    errno.ENOENT, errno.EBUSY)}
MEMORY_BYTES = Counter("hyperbroker_agent_memory_bytes_total", "Guest-memory bytes moved",
                       ["direction"], registry=AGENT)
MEMORY_READ = MEMORY_BYTES.labels("read")
MEMORY_WRITE = MEMORY_BYTES.labels("write")
LINK_RTT = Histogram("hyperbroker_agent_link_rtt_seconds",
                     "Agent -> broker -> agent time per call, minus the broker's own time",
                     buckets=LATENCY_BUCKETS, registry=AGENT)
