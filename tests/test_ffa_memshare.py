"""Memory sharing: MEM_SHARE/LEND, MEM_FRAG_TX, MEM_RECLAIM and the SHA-256 partition."""

from __future__ import annotations

import hashlib
import struct

import pytest

from hyperbroker.handlers.ffa import FfaHandler, abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.partitions import digest_words
from hyperbroker.testing.ffa import (
    BUFFER_ADDRESS,
    RAM_BASE,
    RAM_SIZE,
    TX_ADDRESS,
    FfaGuest,
    error_of,
    handle_of,
)
from hyperbroker.testing.metrics import HANDLERS as REGISTRY

ECHO, SHA = 0x8001, 0x8002
PAGE = 4096


@pytest.fixture
async def guest() -> FfaGuest:
    g = FfaGuest(FfaHandler({}))
    await g.setup(abi.VERSION_1_2)
    return g


async def hash_request(
    g: FfaGuest, handle: int, offset: int = 0, length: int = 0
) -> tuple[int, ...]:
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, abi.pack_target(g.endpoint_id, SHA), 0,
                     handle, offset, length)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP_64, r
    return r.x[3:8]


# ---- sharing and hashing (issue 4: "memory sharing does real work") ------------------------
async def test_share_returns_a_handle_with_the_hypervisor_bit(guest: FfaGuest) -> None:
    # SUCCESS with w2/w3 = handle; bit 63 = 1 for a hypervisor-allocated handle.
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),))
    assert r.x[0] == abi.FFA_SUCCESS_32
    assert handle_of(r) & abi.HANDLE_HYPERVISOR_BIT and handle_of(r) != abi.INVALID_HANDLE


async def test_sha256_partition_hashes_the_shared_page(guest: FfaGuest) -> None:
    data = bytes(range(256)) * 16
    guest.poke(BUFFER_ADDRESS, data)
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    status, *digest = await hash_request(guest, handle)
    assert status == 0 and tuple(digest) == digest_words(data)
    raw = b"".join(w.to_bytes(8, "little") for w in digest)
    assert raw == hashlib.sha256(data).digest()  # x4..x7 stored in order give the digest


async def test_sha256_follows_constituents_in_descriptor_order(guest: FfaGuest) -> None:
    a, b = BUFFER_ADDRESS + 4 * PAGE, BUFFER_ADDRESS
    guest.poke(a, b"A" * PAGE)
    guest.poke(b, b"B" * 2 * PAGE)
    handle = handle_of(await guest.share((SHA,), ((a, 1), (b, 2))))
    status, *digest = await hash_request(guest, handle, PAGE - 3, 6)
    assert status == 0 and tuple(digest) == digest_words(b"AAABBB")


async def test_sha256_over_direct_req2(guest: FfaGuest) -> None:
    guest.poke(BUFFER_ADDRESS, b"hello")
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ2, abi.pack_target(guest.endpoint_id, SHA),
                         0, 0, handle, 0, 5)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP2
    assert r.x[4] == 0 and r.x[5:9] == digest_words(b"hello")


async def test_sha256_of_a_handle_not_shared_with_it_reports_invalid(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((ECHO,), ((BUFFER_ADDRESS, 1),)))
    status, *_ = await hash_request(guest, handle)
    assert status == FfaError.INVALID_PARAMETERS & (1 << 64) - 1


async def test_sha256_beyond_the_share_reports_invalid(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    status, *_ = await hash_request(guest, handle, PAGE - 1, 2)
    assert status == FfaError.INVALID_PARAMETERS & (1 << 64) - 1


async def test_sha256_over_direct_req_32_reports_not_supported(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_32, abi.pack_target(guest.endpoint_id, SHA))
    assert r.x[3] == FfaError.NOT_SUPPORTED & abi.W_MASK


async def test_lend_is_accepted_and_readable_by_the_borrower(guest: FfaGuest) -> None:
    # Linux lends with attributes 0: "the owner/sender must not specify the attributes".
    guest.poke(BUFFER_ADDRESS, b"lent")
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), fid=abi.FFA_MEM_LEND_64, attributes=0)
    status, *digest = await hash_request(guest, handle_of(r), 0, 4)
    assert status == 0 and tuple(digest) == digest_words(b"lent")


async def test_share_32_and_v1_0_layout(guest: FfaGuest) -> None:
    g = FfaGuest(guest.handler)
    await g.setup(abi.VERSION_1_0)
    r = await g.share((SHA,), ((BUFFER_ADDRESS, 1),), fid=abi.FFA_MEM_SHARE_32)
    assert r.x[0] == abi.FFA_SUCCESS_32


async def test_one_transaction_may_name_several_borrowers(guest: FfaGuest) -> None:
    r = await guest.share((ECHO, SHA), ((BUFFER_ADDRESS, 1),))
    status, *_ = await hash_request(guest, handle_of(r), 0, 1)
    assert status == 0


async def test_shares_are_counted(guest: FfaGuest) -> None:
    before = REGISTRY.get_sample_value("hyperbroker_ffa_pages_shared_total", {"kind": "share"}) or 0
    await guest.share((SHA,), ((BUFFER_ADDRESS, 3),))
    after = REGISTRY.get_sample_value("hyperbroker_ffa_pages_shared_total", {"kind": "share"})
    assert after == before + 3


# ---- fragments -----------------------------------------------------------------------
async def test_fragmented_share_is_assembled_with_frag_tx(guest: FfaGuest) -> None:
    ranges = tuple((BUFFER_ADDRESS + 2 * i * PAGE, 1) for i in range(8))
    data = guest.descriptor((SHA,), ranges)
    first = len(data) - 5 * 16
    guest.poke(TX_ADDRESS, data[:first])
    r = await guest.call(abi.FFA_MEM_SHARE_64, len(data), first, 0, 0)
    assert r.x[0] == abi.FFA_MEM_FRAG_RX and r.x[3] == first
    handle = abi.join_handle(r.x[1], r.x[2])
    offset = first
    for size in (48, 32):
        guest.poke(TX_ADDRESS, data[offset : offset + size])
        r = await guest.call(abi.FFA_MEM_FRAG_TX, *abi.split_handle(handle), size, 0)
        offset += size
        if offset < len(data):
            assert r.x[0] == abi.FFA_MEM_FRAG_RX and r.x[3] == offset
    assert r.x[0] == abi.FFA_SUCCESS_32 and handle_of(r) == handle
    status, *_ = await hash_request(guest, handle, 7 * PAGE, PAGE)
    assert status == 0


async def test_frag_tx_with_an_unknown_handle_is_invalid(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MEM_FRAG_TX, 1, 1 << 31, 16, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def _start_fragmented(g: FfaGuest) -> tuple[int, bytes, int]:
    data = g.descriptor((SHA,), ((BUFFER_ADDRESS, 1), (BUFFER_ADDRESS + 2 * PAGE, 1)))
    first = len(data) - 16
    g.poke(TX_ADDRESS, data[:first])
    r = await g.call(abi.FFA_MEM_SHARE_64, len(data), first, 0, 0)
    return abi.join_handle(r.x[1], r.x[2]), data, first


async def test_frag_tx_not_a_whole_number_of_constituents_is_invalid(guest: FfaGuest) -> None:
    # PKVM: later fragments are a multiple of 16 bytes (whole constituents).
    handle, _, _ = await _start_fragmented(guest)
    r = await guest.call(abi.FFA_MEM_FRAG_TX, *abi.split_handle(handle), 8, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_frag_tx_past_the_total_length_is_invalid(guest: FfaGuest) -> None:
    handle, _, _ = await _start_fragmented(guest)
    r = await guest.call(abi.FFA_MEM_FRAG_TX, *abi.split_handle(handle), 32, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_frag_tx_naming_another_sender_is_invalid(guest: FfaGuest) -> None:
    # W4[31:16] = sender ID is for a hypervisor only.
    handle, _, _ = await _start_fragmented(guest)
    r = await guest.call(abi.FFA_MEM_FRAG_TX, *abi.split_handle(handle), 16, 0x7777 << 16)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_reclaim_of_an_unfinished_transaction_abandons_it(guest: FfaGuest) -> None:
    # PKVM aborts a failed fragmented transaction with FFA_MEM_RECLAIM(handle, 0).
    handle, _, _ = await _start_fragmented(guest)
    assert (await guest.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle))).x[0] == \
        abi.FFA_SUCCESS_32
    r = await guest.call(abi.FFA_MEM_FRAG_TX, *abi.split_handle(handle), 16, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


# ---- register and descriptor checks ---------------------------------------------
async def test_share_without_tx_buffer_is_invalid() -> None:
    g = FfaGuest(FfaHandler({}))
    await g.call(abi.FFA_VERSION, abi.VERSION_1_2)
    r = await g.call(abi.FFA_MEM_SHARE_64, 80, 80, 0, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_dynamic_buffer_is_invalid(guest: FfaGuest) -> None:
    # X3/w4 non-zero only if FFA_FEATURES reports dynamic buffers (it does not).
    r = await guest.call(abi.FFA_MEM_SHARE_64, 112, 112, BUFFER_ADDRESS, 1)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


@pytest.mark.parametrize(("total", "frag"), [(100, 120), (0, 0), (112, 16)])
async def test_bad_lengths_are_invalid(guest: FfaGuest, total: int, frag: int) -> None:
    # fraglen <= len, and a first fragment holds at least header + one EMAD (pKVM).
    r = await guest.call(abi.FFA_MEM_SHARE_64, total, frag, 0, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_fragment_larger_than_tx_is_invalid(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MEM_SHARE_64, 2 * PAGE, PAGE + 16, 0, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_descriptor_longer_than_the_bound_is_no_memory(guest: FfaGuest) -> None:
    # PKVM: len > descriptor buffer gives NO_MEMORY.
    r = await guest.call(abi.FFA_MEM_SHARE_64, 64 * 1024 + 16, 4096, 0, 0)
    assert error_of(r) is FfaError.NO_MEMORY


async def test_malformed_descriptor_is_invalid(guest: FfaGuest) -> None:
    data = bytearray(guest.descriptor((SHA,), ((BUFFER_ADDRESS, 1),)))
    data[-4] = 1  # a constituent's reserved field (bytes 12..16)
    guest.poke(TX_ADDRESS, bytes(data))
    r = await guest.call(abi.FFA_MEM_SHARE_64, len(data), len(data), 0, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_sender_other_than_the_caller_is_invalid(guest: FfaGuest) -> None:
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), sender=guest.endpoint_id + 1)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_share_with_a_vm_is_not_supported(guest: FfaGuest) -> None:
    # Xen: the receiver must be secure, otherwise NOT_SUPPORTED.
    r = await guest.share((0x0033,), ((BUFFER_ADDRESS, 1),))
    assert error_of(r) is FfaError.NOT_SUPPORTED


async def test_share_with_an_unknown_partition_is_invalid(guest: FfaGuest) -> None:
    r = await guest.share((0x8999,), ((BUFFER_ADDRESS, 1),))
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_share_of_device_memory_is_not_supported(guest: FfaGuest) -> None:
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), attributes=0x10)  # device nGnRnE
    assert error_of(r) is FfaError.NOT_SUPPORTED


async def test_share_without_attributes_is_invalid(guest: FfaGuest) -> None:
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), attributes=0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


@pytest.mark.parametrize("permissions", [0x0, 0x1 << 2])  # data access not specified
async def test_share_without_data_access_is_invalid(guest: FfaGuest, permissions: int) -> None:
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), permissions=permissions)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_share_with_execute_permission_is_denied(guest: FfaGuest) -> None:
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), permissions=0x2 | 0x2 << 2)
    assert error_of(r) is FfaError.DENIED


@pytest.mark.parametrize("flags", [1 << 0, 1 << 2, 1 << 3, 1 << 9, 1 << 20])
async def test_share_flags_other_than_time_slicing_are_invalid(guest: FfaGuest, flags: int) -> None:
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), flags=flags)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_time_slicing_flag_is_accepted(guest: FfaGuest) -> None:
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),), flags=1 << 1)
    assert r.x[0] == abi.FFA_SUCCESS_32


async def test_share_of_pages_already_shared_is_denied(guest: FfaGuest) -> None:
    # Pages move host-owned -> shared; a second share of the same page fails (DENIED).
    await guest.share((SHA,), ((BUFFER_ADDRESS, 2),))
    r = await guest.share((ECHO,), ((BUFFER_ADDRESS + PAGE, 1),))
    assert error_of(r) is FfaError.DENIED


@pytest.mark.parametrize("address", [0x1000_0000, RAM_BASE + RAM_SIZE - PAGE])
async def test_share_outside_the_vms_memory_is_denied(guest: FfaGuest, address: int) -> None:
    # Xen: each page must be the guest's RAM (DENIED otherwise); the second range ends past.
    r = await guest.share((SHA,), ((address, 2),))
    assert error_of(r) is FfaError.DENIED


async def test_more_pages_than_configured_is_no_memory() -> None:
    g = FfaGuest(FfaHandler({"max_pages_per_share": 4}))
    await g.setup()
    r = await g.share((SHA,), ((BUFFER_ADDRESS, 5),))
    assert error_of(r) is FfaError.NO_MEMORY


async def test_more_shares_than_configured_is_no_memory() -> None:
    g = FfaGuest(FfaHandler({"max_shares_per_vm": 2}))
    await g.setup()
    for i in range(2):
        assert (await g.share((SHA,), ((BUFFER_ADDRESS + i * PAGE, 1),))).x[0] == \
            abi.FFA_SUCCESS_32
    r = await g.share((SHA,), ((BUFFER_ADDRESS + 2 * PAGE, 1),))
    assert error_of(r) is FfaError.NO_MEMORY


# ---- reclaim ---------------------------------------------------------------------------
async def test_reclaim_returns_success_and_ends_access(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    r = await guest.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    assert r.x[0] == abi.FFA_SUCCESS_32
    status, *_ = await hash_request(guest, handle)
    assert status == FfaError.INVALID_PARAMETERS & (1 << 64) - 1
    again = await guest.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    assert error_of(again) is FfaError.INVALID_PARAMETERS


async def test_reclaimed_pages_may_be_shared_again(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    await guest.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),))
    assert r.x[0] == abi.FFA_SUCCESS_32 and handle_of(r) != handle


async def test_reclaim_with_clear_flag_is_invalid(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    r = await guest.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 1)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_reclaim_of_an_unknown_handle_is_invalid(guest: FfaGuest) -> None:
    # Xen: INVALID_PARAMETERS if the guest does not own the handle.
    r = await guest.call(abi.FFA_MEM_RECLAIM, 5, 1 << 31, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_handles_are_distinct_per_share(guest: FfaGuest) -> None:
    handles = {handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS + i * PAGE, 1),)))
               for i in range(4)}
    assert len(handles) == 4


def test_descriptor_layout_matches_linux_offsets() -> None:
    # V1.1+ header 48 bytes, EMAD array at 48, EMAD size 32 for v1.2, composite after.
    g = FfaGuest(FfaHandler({}), version=abi.VERSION_1_2, endpoint_id=7)
    data = g.descriptor((SHA,), ((BUFFER_ADDRESS, 2),))
    sender, attrs, _, _, _, emad_size, count, emad_off = struct.unpack_from("<HHIQQIII", data)
    assert (sender, attrs, emad_size, count, emad_off) == (7, 0x2F, 32, 1, 48)
    assert struct.unpack_from("<I", data, 48 + 4)[0] == 80 and len(data) == 80 + 16 + 16


async def test_a_new_share_abandons_an_unfinished_one(guest: FfaGuest) -> None:
    # One TX buffer carries one transaction; a guest that restarted mid-way can share again.
    handle, _, _ = await _start_fragmented(guest)
    r = await guest.share((SHA,), ((BUFFER_ADDRESS, 1),))
    assert r.x[0] == abi.FFA_SUCCESS_32
    old = await guest.call(abi.FFA_MEM_FRAG_TX, *abi.split_handle(handle), 16, 0)
    assert error_of(old) is FfaError.INVALID_PARAMETERS


async def test_unmap_abandons_an_unfinished_transaction(guest: FfaGuest) -> None:
    handle, _, _ = await _start_fragmented(guest)
    await guest.call(abi.FFA_RXTX_UNMAP)
    r = await guest.call(abi.FFA_MEM_FRAG_TX, *abi.split_handle(handle), 16, 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS
