"""Strategies, frame builders and sample messages for the codec tests.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import strategies as st

from hyperbroker.calls import ActionKind, Outcome, VmmAction
from hyperbroker.kvm import SmcccFilter
from hyperbroker.smccc import NR_ARGS
from hyperbroker.wire import vmm as proto

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)
u64 = st.integers(0, (1 << 64) - 1)
regs = st.tuples(*[u64] * NR_ARGS)

# Every errno the codec may answer with: a malformed frame (EPROTO), a version it does not speak
# (EPROTONOSUPPORT), a size over a limit (EMSGSIZE), an unknown type (EBADMSG), a bad field value
# (EINVAL). docs of struct hb_error: "positive errno: EPROTO, EMSGSIZE, EINVAL ...".
DECODE_ERRNOS = {errno.EPROTO, errno.EPROTONOSUPPORT, errno.EMSGSIZE, errno.EBADMSG, errno.EINVAL}


def _clip(text: str, max_bytes: int) -> str:
    while len(text.encode()) > max_bytes:
        text = text[:-1]
    return text


def c_string(size: int) -> st.SearchStrategy[str]:
    """Text that fits a NUL-padded char[size]: at most size - 1 UTF-8 bytes, no NUL."""
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
    return st.text(chars, max_size=size - 1).map(lambda s: _clip(s, size - 1))


calls = st.builds(proto.CallMsg, u32, u32, u64, u32, u32, u64, regs)
actions = st.builds(VmmAction, st.sampled_from(ActionKind), u32, u64, u64)
timings = st.builds(proto.Timing, u64, u64, u64, u64, u64, u32, st.sampled_from(proto.ResultSource))
results = st.builds(
    proto.ResultMsg, u32, u32, u64, st.sampled_from(Outcome), u32, regs, timings,
    st.lists(actions, max_size=6).map(tuple),
)
regions = st.builds(proto.MemRegion, u64, u64, u64, u32)


def _register_vm(name: str, profile: str, nr_vcpus: int, regs: tuple[proto.MemRegion, ...],
                 flags: int, boot_id: bytes | None) -> proto.RegisterVm:
    flags &= ~proto.REGISTER_BOOT_ID
    if boot_id is None:
        return proto.RegisterVm(name, profile, nr_vcpus, regs, flags)
    return proto.RegisterVm(name, profile, nr_vcpus, regs, flags | proto.REGISTER_BOOT_ID, boot_id)


register_vms = st.builds(
    _register_vm, c_string(proto.NAME_LEN), c_string(proto.PROFILE_LEN), u32,
    st.lists(regions, max_size=8).map(tuple), u32,
    st.none() | st.binary(min_size=proto.BOOT_ID_LEN, max_size=proto.BOOT_ID_LEN).filter(any),
)
filters = st.builds(SmcccFilter, u32, u32, u8, st.binary(min_size=15, max_size=15))
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
register_vm_replies = st.builds(
    proto.RegisterVmReply, s32, u32, u64, st.lists(filters, max_size=8).map(tuple), texts,
)
filter_reports = st.builds(
    proto.FilterReport, u32, st.lists(s32, max_size=proto.MAX_FILTERS).map(tuple)
)
destroys = st.builds(proto.DestroyVm, u32)
statuses = st.builds(proto.StatusReply, s32)
mem_reads = st.builds(proto.MemRead, u32, u64, st.integers(0, proto.MAX_MEM_CHUNK))
mem_writes = st.builds(proto.MemWrite, u32, u64, st.binary(max_size=512))
mem_read_replies = st.builds(proto.MemReadReply, s32, st.binary(max_size=512))
errors = st.builds(proto.ErrorMsg, s32, u16, texts)

MESSAGES: list[tuple[st.SearchStrategy[proto.Message], proto.MsgType]] = [
    (calls, proto.MsgType.CALL),
    (results, proto.MsgType.RESULT),
    (register_vms, proto.MsgType.REGISTER_VM),
    (register_vm_replies, proto.MsgType.REGISTER_VM_REPLY),
    (filter_reports, proto.MsgType.FILTER_REPORT),
    (destroys, proto.MsgType.DESTROY_VM),
    (statuses, proto.MsgType.DESTROY_VM_REPLY),
    (mem_reads, proto.MsgType.MEM_READ),
    (mem_writes, proto.MsgType.MEM_WRITE),
    (mem_read_replies, proto.MsgType.MEM_READ_REPLY),
    (errors, proto.MsgType.ERROR),
    (st.just(proto.Ping()), proto.MsgType.PING),
    (st.just(proto.Pong()), proto.MsgType.PONG),
]
any_message = st.one_of([s for s, _ in MESSAGES])


def frame(msg_type: int, payload: bytes, tag: int = 0, *, version: int = proto.VERSION,
          length: int | None = None, magic: int = proto.MAGIC) -> bytes:
    """A frame built by hand, so that every header field can be wrong on purpose."""
    n = len(payload) if length is None else length
    return proto.HEADER.pack(magic, version, msg_type, n, tag) + payload


def refused(data: bytes) -> proto.ProtocolError:
    with pytest.raises(proto.ProtocolError) as info:
        proto.decode(data)
    return info.value


def a_call() -> proto.CallMsg:
    return proto.CallMsg(1, 2, 3, 0x8400_0050, 0, 4, tuple(range(NR_ARGS)))


def a_result(**overrides: object) -> proto.ResultMsg:
    fields: dict[str, object] = dict(
        vm_id=1, vcpu=0, seq=9, outcome=Outcome.OK, reg_mask=0xF, x=(0,) * NR_ARGS,
        timing=proto.Timing(), actions=(VmmAction(ActionKind.CPU_ON, 1, 0x4000, 7),),
    )
    fields.update(overrides)
    return proto.ResultMsg(**fields)  # type: ignore[arg-type]


def payload_of(msg: proto.Message) -> bytes:
    return proto.encode(msg)[proto.HEADER.size :]
