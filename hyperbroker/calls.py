"""What flows through hyperbroker: a forwarded call, its result, and what the VMM must do.

These types are the contract between handlers, the broker and the agent. They are plain values:
no I/O, no protobuf, no sockets. The wire forms live in hyperbroker.wire.v1 (agent <-> broker)
and hyperbroker.wire.vmm (VMM <-> agent).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from hyperbroker.kvm import KVM_HYPERCALL_EXIT_SMC
from hyperbroker.smccc import (
    NOT_SUPPORTED_U64,
    NR_ARGS,
    SMCCC_1_1_RESULT_MASK,
    U64_MASK,
)


class Outcome(enum.IntEnum):
    """How a call ended. Values are shared by the proto enum and the VMM protocol."""

    OK = 0
    GUEST_ERROR = 1  # the handler answered with the ABI's own error code
    DENIED = 2  # no rule forwards it, or no handler serves it: SMCCC NOT_SUPPORTED
    FALLBACK = 3  # the broker could not answer in time: the rule's fallback registers
    INTERNAL_ERROR = 4  # a handler failed; the guest got the rule's fallback


class Conduit(enum.IntEnum):
    HVC = 0
    SMC = 1


class Call(NamedTuple):
    """One guest SMCCC call as the VMM saw it at KVM_EXIT_HYPERCALL.

    A NamedTuple rather than a dataclass: the broker builds one per hypercall.
    """

    vcpu: int
    seq: int
    function_id: int
    x: tuple[int, ...]  # x0..x17 as read with KVM_GET_ONE_REG; x[0] low 32 bits == function_id
    flags: int = 0  # KVM_HYPERCALL_EXIT_* as the exit reported them

    @property
    def conduit(self) -> Conduit:
        return Conduit.SMC if self.flags & KVM_HYPERCALL_EXIT_SMC else Conduit.HVC

    def arg(self, n: int) -> int:
        return self.x[n] if n < len(self.x) else 0


class ActionKind(enum.IntEnum):
    """VMM actions a result may carry; numbers shared with include/hyperbroker/vmm_protocol.h."""

    CPU_ON = 1  # vcpu, address = entry point, value = context id
    CPU_OFF = 2  # vcpu
    CPU_SUSPEND = 3  # vcpu, address = entry point, value = context id
    SYSTEM_OFF = 4
    SYSTEM_RESET = 5  # a cold reset (PSCI SYSTEM_RESET)
    SYSTEM_SUSPEND = 6  # vcpu, address = entry point, value = context id
    INJECT_IRQ = 7  # vcpu, value = interrupt number, address = level (0 or 1)
    SYSTEM_OFF2 = 8  # value = off type (PSCI SYSTEM_OFF2), address = cookie
    SYSTEM_RESET2 = 9  # value = reset type (PSCI SYSTEM_RESET2), address = cookie


@dataclass(frozen=True, slots=True)
class VmmAction:
    kind: ActionKind
    vcpu: int = 0
    address: int = 0
    value: int = 0


@dataclass(frozen=True, slots=True)
class MemoryWrite:
    """Bytes to store in guest memory before the vCPU resumes."""

    gpa: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Result:
    """The registers to write back, with an explicit mask, and what else must happen first.

    `x[i]` is written to register i when bit i of `mask` is set. SMCCC 1.0/1.1 calls return
    x0..x3; SMCCC 1.2 calls may return up to x0..x17 (Arm DEN0028 (SMCCC)).
    """

    x: tuple[int, ...]
    mask: int = SMCCC_1_1_RESULT_MASK
    outcome: Outcome = Outcome.OK
    actions: tuple[VmmAction, ...] = ()
    memory_writes: tuple[MemoryWrite, ...] = field(default=())

    @classmethod
    def regs(cls, *values: int, outcome: Outcome = Outcome.OK, mask: int | None = None,
             actions: tuple[VmmAction, ...] = ()) -> Result:
        """x0.. from `values` (negative codes sign-extended); x0..x3 at least are written."""
        n = len(values)
        if n > NR_ARGS:
            raise ValueError(f"at most {NR_ARGS} result registers")
        x = tuple([v & U64_MASK for v in values])  # a list first: faster than a generator
        if n < 4:
            x += (0,) * (4 - n)
            n = 4
        return cls(x, (1 << n) - 1 if mask is None else mask, outcome, actions)

    def register(self, n: int) -> int:
        return self.x[n] if n < len(self.x) else 0


NOT_SUPPORTED = Result.regs(NOT_SUPPORTED_U64, outcome=Outcome.DENIED)
