"""FF-A memory transaction descriptors: the guest-supplied bytes of MEM_SHARE/LEND, parsed safely.

`parse_mem_transaction` turns the bytes a sender put in its TX buffer into a typed `MemTransaction`,
or answers `FfaError.INVALID_PARAMETERS`. Every offset, count and length is checked against the data
before it is used, every reserved field must be zero, and the permission and attribute encodings
must be ones the spec defines (Arm DEN0077A v1.1 §10.9-§10.11, Tables 10.13-10.20; the same
structures in include/linux/arm_ffa.h and Hafnium's inc/vmapi/hf/ffa.h). It never raises for any
input. Whether a well-formed transaction is *allowed* (who the sender is, which receivers exist,
limits, memory ownership) is decided in handlers.ffa.memshare; this module knows nothing of handler
state, partitions or guest memory.
"""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass

from hyperbroker.handlers.ffa.abi import VERSION_1_0, VERSION_1_2, FfaError

PAGE_SIZE = 4096  # the FF-A granule of RX/TX pages and constituents: Linux FFA_PAGE_SIZE SZ_4K
ADDRESS_LIMIT = 1 << 64

# Sizes: v1.0 header 32 bytes, v1.1+ 48; EMAD 16 bytes, 32 from v1.2 (Linux ffa_mem_desc_offset,
# FFA_EMAD_HAS_IMPDEF_FIELD); composite header and constituent 16 each.
HEADER_SIZE_V1_0 = 32
HEADER_SIZE_V1_1 = 48
EMAD_SIZE_V1_0 = 16  # also v1.1
EMAD_SIZE_V1_2 = 32
COMPOSITE_HEADER_SIZE = 16
CONSTITUENT_SIZE = 16
EMAD_OFFSET_ALIGN = 16  # Xen rejects `offs & 0xF`; arm_ffa.h: "16-byte aligned offset"

_HEADER_V1_0 = struct.Struct("<HBBIQQII")  # sender, attrs, rsvd, flags, handle, tag, rsvd, count
_HEADER_V1_1 = struct.Struct("<HHIQQIII12s")  # ... emad size, count, emad offset, reserved
_EMAD = struct.Struct("<HBBI")  # receiver, permissions, flags, composite offset
_COMPOSITE = struct.Struct("<IIQ")  # total pages, constituent count, reserved
_CONSTITUENT = struct.Struct("<QII")  # address, page count, reserved

# Access permissions byte (DEN0077A v1.1 Table 10.15): data access bits[1:0], instruction access
# bits[3:2].
DATA_ACCESS_MASK = 0x3
INSTRUCTION_ACCESS_SHIFT = 2
INSTRUCTION_ACCESS_MASK = 0x3
PERMISSIONS_MBZ = 0xF0


class DataAccess(enum.IntEnum):
    NOT_SPECIFIED = 0
    RO = 1
    RW = 2


class InstructionAccess(enum.IntEnum):
    NOT_SPECIFIED = 0
    NX = 1
    X = 2


# Memory region attributes (DEN0077A v1.1 Table 10.18): shareability bits[1:0], cacheability
# [3:2], type [5:4].
ATTR_SHAREABILITY_MASK = 0x3
ATTR_CACHEABILITY_SHIFT = 2
ATTR_TYPE_SHIFT = 4
ATTR_NS_BIT = 1 << 6  # v1.1; reserved for DONATE/LEND/SHARE (§10.10.4.1; Xen: INVALID_PARAMETERS)
ATTR_MBZ_V1_0 = 0xC0  # bits[7:6] of the v1.0 attribute byte
ATTR_MBZ_V1_1 = 0xFFC0  # bits[15:7] reserved, plus the NS bit for a send
SHAREABILITY_RESERVED = 1
TYPE_NOT_SPECIFIED = 0
TYPE_DEVICE = 1
TYPE_NORMAL = 2
NORMAL_NON_CACHEABLE = 1
NORMAL_WRITE_BACK = 3
NORMAL_WB_INNER_SHAREABLE = 0x2F  # OP-TEE/Xen FFA_NORMAL_MEM_REG_ATTR; what Linux sends for SHARE

EMAD_FLAGS_MBZ = 0xFF  # bit0 (retrieve-self-borrower) is for retrieve requests only


class Layout(enum.Enum):
    """Which descriptor layout, from the negotiated version and (v1.2) the EMAD size field."""

    V1_0 = "1.0"  # 32-byte header, 16-byte EMADs at offset 32
    V1_1 = "1.1"  # 48-byte header, 16-byte EMADs at the EMAD offset
    V1_2 = "1.2"  # 48-byte header, 32-byte EMADs carrying a 16-byte IMPDEF value

    @property
    def emad_size(self) -> int:
        return EMAD_SIZE_V1_2 if self is Layout.V1_2 else EMAD_SIZE_V1_0

    @property
    def header_size(self) -> int:
        return HEADER_SIZE_V1_0 if self is Layout.V1_0 else HEADER_SIZE_V1_1


@dataclass(frozen=True, slots=True)
class Constituent:
    """One range of 4 KiB pages, at a 4 KiB-aligned IPA of the sender."""

    address: int
    page_count: int

    @property
    def end(self) -> int:
        return self.address + self.page_count * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class EndpointAccess:
    """One endpoint memory access descriptor (EMAD): a receiver and its permissions."""

    receiver: int
    permissions: int
    impdef: bytes = b"\0" * 16  # v1.2 only

    @property
    def data_access(self) -> int:
        return self.permissions & DATA_ACCESS_MASK

    @property
    def instruction_access(self) -> int:
        return (self.permissions >> INSTRUCTION_ACCESS_SHIFT) & INSTRUCTION_ACCESS_MASK


@dataclass(frozen=True, slots=True)
class MemTransaction:
    """A lend/share transaction descriptor as the sender wrote it (DEN0077A v1.1 Table 10.20)."""

    layout: Layout
    sender: int
    attributes: int
    flags: int
    handle: int
    tag: int
    receivers: tuple[EndpointAccess, ...]
    total_pages: int
    constituents: tuple[Constituent, ...]
    emad_offset: int  # where the EMAD array starts (32 for v1.0)
    composite_offset: int

    @property
    def length(self) -> int:
        return self.composite_offset + COMPOSITE_HEADER_SIZE + CONSTITUENT_SIZE * len(
            self.constituents
        )


def layout_for(version: int, emad_size: int | None = None) -> Layout | None:
    """The layout a caller at `version` may use; v1.2 callers may still send 16-byte EMADs."""
    if version <= VERSION_1_0:
        return Layout.V1_0
    if emad_size == EMAD_SIZE_V1_0 or (emad_size is None and version < VERSION_1_2):
        return Layout.V1_1
    if emad_size == EMAD_SIZE_V1_2 and version >= VERSION_1_2:
        return Layout.V1_2
    return None


def minimum_first_fragment(version: int) -> int:
    """Header plus one 16-byte EMAD: the smallest first fragment that can hold a descriptor, the
    bound pKVM checks too (__do_ffa_mem_xfer in arch/arm64/kvm/hyp/nvhe/ffa.c). A 32-byte v1.2
    EMAD is checked when the whole descriptor is parsed."""
    if version <= VERSION_1_0:
        return HEADER_SIZE_V1_0 + EMAD_SIZE_V1_0
    return HEADER_SIZE_V1_1 + EMAD_SIZE_V1_0


def attributes_valid(attributes: int) -> bool:
    """A defined encoding of the memory region attributes (Table 10.18), reserved bits already
    zero."""
    kind = (attributes >> ATTR_TYPE_SHIFT) & 0x3
    cacheability = (attributes >> ATTR_CACHEABILITY_SHIFT) & 0x3
    shareability = attributes & ATTR_SHAREABILITY_MASK
    if kind == TYPE_NOT_SPECIFIED:
        return attributes == 0
    if kind == TYPE_DEVICE:
        return shareability == 0  # device memory has no shareability of its own
    if kind == TYPE_NORMAL:
        return (
            cacheability in (NORMAL_NON_CACHEABLE, NORMAL_WRITE_BACK)
            and shareability != SHAREABILITY_RESERVED
        )
    return False


def permissions_valid(permissions: int) -> bool:
    """Neither access field uses its reserved value 3 and bits[7:4] are zero (Table 10.15)."""
    if permissions & PERMISSIONS_MBZ:
        return False
    data = permissions & DATA_ACCESS_MASK
    instruction = (permissions >> INSTRUCTION_ACCESS_SHIFT) & INSTRUCTION_ACCESS_MASK
    return data != 3 and instruction != 3


_INVALID = FfaError.INVALID_PARAMETERS


def parse_mem_transaction(data: bytes, version: int) -> MemTransaction | FfaError:
    """Parse a complete lend/share descriptor sent by a caller at `version`.

    The descriptor must end exactly with its last constituent. Any violation answers
    INVALID_PARAMETERS; nothing here raises.
    """
    length = len(data)
    if version <= VERSION_1_0:
        if length < HEADER_SIZE_V1_0:
            return _INVALID
        sender, attributes, rsvd8, flags, handle, tag, rsvd32, count = _HEADER_V1_0.unpack_from(
            data
        )
        if rsvd8 or rsvd32 or attributes & ATTR_MBZ_V1_0:
            return _INVALID
        layout, emad_offset = Layout.V1_0, HEADER_SIZE_V1_0
    else:
        if length < HEADER_SIZE_V1_1:
            return _INVALID
        (sender, attributes, flags, handle, tag, emad_size, count, emad_offset,
         reserved) = _HEADER_V1_1.unpack_from(data)
        found = layout_for(version, emad_size)
        if found is None or any(reserved) or attributes & ATTR_MBZ_V1_1:
            return _INVALID
        layout = found
        if emad_offset < HEADER_SIZE_V1_1 or emad_offset % EMAD_OFFSET_ALIGN:
            return _INVALID
    if not attributes_valid(attributes):
        return _INVALID
    emad_size = layout.emad_size
    emads_end = emad_offset + count * emad_size
    if count < 1 or emads_end > length:
        return _INVALID

    receivers: list[EndpointAccess] = []
    composite_offset: int | None = None
    for i in range(count):
        base = emad_offset + i * emad_size
        receiver, permissions, emad_flags, offset = _EMAD.unpack_from(data, base)
        if emad_flags & EMAD_FLAGS_MBZ or not permissions_valid(permissions):
            return _INVALID
        if layout is Layout.V1_2:
            impdef = bytes(data[base + 8 : base + 24])
            reserved_tail = data[base + 24 : base + 32]
        else:
            impdef = b"\0" * 16
            reserved_tail = data[base + 8 : base + 16]
        if any(reserved_tail):
            return _INVALID
        if composite_offset is None:
            composite_offset = offset
        elif offset != composite_offset:  # every receiver gets the same region
            return _INVALID
        if any(r.receiver == receiver for r in receivers):
            return _INVALID
        receivers.append(EndpointAccess(receiver, permissions, impdef))
    assert composite_offset is not None  # count >= 1

    # The composite region follows the EMAD array and ends the descriptor exactly.
    if composite_offset < emads_end or composite_offset + COMPOSITE_HEADER_SIZE > length:
        return _INVALID
    total_pages, n_constituents, reserved64 = _COMPOSITE.unpack_from(data, composite_offset)
    first = composite_offset + COMPOSITE_HEADER_SIZE
    if reserved64 or n_constituents < 1 or first + n_constituents * CONSTITUENT_SIZE != length:
        return _INVALID
    constituents = []
    pages = 0
    for i in range(n_constituents):
        address, page_count, reserved = _CONSTITUENT.unpack_from(data, first + i * CONSTITUENT_SIZE)
        if reserved or page_count < 1 or address % PAGE_SIZE:
            return _INVALID
        c = Constituent(address, page_count)
        if c.end > ADDRESS_LIMIT:
            return _INVALID
        constituents.append(c)
        pages += page_count
    if pages != total_pages:
        return _INVALID
    ordered = sorted(constituents, key=lambda c: c.address)
    if any(a.end > b.address for a, b in itertools.pairwise(ordered)):
        return _INVALID  # one page named twice in one transaction
    return MemTransaction(
        layout=layout,
        sender=sender,
        attributes=attributes,
        flags=flags,
        handle=handle,
        tag=tag,
        receivers=tuple(receivers),
        total_pages=total_pages,
        constituents=tuple(constituents),
        emad_offset=emad_offset,
        composite_offset=composite_offset,
    )


def encode_mem_transaction(tx: MemTransaction) -> bytes:
    """The canonical bytes of `tx` (zero in every reserved field and gap); parses back to `tx`."""
    out = bytearray(tx.length)
    count = len(tx.receivers)
    if tx.layout is Layout.V1_0:
        _HEADER_V1_0.pack_into(out, 0, tx.sender, tx.attributes, 0, tx.flags, tx.handle, tx.tag,
                               0, count)
    else:
        _HEADER_V1_1.pack_into(out, 0, tx.sender, tx.attributes, tx.flags, tx.handle, tx.tag,
                               tx.layout.emad_size, count, tx.emad_offset, b"")
    for i, r in enumerate(tx.receivers):
        base = tx.emad_offset + i * tx.layout.emad_size
        _EMAD.pack_into(out, base, r.receiver, r.permissions, 0, tx.composite_offset)
        if tx.layout is Layout.V1_2:
            out[base + 8 : base + 24] = r.impdef
    _COMPOSITE.pack_into(out, tx.composite_offset, tx.total_pages, len(tx.constituents), 0)
    first = tx.composite_offset + COMPOSITE_HEADER_SIZE
    for i, c in enumerate(tx.constituents):
        _CONSTITUENT.pack_into(out, first + i * CONSTITUENT_SIZE, c.address, c.page_count, 0)
    return bytes(out)


def build_mem_transaction(
    version: int,
    sender: int,
    receivers: tuple[EndpointAccess, ...],
    constituents: tuple[Constituent, ...],
    *,
    attributes: int = NORMAL_WB_INNER_SHAREABLE,
    flags: int = 0,
    tag: int = 0,
) -> MemTransaction:
    """A descriptor laid out as Linux lays it out (ffa_setup_and_transmit in
    drivers/firmware/arm_ffa/driver.c): EMADs right after the header."""
    layout = Layout.V1_2 if version >= VERSION_1_2 else layout_for(version)
    assert layout is not None
    emad_offset = layout.header_size
    return MemTransaction(
        layout=layout,
        sender=sender,
        attributes=attributes,
        flags=flags,
        handle=0,
        tag=tag,
        receivers=receivers,
        total_pages=sum(c.page_count for c in constituents),
        constituents=constituents,
        emad_offset=emad_offset,
        composite_offset=emad_offset + len(receivers) * layout.emad_size,
    )


# Partition information descriptor: id, execution contexts, properties, UUID (v1.1+); DEN0077A
# v1.0 Table 8.25 (8 bytes), v1.1 Table 13.37 (24 bytes).
PARTITION_INFO_SIZE_V1_0 = 8
PARTITION_INFO_SIZE_V1_1 = 24
_PARTITION_INFO = struct.Struct("<HHI")


def partition_info_size(version: int) -> int:
    return PARTITION_INFO_SIZE_V1_0 if version <= VERSION_1_0 else PARTITION_INFO_SIZE_V1_1


def encode_partition_info(
    version: int, partition_id: int, exec_contexts: int, properties: int, uuid_bytes: bytes
) -> bytes:
    """One descriptor as FFA_PARTITION_INFO_GET writes it into the caller's RX buffer."""
    head = _PARTITION_INFO.pack(partition_id, exec_contexts, properties)
    return head if version <= VERSION_1_0 else head + uuid_bytes
