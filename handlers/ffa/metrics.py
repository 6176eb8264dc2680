"""Prometheus metrics of the FF-A handler, all named hyperbroker_ffa_* with bounded labels.

Labels come from closed sets only: transaction kind (share, lend), reclaim reason, FF-A function
names (handlers.ffa.abi.FUNCTION_NAMES plus one "other"), error names (FfaError), and partition
names from the handler's configuration. Counters only grow, so the number of live shares is
`shares_total - reclaims_total` summed across broker processes, which stays right across
restarts (state lives in the store, not in these counters). Children are resolved once per label
set and cached, so a call does at most one dict lookup per metric. No handler logic here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

SHARES = Counter(
    "hyperbroker_ffa_shares_total", "Memory transactions completed (MEM_SHARE/MEM_LEND)", ["kind"]
)
PAGES_SHARED = Counter(
    "hyperbroker_ffa_pages_shared_total", "4 KiB pages in completed memory transactions", ["kind"]
)
RECLAIMS = Counter(
    "hyperbroker_ffa_reclaims_total",
    "Memory transactions ended (guest FFA_MEM_RECLAIM or VM destroyed)",
    ["reason"],
)
PAGES_RECLAIMED = Counter(
    "hyperbroker_ffa_pages_reclaimed_total", "4 KiB pages returned to their VM", ["reason"]
)
DIRECT_MESSAGES = Counter(
    "hyperbroker_ffa_direct_messages_total",
    "Direct requests delivered to a partition, by outcome (ok: a response; error: FFA_ERROR)",
    ["partition", "kind", "result"],
)
ERRORS = Counter(
    "hyperbroker_ffa_errors_total", "FFA_ERROR answers by function and error code",
    ["function", "code"],
)
PARTITION_UP = Gauge(
    "hyperbroker_ffa_partition_up",
    "1 when the partition answered its last request, 0 when it could not be reached",
    ["partition"],
)

_children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}


def child(metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
    """`metric.labels(*labels)`, resolved once per label set."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def count(metric: Counter, *labels: str, amount: float = 1) -> None:
    c = child(metric, *labels)
    assert isinstance(c, Counter)
    c.inc(amount)


def set_up(partition: str, up: bool) -> None:
    g = child(PARTITION_UP, partition)
    assert isinstance(g, Gauge)
    g.set(1 if up else 0)
