"""The VMM <-> agent codec (hyperbroker.wire.vmm): payload sizes, enum fields, arbitrary bytes.

Every malformed input is a ProtocolError carrying the errno of the HB_MSG_ERROR reply
(see test_round_trips.py for the layout and the trust boundary).
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hyperbroker.calls import ActionKind, Outcome
from hyperbroker.kvm import SmcccFilter
from hyperbroker.smccc import NR_ARGS
from hyperbroker.wire import vmm as proto

from .support import DECODE_ERRNOS, a_call, a_result, frame, payload_of, refused, u8, u16, u32

# ---- payload size checks, per message type ------------------------------------------------------


@pytest.mark.parametrize(
    ("msg_type", "payload"),
    [
        (proto.MsgType.CALL, payload_of(a_call())[:-1]),
        (proto.MsgType.CALL, payload_of(a_call()) + b"\0"),
        (proto.MsgType.RESULT, payload_of(a_result(actions=()))[:-1]),
        (proto.MsgType.RESULT, payload_of(a_result())[:-1]),  # its one action is cut short
        (proto.MsgType.RESULT, payload_of(a_result()) + b"\0"),
        (proto.MsgType.REGISTER_VM, b"\0" * (proto.REGISTER_VM.size - 1)),
        (proto.MsgType.REGISTER_VM,
         payload_of(proto.RegisterVm("vm", "", 1, (proto.MemRegion(0, 4096),)))[:-1]),
        (proto.MsgType.REGISTER_VM,
         payload_of(proto.RegisterVm("vm", "", 1, (proto.MemRegion(0, 4096),))) + b"\0"),
        (proto.MsgType.REGISTER_VM_REPLY, b"\0" * (proto.REGISTER_VM_REPLY.size - 1)),
        (proto.MsgType.REGISTER_VM_REPLY,
         payload_of(proto.RegisterVmReply(0, 1, 1, (SmcccFilter(0x8400_0050, 16, 2),)))[:-1]),
        (proto.MsgType.FILTER_REPORT, b"\0" * (proto.FILTER_REPORT.size - 1)),
        (proto.MsgType.FILTER_REPORT, payload_of(proto.FilterReport(1, (0, 0)))[:-1]),
        (proto.MsgType.FILTER_REPORT, payload_of(proto.FilterReport(1, (0, 0))) + b"\0"),
        (proto.MsgType.DESTROY_VM, b"\0" * 7),
        (proto.MsgType.DESTROY_VM, b"\0" * 9),
        (proto.MsgType.DESTROY_VM_REPLY, b"\0" * 7),
        (proto.MsgType.DESTROY_VM_REPLY, b"\0" * 9),
        (proto.MsgType.MEM_READ, b"\0" * (proto.MEM_ACCESS.size - 1)),
        (proto.MsgType.MEM_READ, payload_of(proto.MemRead(1, 0, 8)) + b"\0"),
        (proto.MsgType.MEM_WRITE, b"\0" * (proto.MEM_ACCESS.size - 1)),
        (proto.MsgType.MEM_WRITE, payload_of(proto.MemWrite(1, 0, b"abcd"))[:-1]),
        (proto.MsgType.MEM_WRITE, payload_of(proto.MemWrite(1, 0, b"abcd")) + b"\0"),
        (proto.MsgType.MEM_READ_REPLY, b"\0" * (proto.MEM_REPLY.size - 1)),
        (proto.MsgType.MEM_READ_REPLY, payload_of(proto.MemReadReply(0, b"abcd"))[:-1]),
        (proto.MsgType.MEM_READ_REPLY, payload_of(proto.MemReadReply(0, b"abcd")) + b"\0"),
        (proto.MsgType.ERROR, b"\0" * (proto.ERROR.size - 1)),
        (proto.MsgType.PING, b"\0"),
        (proto.MsgType.PONG, b"\0"),
    ],
    ids=lambda v: v.name if isinstance(v, proto.MsgType) else f"{len(v)}B",
)
def test_payload_of_the_wrong_size_is_eproto(msg_type: proto.MsgType, payload: bytes) -> None:
    e = refused(frame(msg_type, payload, tag=11))
    assert (e.code, e.tag, e.msg_type) == (errno.EPROTO, 11, msg_type)


def test_register_vm_with_more_than_max_regions_is_einval() -> None:
    body = proto.REGISTER_VM.pack(b"vm", b"", 1, 0, proto.MAX_REGIONS + 1, 0)
    payload = body + bytes(proto.REGION.size * (proto.MAX_REGIONS + 1))
    assert refused(frame(proto.MsgType.REGISTER_VM, payload)).code == errno.EINVAL


def test_register_vm_name_that_is_not_utf8_is_einval() -> None:
    payload = proto.REGISTER_VM.pack(b"\xff\xfe", b"", 1, 0, 0, 0)
    assert refused(frame(proto.MsgType.REGISTER_VM, payload)).code == errno.EINVAL


def test_register_vm_profile_that_is_not_utf8_is_einval() -> None:
    payload = proto.REGISTER_VM.pack(b"vm", b"\xc3", 1, 0, 0, 0)
    assert refused(frame(proto.MsgType.REGISTER_VM, payload)).code == errno.EINVAL


def test_register_vm_name_stops_at_the_first_nul() -> None:
    payload = proto.REGISTER_VM.pack(b"vm\0junk", b"gold\0\xff", 1, 0, 0, 0)
    msg = proto.decode(frame(proto.MsgType.REGISTER_VM, payload)).message
    assert isinstance(msg, proto.RegisterVm)
    assert (msg.name, msg.profile) == ("vm", "gold")


def test_filter_report_with_more_than_max_filters_is_einval() -> None:
    n = proto.MAX_FILTERS + 1
    payload = proto.FILTER_REPORT.pack(1, n) + bytes(4 * n)
    assert refused(frame(proto.MsgType.FILTER_REPORT, payload)).code == errno.EINVAL


def test_mem_read_over_max_mem_chunk_is_emsgsize() -> None:
    payload = proto.MEM_ACCESS.pack(1, proto.MAX_MEM_CHUNK + 1, 0)
    assert refused(frame(proto.MsgType.MEM_READ, payload)).code == errno.EMSGSIZE


def test_mem_write_over_max_mem_chunk_is_emsgsize() -> None:
    n = proto.MAX_MEM_CHUNK + 1
    payload = proto.MEM_ACCESS.pack(1, n, 0) + bytes(n)
    assert refused(frame(proto.MsgType.MEM_WRITE, payload)).code == errno.EMSGSIZE


def test_register_vm_reply_text_after_the_filters_is_the_message() -> None:
    f = SmcccFilter(0x8400_0050, 0x10, 2)
    payload = proto.REGISTER_VM_REPLY.pack(-errno.EEXIST, 0, 3, 1, 0) + f.pack() + b"overlap"
    msg = proto.decode(frame(proto.MsgType.REGISTER_VM_REPLY, payload)).message
    assert msg == proto.RegisterVmReply(-errno.EEXIST, 0, 3, (f,), "overlap")


# ---- RESULT fields that name an enum ------------------------------------------------------------
# A RESULT comes from the agent, but the agent decodes whatever a VMM sends on its socket
# (agent/core.py on_frame catches only ProtocolError), so a value outside the enum must be a
# ProtocolError like every other malformed field.

ENUM_BUG = (
    "hyperbroker/vmm_protocol.py:377,381-382: _decode_payload builds Outcome(v[3]), "
    "ResultSource(t[6]) and ActionKind(k) from wire values without a check, so an unknown "
    "value raises ValueError instead of ProtocolError"
)


def result_payload_with(outcome: int = 0, source: int = 0, kind: int = 1) -> bytes:
    t = (0, 0, 0, 0, 0, 0, source)
    return (
        proto.RESULT.pack(1, 0, 1, outcome, 0xF, *([0] * NR_ARGS), *t, 1, 0)
        + proto.ACTION.pack(kind, 0, 0, 0)
    )


def test_result_with_known_enum_values_decodes() -> None:
    msg = proto.decode(frame(proto.MsgType.RESULT, result_payload_with(4, 2, 8))).message
    assert isinstance(msg, proto.ResultMsg)
    assert msg.outcome is Outcome.INTERNAL_ERROR
    assert msg.timing.source is proto.ResultSource.FALLBACK
    assert msg.actions[0].kind is ActionKind.SYSTEM_OFF2


def test_result_with_unknown_outcome_is_a_protocol_error() -> None:
    e = refused(frame(proto.MsgType.RESULT, result_payload_with(outcome=max(Outcome) + 1)))
    assert e.code in (errno.EINVAL, errno.EBADMSG)


def test_result_with_unknown_source_is_a_protocol_error() -> None:
    e = refused(frame(proto.MsgType.RESULT, result_payload_with(source=3)))
    assert e.code in (errno.EINVAL, errno.EBADMSG)


def test_result_with_unknown_action_kind_is_a_protocol_error() -> None:
    e = refused(frame(proto.MsgType.RESULT, result_payload_with(kind=0)))
    assert e.code in (errno.EINVAL, errno.EBADMSG)


# ---- decode of arbitrary bytes ------------------------------------------------------------------


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


# One valid frame of every type (several for the variable-length ones): mutating these reaches
# the payload decoders' deeper checks far more often than random bytes do, at little cost.
SAMPLE_FRAMES = [
    proto.encode(m, tag)
    for tag, m in enumerate([
        a_call(), a_result(), a_result(actions=()),
        proto.RegisterVm("vm-1", "gold", 2, (proto.MemRegion(0x4000_0000, 1 << 20),), 1),
        proto.RegisterVm("", "", 1, ()),
        proto.RegisterVmReply(0, 1, 2, (SmcccFilter(0x8400_0050, 16, 2),), "ok"),
        proto.RegisterVmReply(-errno.EEXIST, 0, 0, (), "overlap"),
        proto.FilterReport(1, (0, errno.EEXIST)), proto.FilterReport(1, ()),
        proto.DestroyVm(1), proto.StatusReply(-errno.ENOENT),
        proto.MemRead(1, 0x4000_0000, 64), proto.MemWrite(1, 0x4000_0000, b"data"),
        proto.MemReadReply(0, b"data"), proto.MemReadReply(-errno.EFAULT, b""),
        proto.ErrorMsg(errno.EPROTO, 3, "bad"), proto.Ping(), proto.Pong(),
    ])
]
edits = st.lists(st.tuples(u16, u8), max_size=4)


def framed(types: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    """Frames with a good magic and random payloads, the announced length mostly right."""
    return st.builds(
        lambda t, p, tag, delta: frame(t, p, tag, length=max(0, len(p) + delta)),
        types, st.binary(max_size=300), u32,
        st.sampled_from([0] * 12 + [-1, 1, proto.MAX_PAYLOAD]),
    )


NON_RESULT_TYPES = [int(t) for t in proto.MsgType if t is not proto.MsgType.RESULT]


def not_a_result(data: bytes) -> bool:
    """RESULT frames have their own fuzz tests below (see ENUM_BUG)."""
    return data[6:8] != struct.pack("<H", proto.MsgType.RESULT)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    framed(st.sampled_from([*NON_RESULT_TYPES, 0, 0x08, 0x80, 0x100, 0xFFFF])),
    st.builds(_mutate, st.sampled_from(SAMPLE_FRAMES), edits),
).filter(not_a_result))
def test_decode_of_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    try:
        got = proto.decode(data)
    except proto.ProtocolError as e:
        assert e.code in DECODE_ERRNOS
        assert 0 <= e.tag <= 0xFFFF_FFFF and 0 <= e.msg_type <= 0xFFFF
    else:
        assert got.type in set(proto.MsgType)
        assert len(data) == proto.HEADER.size + proto.parse_header(data)[1]


RESULT_SOURCE_OFFSET = 24 + 8 * NR_ARGS + 44  # hb_result.timing.source
RESULT_NR_ACTIONS_OFFSET = proto.RESULT.size - 8  # hb_result.nr_actions


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(Outcome), st.sampled_from(proto.ResultSource),
    st.lists(st.sampled_from(ActionKind), max_size=3), st.binary(max_size=400),
    st.integers(0, 7), st.integers(-30, 30),
)
def test_decode_of_arbitrary_result_frames_with_known_enums_raises_only_protocol_error(
    outcome: Outcome, source: proto.ResultSource, kinds: list[ActionKind], noise: bytes,
    nr_actions: int, cut: int,
) -> None:
    body = bytearray(noise.ljust(proto.RESULT.size, b"\0")[: proto.RESULT.size])
    struct.pack_into("<I", body, 16, outcome)
    struct.pack_into("<I", body, RESULT_SOURCE_OFFSET, source)
    struct.pack_into("<I", body, RESULT_NR_ACTIONS_OFFSET, nr_actions)
    tail = b"".join(proto.ACTION.pack(k, 0, 0, 0) for k in kinds)
    payload = (bytes(body) + tail)[: max(0, proto.RESULT.size + len(tail) + cut)]
    whole = len(payload) == proto.RESULT.size + nr_actions * proto.ACTION.size
    try:
        msg = proto.decode(frame(proto.MsgType.RESULT, payload)).message
    except proto.ProtocolError as e:
        assert e.code == errno.EPROTO and not whole
    else:
        assert whole and isinstance(msg, proto.ResultMsg)
        assert (msg.outcome, msg.timing.source) == (outcome, source)
        assert [a.kind for a in msg.actions] == kinds[:nr_actions]


@settings(max_examples=50, deadline=None, database=None, phases=[Phase.generate])
@given(u32, u32, u32)
def test_decode_of_result_frames_with_any_enum_value_raises_only_protocol_error(
    outcome: int, source: int, kind: int,
) -> None:
    try:
        proto.decode(frame(proto.MsgType.RESULT, result_payload_with(outcome, source, kind)))
    except proto.ProtocolError as e:
        assert e.code in DECODE_ERRNOS
