"""Per-VM vCPU power state for userspace PSCI: who is ON, OFF, or ON_PENDING, and why.

The broker learns a vCPU's power only from the calls it sees, so the model keeps what PSCI
requires (DEN0022 §5.1.4 CPU_ON, §5.1.5 AFFINITY_INFO) and folds in evidence:
- a vCPU that makes a call is running, so it is ON whatever the model said;
- CPU_ON leaves its target ON_PENDING until the caller calls again: the VMM carries out a
  result's actions before it resumes the caller (include/hyperbroker/vmm_protocol.h
  HB_MSG_RESULT), so the caller's next call proves the target was started.
It is a plain value with a JSON form for ctx.state; it knows nothing of registers or handlers.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hyperbroker.handlers.psci.abi import AffinityState


class Power(enum.Enum):
    ON = "on"
    OFF = "off"
    ON_PENDING = "on_pending"


@dataclass(frozen=True, slots=True)
class VcpuPower:
    state: Power
    started_by: int | None = None  # ON_PENDING: the vCPU whose CPU_ON is in flight


@dataclass(frozen=True, slots=True)
class VmPower:
    vcpus: tuple[VcpuPower, ...]

    @classmethod
    def initial(cls, nr_vcpus: int, boot_vcpus: Iterable[int]) -> VmPower:
        """Power at VM start: the boot vCPUs ON, every secondary OFF (measured on the KVM bed:
        secondaries start powered off and wait for CPU_ON)."""
        boot = set(boot_vcpus)
        return cls(tuple(VcpuPower(Power.ON if i in boot else Power.OFF) for i in range(nr_vcpus)))

    def state(self, vcpu: int) -> Power:
        return self.vcpus[vcpu].state

    def _set(self, vcpu: int, value: VcpuPower) -> VmPower:
        vcpus = list(self.vcpus)
        vcpus[vcpu] = value
        return replace(self, vcpus=tuple(vcpus))

    def observe(self, caller: int) -> VmPower:
        """Evidence from a call by `caller`: it runs, and its earlier CPU_ON actions were done."""
        out = self
        if 0 <= caller < len(self.vcpus) and self.vcpus[caller].state is not Power.ON:
            out = out._set(caller, VcpuPower(Power.ON))
        for i, v in enumerate(out.vcpus):
            if v.state is Power.ON_PENDING and v.started_by == caller:
                out = out._set(i, VcpuPower(Power.ON))
        return out

    def start(self, caller: int, target: int) -> VmPower:
        """CPU_ON accepted for an OFF target: it is ON_PENDING until the caller's next call."""
        return self._set(target, VcpuPower(Power.ON_PENDING, caller))

    def stop(self, vcpu: int) -> VmPower:
        """CPU_OFF by `vcpu`."""
        return self._set(vcpu, VcpuPower(Power.OFF))

    def all_off(self) -> VmPower:
        return replace(self, vcpus=tuple(VcpuPower(Power.OFF) for _ in self.vcpus))

    def others_off(self, caller: int) -> bool:
        """SYSTEM_SUSPEND's precondition: every vCPU but the caller is OFF (DEN0022 §5.20)."""
        return all(v.state is Power.OFF for i, v in enumerate(self.vcpus) if i != caller)

    def affinity(self, members: Sequence[int]) -> AffinityState:
        """AFFINITY_INFO over the vCPUs of one affinity instance: ON if any is ON (a suspended
        core counts as ON), else ON_PENDING if any is pending, else OFF."""
        states = {self.vcpus[i].state for i in members}
        if Power.ON in states:
            return AffinityState.ON
        if Power.ON_PENDING in states:
            return AffinityState.ON_PENDING
        return AffinityState.OFF

    def resized(self, nr_vcpus: int) -> VmPower:
        """The same VM seen with a different vCPU count: new vCPUs start OFF."""
        vcpus = self.vcpus[:nr_vcpus] + tuple(
            VcpuPower(Power.OFF) for _ in range(len(self.vcpus), nr_vcpus)
        )
        return replace(self, vcpus=vcpus)

    def to_json(self) -> dict[str, Any]:
        return {"vcpus": [[v.state.value, v.started_by] for v in self.vcpus]}

    @classmethod
    def from_json(cls, doc: Any) -> VmPower | None:
        """The stored form, or None for a document this version cannot read (start afresh)."""
        try:
            return cls(tuple(VcpuPower(Power(s), by) for s, by in doc["vcpus"]))
        except (KeyError, TypeError, ValueError):
            return None
