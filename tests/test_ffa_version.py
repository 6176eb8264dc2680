"""FFA_VERSION negotiation and call admission (FFA_VERSION; include/linux/arm_ffa.h; the FFA_ERROR
convention, include/linux/arm_ffa.h)."""

from __future__ import annotations

import pytest

from hyperbroker.calls import Outcome
from hyperbroker.handlers.ffa import FfaHandler, abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.smccc import NOT_SUPPORTED_U64
from hyperbroker.testing.ffa import FfaGuest, error_of


@pytest.fixture
def guest() -> FfaGuest:
    return FfaGuest(FfaHandler({}))


async def test_version_returns_our_version_not_success(guest: FfaGuest) -> None:
    # W0 = the callee's version, never FFA_SUCCESS.
    r = await guest.call(abi.FFA_VERSION, abi.VERSION_1_1)
    assert r.x[0] == abi.VERSION_1_2
    assert r.outcome is Outcome.OK


async def test_version_with_bit31_is_not_supported(guest: FfaGuest) -> None:
    # Bit 31 must be zero (HF FFA_VERSION_MBZ_BIT, TF-A BIT31_MASK).
    r = await guest.call(abi.FFA_VERSION, abi.VERSION_1_2 | 1 << 31)
    assert r.x[0] == NOT_SUPPORTED_U64
    assert r.outcome is Outcome.GUEST_ERROR


@pytest.mark.parametrize("requested", [0x0, 0x20000, 0x7FFF0002])
async def test_version_with_other_major_is_not_supported(guest: FfaGuest, requested: int) -> None:
    # Compatible versions share the major.
    r = await guest.call(abi.FFA_VERSION, requested)
    assert r.x[0] == NOT_SUPPORTED_U64


async def test_newer_minor_is_served_as_ours(guest: FfaGuest) -> None:
    # Xen: a minor above ours records ours; Linux downgrades to min(fw, own).
    r = await guest.call(abi.FFA_VERSION, abi.make_version(1, 7))
    assert r.x[0] == abi.VERSION_1_2
    regs = await guest.call(abi.FFA_FEATURES, abi.FFA_PARTITION_INFO_GET_REGS)
    assert regs.x[0] == abi.FFA_SUCCESS_32  # the caller is treated as v1.2


async def test_call_before_version_is_not_supported(guest: FfaGuest) -> None:
    # Xen (FF-A 1.2 rules): no ABI but FFA_VERSION before a version is requested.
    r = await guest.call(abi.FFA_ID_GET)
    assert error_of(r) is FfaError.NOT_SUPPORTED
    assert r.x[0] == abi.FFA_ERROR and r.x[2] == 0xFFFF_FFFF  # w2 zero-extended


async def test_version_may_be_asked_again_before_other_calls(guest: FfaGuest) -> None:
    # Xen: repeated FFA_VERSION calls are allowed until the first other call.
    await guest.call(abi.FFA_VERSION, abi.VERSION_1_2)
    await guest.call(abi.FFA_VERSION, abi.VERSION_1_0)
    r = await guest.call(abi.FFA_SPM_ID_GET)  # a v1.1 call: the v1.0 caller does not have it
    assert error_of(r) is FfaError.NOT_SUPPORTED


async def test_version_is_frozen_by_the_first_other_call(guest: FfaGuest) -> None:
    # HF: once another call was made, a different version is NOT_SUPPORTED.
    await guest.call(abi.FFA_VERSION, abi.VERSION_1_1)
    await guest.call(abi.FFA_ID_GET)
    different = await guest.call(abi.FFA_VERSION, abi.VERSION_1_2)
    assert different.x[0] == NOT_SUPPORTED_U64
    same = await guest.call(abi.FFA_VERSION, abi.VERSION_1_1)
    assert same.x[0] == abi.VERSION_1_2


async def test_a_rejected_call_does_not_freeze(guest: FfaGuest) -> None:
    # Only served calls freeze, so unknown IDs have static answers.
    await guest.call(abi.FFA_VERSION, abi.VERSION_1_1)
    await guest.call(abi.FFA_MSG_POLL)
    r = await guest.call(abi.FFA_VERSION, abi.VERSION_1_2)
    assert r.x[0] == abi.VERSION_1_2


async def test_newer_calls_are_not_supported_for_older_callers(guest: FfaGuest) -> None:
    # DIRECT_REQ2 and PARTITION_INFO_GET_REGS are v1.2.
    await guest.call(abi.FFA_VERSION, abi.VERSION_1_1)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET_REGS)
    assert error_of(r) is FfaError.NOT_SUPPORTED


@pytest.mark.parametrize("fid", [abi.FFA_MSG_POLL, abi.FFA_MEM_DONATE_64, abi.FFA_RUN,
                                 abi.FFA_NOTIFICATION_BIND, 0x8400_00FF, 0xC400_0063])
async def test_every_other_id_is_ffa_error_not_supported(guest: FfaGuest, fid: int) -> None:
    # Issue 4 item 1: every other ID in the FF-A range is FFA_ERROR(NOT_SUPPORTED).
    await guest.setup()
    r = await guest.call(fid)
    assert error_of(r) is FfaError.NOT_SUPPORTED


async def test_static_answers_equal_what_the_handler_answers(guest: FfaGuest) -> None:
    static = guest.handler.static_answers()
    assert abi.FFA_MSG_POLL in static and abi.FFA_VERSION not in static
    await guest.setup()
    for fid, answer in static.items():
        assert await guest.call(fid) == answer


async def test_v1_2_callers_get_x8_to_x17_zeroed(guest: FfaGuest) -> None:
    # Register width in v1.2: Xen zeroes x8-x17 for v1.2 guests.
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_ID_GET)
    assert r.mask == (1 << 18) - 1
    await (v11 := FfaGuest(guest.handler)).setup(abi.VERSION_1_1)
    r = await v11.call(abi.FFA_ID_GET)
    assert r.mask == 0xFF
