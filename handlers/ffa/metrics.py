"""Prometheus metrics of the FF-A handler, all named hyperbroker_ffa_* with bounded labels.

Labels come from closed sets only: transaction kind (share, lend), reclaim reason, FF-A function
names (handlers.ffa.abi.FUNCTION_NAMES plus one "other"), error names (FfaError), and partition
names from the handler's configuration. The counters are per broker process and start at zero
with it: `shares_total - reclaims_total` is the number of shares this process saw begin and not
end, not the number of live shares (those are in the store, per VM: `hyperbroker inspect`).
No handler logic here.
"""

from __future__ import annotations

from hyperbroker.handlers.api import HANDLER_METRICS
from hyperbroker.handlers.ffa.state import ShareKind
from hyperbroker.runtime.metrics import Counter, Gauge

SHARES = Counter(
    "hyperbroker_ffa_shares_total", "Memory transactions completed (MEM_SHARE/MEM_LEND)", ["kind"],
    registry=HANDLER_METRICS,
)
PAGES_SHARED = Counter(
    "hyperbroker_ffa_pages_shared_total", "4 KiB pages in completed memory transactions", ["kind"],
    registry=HANDLER_METRICS,
)
RECLAIMS = Counter(
    "hyperbroker_ffa_reclaims_total",
    "Memory transactions ended (guest FFA_MEM_RECLAIM or VM destroyed)",
    ["reason"],
    registry=HANDLER_METRICS,
)
PAGES_RECLAIMED = Counter(
    "hyperbroker_ffa_pages_reclaimed_total", "4 KiB pages returned to their VM", ["reason"],
    registry=HANDLER_METRICS,
)
DIRECT_MESSAGES = Counter(
    "hyperbroker_ffa_direct_messages_total",
    "Direct requests delivered to a partition, by outcome (ok: a response; error: FFA_ERROR)",
    ["partition", "kind", "result"],
    registry=HANDLER_METRICS,
)
ERRORS = Counter(
    "hyperbroker_ffa_errors_total", "FFA_ERROR answers by function and error code",
    ["function", "code"],
    registry=HANDLER_METRICS,
)
PARTITION_UP = Gauge(
    "hyperbroker_ffa_partition_up",
    "1 when the partition answered its last request, 0 when it could not be reached",
    ["partition"],
    registry=HANDLER_METRICS,
)

# Exported as 0 before the first event, so a panel shows 0 rather than no data. A reclaim's reason
# is the guest's FFA_MEM_RECLAIM, an undone share, or the VM reset or destroyed.
SHARE_KINDS = tuple(kind.value for kind in ShareKind)
RECLAIM_REASONS = ("guest", "undo", "vm_reset", "vm_destroyed")
for _family, _values in ((SHARES, SHARE_KINDS), (PAGES_SHARED, SHARE_KINDS),
                         (RECLAIMS, RECLAIM_REASONS), (PAGES_RECLAIMED, RECLAIM_REASONS)):
    _family.initialise(_values)


def count(metric: Counter, *labels: str, amount: float = 1) -> None:
    metric.labels(*labels).inc(amount)


def set_up(partition: str, up: bool) -> None:
    PARTITION_UP.labels(partition).set(1 if up else 0)
