"""FFA_FEATURES, FFA_ID_GET, FFA_SPM_ID_GET, FFA_PARTITION_INFO_GET(_REGS) (FFA_FEATURES;
FFA_PARTITION_INFO_GET_REGS)."""

from __future__ import annotations

import struct
import uuid

import pytest

from hyperbroker.handlers.ffa import FfaHandler, abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.config import ECHO_UUID, SHA256_UUID
from hyperbroker.handlers.ffa.discovery import uuid_to_pair
from hyperbroker.smccc import uuid_to_regs
from hyperbroker.testing.context import MemoryPools
from hyperbroker.testing.ffa import RX_ADDRESS, FfaGuest, error_of, make_context


def _many(n: int) -> list[dict[str, object]]:
    return [{"kind": "echo", "name": f"p{i}", "id": 0x8010 + i, "uuid": str(uuid.UUID(int=i + 1))}
            for i in range(n)]


@pytest.fixture
def guest() -> FfaGuest:
    return FfaGuest(FfaHandler({}))


# ---- FFA_FEATURES -----------------------------------------------------------------------
async def test_features_of_rxtx_map_v1_2_reports_min_size_and_max_pages(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_FEATURES, abi.FFA_RXTX_MAP_64)
    assert r.x[0] == abi.FFA_SUCCESS_32
    assert r.x[2] & 0x3 == 0  # 4 KiB minimum size and alignment
    assert r.x[2] >> 16 == 16  # default max_rxtx_pages, the v1.2 field


async def test_features_of_rxtx_map_before_v1_2_has_no_max_pages_field(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_1)
    r = await guest.call(abi.FFA_FEATURES, abi.FFA_RXTX_MAP_32)
    assert r.x[2] == 0


@pytest.mark.parametrize("fid", [abi.FFA_MEM_SHARE_32, abi.FFA_MEM_SHARE_64, abi.FFA_MEM_LEND_64])
async def test_features_of_mem_share_reports_no_dynamic_buffers(guest: FfaGuest, fid: int) -> None:
    # W2 bit0 = dynamic buffers supported; pKVM and Xen say 0.
    await guest.setup()
    r = await guest.call(abi.FFA_FEATURES, fid)
    assert r.x[0] == abi.FFA_SUCCESS_32 and r.x[2] == 0


@pytest.mark.parametrize("feature", [1, 2, 3, 0x100 | 1])
async def test_features_of_feature_ids_is_not_supported(guest: FfaGuest, feature: int) -> None:
    # No NPI/SRI/MEI here; Linux then runs without notifications.
    await guest.setup()
    assert error_of(await guest.call(abi.FFA_FEATURES, feature)) is FfaError.NOT_SUPPORTED


@pytest.mark.parametrize("fid", [abi.FFA_MEM_DONATE_32, abi.FFA_NOTIFICATION_BITMAP_CREATE,
                                 abi.FFA_MEM_RETRIEVE_REQ_64, 0x8600_0000])
async def test_features_of_unserved_function_is_not_supported(guest: FfaGuest, fid: int) -> None:
    await guest.setup()
    assert error_of(await guest.call(abi.FFA_FEATURES, fid)) is FfaError.NOT_SUPPORTED


async def test_features_of_v1_2_call_for_v1_1_caller_is_not_supported(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_1)
    r = await guest.call(abi.FFA_FEATURES, abi.FFA_MSG_SEND_DIRECT_REQ2)
    assert error_of(r) is FfaError.NOT_SUPPORTED


# ---- FFA_ID_GET / FFA_SPM_ID_GET ---------------------------------------------------------
async def test_id_get_is_never_zero_nor_secure_and_stable(guest: FfaGuest) -> None:
    await guest.setup()
    first = (await guest.call(abi.FFA_ID_GET)).x[2]
    again = (await guest.call(abi.FFA_ID_GET)).x[2]
    assert first == again and first != 0 and not first & abi.ENDPOINT_SECURE_BIT


async def test_id_get_is_unique_across_vms_on_different_hosts() -> None:
    handler, pools = FfaHandler({}), MemoryPools()
    ids = set()
    for host in ("host-a", "host-b"):
        for name in ("vm-1", "vm-2"):
            g = FfaGuest(handler, make_context(name, host=host, pools=pools))
            await g.setup()
            ids.add(g.endpoint_id)
    assert len(ids) == 4


async def test_spm_id_get_returns_the_configured_spmc_id() -> None:
    g = FfaGuest(FfaHandler({"spmc_id": 0x8123}))
    await g.setup(abi.VERSION_1_1)
    r = await g.call(abi.FFA_SPM_ID_GET)
    assert (r.x[0], r.x[2]) == (abi.FFA_SUCCESS_32, 0x8123)


async def test_spm_id_get_is_not_supported_for_v1_0(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_0)
    assert error_of(await guest.call(abi.FFA_SPM_ID_GET)) is FfaError.NOT_SUPPORTED


# ---- FFA_PARTITION_INFO_GET --------------------------------------------------------------
async def test_partition_info_v1_1_writes_24_byte_descriptors_to_rx(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_1)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    assert (r.x[0], r.x[2], r.x[3]) == (abi.FFA_SUCCESS_32, 2, 24)
    first = guest.peek(RX_ADDRESS, 24)
    pid, ctxs, props = struct.unpack_from("<HHI", first)
    assert (pid, ctxs) == (0x8001, 1)
    assert props & abi.PROP_DIRECT_REQ_RECV and props & abi.PROP_AARCH64
    assert not props & abi.PROP_DIRECT_REQ2_RECV  # a v1.2 bit, reserved for v1.1 callers
    assert first[8:24] == ECHO_UUID.bytes
    assert guest.peek(RX_ADDRESS + 24, 24)[8:24] == SHA256_UUID.bytes


async def test_partition_info_v1_0_writes_8_byte_descriptors(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_0)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    assert (r.x[2], r.x[3]) == (2, 0)  # w3 is reserved in v1.0 (Xen answers 0)
    assert struct.unpack_from("<HHIHHI", guest.peek(RX_ADDRESS, 16))[::3] == (0x8001, 0x8002)


async def test_partition_info_count_only_writes_nothing(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, abi.PARTITION_INFO_COUNT_ONLY)
    assert (r.x[0], r.x[2]) == (abi.FFA_SUCCESS_32, 2)
    assert guest.peek(RX_ADDRESS, 48) == bytes(48)
    # RX stays ours: a full request right after is not BUSY.
    full = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    assert full.x[0] == abi.FFA_SUCCESS_32


async def test_partition_info_count_only_flag_is_invalid_for_v1_0(guest: FfaGuest) -> None:
    # In v1.0 w5 must be zero (Xen: INVALID_PARAMETERS).
    await guest.setup(abi.VERSION_1_0)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 1)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_partition_info_reserved_flags_are_invalid(guest: FfaGuest) -> None:
    await guest.setup()
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 2)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_partition_info_uuid_filter_selects_one(guest: FfaGuest) -> None:
    # W1..w4 = the raw UUID bytes as little-endian words (Linux export_uuid).
    await guest.setup()
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, *uuid_to_regs(SHA256_UUID.bytes), 0)
    assert r.x[2] == 1
    assert struct.unpack_from("<H", guest.peek(RX_ADDRESS, 2))[0] == 0x8002


async def test_partition_info_unknown_uuid_is_invalid(guest: FfaGuest) -> None:
    # A non-nil UUID that matches nothing (Xen ffa_get_sp_count).
    await guest.setup()
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 1, 2, 3, 4, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_partition_info_without_rx_is_denied(guest: FfaGuest) -> None:
    # Xen returns DENIED when no RX/TX is mapped.
    await guest.call(abi.FFA_VERSION, abi.VERSION_1_2)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    assert error_of(r) is FfaError.DENIED


async def test_partition_info_while_guest_holds_rx_is_busy(guest: FfaGuest) -> None:
    # BUSY while the RX buffer is still owned by the guest (Xen ffa_rx_acquire).
    await guest.setup()
    await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    assert error_of(r) is FfaError.BUSY
    await guest.call(abi.FFA_RX_RELEASE)
    assert (await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)).x[0] == abi.FFA_SUCCESS_32


async def test_partition_info_larger_than_rx_is_no_memory() -> None:
    g = FfaGuest(FfaHandler({"partitions": _many(200)}))  # 200 * 24 bytes > one page
    await g.setup()
    r = await g.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    assert error_of(r) is FfaError.NO_MEMORY


# ---- FFA_PARTITION_INFO_GET_REGS ---------------------------------------------------------
async def test_partition_info_get_regs_packs_descriptors_in_registers(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET_REGS, 0, 0, 0)
    assert r.x[0] == abi.FFA_SUCCESS_64 and r.mask == (1 << 18) - 1
    x2 = r.x[2]
    assert (x2 & 0xFFFF, x2 >> 16 & 0xFFFF, x2 >> 32 & 0xFFFF, x2 >> 48) == (1, 1, 0, 24)
    assert r.x[3] & 0xFFFF == 0x8001 and r.x[3] >> 16 & 0xFFFF == 1
    assert r.x[3] >> 32 & abi.PROP_DIRECT_REQ2_RECV
    assert (r.x[4], r.x[5]) == uuid_to_pair(ECHO_UUID)
    assert r.x[6] & 0xFFFF == 0x8002 and (r.x[7], r.x[8]) == uuid_to_pair(SHA256_UUID)
    assert r.x[9:18] == (0,) * 9


async def test_partition_info_get_regs_pages_through_more_than_five() -> None:
    g = FfaGuest(FfaHandler({"partitions": _many(7)}))
    await g.setup(abi.VERSION_1_2)
    first = await g.call(abi.FFA_PARTITION_INFO_GET_REGS, 0, 0, 0)
    assert first.x[2] & 0xFFFF == 6 and first.x[2] >> 16 & 0xFFFF == 4
    rest = await g.call(abi.FFA_PARTITION_INFO_GET_REGS, 0, 0, 5)
    assert rest.x[2] >> 16 & 0xFFFF == 6
    assert [rest.x[3] & 0xFFFF, rest.x[6] & 0xFFFF] == [0x8015, 0x8016]


async def test_partition_info_get_regs_start_past_the_end_is_invalid(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET_REGS, 0, 0, 2)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_partition_info_get_regs_tag_with_start_zero_is_invalid(guest: FfaGuest) -> None:
    # The tag must be 0 when the start index is 0.
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET_REGS, 0, 0, 7 << 16)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_partition_info_get_regs_stale_tag_is_retry(guest: FfaGuest) -> None:
    # A tag mismatch gives RETRY.
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET_REGS, 0, 0, 7 << 16 | 1)
    assert error_of(r) is FfaError.RETRY


async def test_partition_info_get_regs_uuid_filter(guest: FfaGuest) -> None:
    await guest.setup(abi.VERSION_1_2)
    r = await guest.call(abi.FFA_PARTITION_INFO_GET_REGS, *uuid_to_pair(SHA256_UUID), 0)
    assert r.x[2] & 0xFFFF == 0 and r.x[3] & 0xFFFF == 0x8002
    missing = await guest.call(abi.FFA_PARTITION_INFO_GET_REGS, 5, 6, 0)
    assert error_of(missing) is FfaError.INVALID_PARAMETERS
