"""Hyper-V discovery never lies: Hyper-V's UID promises HV_FUNC_ID and nothing of KVM's, and
every hypercall and register the feature registers promise is served (issue 6 item 4;
include/linux/arm-smccc.h, ARM_SMCCC_VENDOR_HYP_UID_HYPERV_REG_*; include/hyperv/hvgdk_mini.h)."""

from __future__ import annotations

from typing import Any

import pytest

from hyperbroker.calls import Call
from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.hyperv import HypervHandler, abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.layout import PostMessageInput
from hyperbroker.smccc import NOT_SUPPORTED_U64
from hyperbroker.testing.context import FakeContext, FakeGuestMemory

RAM = 0x4000_0000
CONFIGS: list[dict[str, Any]] = [
    {},
    {"privileges": abi.HV_MSR_HYPERCALL_AVAILABLE | abi.HV_MSR_VP_INDEX_AVAILABLE,
     "misc_features": 0},
]


def context() -> FakeContext:
    return FakeContext(VmInfo("h", "vm", 1, "p", 1),
                       memory=FakeGuestMemory(regions={RAM: bytearray(0x4000)}))


async def registers(h: HypervHandler, ctx: FakeContext, *x: int) -> tuple[int, ...]:
    regs = tuple(x) + (0,) * (18 - len(x))
    return (await h.handle(Call(0, 0, x[0], regs), ctx)).x


@pytest.mark.parametrize("config", CONFIGS)
async def test_every_claimed_function_is_served(config: dict[str, Any]) -> None:
    h = HypervHandler(config)
    for discovery, claimed in h.discovery_claims().items():
        assert (await registers(h, context(), discovery))[0] != NOT_SUPPORTED_U64
        for fid in claimed:
            x0 = (await registers(h, context(), fid, abi.HVCALL_GET_PARTITION_ID | abi.FAST_BIT))[0]
            assert x0 != NOT_SUPPORTED_U64
            assert x0 & 0xFFFF != HvStatus.INVALID_HYPERCALL_CODE


@pytest.mark.parametrize("config", CONFIGS)
async def test_the_uid_hides_kvms_services(config: dict[str, Any]) -> None:
    h = HypervHandler(config)
    claimed = set().union(*h.discovery_claims().values())
    assert abi.KVM_FEATURES not in claimed
    assert (await registers(h, context(), abi.KVM_FEATURES))[0] == NOT_SUPPORTED_U64
    assert h.served_functions() == claimed | set(h.discovery_claims())


@pytest.mark.parametrize("config", CONFIGS)
async def test_nothing_else_in_the_range_is_answered(config: dict[str, Any]) -> None:
    h = HypervHandler(config)
    for r in h.ranges:
        for number in [*range(0x80), *range(0xFF00, 0x1_0000)]:
            fid = r.base + number
            served = (await registers(h, context(), fid))[0] != NOT_SUPPORTED_U64
            assert served == (fid in h.served_functions()), hex(fid)


# A well-formed call of each hypercall code, as (control, x2, x3, input page bytes).
def _post() -> bytes:
    return PostMessageInput(1, 0, 1, 0, bytes(240)).pack()


CALLS: dict[int, tuple[int, int, int, bytes]] = {
    abi.HVCALL_GET_VP_REGISTERS: (abi.HVCALL_GET_VP_REGISTERS | abi.FAST_BIT | 1 << 32,
                                  abi.HV_PARTITION_ID_SELF, abi.HV_VP_INDEX_SELF, b""),
    abi.HVCALL_SET_VP_REGISTERS: (abi.HVCALL_SET_VP_REGISTERS | abi.FAST_BIT | 1 << 32,
                                  abi.HV_PARTITION_ID_SELF, abi.HV_VP_INDEX_SELF, b""),
    abi.HVCALL_GET_PARTITION_ID: (abi.HVCALL_GET_PARTITION_ID, 0, RAM + 0x1000, b""),
    abi.HVCALL_POST_MESSAGE: (abi.HVCALL_POST_MESSAGE, RAM, 0, _post()),
    abi.HVCALL_SIGNAL_EVENT: (abi.HVCALL_SIGNAL_EVENT | abi.FAST_BIT, 1, 0, b""),
}


@pytest.mark.parametrize("config", CONFIGS)
async def test_every_hypercall_the_privileges_promise_succeeds(config: dict[str, Any]) -> None:
    h = HypervHandler(config)
    for code in h.persona_claims()["hypercalls"]:
        ctx = context()
        x1, x2, x3, page = CALLS[code]
        if page:
            ctx.memory.poke(RAM, page)
        x4 = abi.HV_REGISTER_GUEST_OS_ID  # the register Get/Set name: always writable
        x0 = (await registers(h, ctx, abi.HV_FUNC_ID, x1, x2, x3, x4))[0]
        assert x0 & 0xFFFF == HvStatus.SUCCESS, abi.CALL_NAMES[code]


@pytest.mark.parametrize("config", CONFIGS)
async def test_every_hypercall_not_promised_is_refused(config: dict[str, Any]) -> None:
    h = HypervHandler(config)
    for code in set(CALLS) - h.persona_claims()["hypercalls"]:
        ctx = context()
        x1, x2, x3, page = CALLS[code]
        if page:
            ctx.memory.poke(RAM, page)
        x0 = (await registers(h, ctx, abi.HV_FUNC_ID, x1, x2, x3))[0]
        assert x0 & 0xFFFF == HvStatus.ACCESS_DENIED, abi.CALL_NAMES[code]


@pytest.mark.parametrize("config", CONFIGS)
async def test_every_register_the_features_promise_reads(config: dict[str, Any]) -> None:
    h = HypervHandler(config)
    for name in h.persona_claims()["registers"]:
        x1 = abi.HVCALL_GET_VP_REGISTERS | abi.FAST_BIT | 1 << 32
        x0 = (await registers(h, context(), abi.HV_FUNC_ID, x1, abi.HV_PARTITION_ID_SELF,
                              abi.HV_VP_INDEX_SELF, name))[0]
        assert x0 & 0xFFFF == HvStatus.SUCCESS, hex(name)
