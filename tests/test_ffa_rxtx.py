"""FFA_RXTX_MAP, FFA_RXTX_UNMAP, FFA_RX_RELEASE and RX ownership (FFA_RXTX_MAP)."""

from __future__ import annotations

import pytest

from hyperbroker.handlers.ffa import FfaHandler, abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.testing.ffa import RAM_BASE, RAM_SIZE, RX_ADDRESS, TX_ADDRESS, FfaGuest, error_of


@pytest.fixture
async def guest() -> FfaGuest:
    g = FfaGuest(FfaHandler({}))
    await g.call(abi.FFA_VERSION, abi.VERSION_1_2)
    g.endpoint_id = (await g.call(abi.FFA_ID_GET)).x[2]
    return g


async def test_map_succeeds_for_page_aligned_guest_ram(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
    assert r.x[0] == abi.FFA_SUCCESS_32


async def test_map_accepts_several_pages_up_to_the_limit(guest: FfaGuest) -> None:
    # A 64 KiB-page Linux maps 16 pages (bufsz / 4K); Xen takes only 1.
    r = await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, TX_ADDRESS + 16 * 4096, 16)
    assert r.x[0] == abi.FFA_SUCCESS_32


async def test_map_twice_is_denied(guest: FfaGuest) -> None:
    # DENIED if the buffers are already mapped (pKVM, Xen).
    await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
    r = await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS + 0x4000, RX_ADDRESS + 0x4000, 1)
    assert error_of(r) is FfaError.DENIED


@pytest.mark.parametrize("pages", [0, 17, 1 << 20])
async def test_map_page_count_out_of_range_is_invalid(guest: FfaGuest, pages: int) -> None:
    # HF rejects page_count < 1 and > its maximum.
    r = await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, pages)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


@pytest.mark.parametrize(("tx", "rx"), [(TX_ADDRESS + 8, RX_ADDRESS), (TX_ADDRESS, RX_ADDRESS + 1)])
async def test_map_unaligned_buffer_is_invalid(guest: FfaGuest, tx: int, rx: int) -> None:
    r = await guest.call(abi.FFA_RXTX_MAP_64, tx, rx, 1)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_map_overlapping_buffers_is_invalid(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, TX_ADDRESS + 4096, 2)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


@pytest.mark.parametrize("rx", [0x1000, RAM_BASE + RAM_SIZE - 4096, RAM_BASE + RAM_SIZE])
async def test_map_outside_the_vms_memory_is_invalid(guest: FfaGuest, rx: int) -> None:
    # Issue 4 item 1: buffers that lie in the VM's memory; the second case ends past RAM.
    r = await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, rx, 2)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_map_32_masks_addresses_to_32_bits(guest: FfaGuest) -> None:
    # For SMC32 calls Xen masks the addresses to 32 bits.
    r = await guest.call(abi.FFA_RXTX_MAP_32, 1 << 40 | TX_ADDRESS, 1 << 40 | RX_ADDRESS, 1)
    assert r.x[0] == abi.FFA_SUCCESS_32


async def test_unmap_without_map_is_invalid(guest: FfaGuest) -> None:
    # Xen: INVALID_PARAMETERS if nothing is mapped.
    assert error_of(await guest.call(abi.FFA_RXTX_UNMAP)) is FfaError.INVALID_PARAMETERS


async def test_unmap_accepts_zero_or_own_id(guest: FfaGuest) -> None:
    # Newer Linux sends w1 = 0, older Linux PACK_TARGET_INFO(vm_id, 0).
    for w1 in (0, guest.endpoint_id << 16):
        await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
        assert (await guest.call(abi.FFA_RXTX_UNMAP, w1)).x[0] == abi.FFA_SUCCESS_32


async def test_unmap_naming_another_endpoint_is_invalid(guest: FfaGuest) -> None:
    # Only a hypervisor may name another endpoint.
    await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
    r = await guest.call(abi.FFA_RXTX_UNMAP, (guest.endpoint_id + 1) << 16)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_unmap_while_guest_holds_rx_is_denied(guest: FfaGuest) -> None:
    # Xen: DENIED while the guest still owns RX.
    await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
    await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    assert error_of(await guest.call(abi.FFA_RXTX_UNMAP)) is FfaError.DENIED
    await guest.call(abi.FFA_RX_RELEASE)
    assert (await guest.call(abi.FFA_RXTX_UNMAP)).x[0] == abi.FFA_SUCCESS_32


async def test_map_after_unmap_succeeds(guest: FfaGuest) -> None:
    await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
    await guest.call(abi.FFA_RXTX_UNMAP)
    r = await guest.call(abi.FFA_RXTX_MAP_64, RX_ADDRESS, TX_ADDRESS, 1)
    assert r.x[0] == abi.FFA_SUCCESS_32


async def test_rx_release_without_buffers_is_denied(guest: FfaGuest) -> None:
    # Xen: DENIED if nothing is mapped.
    assert error_of(await guest.call(abi.FFA_RX_RELEASE)) is FfaError.DENIED


async def test_rx_release_of_a_free_buffer_is_denied(guest: FfaGuest) -> None:
    # Xen: DENIED if the buffer is already free.
    await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
    assert error_of(await guest.call(abi.FFA_RX_RELEASE)) is FfaError.DENIED


async def test_rx_release_naming_another_receiver_is_invalid(guest: FfaGuest) -> None:
    # W1[15:0] may name another receiver only at the hypervisor (HF api_ffa_rx_release).
    await guest.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, 1)
    await guest.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)
    r = await guest.call(abi.FFA_RX_RELEASE, guest.endpoint_id + 1)
    assert error_of(r) is FfaError.INVALID_PARAMETERS
    assert (await guest.call(abi.FFA_RX_RELEASE, guest.endpoint_id)).x[0] == abi.FFA_SUCCESS_32
