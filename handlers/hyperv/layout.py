"""Hypercall input and output blocks: parsed from guest bytes, built into guest bytes.

Slow hypercalls keep their input and output in guest pages (x2 and x3 hold the GPAs); fast ones
keep them in registers. Both are seen here as the same little-endian byte block, so one parser
serves both: for a fast call the block is x2..x17 (16 registers, 128 bytes), the input starts at
x2 and the output at the next 16-byte boundary after the input. That is what Linux relies on for
a one-register HvCallGetVpRegisters (input header in x2/x3, the name in x4, the value returned in
x6/x7; arch/arm64/hyperv/hv_core.c) and for HvCallSetVpRegisters (name in x4, value in x6/x7).
Structures are those of include/hyperv/hvgdk_mini.h. Every parser takes untrusted bytes and
returns a value or None; nothing here raises for guest input.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

FAST_FIRST_REGISTER = 2  # x2
FAST_BLOCK_REGISTERS = 16  # x2..x17 (SMCCC 1.2 moves x0..x17)
FAST_BLOCK_SIZE = 8 * FAST_BLOCK_REGISTERS

VP_HEADER = struct.Struct("<QIBBH")  # hv_input_{get,set}_vp_registers header
REGISTER_NAME = struct.Struct("<I")
REGISTER_ASSOC = struct.Struct("<IIQ16s")  # hv_register_assoc
POST_MESSAGE = struct.Struct("<IIII240s")  # hv_input_post_message (HV_MESSAGE_PAYLOAD 240)
SIGNAL_EVENT = struct.Struct("<IHH")  # hv_input_signal_event
PARTITION_ID = struct.Struct("<Q")  # hv_output_get_partition_id
assert VP_HEADER.size == 16 and REGISTER_ASSOC.size == 32
assert POST_MESSAGE.size == 256 and SIGNAL_EVENT.size == 8

VALUE_SIZE = 16  # HV_REGISTER_VALUE is 128 bits


def align16(n: int) -> int:
    return (n + 15) & ~15


def fast_block(x: Sequence[int]) -> bytes:
    """x2..x17 as the fast hypercall's byte block."""
    regs = [(x[i] if i < len(x) else 0) & ((1 << 64) - 1)
            for i in range(FAST_FIRST_REGISTER, FAST_FIRST_REGISTER + FAST_BLOCK_REGISTERS)]
    return b"".join(r.to_bytes(8, "little") for r in regs)


def fast_output_offset(input_size: int) -> int:
    """Where a fast call's output starts in the block: the 16-byte boundary after the input."""
    return align16(input_size)


def fast_fits(input_size: int, output_size: int) -> bool:
    return fast_output_offset(input_size) + output_size <= FAST_BLOCK_SIZE


def fast_output_registers(input_size: int, offset: int, data: bytes) -> dict[int, int]:
    """Register number -> value for `data` at `offset` in a fast call's output block."""
    start = fast_output_offset(input_size) + offset
    padded = data + bytes(-len(data) % 8)
    return {
        FAST_FIRST_REGISTER + (start + k) // 8: int.from_bytes(padded[k : k + 8], "little")
        for k in range(0, len(padded), 8)
    }


@dataclass(frozen=True, slots=True)
class VpHeader:
    """PartitionId, VpIndex, InputVtl and the RsvdZ bytes of Get/SetVpRegisters' input."""

    partition_id: int
    vp_index: int
    input_vtl: int
    reserved: int

    @classmethod
    def parse(cls, data: bytes) -> VpHeader | None:
        if len(data) < VP_HEADER.size:
            return None
        pid, vp, vtl, r8, r16 = VP_HEADER.unpack_from(data)
        return cls(pid, vp, vtl, r8 | r16 << 8)

    def pack(self) -> bytes:
        return VP_HEADER.pack(self.partition_id, self.vp_index, self.input_vtl,
                              self.reserved & 0xFF, self.reserved >> 8)


# union hv_input_vtl: target_vtl 3:0, use_target_vtl 4, reserved_z 7:5.
VTL_TARGET_MASK = 0xF
VTL_USE_TARGET = 1 << 4
VTL_RESERVED = 0xE0


def register_name(data: bytes, index: int) -> int | None:
    """The index-th name of GetVpRegisters' rep list (after the 16-byte header)."""
    off = VP_HEADER.size + REGISTER_NAME.size * index
    if off + REGISTER_NAME.size > len(data):
        return None
    return int(REGISTER_NAME.unpack_from(data, off)[0])


@dataclass(frozen=True, slots=True)
class RegisterAssoc:
    """One element of SetVpRegisters' rep list: the name, its RsvdZ bytes, a 128-bit value."""

    name: int
    reserved: int
    value: int

    @classmethod
    def parse(cls, data: bytes, index: int) -> RegisterAssoc | None:
        off = VP_HEADER.size + REGISTER_ASSOC.size * index
        if off + REGISTER_ASSOC.size > len(data):
            return None
        name, r1, r2, value = REGISTER_ASSOC.unpack_from(data, off)
        return cls(name, r1 | r2 << 32, int.from_bytes(value, "little"))

    def pack(self) -> bytes:
        return REGISTER_ASSOC.pack(self.name, self.reserved & 0xFFFF_FFFF, self.reserved >> 32,
                                   self.value.to_bytes(16, "little"))


def register_value(value: int) -> bytes:
    """HV_REGISTER_VALUE: 128 bits, little-endian."""
    return value.to_bytes(VALUE_SIZE, "little")


@dataclass(frozen=True, slots=True)
class PostMessageInput:
    connection_id: int  # union hv_connection_id: id 23:0, reserved 31:24
    reserved: int
    message_type: int
    payload_size: int
    payload: bytes  # the first payload_size bytes when payload_size is valid

    @classmethod
    def parse(cls, data: bytes) -> PostMessageInput | None:
        if len(data) < POST_MESSAGE.size:
            return None
        conn, reserved, mtype, size, payload = POST_MESSAGE.unpack_from(data)
        return cls(conn, reserved, mtype, size, payload[: min(size, len(payload))])

    def pack(self) -> bytes:
        return POST_MESSAGE.pack(self.connection_id, self.reserved, self.message_type,
                                 self.payload_size, self.payload)


@dataclass(frozen=True, slots=True)
class SignalEventInput:
    connection_id: int
    flag_number: int
    reserved: int

    @classmethod
    def parse(cls, data: bytes) -> SignalEventInput | None:
        if len(data) < SIGNAL_EVENT.size:
            return None
        return cls(*SIGNAL_EVENT.unpack_from(data))

    def pack(self) -> bytes:
        return SIGNAL_EVENT.pack(self.connection_id, self.flag_number, self.reserved)


CONNECTION_ID_MASK = 0x00FF_FFFF  # union hv_connection_id { u32 id:24; u32 reserved:8; }
