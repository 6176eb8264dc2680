"""Memshare discovery never lies: KVM's UID and KVM_FEATURES claim exactly what the handler
serves, and every claimed ID answers (issue 6 items 3 and 4; include/linux/arm-smccc.h,
Documentation/virt/kvm/arm/hypercalls.rst)."""

from __future__ import annotations

from typing import Any

import pytest

from hyperbroker.calls import Call
from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.memshare import MemshareHandler, abi
from hyperbroker.smccc import NOT_SUPPORTED_U64
from hyperbroker.testing.context import FakeContext

CONFIGS: list[dict[str, Any]] = [{}, {"mmio_guard": False}, {"granule": 65536}]


async def registers(h: MemshareHandler, fid: int, *args: int) -> tuple[int, ...]:
    ctx = FakeContext(VmInfo("h", "vm", 1, "p", 1))
    x = (fid, *args) + (0,) * (17 - len(args))
    return (await h.handle(Call(vcpu=0, seq=0, function_id=fid, x=x), ctx)).x


async def answer(h: MemshareHandler, fid: int, *args: int) -> int:
    return (await registers(h, fid, *args))[0]


@pytest.mark.parametrize("config", CONFIGS)
async def test_every_claimed_id_is_served(config: dict[str, Any]) -> None:
    h = MemshareHandler(config)
    for discovery, claimed in h.discovery_claims().items():
        assert await answer(h, discovery) != NOT_SUPPORTED_U64
        for fid in claimed:
            assert any(fid in r for r in h.ranges)
            # a granule-aligned IPA: every memshare call then does its job
            assert await answer(h, fid, 0x4000_0000) != NOT_SUPPORTED_U64, hex(fid)


@pytest.mark.parametrize("config", CONFIGS)
async def test_kvm_features_claims_exactly_the_served_ids(config: dict[str, Any]) -> None:
    h = MemshareHandler(config)
    claimed = h.discovery_claims()[abi.KVM_FEATURES]
    assert claimed == h.served_functions()
    words = (await registers(h, abi.KVM_FEATURES))[:4]
    advertised = abi.bitmap_functions(words)
    assert advertised == h.functions
    assert {fid for n in advertised for fid in abi.FUNCTION_IDS[n]} == claimed


@pytest.mark.parametrize("config", CONFIGS)
async def test_nothing_outside_the_served_ids_is_answered(config: dict[str, Any]) -> None:
    # Function numbers 0..0x7F and the service queries 0xFF00..0xFFFF of all four sub-ranges.
    h = MemshareHandler(config)
    for r in h.ranges:
        for number in [*range(0x80), *range(0xFF00, 0x1_0000)]:
            fid = r.base + number
            served = await answer(h, fid, 0x4000_0000) != NOT_SUPPORTED_U64
            assert served == (fid in h.served_functions()), hex(fid)
