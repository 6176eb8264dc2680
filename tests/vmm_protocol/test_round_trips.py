"""The VMM <-> agent codec (hyperbroker.wire.vmm): round trips, encoder refusals, header checks.

The byte layout is include/hyperbroker/vmm_protocol.h (tests/test_c_header.py checks that the C
header and these struct formats agree). Decoding is the agent's trust boundary: whatever bytes a
VMM sends, decode() answers with a frame or a ProtocolError carrying the errno of the
HB_MSG_ERROR reply, never another exception.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperbroker.smccc import NR_ARGS
from hyperbroker.wire import vmm as proto

from .support import (
    a_call,
    a_result,
    calls,
    destroys,
    errors,
    filter_reports,
    frame,
    mem_read_replies,
    mem_reads,
    mem_writes,
    refused,
    register_vm_replies,
    register_vms,
    results,
    statuses,
    u16,
    u32,
)

# ---- round trips: every message type, every field at its full width -----------------------------


def assert_round_trip(msg: proto.Message, tag: int, msg_type: proto.MsgType) -> None:
    data = proto.encode(msg, tag)
    got = proto.decode(data)
    assert got == proto.Frame(msg_type, tag, msg)
    assert proto.parse_header(data) == (msg_type, len(data) - proto.HEADER.size, tag)


@given(calls, u32)
def test_call_round_trips(msg: proto.CallMsg, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.CALL)


@given(results, u32)
def test_result_round_trips(msg: proto.ResultMsg, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.RESULT)


@given(register_vms, u32)
def test_register_vm_round_trips(msg: proto.RegisterVm, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.REGISTER_VM)


@given(register_vm_replies, u32)
def test_register_vm_reply_round_trips(msg: proto.RegisterVmReply, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.REGISTER_VM_REPLY)


@given(filter_reports, u32)
def test_filter_report_round_trips(msg: proto.FilterReport, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.FILTER_REPORT)


@given(destroys, u32)
def test_destroy_vm_round_trips(msg: proto.DestroyVm, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.DESTROY_VM)


@given(statuses, u32)
def test_status_reply_round_trips_as_destroy_vm_reply(msg: proto.StatusReply, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.DESTROY_VM_REPLY)


@given(mem_reads, u32)
def test_mem_read_round_trips(msg: proto.MemRead, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.MEM_READ)


@given(mem_writes, u32)
def test_mem_write_round_trips(msg: proto.MemWrite, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.MEM_WRITE)


@given(mem_read_replies, u32)
def test_mem_read_reply_round_trips(msg: proto.MemReadReply, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.MEM_READ_REPLY)


@given(errors, u32)
def test_error_round_trips(msg: proto.ErrorMsg, tag: int) -> None:
    assert_round_trip(msg, tag, proto.MsgType.ERROR)


@given(u32)
def test_ping_and_pong_round_trip_with_an_empty_payload(tag: int) -> None:
    assert_round_trip(proto.Ping(), tag, proto.MsgType.PING)
    assert_round_trip(proto.Pong(), tag, proto.MsgType.PONG)
    assert len(proto.encode(proto.Ping(), tag)) == proto.HEADER.size


def test_register_vm_with_max_regions_and_longest_names_round_trips() -> None:
    # char name[HB_NAME_LEN] and profile[HB_PROFILE_LEN] keep one byte for the NUL.
    msg = proto.RegisterVm(
        "n" * (proto.NAME_LEN - 1), "p" * (proto.PROFILE_LEN - 1), proto.MAX_VCPUS,
        tuple(proto.MemRegion(i << 30, 1 << 30, i, proto.REGION_READONLY)
              for i in range(proto.MAX_REGIONS)),
        proto.REGISTER_MEM_FDS,
    )
    assert proto.decode(proto.encode(msg)).message == msg


def test_filter_report_with_max_filters_round_trips() -> None:
    msg = proto.FilterReport(7, tuple(range(proto.MAX_FILTERS)))
    assert proto.decode(proto.encode(msg)).message == msg


def test_mem_write_of_max_mem_chunk_round_trips() -> None:
    msg = proto.MemWrite(1, 0x4000_0000, bytes(range(256)) * (proto.MAX_MEM_CHUNK // 256))
    assert proto.decode(proto.encode(msg)).message == msg


def test_mem_read_of_max_mem_chunk_round_trips() -> None:
    msg = proto.MemRead(1, 0x4000_0000, proto.MAX_MEM_CHUNK)
    assert proto.decode(proto.encode(msg)).message == msg


def test_payload_of_exactly_max_payload_is_accepted() -> None:
    text = "e" * (proto.MAX_PAYLOAD - proto.ERROR.size)
    data = proto.encode(proto.ErrorMsg(errno.EPROTO, 3, text))
    assert len(data) == proto.HEADER.size + proto.MAX_PAYLOAD
    assert proto.decode(data).message == proto.ErrorMsg(errno.EPROTO, 3, text)


def test_result_pads_short_register_tuples_to_x17() -> None:
    msg = a_result(x=(1, 2, 3, 4))
    got = proto.decode(proto.encode(msg)).message
    assert isinstance(got, proto.ResultMsg)
    assert got.x == (1, 2, 3, 4) + (0,) * (NR_ARGS - 4)


def test_magic_reads_hbp1_on_the_wire() -> None:
    # vmm_protocol.h: HB_MAGIC 0x31504248 is "HBP1" as bytes on the wire (little-endian).
    assert proto.encode(proto.Ping())[:4] == b"HBP1"
    assert proto.header(proto.MsgType.PING, 0, 0)[:4] == b"HBP1"


def test_header_is_little_endian_magic_version_type_length_tag() -> None:
    data = proto.encode(proto.DestroyVm(5), tag=0x0A0B0C0D)
    assert data[:16] == (
        b"HBP1" + b"\x01\x00" + b"\x04\x00" + b"\x08\x00\x00\x00" + b"\x0d\x0c\x0b\x0a"
    )


@given(calls, u32)
def test_encode_call_equals_encode_of_call_msg(msg: proto.CallMsg, tag: int) -> None:
    assert proto.encode_call(msg, tag) == proto.encode(msg, tag)


# ---- encoder refusals: caller errors are exceptions, not frames ---------------------------------


def test_encode_refuses_a_call_without_eighteen_registers() -> None:
    with pytest.raises(ValueError, match=r"x0\.\.x17"):
        proto.encode(proto.CallMsg(1, 0, 0, 0, 0, 0, (0,) * (NR_ARGS - 1)))


def test_encode_refuses_a_name_that_leaves_no_room_for_the_nul() -> None:
    with pytest.raises(ValueError, match="name"):
        proto.encode(proto.RegisterVm("n" * proto.NAME_LEN, "", 1, ()))


def test_encode_refuses_a_profile_that_leaves_no_room_for_the_nul() -> None:
    with pytest.raises(ValueError, match="profile"):
        proto.encode(proto.RegisterVm("vm", "p" * proto.PROFILE_LEN, 1, ()))


def test_encode_refuses_something_that_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        proto.encode(object())  # type: ignore[arg-type]


# ---- header checks ------------------------------------------------------------------------------


@given(st.binary(max_size=proto.HEADER.size - 1))
def test_frame_shorter_than_a_header_is_eproto(data: bytes) -> None:
    assert refused(data).code == errno.EPROTO


@given(u32.filter(lambda m: m != proto.MAGIC))
def test_bad_magic_is_eproto(magic: int) -> None:
    assert refused(frame(proto.MsgType.PING, b"", magic=magic)).code == errno.EPROTO


@given(u16.filter(lambda v: v != proto.VERSION), u32)
def test_bad_version_is_eprotonosupport_and_keeps_tag_and_type(version: int, tag: int) -> None:
    e = refused(frame(proto.MsgType.PING, b"", tag, version=version))
    assert (e.code, e.tag, e.msg_type) == (errno.EPROTONOSUPPORT, tag, proto.MsgType.PING)


def test_length_over_max_payload_is_emsgsize() -> None:
    e = refused(frame(proto.MsgType.ERROR, b"", 5, length=proto.MAX_PAYLOAD + 1))
    assert (e.code, e.tag, e.msg_type) == (errno.EMSGSIZE, 5, proto.MsgType.ERROR)


def test_parse_header_accepts_length_of_exactly_max_payload() -> None:
    data = frame(proto.MsgType.ERROR, b"", 5, length=proto.MAX_PAYLOAD)
    assert proto.parse_header(data) == (proto.MsgType.ERROR, proto.MAX_PAYLOAD, 5)


def test_frame_shorter_than_its_announced_length_is_eproto() -> None:
    data = proto.encode(proto.DestroyVm(1), tag=3)
    e = refused(data[:-1])
    assert (e.code, e.tag, e.msg_type) == (errno.EPROTO, 3, proto.MsgType.DESTROY_VM)


def test_frame_longer_than_its_announced_length_is_eproto() -> None:
    assert refused(proto.encode(proto.DestroyVm(1)) + b"\0").code == errno.EPROTO


@given(u16.filter(lambda t: t not in set(proto.MsgType)), u32)
def test_unknown_message_type_is_ebadmsg_and_keeps_tag_and_type(msg_type: int, tag: int) -> None:
    e = refused(frame(msg_type, b"", tag))
    assert (e.code, e.tag, e.msg_type) == (errno.EBADMSG, tag, msg_type)


def test_a_payload_error_carries_the_frames_tag_and_type() -> None:
    e = refused(frame(proto.MsgType.CALL, b"\0" * 4, tag=77))
    assert (e.code, e.tag, e.msg_type) == (errno.EPROTO, 77, proto.MsgType.CALL)


def test_decode_accepts_a_memoryview() -> None:
    data = proto.encode(a_call(), 4)
    assert proto.decode(memoryview(data)) == proto.decode(data)
