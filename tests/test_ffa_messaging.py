"""Direct messaging: DIRECT_REQ (32, 64), DIRECT_REQ2 and their responses (FF-A direct messaging).
"""

from __future__ import annotations

import pytest

from hyperbroker.handlers.ffa import FfaHandler, abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.config import ECHO_UUID, SHA256_UUID
from hyperbroker.handlers.ffa.discovery import uuid_to_pair
from hyperbroker.testing.ffa import FfaGuest, error_of
from hyperbroker.testing.metrics import HANDLERS as REGISTRY

ECHO = 0x8001


@pytest.fixture
async def guest() -> FfaGuest:
    g = FfaGuest(FfaHandler({}))
    await g.setup(abi.VERSION_1_2)
    return g


def target(g: FfaGuest, dst: int = ECHO) -> int:
    return abi.pack_target(g.endpoint_id, dst)


async def test_direct_req_64_is_answered_with_resp_64(guest: FfaGuest) -> None:
    payload = (1, 2, 3, 1 << 63, 5)
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, target(guest), 0, *payload)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP_64
    assert r.x[1] == abi.pack_target(ECHO, guest.endpoint_id)  # responder << 16 | requester
    assert r.x[2] == 0 and r.x[3:8] == payload


async def test_direct_req_32_masks_payload_to_32_bits(guest: FfaGuest) -> None:
    # An SMC32 request carries 32-bit values; Xen masks x2..x7.
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_32, target(guest), 0, 1 << 40 | 7, 8, 9, 10,
                         11)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP_32
    assert r.x[3:8] == (7, 8, 9, 10, 11)


async def test_direct_req2_routes_by_uuid_and_returns_x4_to_x17(guest: FfaGuest) -> None:
    payload = tuple(range(100, 114))
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ2, target(guest), *uuid_to_pair(ECHO_UUID),
                         *payload)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP2
    assert r.x[2:4] == (0, 0) and r.x[4:18] == payload
    assert r.mask == (1 << 18) - 1


async def test_direct_req2_with_nil_uuid_reaches_the_partition(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ2, target(guest), 0, 0, 42)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP2 and r.x[4] == 42


async def test_direct_req2_with_another_partitions_uuid_is_invalid(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ2, target(guest), *uuid_to_pair(SHA256_UUID))
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_direct_req2_is_not_supported_before_v1_2() -> None:
    g = FfaGuest(FfaHandler({}))
    await g.setup(abi.VERSION_1_1)
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ2, target(g), 0, 0)
    assert error_of(r) is FfaError.NOT_SUPPORTED


async def test_direct_req2_to_a_partition_without_req2_is_denied() -> None:
    spec = {"kind": "echo", "id": 0x8001, "uuid": str(ECHO_UUID),
            "properties": abi.PROP_DIRECT_REQ_RECV | abi.PROP_AARCH64}
    g = FfaGuest(FfaHandler({"partitions": [spec]}))
    await g.setup()
    assert error_of(await g.call(abi.FFA_MSG_SEND_DIRECT_REQ2, target(g))) is FfaError.DENIED


async def test_direct_req_to_a_partition_without_req_is_denied() -> None:
    spec = {"kind": "echo", "id": 0x8001, "uuid": str(ECHO_UUID),
            "properties": abi.PROP_DIRECT_REQ2_RECV | abi.PROP_AARCH64}
    g = FfaGuest(FfaHandler({"partitions": [spec]}))
    await g.setup()
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, target(g), 0)
    assert error_of(r) is FfaError.DENIED


async def test_spoofed_source_is_invalid(guest: FfaGuest) -> None:
    # Xen: w1[31:16] must be the caller's own ID.
    w1 = abi.pack_target(guest.endpoint_id + 1, ECHO)
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, w1, 0, 1)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_message_to_self_is_invalid(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, target(guest, guest.endpoint_id), 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_message_to_a_vm_is_not_supported(guest: FfaGuest) -> None:
    # Xen: the destination must be secure (bit 15), else NOT_SUPPORTED.
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, target(guest, 0x0042), 0)
    assert error_of(r) is FfaError.NOT_SUPPORTED


async def test_message_to_an_unknown_partition_is_invalid(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, target(guest, 0x8777), 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


@pytest.mark.parametrize("w2", [abi.DIRECT_MSG_FRAMEWORK | 4, abi.DIRECT_MSG_FRAMEWORK | 8, 1])
async def test_framework_messages_and_flags_are_refused(guest: FfaGuest, w2: int) -> None:
    # Framework messages (VM created/destroyed, version) are not a guest's to send; for
    # partition messages w2 must be zero (HF: INVALID_PARAMETERS).
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_32, target(guest), w2)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


@pytest.mark.parametrize("fid", [abi.FFA_MSG_SEND_DIRECT_RESP_32, abi.FFA_MSG_SEND_DIRECT_RESP_64,
                                 abi.FFA_MSG_SEND_DIRECT_RESP2])
async def test_a_guests_direct_response_is_denied(guest: FfaGuest, fid: int) -> None:
    # HF: a response needs a request in progress; nobody sends a guest direct requests.
    r = await guest.call(fid, abi.pack_target(guest.endpoint_id, ECHO))
    assert error_of(r) is FfaError.DENIED


async def test_direct_messages_are_counted_per_partition(guest: FfaGuest) -> None:
    labels = {"partition": "echo", "kind": "direct_req_64", "result": "ok"}
    before = REGISTRY.get_sample_value("hyperbroker_ffa_direct_messages_total", labels) or 0
    await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, target(guest), 0, 1)
    after = REGISTRY.get_sample_value("hyperbroker_ffa_direct_messages_total", labels)
    assert after == before + 1


async def test_errors_are_counted_by_function_and_code(guest: FfaGuest) -> None:
    labels = {"function": "FFA_MSG_SEND_DIRECT_REQ_64", "code": "NOT_SUPPORTED"}
    before = REGISTRY.get_sample_value("hyperbroker_ffa_errors_total", labels) or 0
    await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, target(guest, 0x42), 0)
    assert REGISTRY.get_sample_value("hyperbroker_ffa_errors_total", labels) == before + 1
