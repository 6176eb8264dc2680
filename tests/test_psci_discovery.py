"""PSCI discovery never lies: every ID PSCI_VERSION and PSCI_FEATURES claim is served, and every
served ID is claimed (issue 6 item 4; include/uapi/linux/psci.h, arch/arm64/kvm/psci.c)."""

from __future__ import annotations

from typing import Any

import pytest

from hyperbroker.calls import Call
from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.psci import PsciHandler, abi
from hyperbroker.smccc import NOT_SUPPORTED_U64, RESERVED_ARCH_RANGES
from hyperbroker.testing.context import FakeContext

CONFIGS: list[dict[str, Any]] = [
    {},
    {"version": "0.2"},
    {"version": "1.0"},
    {"version": "1.1", "system_suspend": False},
    {"version": "1.3", "system_off2": False},
]

# Arguments that make a served function do its job rather than fail on a parameter; any answer
# but NOT_SUPPORTED proves the function is served.
ARGS: dict[int, tuple[int, ...]] = {abi.PSCI_FEATURES: (abi.PSCI_VERSION,)}


async def answer(h: PsciHandler, fid: int, *args: int) -> int:
    ctx = FakeContext(VmInfo("h", "vm", 2, "p", 1))
    x = (fid, *args) + (0,) * (17 - len(args))
    result = await h.handle(Call(vcpu=0, seq=0, function_id=fid, x=x), ctx)
    return result.x[0]


def kernel_served(fid: int) -> bool:
    """SMCCC_VERSION: in the Arm architecture range every profile leaves to KVM."""
    return fid == abi.SMCCC_VERSION and any(fid in r for r in RESERVED_ARCH_RANGES)


@pytest.mark.parametrize("config", CONFIGS)
async def test_every_claimed_id_is_served(config: dict[str, Any]) -> None:
    h = PsciHandler(config)
    for discovery, claimed in h.discovery_claims().items():
        assert await answer(h, discovery, *ARGS.get(discovery, ())) != NOT_SUPPORTED_U64
        for fid in claimed:
            if any(fid in r for r in h.ranges):
                assert await answer(h, fid, *ARGS.get(fid, ())) != NOT_SUPPORTED_U64, hex(fid)
            else:
                assert kernel_served(fid), hex(fid)


@pytest.mark.parametrize("config", CONFIGS)
async def test_features_is_true_for_exactly_the_claimed_ids(config: dict[str, Any]) -> None:
    h = PsciHandler(config)
    claims = h.discovery_claims().get(abi.PSCI_FEATURES, frozenset())
    candidates = [fid for r in h.ranges for fid in range(r.base, r.end)]
    candidates += [abi.SMCCC_VERSION, 0x8000_0001, 0x8400_0050, 0xC600_0000]
    if abi.PSCI_FEATURES not in h.served_functions():
        assert not claims
        return
    for fid in candidates:
        supported = await answer(h, abi.PSCI_FEATURES, fid) != NOT_SUPPORTED_U64
        assert supported == (fid in claims), hex(fid)


@pytest.mark.parametrize("config", CONFIGS)
async def test_served_functions_are_exactly_those_answered(config: dict[str, Any]) -> None:
    h = PsciHandler(config)
    for r in h.ranges:
        for fid in range(r.base, r.end):
            served = await answer(h, fid, *ARGS.get(fid, ())) != NOT_SUPPORTED_U64
            assert served == (fid in h.served_functions()), hex(fid)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_served_id_is_claimed_by_some_discovery_call(config: dict[str, Any]) -> None:
    h = PsciHandler(config)
    claims = h.discovery_claims()
    claimed = set().union(*claims.values()) | set(claims)
    # PSCI 0.2 has no PSCI_FEATURES: MIGRATE_INFO_TYPE is optional there and unclaimable.
    unclaimable = {abi.MIGRATE_INFO_TYPE} if abi.PSCI_FEATURES not in claims else set()
    assert h.served_functions() - unclaimable <= claimed
