"""Discovery: FFA_FEATURES, FFA_ID_GET, FFA_SPM_ID_GET, FFA_PARTITION_INFO_GET(_REGS).

Pure answers computed from the caller's negotiated version, the configured partitions and the
handler limits. FFA_PARTITION_INFO_GET's descriptors go into the caller's RX buffer: this module
returns the bytes, and handlers.ffa.mailbox decides whether RX may take them. It knows nothing of
guest memory, the store or how partitions are served.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.abi import FfaError, Success
from hyperbroker.handlers.ffa.descriptors import encode_partition_info, partition_info_size
from hyperbroker.handlers.ffa.partitions import Partition, PartitionSet
from hyperbroker.handlers.ffa.version import served_at

# FFA_RXTX_MAP properties: bits[1:0] minimum size and alignment (0 = 4 KiB), bits[31:16]
# the maximum buffer size in pages, a field that exists from v1.2.
RXTX_MIN_4K = 0
RXTX_MAX_PAGES_SHIFT = 16
RXTX_MAX_PAGES_LIMIT = 0xFFFF
FEATURE_ID_MBZ = 0x7FFF_FF00  # bits[30:8] of a feature ID (Hafnium)
FUNCTION_ID_BIT = 1 << 31


def features(version: int, w1: int, max_rxtx_pages: int) -> Success | FfaError:
    """FFA_FEATURES(w1): SUCCESS with w2 = interface properties, or NOT_SUPPORTED.

    Feature IDs (NPI, SRI, MEI) are NOT_SUPPORTED: this endpoint raises no notifications and no
    managed exits, and Linux then runs without notifications. MEM_SHARE/LEND report
    w2 bit0 = 0, no dynamic buffers, like pKVM and Xen.
    """
    w1 &= abi.W_MASK
    if not w1 & FUNCTION_ID_BIT:
        return FfaError.NOT_SUPPORTED
    if not served_at(w1, version):
        return FfaError.NOT_SUPPORTED
    properties = 0
    if w1 in (abi.FFA_RXTX_MAP_32, abi.FFA_RXTX_MAP_64):
        properties = RXTX_MIN_4K
        if version >= abi.VERSION_1_2:
            properties |= min(max_rxtx_pages, RXTX_MAX_PAGES_LIMIT) << RXTX_MAX_PAGES_SHIFT
    return Success((0, properties))


def id_get(endpoint_id: int) -> Success:
    """FFA_ID_GET: w2[15:0] = the caller's own endpoint ID."""
    return Success((0, endpoint_id))


def spm_id_get(spmc_id: int) -> Success:
    """FFA_SPM_ID_GET (v1.1): w2 = the SPMC's ID (Hafnium api_ffa_spm_id_get)."""
    return Success((0, spmc_id))


def uuid_from_words(w1: int, w2: int, w3: int, w4: int) -> uuid.UUID | None:
    """The raw UUID bytes as four little-endian words (Linux export_uuid); nil is None."""
    raw = b"".join((w & abi.W_MASK).to_bytes(4, "little") for w in (w1, w2, w3, w4))
    return None if raw == bytes(16) else uuid.UUID(bytes=raw)


def uuid_from_pair(lo: int, hi: int) -> uuid.UUID | None:
    """The raw UUID bytes as two little-endian u64 (GET_REGS x1/x2, REQ2 x2/x3)."""
    raw = lo.to_bytes(8, "little") + hi.to_bytes(8, "little")
    return None if raw == bytes(16) else uuid.UUID(bytes=raw)


def uuid_to_pair(value: uuid.UUID) -> tuple[int, int]:
    raw = value.bytes
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


@dataclass(frozen=True, slots=True)
class PartitionInfoPlan:
    """What FFA_PARTITION_INFO_GET answers: w2 count, w3 size, and RX contents unless count-only."""

    count: int
    size: int
    descriptors: bytes | None

    def answer(self) -> Success:
        return Success((0, self.count, self.size))


def _matching(partitions: PartitionSet, wanted: uuid.UUID | None) -> tuple[Partition, ...] | None:
    found = partitions.matching(wanted)
    if wanted is not None and not found:
        return None  # a UUID nobody has (Xen ffa_get_sp_count)
    return found


def partition_info_get(
    version: int, partitions: PartitionSet, w1: int, w2: int, w3: int, w4: int, w5: int
) -> PartitionInfoPlan | FfaError:
    """FFA_PARTITION_INFO_GET: UUID filter in w1..w4, flags in w5."""
    flags = w5 & abi.W_MASK
    allowed = 0 if version <= abi.VERSION_1_0 else abi.PARTITION_INFO_COUNT_ONLY
    if flags & ~allowed:
        return FfaError.INVALID_PARAMETERS
    found = _matching(partitions, uuid_from_words(w1, w2, w3, w4))
    if found is None:
        return FfaError.INVALID_PARAMETERS
    if flags & abi.PARTITION_INFO_COUNT_ONLY:
        return PartitionInfoPlan(len(found), 0, None)  # Xen: w3 = 0 for a count-only request
    blob = b"".join(
        encode_partition_info(
            version,
            p.info.partition_id,
            p.info.exec_contexts,
            p.info.properties_for(version),
            p.info.uuid.bytes,
        )
        for p in found
    )
    size = 0 if version <= abi.VERSION_1_0 else partition_info_size(version)
    return PartitionInfoPlan(len(found), size, blob)


GET_REGS_PER_CALL = 5  # x3..x17, three registers per descriptor
GET_REGS_TAG = 0  # the partition list never changes under a VM: one tag, 0


def partition_info_get_regs(
    partitions: PartitionSet, x1: int, x2: int, x3: int
) -> Success | FfaError:
    """FFA_PARTITION_INFO_GET_REGS (v1.2, SMC64): up to five descriptors per call."""
    start, tag = x3 & 0xFFFF, (x3 >> 16) & 0xFFFF
    if x3 >> 32 or (start == 0 and tag != 0):
        return FfaError.INVALID_PARAMETERS
    if tag != GET_REGS_TAG:
        return FfaError.RETRY
    found = _matching(partitions, uuid_from_pair(x1, x2))
    if found is None or start >= len(found):
        return FfaError.INVALID_PARAMETERS
    chunk = found[start : start + GET_REGS_PER_CALL]
    last = len(found) - 1
    current = start + len(chunk) - 1
    size = partition_info_size(abi.VERSION_1_2)
    regs: list[int] = []
    for p in chunk:
        info = p.info
        props = info.properties_for(abi.VERSION_1_2)
        regs.append(info.partition_id | info.exec_contexts << 16 | props << 32)
        regs.extend(uuid_to_pair(info.uuid))
    x2_out = last | current << 16 | GET_REGS_TAG << 32 | size << 48
    return Success((0, x2_out, *regs), smc64=True)
