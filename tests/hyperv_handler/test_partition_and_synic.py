"""HypervHandler: GetPartitionId, SynIC messages and events, state and robustness.

Same interface and sources as test_hypercalls.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperbroker.calls import Outcome, Result
from hyperbroker.handlers.api import HandlerConfigError, VmInfo
from hyperbroker.handlers.hyperv import HypervHandler, abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.layout import (
    PostMessageInput,
    SignalEventInput,
)
from hyperbroker.handlers.hyperv.synic import PostMessage, SignalEvent
from hyperbroker.testing.context import FakeContext, MemoryPools
from hyperbroker.testing.metrics import HANDLERS as REGISTRY

from .support import IN, OUT, SELF_P, SELF_VP, control, get_fast, hv, make, set_fast, status

# HvCallGetPartitionId


async def test_get_partition_id_writes_the_id_to_the_output_page() -> None:
    h, ctx = make({"partition_id": 0x77})
    result = await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID), 0, OUT)
    assert status(result) is HvStatus.SUCCESS
    assert ctx.memory.peek(OUT, 8) == (0x77).to_bytes(8, "little")


async def test_fast_get_partition_id_returns_it_in_x2() -> None:
    h, ctx = make({"partition_id": 0x77})
    result = await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))
    assert (result.x[2], result.mask) == (0x77, 0b101)


async def test_partition_ids_are_unique_across_the_fleet() -> None:
    pools = MemoryPools()
    ids = []
    for name in ("a", "b", "c"):
        h, ctx = make(name=name, pools=pools)
        ids.append((await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))).x[2])
        assert (await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))).x[2] == ids[-1]
    assert len(set(ids)) == 3 and 0 not in ids


async def test_get_partition_id_without_the_privilege_is_access_denied() -> None:
    h, ctx = make({"privileges": 0x60})  # HYPERCALL and VP_INDEX only
    result = await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))
    assert status(result) is HvStatus.ACCESS_DENIED


# HvCallPostMessage, HvCallSignalEvent


class RecordingSink:
    def __init__(self, answer: HvStatus = HvStatus.SUCCESS) -> None:
        self.answer = answer
        self.seen: list[PostMessage | SignalEvent] = []

    def post_message(self, vm: VmInfo, vp: int, message: PostMessage) -> HvStatus:
        self.seen.append(message)
        return self.answer

    def signal_event(self, vm: VmInfo, vp: int, event: SignalEvent) -> HvStatus:
        self.seen.append(event)
        return self.answer


def message(conn: int = 4, reserved: int = 0, mtype: int = 1, size: int = 8) -> bytes:
    return PostMessageInput(conn, reserved, mtype, size, bytes(range(8)) + bytes(232)).pack()


async def post(h: HypervHandler, ctx: FakeContext, data: bytes) -> Result:
    ctx.memory.poke(IN, data)
    return await hv(h, ctx, control(abi.HVCALL_POST_MESSAGE), IN, 0)


async def signal(h: HypervHandler, ctx: FakeContext, conn: int, flag: int = 0,
                 reserved: int = 0) -> Result:
    """vmbus_set_event (drivers/hv/connection.c): a fast HVCALL_SIGNAL_EVENT of sig_event."""
    x2 = conn | flag << 32 | reserved << 48
    return await hv(h, ctx, control(abi.HVCALL_SIGNAL_EVENT, fast=True), x2)


async def test_post_message_reaches_the_sink() -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    assert status(await post(h, ctx, message())) is HvStatus.SUCCESS
    assert sink.seen == [PostMessage(4, 1, bytes(range(8)))]
    assert ctx.state.get()["messages_posted"] == 1


async def test_the_default_sink_counts_and_acknowledges() -> None:
    h, ctx = make()
    before = REGISTRY.get_sample_value("hyperbroker_hyperv_synic_total",
                                       {"kind": "post_message"}) or 0.0
    assert status(await post(h, ctx, message())) is HvStatus.SUCCESS
    assert REGISTRY.get_sample_value("hyperbroker_hyperv_synic_total",
                                     {"kind": "post_message"}) == before + 1


@pytest.mark.parametrize(("data", "expected"), [
    (message(size=241), HvStatus.INVALID_PARAMETER),  # > HV_MESSAGE_PAYLOAD_BYTE_COUNT
    (message(mtype=0x8000_0010), HvStatus.INVALID_PARAMETER),  # a hypervisor message type
    (message(mtype=0), HvStatus.INVALID_PARAMETER),  # HVMSG_NONE
    (message(reserved=1), HvStatus.INVALID_PARAMETER),
    (message(conn=1 << 24 | 4), HvStatus.INVALID_CONNECTION_ID),
])
async def test_bad_messages_are_refused(data: bytes, expected: HvStatus) -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    assert status(await post(h, ctx, data)) is expected
    assert sink.seen == []


async def test_a_message_to_an_unlisted_connection_is_invalid_connection_id() -> None:
    h, ctx = make({"connections": [1, 2]})
    assert status(await post(h, ctx, message(conn=4))) is HvStatus.INVALID_CONNECTION_ID
    assert status(await post(h, ctx, message(conn=2))) is HvStatus.SUCCESS


async def test_the_sinks_status_reaches_the_guest() -> None:
    h, ctx = make(sink=RecordingSink(HvStatus.INSUFFICIENT_BUFFERS))
    assert status(await post(h, ctx, message())) is HvStatus.INSUFFICIENT_BUFFERS
    assert status(await signal(h, ctx, 4)) is HvStatus.INSUFFICIENT_BUFFERS


async def test_post_message_without_the_privilege_is_access_denied() -> None:
    h, ctx = make({"privileges": abi.HV_MSR_HYPERCALL_AVAILABLE | abi.HV_SIGNAL_EVENTS})
    assert status(await post(h, ctx, message())) is HvStatus.ACCESS_DENIED


async def test_signal_event_reaches_the_sink() -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    assert status(await signal(h, ctx, 0x2001, flag=3)) is HvStatus.SUCCESS
    assert sink.seen == [SignalEvent(0x2001, 3)]


@pytest.mark.parametrize(("flag", "reserved", "conn", "expected"), [
    (abi.HV_EVENT_FLAGS_COUNT, 0, 4, HvStatus.INVALID_PARAMETER),
    (0, 1, 4, HvStatus.INVALID_PARAMETER),
    (0, 0, 0xFF00_0004, HvStatus.INVALID_CONNECTION_ID),
])
async def test_bad_events_are_refused(flag: int, reserved: int, conn: int,
                                      expected: HvStatus) -> None:
    h, ctx = make()
    assert status(await signal(h, ctx, conn, flag, reserved)) is expected


async def test_signal_event_without_the_privilege_is_access_denied() -> None:
    h, ctx = make({"privileges": abi.HV_MSR_HYPERCALL_AVAILABLE})
    assert status(await signal(h, ctx, 4)) is HvStatus.ACCESS_DENIED


async def test_slow_signal_event_reads_its_input_page() -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    ctx.memory.poke(IN, SignalEventInput(9, 1, 0).pack())
    assert status(await hv(h, ctx, control(abi.HVCALL_SIGNAL_EVENT), IN, 0)) is HvStatus.SUCCESS
    assert sink.seen == [SignalEvent(9, 1)]


# State, config, robustness


async def test_the_persona_survives_a_new_handler_instance() -> None:
    h, ctx = make()
    await set_fast(h, ctx, abi.HV_REGISTER_GUEST_OS_ID, 0x1234)
    fresh = HypervHandler({})
    assert (await get_fast(fresh, ctx, abi.HV_REGISTER_GUEST_OS_ID))[1] == 0x1234


async def test_reads_of_constant_registers_do_not_write_state_twice() -> None:
    h, ctx = make()
    await get_fast(h, ctx, abi.HV_REGISTER_VP_INDEX)  # first call: partition ID and epoch
    await get_fast(h, ctx, abi.HV_REGISTER_VP_INDEX)
    await get_fast(h, ctx, abi.HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO)
    assert ctx.state.puts == 1


@pytest.mark.parametrize(("config", "key"), [
    ({"privileges": abi.HV_MSR_SYNIC_AVAILABLE}, "privileges"),
    ({"privileges": abi.HV_MSR_REFERENCE_TSC_AVAILABLE}, "privileges"),
    ({"misc_features": 1 << 3}, "misc_features"),
    ({"hints": 1}, "hints"),
    ({"hints": 1 << 32}, "hints"),
    ({"partition_id": 0}, "partition_id"),
    ({"partition_id": SELF_P}, "partition_id"),
    ({"connections": [1 << 24]}, "connections"),
    ({"hypervisor_version": {"major": 1 << 16}}, "hypervisor_version.major"),
    ({"hypervisor_version": {"flavour": 1}}, "hypervisor_version"),
    ({"vendor": "kvm"}, "vendor"),
])
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(HandlerConfigError, match=key.replace(".", r"\.")):
        HypervHandler(config)


@settings(max_examples=300, deadline=None)
@given(x1=st.integers(0, (1 << 64) - 1) | st.sampled_from(
           [0x50 | 1 << 16 | 1 << 32, 0x51 | 1 << 16 | 1 << 32, 0x46, 0x5C, 0x5D | 1 << 16,
            0x50 | 3 << 32, 0x51 | 2 << 32]),
       regs=st.lists(st.integers(0, (1 << 64) - 1) | st.sampled_from([IN, OUT, SELF_P, SELF_VP]),
                     min_size=16, max_size=16),
       page=st.binary(min_size=512, max_size=512))
async def test_no_guest_input_makes_the_persona_raise(x1: int, regs: list[int],
                                                      page: bytes) -> None:
    h, ctx = make()
    ctx.memory.poke(IN, page)
    result = await hv(h, ctx, x1, *regs)
    assert result.x[0] & 0xFFFF in {int(s) for s in HvStatus}
    assert (result.outcome is Outcome.OK) == (status(result) is HvStatus.SUCCESS)
