"""The VMM <-> agent wire protocol, version 1: encode and decode, no I/O.

The byte layout is include/hyperbroker/vmm_protocol.h; docs/vmm-protocol.md explains it. This
module turns bytes into typed messages and back, and frames a byte stream (SOCK_STREAM mode).
Every decode error is a ProtocolError carrying the errno the agent answers with, so a bad frame
becomes an HB_MSG_ERROR reply, never an exception that escapes a connection.

Longer than 500 lines because it is the whole codec of one protocol, kept in the order of the C
header: each struct, its message, its encoder and its decoder are read side by side against
vmm_protocol.h (tests/test_c_header.py checks sizes and offsets field by field); split, a
reviewer would hold three files open to check one message.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import TypeVar

from hyperbroker.calls import ActionKind, Outcome, VmmAction
from hyperbroker.kvm import SMCCC_FILTER, SmcccFilter
from hyperbroker.smccc import NR_ARGS

MAGIC = 0x31504248
VERSION = 1
MAX_PAYLOAD = 128 * 1024
MAX_MEM_CHUNK = 64 * 1024
MAX_REGIONS = 64
MAX_FILTERS = 64
MAX_VCPUS = 512
NAME_LEN = 64
PROFILE_LEN = 32
REGISTER_MEM_FDS = 1 << 0
REGISTER_BOOT_ID = 1 << 1
BOOT_ID_LEN = 16
REGION_READONLY = 1 << 0


class MsgType(enum.IntEnum):
    REGISTER_VM = 0x01
    FILTER_REPORT = 0x02
    CALL = 0x03
    DESTROY_VM = 0x04
    MEM_READ = 0x05
    MEM_WRITE = 0x06
    PING = 0x07
    VM_RESET = 0x08
    ERROR = 0x7F
    REGISTER_VM_REPLY = 0x81
    RESULT = 0x83
    DESTROY_VM_REPLY = 0x84
    MEM_READ_REPLY = 0x85
    PONG = 0x87
    VM_RESET_REPLY = 0x88


class ResultSource(enum.IntEnum):
    BROKER = 0
    AGENT = 1
    FALLBACK = 2


HEADER = struct.Struct("<IHHII")
REGION = struct.Struct("<QQQII")
REGISTER_VM = struct.Struct(f"<{NAME_LEN}s{PROFILE_LEN}sIIII")
REGISTER_VM_REPLY = struct.Struct("<iIQII")
FILTER_REPORT = struct.Struct("<II")
CALL = struct.Struct(f"<IIQIIQ{NR_ARGS}Q")
TIMING = struct.Struct("<QQQQQII")
RESULT = struct.Struct(f"<IIQII{NR_ARGS}Q{TIMING.format[1:]}II")
ACTION = struct.Struct("<IIQQ")
DESTROY_VM = struct.Struct("<II")
VM_RESET = struct.Struct("<II")
STATUS = struct.Struct("<iI")
MEM_ACCESS = struct.Struct("<IIQ")
MEM_REPLY = struct.Struct("<iI")
ERROR = struct.Struct("<iHH")

# Field offsets in struct hb_result, for code that patches or peeks at a record in place.
RESULT_OUTCOME_OFFSET = struct.calcsize("<IIQ")
RESULT_TIMING_OFFSET = struct.calcsize(f"<IIQII{NR_ARGS}Q")  # timing.agent_ns, then link_ns
RESULT_BROKER_TIMES_OFFSET = RESULT_TIMING_OFFSET + 16  # timing.broker_queue_ns, handler_ns
RESULT_NR_ACTIONS_OFFSET = RESULT_TIMING_OFFSET + TIMING.size
assert (RESULT_OUTCOME_OFFSET, RESULT_TIMING_OFFSET, RESULT_NR_ACTIONS_OFFSET) == (16, 168, 216)

# The C header's static asserts, restated where Python packs the same structs.
assert (HEADER.size, REGION.size, REGISTER_VM.size, REGISTER_VM_REPLY.size) == (16, 32, 112, 24)
assert (CALL.size, TIMING.size, RESULT.size, ACTION.size) == (176, 48, 224, 24)
assert (DESTROY_VM.size, STATUS.size, MEM_ACCESS.size, MEM_REPLY.size, ERROR.size) == (
    8, 8, 16, 8, 8,
)


class ProtocolError(Exception):
    """A frame the peer sent is malformed; `code` is the errno of the HB_MSG_ERROR answer."""

    def __init__(self, code: int, message: str, *, tag: int = 0, msg_type: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.tag = tag
        self.msg_type = msg_type


@dataclass(frozen=True, slots=True)
class MemRegion:
    gpa: int
    size: int
    mmap_offset: int = 0
    flags: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True, slots=True)
class RegisterVm:
    name: str
    profile: str
    nr_vcpus: int
    regions: tuple[MemRegion, ...]
    flags: int = 0
    boot_id: bytes = b""  # BOOT_ID_LEN bytes with REGISTER_BOOT_ID, else empty


@dataclass(frozen=True, slots=True)
class RegisterVmReply:
    status: int
    vm_id: int
    policy_version: int
    filters: tuple[SmcccFilter, ...]
    message: str = ""


@dataclass(frozen=True, slots=True)
class FilterReport:
    vm_id: int
    errnos: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CallMsg:
    vm_id: int
    vcpu: int
    seq: int
    function_id: int
    exit_flags: int
    exit_ns: int
    x: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Timing:
    agent_ns: int = 0
    link_ns: int = 0
    broker_queue_ns: int = 0
    handler_ns: int = 0
    memory_ns: int = 0
    memory_round_trips: int = 0
    source: ResultSource = ResultSource.BROKER


@dataclass(frozen=True, slots=True)
class ResultMsg:
    vm_id: int
    vcpu: int
    seq: int
    outcome: Outcome
    reg_mask: int
    x: tuple[int, ...]
    timing: Timing
    actions: tuple[VmmAction, ...] = ()


@dataclass(frozen=True, slots=True)
class DestroyVm:
    vm_id: int


@dataclass(frozen=True, slots=True)
class StatusReply:
    """The reply to DESTROY_VM."""

    status: int


@dataclass(frozen=True, slots=True)
class VmReset:
    vm_id: int


@dataclass(frozen=True, slots=True)
class VmResetReply:
    status: int


@dataclass(frozen=True, slots=True)
class MemRead:
    vm_id: int
    gpa: int
    length: int


@dataclass(frozen=True, slots=True)
class MemWrite:
    vm_id: int
    gpa: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MemReadReply:
    status: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    code: int
    refused_type: int
    message: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


Message = (
    RegisterVm | RegisterVmReply | FilterReport | CallMsg | ResultMsg | DestroyVm | StatusReply
    | VmReset | VmResetReply | MemRead | MemWrite | MemReadReply | ErrorMsg | Ping | Pong
)


@dataclass(frozen=True, slots=True)
class Frame:
    type: MsgType
    tag: int
    message: Message


def _cstr(raw: bytes, what: str) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(errno.EINVAL, f"{what} is not UTF-8") from None


def _fixed(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise ValueError(f"{what} {text!r} is longer than {size - 1} bytes")
    return raw


def header(msg_type: int, tag: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, msg_type, length, tag)


def encode(msg: Message, tag: int = 0) -> bytes:
    """One whole frame, header included."""
    t, payload = _encode_payload(msg)
    return HEADER.pack(MAGIC, VERSION, t, len(payload), tag) + payload


def encode_call(c: CallMsg, tag: int = 0) -> bytes:
    """The hot path's encoder: a CALL frame without the generic dispatch."""
    return HEADER.pack(MAGIC, VERSION, MsgType.CALL, CALL.size, tag) + CALL.pack(
        c.vm_id, c.vcpu, c.seq, c.function_id, c.exit_flags, c.exit_ns, *c.x
    )


def _encode_payload(msg: Message) -> tuple[MsgType, bytes]:
    match msg:
        case CallMsg():
            if len(msg.x) != NR_ARGS:
                raise ValueError(f"a call carries x0..x{NR_ARGS - 1}")
            return MsgType.CALL, CALL.pack(
                msg.vm_id, msg.vcpu, msg.seq, msg.function_id, msg.exit_flags, msg.exit_ns, *msg.x
            )
        case ResultMsg():
            return MsgType.RESULT, encode_result_payload(msg)
        case RegisterVm():
            body = REGISTER_VM.pack(
                _fixed(msg.name, NAME_LEN, "name"),
                _fixed(msg.profile, PROFILE_LEN, "profile"),
                msg.nr_vcpus,
                msg.flags,
                len(msg.regions),
                0,
            )
            regions = b"".join(
                REGION.pack(r.gpa, r.size, r.mmap_offset, r.flags, 0) for r in msg.regions
            )
            if bool(msg.boot_id) != bool(msg.flags & REGISTER_BOOT_ID) or (
                    msg.boot_id and len(msg.boot_id) != BOOT_ID_LEN):
                raise ValueError(f"a boot ID is {BOOT_ID_LEN} bytes, sent with REGISTER_BOOT_ID")
            return MsgType.REGISTER_VM, body + regions + msg.boot_id
        case RegisterVmReply():
            body = REGISTER_VM_REPLY.pack(
                msg.status, msg.vm_id, msg.policy_version, len(msg.filters), 0
            )
            return MsgType.REGISTER_VM_REPLY, body + b"".join(
                f.pack() for f in msg.filters
            ) + msg.message.encode()
        case FilterReport():
            return MsgType.FILTER_REPORT, FILTER_REPORT.pack(
                msg.vm_id, len(msg.errnos)
            ) + struct.pack(f"<{len(msg.errnos)}i", *msg.errnos)
        case DestroyVm():
            return MsgType.DESTROY_VM, DESTROY_VM.pack(msg.vm_id, 0)
        case StatusReply():
            return MsgType.DESTROY_VM_REPLY, STATUS.pack(msg.status, 0)
        case VmReset():
            return MsgType.VM_RESET, VM_RESET.pack(msg.vm_id, 0)
        case VmResetReply():
            return MsgType.VM_RESET_REPLY, STATUS.pack(msg.status, 0)
        case MemRead():
            return MsgType.MEM_READ, MEM_ACCESS.pack(msg.vm_id, msg.length, msg.gpa)
        case MemWrite():
            return MsgType.MEM_WRITE, MEM_ACCESS.pack(msg.vm_id, len(msg.data), msg.gpa) + msg.data
        case MemReadReply():
            return MsgType.MEM_READ_REPLY, MEM_REPLY.pack(msg.status, len(msg.data)) + msg.data
        case ErrorMsg():
            return MsgType.ERROR, ERROR.pack(msg.code, msg.refused_type, 0) + msg.message.encode()
        case Ping():
            return MsgType.PING, b""
        case Pong():
            return MsgType.PONG, b""
    raise TypeError(f"not a protocol message: {msg!r}")


ZERO_X = (0,) * NR_ARGS
ARGS_MASK = (1 << NR_ARGS) - 1  # the reg_mask bits of registers that exist


def pack_result(vm_id: int, vcpu: int, seq: int, outcome: int, mask: int, x: tuple[int, ...],
                agent_ns: int, link_ns: int, queued_ns: int, handler_ns: int, memory_ns: int,
                memory_round_trips: int, source: int,
                actions: tuple[VmmAction, ...] = ()) -> bytes:
    """A `struct hb_result` payload and its `struct hb_action` records: the one packer of it.

    The broker builds its records with this (source BROKER, agent times zero, filled in by the
    agent on the way through), the agent its own static and fallback answers. `x` shorter than
    NR_ARGS is zero-padded, longer is cut.
    """
    if len(x) != NR_ARGS:
        x = (x + ZERO_X)[:NR_ARGS]
    record = RESULT.pack(vm_id, vcpu, seq, outcome, mask, *x, agent_ns, link_ns,
                         queued_ns, handler_ns, memory_ns, memory_round_trips, source,
                         len(actions), 0)
    if actions:
        record += b"".join(ACTION.pack(a.kind, a.vcpu, a.address, a.value) for a in actions)
    return record


def encode_result_payload(r: ResultMsg) -> bytes:
    t = r.timing
    return pack_result(r.vm_id, r.vcpu, r.seq, r.outcome, r.reg_mask, r.x, t.agent_ns,
                       t.link_ns, t.broker_queue_ns, t.handler_ns, t.memory_ns,
                       t.memory_round_trips, t.source, r.actions)


def parse_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """(type, length, tag) of a frame header; ProtocolError on a bad magic, version or size."""
    if len(data) < HEADER.size:
        raise ProtocolError(errno.EPROTO, f"frame of {len(data)} bytes is shorter than a header")
    magic, version, msg_type, length, tag = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(errno.EPROTO, f"bad magic {magic:#010x}, expected {MAGIC:#010x}")
    if version != VERSION:
        raise ProtocolError(
            errno.EPROTONOSUPPORT, f"protocol version {version} not supported (speaks {VERSION})",
            tag=tag, msg_type=msg_type,
        )
    if length > MAX_PAYLOAD:
        raise ProtocolError(
            errno.EMSGSIZE, f"payload of {length} bytes exceeds {MAX_PAYLOAD}", tag=tag,
            msg_type=msg_type,
        )
    return msg_type, length, tag


def decode(frame: bytes | memoryview) -> Frame:
    """One whole frame (a SEQPACKET packet, or a frame cut from a stream)."""
    msg_type, length, tag = parse_header(frame)
    if len(frame) != HEADER.size + length:
        raise ProtocolError(
            errno.EPROTO,
            f"frame is {len(frame)} bytes but its header announces {HEADER.size + length}",
            tag=tag, msg_type=msg_type,
        )
    payload = bytes(frame[HEADER.size :])
    try:
        kind = MsgType(msg_type)
    except ValueError:
        raise ProtocolError(
            errno.EBADMSG, f"unknown message type {msg_type:#x}", tag=tag, msg_type=msg_type
        ) from None
    try:
        return Frame(kind, tag, _decode_payload(kind, payload))
    except ProtocolError as e:
        e.tag, e.msg_type = tag, msg_type
        raise


E = TypeVar("E", bound=enum.IntEnum)


def _enum(kind: type[E], value: int, what: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise ProtocolError(errno.EINVAL, f"unknown {what} {value}") from None


def _need(payload: bytes, size: int, what: str, exact: bool = False) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        raise ProtocolError(
            errno.EPROTO, f"{what} payload is {len(payload)} bytes, expected "
            f"{'exactly' if exact else 'at least'} {size}"
        )


def _decode_payload(kind: MsgType, p: bytes) -> Message:
    if kind is MsgType.CALL:
        _need(p, CALL.size, "CALL", exact=True)
        v = CALL.unpack(p)
        return CallMsg(v[0], v[1], v[2], v[3], v[4], v[5], v[6:])
    if kind is MsgType.RESULT:
        _need(p, RESULT.size, "RESULT")
        v = RESULT.unpack_from(p)
        x = v[5 : 5 + NR_ARGS]
        t = v[5 + NR_ARGS : 5 + NR_ARGS + 7]
        nr_actions = v[-2]
        _need(p, RESULT.size + nr_actions * ACTION.size, "RESULT", exact=True)
        actions = tuple(
            VmmAction(_enum(ActionKind, k, "action kind"), cpu, addr, val)
            for k, cpu, addr, val in ACTION.iter_unpack(p[RESULT.size :])
        )
        return ResultMsg(
            v[0], v[1], v[2], _enum(Outcome, v[3], "outcome"), v[4], x,
            Timing(t[0], t[1], t[2], t[3], t[4], t[5], _enum(ResultSource, t[6], "source")),
            actions,
        )
    if kind is MsgType.REGISTER_VM:
        _need(p, REGISTER_VM.size, "REGISTER_VM")
        name_raw, profile_raw, nr_vcpus, flags, nr_regions, _ = REGISTER_VM.unpack_from(p)
        if nr_regions > MAX_REGIONS:
            raise ProtocolError(errno.EINVAL, f"{nr_regions} regions exceed {MAX_REGIONS}")
        end = REGISTER_VM.size + nr_regions * REGION.size
        boot_len = BOOT_ID_LEN if flags & REGISTER_BOOT_ID else 0
        _need(p, end + boot_len, "REGISTER_VM", exact=True)
        regions = tuple(
            MemRegion(gpa, size, off, fl)
            for gpa, size, off, fl, _ in REGION.iter_unpack(p[REGISTER_VM.size : end])
        )
        boot_id = bytes(p[end : end + boot_len])
        if boot_len and not any(boot_id):
            raise ProtocolError(errno.EINVAL, "the boot ID is all zero")
        return RegisterVm(
            _cstr(name_raw, "name"), _cstr(profile_raw, "profile"), nr_vcpus, regions, flags,
            boot_id,
        )
    if kind is MsgType.REGISTER_VM_REPLY:
        _need(p, REGISTER_VM_REPLY.size, "REGISTER_VM_REPLY")
        status, vm_id, version, nr, _ = REGISTER_VM_REPLY.unpack_from(p)
        if nr > MAX_FILTERS:
            raise ProtocolError(errno.EINVAL, f"{nr} filters exceed {MAX_FILTERS}")
        end = REGISTER_VM_REPLY.size + nr * SMCCC_FILTER.size
        _need(p, end, "REGISTER_VM_REPLY")
        filters = tuple(
            SmcccFilter.unpack(p[o : o + SMCCC_FILTER.size])
            for o in range(REGISTER_VM_REPLY.size, end, SMCCC_FILTER.size)
        )
        return RegisterVmReply(status, vm_id, version, filters, p[end:].decode(errors="replace"))
    if kind is MsgType.FILTER_REPORT:
        _need(p, FILTER_REPORT.size, "FILTER_REPORT")
        vm_id, nr = FILTER_REPORT.unpack_from(p)
        if nr > MAX_FILTERS:
            raise ProtocolError(errno.EINVAL, f"{nr} filters exceed {MAX_FILTERS}")
        _need(p, FILTER_REPORT.size + 4 * nr, "FILTER_REPORT", exact=True)
        return FilterReport(vm_id, struct.unpack_from(f"<{nr}i", p, FILTER_REPORT.size))
    if kind is MsgType.DESTROY_VM:
        _need(p, DESTROY_VM.size, "DESTROY_VM", exact=True)
        return DestroyVm(DESTROY_VM.unpack(p)[0])
    if kind is MsgType.DESTROY_VM_REPLY:
        _need(p, STATUS.size, "DESTROY_VM_REPLY", exact=True)
        return StatusReply(STATUS.unpack(p)[0])
    if kind is MsgType.VM_RESET:
        _need(p, VM_RESET.size, "VM_RESET", exact=True)
        return VmReset(VM_RESET.unpack(p)[0])
    if kind is MsgType.VM_RESET_REPLY:
        _need(p, STATUS.size, "VM_RESET_REPLY", exact=True)
        return VmResetReply(STATUS.unpack(p)[0])
    if kind in (MsgType.MEM_READ, MsgType.MEM_WRITE):
        _need(p, MEM_ACCESS.size, kind.name)
        vm_id, length, gpa = MEM_ACCESS.unpack_from(p)
        if length > MAX_MEM_CHUNK:
            raise ProtocolError(errno.EMSGSIZE, f"{length} bytes exceed {MAX_MEM_CHUNK}")
        if kind is MsgType.MEM_READ:
            _need(p, MEM_ACCESS.size, "MEM_READ", exact=True)
            return MemRead(vm_id, gpa, length)
        _need(p, MEM_ACCESS.size + length, "MEM_WRITE", exact=True)
        return MemWrite(vm_id, gpa, p[MEM_ACCESS.size :])
    if kind is MsgType.MEM_READ_REPLY:
        _need(p, MEM_REPLY.size, "MEM_READ_REPLY")
        status, length = MEM_REPLY.unpack_from(p)
        if length > MAX_MEM_CHUNK:
            raise ProtocolError(errno.EMSGSIZE, f"{length} bytes exceed {MAX_MEM_CHUNK}")
        _need(p, MEM_REPLY.size + length, "MEM_READ_REPLY", exact=True)
        return MemReadReply(status, p[MEM_REPLY.size :])
    if kind is MsgType.ERROR:
        _need(p, ERROR.size, "ERROR")
        code, refused, _ = ERROR.unpack_from(p)
        return ErrorMsg(code, refused, p[ERROR.size :].decode(errors="replace"))
    if kind is MsgType.PING:
        _need(p, 0, "PING", exact=True)
        return Ping()
    _need(p, 0, "PONG", exact=True)
    return Pong()


class StreamFramer:
    """Cuts a SOCK_STREAM byte stream into whole frames.

    A header that cannot be trusted (bad magic, absurd length) leaves the stream unframeable:
    `feed` raises ProtocolError and the connection must be closed after the error reply.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        buf = self._buf
        offset = 0
        while len(buf) - offset >= HEADER.size:
            magic, _version, _type, length, _tag = HEADER.unpack_from(buf, offset)
            if magic != MAGIC or length > MAX_PAYLOAD:
                del buf[:offset]
                parse_header(bytes(buf[: HEADER.size]))  # raises with the precise reason
                raise AssertionError("unreachable")  # pragma: no cover
            end = offset + HEADER.size + length
            if end > len(buf):
                break
            frames.append(bytes(buf[offset:end]))
            offset = end
        del buf[:offset]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)
