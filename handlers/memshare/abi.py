"""KVM's vendor-hypervisor service as a pKVM guest sees it: IDs, UID, KVM_FEATURES bitmap.

Mirrors include/linux/arm-smccc.h (KVM's vendor hypervisor service) and
Documentation/virt/kvm/arm/hypercalls.rst (the pKVM guest hypercalls). Constants and register
encodings only; no record keeping, no policy.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from hyperbroker.smccc import uuid_to_regs

# ARM_SMCCC_VENDOR_HYP_CALL_UID_FUNC_ID and the KVM function IDs.
VENDOR_HYP_CALL_UID = 0x8600_FF01
KVM_FEATURES = 0x8600_0000
KVM_PTP = 0x8600_0001
HYP_MEMINFO = 0xC600_0002
MEM_SHARE = 0xC600_0003
MEM_UNSHARE = 0xC600_0004
MMIO_GUARD = 0xC600_0007
DISCOVER_IMPL_VER = 0xC600_0040
DISCOVER_IMPL_CPUS = 0xC600_0041

# ARM_SMCCC_KVM_FUNC_*: the bit each function has in the KVM_FEATURES bitmap.
FUNC_FEATURES = 0  # KVM_FEATURES and VENDOR_HYP_CALL_UID (vendor_hyp_bmap bit FUNC_FEAT)
FUNC_PTP = 1
FUNC_HYP_MEMINFO = 2
FUNC_MEM_SHARE = 3
FUNC_MEM_UNSHARE = 4
FUNC_MMIO_GUARD = 7
FUNC_DISCOVER_IMPL_VER = 64
FUNC_DISCOVER_IMPL_CPUS = 65
NUM_FUNCS = 128  # ARM_SMCCC_KVM_NUM_FUNCS: four 32-bit words, R0 = functions 0..31 ...

# Function number -> the IDs that bit of KVM_FEATURES promises.
FUNCTION_IDS: Mapping[int, tuple[int, ...]] = {
    FUNC_FEATURES: (KVM_FEATURES, VENDOR_HYP_CALL_UID),
    FUNC_PTP: (KVM_PTP,),
    FUNC_HYP_MEMINFO: (HYP_MEMINFO,),
    FUNC_MEM_SHARE: (MEM_SHARE,),
    FUNC_MEM_UNSHARE: (MEM_UNSHARE,),
    FUNC_MMIO_GUARD: (MMIO_GUARD,),
    FUNC_DISCOVER_IMPL_VER: (DISCOVER_IMPL_VER,),
    FUNC_DISCOVER_IMPL_CPUS: (DISCOVER_IMPL_CPUS,),
}

FUNCTION_NAMES: Mapping[int, str] = {
    VENDOR_HYP_CALL_UID: "VENDOR_HYP_CALL_UID",
    KVM_FEATURES: "VENDOR_HYP_KVM_FEATURES",
    KVM_PTP: "VENDOR_HYP_KVM_PTP",
    HYP_MEMINFO: "KVM_HYP_MEMINFO",
    MEM_SHARE: "KVM_MEM_SHARE",
    MEM_UNSHARE: "KVM_MEM_UNSHARE",
    MMIO_GUARD: "KVM_MMIO_GUARD",
    DISCOVER_IMPL_VER: "KVM_DISCOVER_IMPL_VER",
    DISCOVER_IMPL_CPUS: "KVM_DISCOVER_IMPL_CPUS",
}

# KVM's vendor-hyp UID: x0..x3 = 0xb66fb428, 0xe911c52e, 0x564bcaa9, 0x743a004d.
KVM_UID = uuid.UUID("28b46fb6-2ec5-11e9-a9ca-4b564d003a74")


def kvm_uid_regs() -> tuple[int, int, int, int]:
    return uuid_to_regs(KVM_UID.bytes)


def features_bitmap(functions: Iterable[int]) -> tuple[int, int, int, int]:
    """KVM_FEATURES' answer: function n sets bit n % 32 of register n // 32."""
    words = [0, 0, 0, 0]
    for n in functions:
        if not 0 <= n < NUM_FUNCS:
            raise ValueError(f"KVM vendor function {n} is outside 0..{NUM_FUNCS - 1}")
        words[n // 32] |= 1 << (n % 32)
    return (words[0], words[1], words[2], words[3])


def bitmap_functions(words: Iterable[int]) -> frozenset[int]:
    """The function numbers a KVM_FEATURES answer advertises (the guest's bitmap_from_arr32)."""
    return frozenset(
        32 * r + b for r, w in enumerate(words) for b in range(32) if (w & 0xFFFF_FFFF) >> b & 1
    )
