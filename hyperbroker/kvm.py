"""KVM arm64 uapi: the SMCCC filter record, hypercall exit flags, register IDs.

Mirrors arch/arm64/include/uapi/asm/kvm.h and include/uapi/linux/kvm.h (Linux 6.4+;
include/uapi/linux/kvm.h; Documentation/virt/kvm/api.rst, KVM_EXIT_HYPERCALL). Byte layouts are
checked against their C sizes by tests/test_kvm_uapi.py. Nothing here issues an ioctl: the VMM does
that."""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

# KVM_SET_DEVICE_ATTR on the VM fd: group KVM_ARM_VM_SMCCC_CTRL, attr KVM_ARM_VM_SMCCC_FILTER.
KVM_ARM_VM_SMCCC_CTRL = 0
KVM_ARM_VM_SMCCC_FILTER = 0

# arm64 KVM_EXIT_HYPERCALL flags (run->hypercall.flags).
KVM_EXIT_HYPERCALL = 3
KVM_HYPERCALL_EXIT_SMC = 1 << 0
KVM_HYPERCALL_EXIT_16BIT = 1 << 1


class FilterAction(enum.IntEnum):
    """enum kvm_smccc_filter_action."""

    HANDLE = 0
    DENY = 1
    FWD_TO_USER = 2


NR_SMCCC_FILTER_ACTIONS = 3

# struct kvm_smccc_filter { __u32 base; __u32 nr_functions; __u8 action; __u8 pad[15]; }
SMCCC_FILTER = struct.Struct("<IIB15s")
assert SMCCC_FILTER.size == 24


@dataclass(frozen=True, slots=True)
class SmcccFilter:
    """One record of the VM's SMCCC filter, exactly as KVM_SET_DEVICE_ATTR reads it."""

    base: int
    nr_functions: int
    action: int
    pad: bytes = bytes(15)

    def pack(self) -> bytes:
        return SMCCC_FILTER.pack(self.base, self.nr_functions, self.action, self.pad)

    @classmethod
    def unpack(cls, data: bytes) -> SmcccFilter:
        base, nr, action, pad = SMCCC_FILTER.unpack(data)
        return cls(base, nr, action, pad)


def errno_name(value: int) -> str:
    """'OK' for 0, else the errno's symbolic name (EEXIST ...), else the number."""
    return "OK" if value == 0 else errno.errorcode.get(value, str(value))


def filter_errno(record: SmcccFilter) -> int:
    """The errno kvm_smccc_set_filter() gives `record` on its own, before overlap checks; 0 if none.

    Order as in arch/arm64/kvm/hypercalls.c (arch/arm64/kvm/hypercalls.c): non-zero pad, then
    `end = base + nr - 1` in u32 arithmetic below base (empty or wrapping), or an unknown action.
    """
    if any(record.pad):
        return errno.EINVAL
    start = record.base & 0xFFFF_FFFF
    end = (start + record.nr_functions - 1) & 0xFFFF_FFFF
    if end < start or record.action >= NR_SMCCC_FILTER_ACTIONS:
        return errno.EINVAL
    return 0


# Register IDs for KVM_GET_ONE_REG / KVM_SET_ONE_REG (api.rst; Documentation/virt/kvm/api.rst,
# KVM_SET_ONE_REG).
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_ARM_CORE = 0x0010 << 16


def core_reg_x(n: int) -> int:
    """The one-reg ID of xN: offsetof(struct kvm_regs, regs.regs[n]) / sizeof(__u32)."""
    if not 0 <= n <= 30:
        raise ValueError("x0..x30")
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (n * 2)


KVM_REG_PC = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | 0x40
