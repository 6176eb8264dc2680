"""One VM's Hyper-V persona state: partition-wide registers, per-VP registers, crash records.

Kept in ctx.state as JSON; each call works on the state freshly loaded from it, and the adapter
stores it back only when it changed. Knows nothing of registers on the wire or of memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATE_VERSION = 1


@dataclass
class PartitionState:
    partition_id: int = 0  # HV_PARTITION_ID_INVALID until allocated
    guest_os_id: int = 0
    crash_params: list[int] = field(default_factory=lambda: [0] * 5)  # GUEST_CRASH_P0..P4
    reference_tsc: int = 0
    time_epoch_ns: int | None = None  # monotonic time at which TIME_REF_COUNT was 0
    time_last: int = 0  # the last TIME_REF_COUNT given: it never goes back
    vp_registers: dict[int, dict[int, int]] = field(default_factory=dict)  # vp -> name -> value
    crash_count: int = 0
    crashes: list[dict[str, Any]] = field(default_factory=list)  # newest last
    messages_posted: int = 0
    events_signalled: int = 0
    eoms: int = 0

    def vp(self, index: int) -> dict[int, int]:
        return self.vp_registers.setdefault(index, {})

    def to_json(self) -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "partition_id": self.partition_id,
            "guest_os_id": self.guest_os_id,
            "crash_params": list(self.crash_params),
            "reference_tsc": self.reference_tsc,
            "time_epoch_ns": self.time_epoch_ns,
            "time_last": self.time_last,
            "vp_registers": {str(vp): {f"{n:#x}": v for n, v in regs.items()}
                             for vp, regs in sorted(self.vp_registers.items()) if regs},
            "crash_count": self.crash_count,
            "crashes": list(self.crashes),
            "messages_posted": self.messages_posted,
            "events_signalled": self.events_signalled,
            "eoms": self.eoms,
        }

    @classmethod
    def from_json(cls, doc: Any) -> PartitionState:
        """The stored document, or a fresh state when there is none."""
        if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
            return cls()
        return cls(
            partition_id=int(doc["partition_id"]),
            guest_os_id=int(doc["guest_os_id"]),
            crash_params=[int(v) for v in doc["crash_params"]],
            reference_tsc=int(doc["reference_tsc"]),
            time_epoch_ns=doc["time_epoch_ns"],
            time_last=int(doc["time_last"]),
            vp_registers={int(vp): {int(n, 16): int(v) for n, v in regs.items()}
                          for vp, regs in doc["vp_registers"].items()},
            crash_count=int(doc["crash_count"]),
            crashes=list(doc["crashes"]),
            messages_posted=int(doc["messages_posted"]),
            events_signalled=int(doc["events_signalled"]),
            eoms=int(doc["eoms"]),
        )
