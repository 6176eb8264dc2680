"""Parsers of guest-supplied Hyper-V hypercall bytes and the control word (hypothesis).

Register conventions as arch/arm64/hyperv/hv_core.c uses them, the control word (the TLFS
hypercall input value) and structures from include/hyperv/hvgdk_mini.h.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hyperbroker.handlers.hyperv import abi, layout
from hyperbroker.handlers.hyperv.abi import Control
from hyperbroker.handlers.hyperv.layout import (
    PostMessageInput,
    RegisterAssoc,
    SignalEventInput,
    VpHeader,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


@given(st.binary(max_size=300), st.integers(0, 80))
def test_parsers_never_raise_on_guest_bytes(data: bytes, index: int) -> None:
    VpHeader.parse(data)
    RegisterAssoc.parse(data, index)
    layout.register_name(data, index)
    PostMessageInput.parse(data)
    SignalEventInput.parse(data)


@given(u64, u32, u8, st.integers(0, 0xFF_FFFF))
def test_vp_header_round_trips(pid: int, vp: int, vtl: int, reserved: int) -> None:
    header = VpHeader(pid, vp, vtl, reserved)
    assert VpHeader.parse(header.pack()) == header


@given(u32, st.integers(0, (1 << 96) - 1), st.integers(0, (1 << 128) - 1))
def test_register_assoc_round_trips(name: int, reserved: int, value: int) -> None:
    assoc = RegisterAssoc(name, reserved, value)
    data = VpHeader(0, 0, 0, 0).pack() + assoc.pack()
    assert RegisterAssoc.parse(data, 0) == assoc


@given(u32, u32, u32, st.integers(0, 240), st.binary(min_size=240, max_size=240))
def test_post_message_round_trips(conn: int, res: int, mtype: int, size: int,
                                  payload: bytes) -> None:
    raw = PostMessageInput(conn, res, mtype, size, payload).pack()
    parsed = PostMessageInput.parse(raw)
    assert parsed is not None
    assert (parsed.connection_id, parsed.message_type, parsed.payload) == (conn, mtype,
                                                                           payload[:size])


@given(u32, u16, u16)
def test_signal_event_round_trips(conn: int, flag: int, reserved: int) -> None:
    event = SignalEventInput(conn, flag, reserved)
    assert SignalEventInput.parse(event.pack()) == event


def test_short_inputs_parse_as_none() -> None:
    assert VpHeader.parse(bytes(15)) is None
    assert RegisterAssoc.parse(bytes(16 + 31), 0) is None
    assert layout.register_name(bytes(16 + 3), 0) is None
    assert PostMessageInput.parse(bytes(255)) is None
    assert SignalEventInput.parse(bytes(7)) is None


@given(u64)
def test_control_word_round_trips(x1: int) -> None:
    control = Control.decode(x1)
    assert control.encode() == x1
    assert control.reserved == x1 & abi.RESERVED_MASK


def test_control_word_fields_sit_where_linux_puts_them() -> None:
    # hv_set_vpreg: HVCALL_SET_VP_REGISTERS | HV_HYPERCALL_FAST_BIT | HV_HYPERCALL_REP_COMP_1
    control = Control.decode(0x51 | 1 << 16 | 1 << 32)
    assert (control.code, control.fast, control.rep_count, control.rep_start) == (0x51, True, 1, 0)
    assert Control.decode(5 << 48).rep_start == 5
    assert Control.decode(3 << 17).varhead_size == 3


@given(st.lists(u64, min_size=18, max_size=18))
def test_fast_block_is_x2_to_x17(x: list[int]) -> None:
    block = layout.fast_block(x)
    assert len(block) == 128
    assert [int.from_bytes(block[i : i + 8], "little") for i in range(0, 128, 8)] == x[2:18]


def test_one_register_get_returns_in_x6_and_x7() -> None:
    # Hv_get_vpreg_128: input header x2/x3, the name in x4; results in x6 (low), x7 (high).
    regs = layout.fast_output_registers(16 + 4, 0, (2 | 3 << 64).to_bytes(16, "little"))
    assert regs == {6: 2, 7: 3}


def test_fast_blocks_fit_five_names_but_not_six() -> None:
    assert layout.fast_fits(16 + 4 * 5, 16 * 5)
    assert not layout.fast_fits(16 + 4 * 6, 16 * 6)
