"""The FF-A handler's configuration, adapter surface and allocators."""

from __future__ import annotations

from typing import Any

import pytest

from hyperbroker.calls import Outcome
from hyperbroker.handlers.api import HandlerConfigError
from hyperbroker.handlers.ffa import abi, endpoints
from hyperbroker.handlers.ffa.config import ECHO_UUID
from hyperbroker.handlers.ffa.remote import FfaPlugin
from hyperbroker.testing.ffa import FfaGuest, error_of

ECHO = {"kind": "echo", "id": 0x8001, "uuid": str(ECHO_UUID)}


@pytest.mark.parametrize(("config", "key"), [
    ({"partitions": []}, "partitions"),
    ({"partitions": "echo"}, "partitions"),
    ({"partitions": [{**ECHO, "kind": "tee"}]}, "partitions[0].kind"),
    ({"partitions": [{**ECHO, "id": 0x0001}]}, "partitions[0].id"),
    ({"partitions": [{**ECHO, "id": 0xFFFF}]}, "partitions[0].id"),
    ({"partitions": [{**ECHO, "id": abi.DEFAULT_SPMC_ID}]}, "partitions[0].id"),
    ({"partitions": [{**ECHO, "uuid": "nope"}]}, "partitions[0].uuid"),
    ({"partitions": [{**ECHO, "uuid": "00000000-0000-0000-0000-000000000000"}]},
     "partitions[0].uuid"),
    ({"partitions": [ECHO, {**ECHO, "name": "other"}]}, "partitions[1].id"),
    ({"partitions": [{**ECHO, "target": "x:1"}]}, "partitions[0]"),
    ({"partitions": [{"kind": "remote", "id": 0x8003, "uuid": str(ECHO_UUID)}]},
     "partitions[0].target"),
    ({"partitions": [{"kind": "remote", "id": 0x8003, "uuid": str(ECHO_UUID), "target": "h:1",
                      "tls_ca": "/nonexistent/ca.pem"}]}, "partitions[0].tls_ca"),
    ({"max_rxtx_pages": 0}, "max_rxtx_pages"),
    ({"max_pages_per_share": "many"}, "max_pages_per_share"),
    ({"max_shares_per_vm": True}, "max_shares_per_vm"),
    ({"spmc_id": 0x0005}, "spmc_id"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(HandlerConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        FfaPlugin(config)


def test_hex_strings_are_accepted_for_ids() -> None:
    h = FfaPlugin({"spmc_id": "0x8100", "partitions": [{**ECHO, "id": "0x8042"}]})
    assert h.settings.spmc_id == 0x8100 and h.partitions.get(0x8042) is not None


def test_default_config_serves_echo_and_sha256() -> None:
    h = FfaPlugin({})
    assert [p.info.name for p in h.partitions] == ["echo", "sha256"]


def test_handler_owns_the_named_ffa_ranges() -> None:
    h = FfaPlugin({})
    assert tuple(h.ranges) == abi.RANGES
    assert h.function_name(abi.FFA_MEM_SHARE_64) == "FFA_MEM_SHARE_64"
    assert h.function_name(0x8400_00F0) == "FFA_OTHER"
    assert h.function_name(0x8400_0000) is None  # PSCI is not ours


def test_named_fallbacks_are_ffa_errors() -> None:
    fallbacks = FfaPlugin({}).named_fallbacks()
    assert fallbacks["busy"].x[:3] == (abi.FFA_ERROR, 0, abi.FfaError.BUSY & abi.W_MASK)
    assert all(r.outcome is Outcome.GUEST_ERROR for r in fallbacks.values())


async def test_unknown_ids_in_range_are_answered_not_raised() -> None:
    g = FfaGuest(FfaPlugin({}))
    for fid in (0x8400_0060, 0x8400_0061, 0xC400_00FF, 0x8400_008F):
        assert error_of(await g.call(fid)) is abi.FfaError.NOT_SUPPORTED


async def test_no_endpoint_id_left_is_no_memory() -> None:
    g = FfaGuest(FfaPlugin({}))
    for i in range(endpoints.FIRST_VM_ID, endpoints.LAST_VM_ID + 1):  # 32767 other VMs
        await g.ctx.pools.store.allocate_id(endpoints.POOL, f"h/{i}", endpoints.FIRST_VM_ID,
                                            endpoints.LAST_VM_ID)
    await g.call(abi.FFA_VERSION, abi.VERSION_1_2)
    assert error_of(await g.call(abi.FFA_ID_GET)) is abi.FfaError.NO_MEMORY
