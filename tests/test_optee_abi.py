"""The OP-TEE proxy's fast calls and handler surface (core/arch/arm/include/sm/optee_smc.h; Xen's
xen/arch/arm/tee/optee.c)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import HandlerConfigError
from hyperbroker.handlers.optee import OpteeHandler, abi
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.grpc_backend import OpteePlugin
from hyperbroker.testing.optee import Harness


def call(fid: int, *args: int) -> Call:
    return Call(0, 1, fid, (fid, *args) + (0,) * (17 - len(args)))


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path, {"thread_count": 4, "os_revision": "3.22"})


async def ask(h: Harness, fid: int, *args: int) -> Result:
    return await h.handler.handle(call(fid, *args), h.guest().ctx)


async def test_calls_uid_is_the_optee_message_uid(harness: Harness) -> None:
    # The Linux probe compares a0..a3 with OPTEE_MSG_UID_0..3.
    r = await ask(harness, abi.CALLS_UID)
    assert r.x[:4] == (0x384FB3E0, 0xE7F811E3, 0xAF630002, 0xA5D5C51B)


async def test_calls_revision_is_2_0(harness: Harness) -> None:
    # Major must be 2.
    assert (await ask(harness, abi.CALLS_REVISION)).x[:2] == (2, 0)


async def test_os_uuid_is_optee_os(harness: Harness) -> None:
    r = await ask(harness, abi.GET_OS_UUID)
    assert r.x[:4] == (0x486178E0, 0xE7F811E3, 0xBC5E0002, 0xA5D5C51B)


async def test_os_revision_comes_from_config_with_no_build_id(harness: Harness) -> None:
    assert (await ask(harness, abi.GET_OS_REVISION)).x[:3] == (3, 22, 0)


async def test_thread_count_is_ok_with_the_configured_count(harness: Harness) -> None:
    assert (await ask(harness, abi.GET_THREAD_COUNT)).x[:2] == (SmcReturn.OK, 4)


async def test_calls_count_counts_the_answered_functions(harness: Harness) -> None:
    assert (await ask(harness, abi.CALLS_COUNT)).x[0] == len(abi.IMPLEMENTED)


async def test_exchange_capabilities_offers_dynamic_shm_and_memref_null_only(
        harness: Harness) -> None:
    # No reserved SHM, no RPC_ARG, no ASYNC_NOTIF, no VIRTUALIZATION for guests.
    for nsec in (0, abi.NSEC_CAP_UNIPROCESSOR):
        r = await ask(harness, abi.EXCHANGE_CAPABILITIES, nsec)
        assert r.x[:4] == (SmcReturn.OK, abi.SEC_CAP_DYNAMIC_SHM | abi.SEC_CAP_MEMREF_NULL, 0, 0)
        assert r.outcome == Outcome.OK


async def test_exchange_capabilities_refuses_an_unknown_normal_world_bit(
        harness: Harness) -> None:
    # entry_fast.c: any bit but UNIPROCESSOR is ENOTAVAIL.
    r = await ask(harness, abi.EXCHANGE_CAPABILITIES, 1 << 1)
    assert r.x[0] == SmcReturn.ENOTAVAIL and r.outcome == Outcome.GUEST_ERROR


async def test_get_shm_config_is_not_available(harness: Harness) -> None:
    # No static SHM for guests.
    assert (await ask(harness, abi.GET_SHM_CONFIG)).x[0] == SmcReturn.ENOTAVAIL


async def test_disable_shm_cache_ends_with_enotavail_and_enable_with_ok(
        harness: Harness) -> None:
    # Linux's optee_disable_shm_cache loops until it gets these (drivers/tee/optee/smc_abi.c):
    # any other answer hangs the probe.
    assert (await ask(harness, abi.DISABLE_SHM_CACHE)).x[0] == SmcReturn.ENOTAVAIL
    assert (await ask(harness, abi.ENABLE_SHM_CACHE)).x[0] == SmcReturn.OK


@pytest.mark.parametrize("fid", [abi.L2CC_MUTEX, abi.VM_CREATED, abi.VM_DESTROYED,
                                 abi.ENABLE_ASYNC_NOTIF, abi.GET_ASYNC_NOTIF_VALUE,
                                 abi.GET_PROTMEM_CONFIG, 0xB200_1234, 0xBF00_0000, 0xBF00_FF02])
async def test_unknown_fast_calls_get_unknown_function_zero_extended(
        harness: Harness, fid: int) -> None:
    # OPTEE_SMC_RETURN_UNKNOWN_FUNCTION is the 32-bit 0xFFFFFFFF; Linux compares it as is.
    r = await ask(harness, fid)
    assert r.x[0] == 0xFFFF_FFFF and r.outcome == Outcome.GUEST_ERROR


@pytest.mark.parametrize("fid", [0x3200_0000, 0x3200_0005, 0x3200_FFFF])
async def test_unknown_yielding_calls_get_ebadcmd(harness: Harness, fid: int) -> None:
    # thread_optee_smc.c std_smc_entry: an unknown a0 is EBADCMD.
    assert (await ask(harness, fid)).x[0] == SmcReturn.EBADCMD


async def test_boot_secondary_is_not_available(harness: Harness) -> None:
    assert (await ask(harness, abi.BOOT_SECONDARY)).x[0] == SmcReturn.ENOTAVAIL


async def test_static_answers_match_handle(harness: Harness) -> None:
    for fid, static in harness.handler.static_answers().items():
        live = await ask(harness, fid)
        assert (live.x, live.mask, live.outcome) == (static.x, static.mask, static.outcome)


async def test_static_answers_exclude_calls_that_depend_on_registers_or_state(
        harness: Harness) -> None:
    static = harness.handler.static_answers()
    for fid in (abi.EXCHANGE_CAPABILITIES, abi.DISABLE_SHM_CACHE, abi.ENABLE_SHM_CACHE,
                abi.CALL_WITH_ARG, abi.RETURN_FROM_RPC):
        assert fid not in static


def test_ranges_are_the_named_optee_abi(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert tuple(h.handler.ranges) == abi.RANGES
    assert OpteeHandler.plugin == "optee"


def test_function_names_cover_the_known_ids(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.handler.function_name(abi.CALL_WITH_ARG) == "OPTEE_CALL_WITH_ARG"
    assert h.handler.function_name(0xB200_7777) is None


def test_foreign_interrupt_fallback_writes_only_a0(tmp_path: Path) -> None:
    # A fallback that leaves a1..a3 alone makes the guest hand them back with RETURN_FROM_RPC.
    fb = Harness(tmp_path).handler.named_fallbacks()["foreign-interrupt"]
    assert fb.mask == 0x1 and fb.x[0] == 0xFFFF_0004 and abi.is_rpc(fb.x[0])


@pytest.mark.parametrize(("config", "key"), [
    ({}, "backend"),
    ({"backend": "127.0.0.1:1", "timeout_ms": 0}, "timeout_ms"),
    ({"backend": "127.0.0.1:1", "yield_ms": "soon"}, "yield_ms"),
    ({"backend": "127.0.0.1:1", "thread_count": 0}, "thread_count"),
    ({"backend": "127.0.0.1:1", "os_revision": "four"}, "os_revision"),
    ({"backend": "127.0.0.1:1", "tls_ca": "/x"}, "tls_cert, tls_key, tls_ca"),
    ({"backend": "127.0.0.1:1", "ta_names": {"not-a-uuid": "x"}}, "ta_names"),
    ({"backend": "127.0.0.1:1", "max_memref_bytes": True}, "max_memref_bytes"),
    ({"backend": "127.0.0.1:1", "colour": "blue"}, "colour"),
])
def test_config_errors_name_the_key(config: dict[str, object], key: str) -> None:
    with pytest.raises(HandlerConfigError, match=key):
        OpteePlugin(config)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cfg = {"backend": "x:1", "tls_cert": str(tmp_path / "c"), "tls_key": str(tmp_path / "k"),
           "tls_ca": str(tmp_path / "ca")}
    with pytest.raises(HandlerConfigError, match="tls_cert"):
        OpteePlugin(cfg)


def test_a_valid_config_builds_without_connecting() -> None:
    h = OpteePlugin({"backend": "127.0.0.1:1", "yield_ms": 0, "thread_count": 2})
    assert h.thread_count == 2 and h.yield_s == 0
