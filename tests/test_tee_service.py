"""The reference TEE service and its trusted applications, driven directly (no proxy, no gRPC).

Result codes and origins follow OP-TEE core (entry_std.c, tee_ta_manager.c) and the TAs'
documented command tables; the device PTA follows OP-TEE core/pta/device.c exactly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from hyperbroker.tee import apps as apps_module
from hyperbroker.tee.apps import (
    BUILTIN,
    DeviceEnumPta,
    KeyedMacTa,
    SecureStorageTa,
    device_enum,
    discover_trusted_apps,
    mac,
    storage,
)
from hyperbroker.tee.gp import Login, Origin, ParamType, TeeResult, param_types
from hyperbroker.tee.sealing import SealError, load_master_key
from hyperbroker.tee.service import Status, TeeService
from hyperbroker.tee.ta import Operation, Param, TrustedApp, VmIdentity
from hyperbroker.tee.uuids import DEVICE_ENUM_PTA, KEYED_MAC_TA, SECURE_STORAGE_TA
from hyperbroker.testing.optee import ECHO_PANIC, ECHO_SLEEP, ECHO_TA, EchoTa

VM_A = VmIdentity("host-a", "vm-a")
VM_B = VmIdentity("host-a", "vm-b")
ZERO = uuid.UUID(int=0)


def mem_in(data: bytes) -> Param:
    return Param.received(ParamType.MEMREF_INPUT, 0, 0, data, len(data), False)


def mem_out(capacity: int) -> Param:
    return Param.received(ParamType.MEMREF_OUTPUT, 0, 0, b"", capacity, False)


def value_out() -> Param:
    return Param(ParamType.VALUE_OUTPUT)


class Client:
    """One VM's view of the service: register, open, invoke."""

    def __init__(self, service: TeeService, vm: VmIdentity, incarnation: str = "boot-1") -> None:
        self.service, self.vm, self.incarnation = service, vm, incarnation

    async def start(self) -> Client:
        await self.service.vm_created(self.vm, self.incarnation)
        return self

    async def open(self, ta: uuid.UUID, login: int = Login.PUBLIC) -> int:
        r = await self.service.open_session(self.vm, self.incarnation, ta, login, ZERO, [])
        assert (r.status, r.ret, r.origin) == (Status.OK, TeeResult.SUCCESS, Origin.TRUSTED_APP)
        return r.session

    async def invoke(self, session: int, cmd: int, params: Sequence[Param]
                     ) -> tuple[int, int, tuple[Param, ...]]:
        r = await self.service.invoke(self.vm, self.incarnation, session, self.service.epoch,
                                      cmd, list(params))
        assert r.status == Status.OK
        return r.ret, r.origin, r.params


@pytest.fixture
def service(tmp_path: Path) -> TeeService:
    return TeeService((*BUILTIN, EchoTa), tmp_path)


async def client(service: TeeService, vm: VmIdentity = VM_A) -> Client:
    return await Client(service, vm).start()


# Sessions and VMs ------------------------------------------------------------------------------


async def test_requests_for_an_unregistered_vm_say_so(service: TeeService) -> None:
    r = await service.open_session(VM_A, "boot-1", ECHO_TA, Login.PUBLIC, ZERO, [])
    assert r.status == Status.VM_UNKNOWN


async def test_an_unknown_ta_is_item_not_found_from_tee(service: TeeService) -> None:
    c = await client(service)
    r = await service.open_session(VM_A, c.incarnation, uuid.uuid4(), Login.PUBLIC, ZERO, [])
    assert (r.ret, r.origin, r.session) == (TeeResult.ITEM_NOT_FOUND, Origin.TEE, 0)


async def test_an_unknown_login_is_bad_parameters(service: TeeService) -> None:
    c = await client(service)
    r = await service.open_session(VM_A, c.incarnation, ECHO_TA, 3, ZERO, [])
    assert (r.ret, r.origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_sessions_of_an_earlier_epoch_are_lost(service: TeeService) -> None:
    c = await client(service)
    session = await c.open(ECHO_TA)
    r = await service.invoke(VM_A, c.incarnation, session, service.epoch ^ 1, 0, [])
    assert r.status == Status.SESSION_LOST
    assert (await service.close_session(VM_A, c.incarnation, session,
                                        service.epoch + 1)).status == Status.SESSION_LOST


async def test_unknown_sessions(service: TeeService) -> None:
    c = await client(service)
    assert (await c.invoke(77, 0, []))[:2] == (TeeResult.BAD_PARAMETERS, Origin.TEE)
    r = await service.close_session(VM_A, c.incarnation, 77, service.epoch)
    assert (r.ret, r.origin) == (TeeResult.ITEM_NOT_FOUND, Origin.TEE)
    r = await service.cancel(VM_A, c.incarnation, 77, service.epoch, 1)
    assert (r.ret, r.origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_sessions_are_per_vm(service: TeeService) -> None:
    a, b = await client(service, VM_A), await client(service, VM_B)
    session = await a.open(ECHO_TA)
    assert (await b.invoke(session, 0, []))[0] == TeeResult.BAD_PARAMETERS
    r = await service.close_session(VM_B, b.incarnation, session, service.epoch)
    assert r.ret == TeeResult.ITEM_NOT_FOUND
    assert service.session_count(VM_A) == 1


async def test_the_per_vm_session_limit(tmp_path: Path) -> None:
    service = TeeService(BUILTIN, tmp_path, max_sessions_per_vm=4)
    assert await service.vm_created(VM_A, "b1", max_sessions=2) == 2
    for _ in range(2):
        await Client(service, VM_A, "b1").open(SECURE_STORAGE_TA)
    r = await service.open_session(VM_A, "b1", SECURE_STORAGE_TA, Login.PUBLIC, ZERO, [])
    assert (r.ret, r.origin) == (TeeResult.OUT_OF_MEMORY, Origin.TEE)
    assert await service.vm_created(VM_B, "b1") == 4  # the service's own cap otherwise


async def test_a_new_incarnation_closes_the_old_ones_sessions(service: TeeService) -> None:
    await (await client(service)).open(ECHO_TA)
    await service.vm_created(VM_A, "boot-2")
    assert service.session_count(VM_A) == 0
    r = await service.open_session(VM_A, "boot-1", ECHO_TA, Login.PUBLIC, ZERO, [])
    assert r.status == Status.VM_UNKNOWN


async def test_vm_destroyed_closes_every_session(service: TeeService) -> None:
    c = await client(service)
    await c.open(ECHO_TA)
    await c.open(SECURE_STORAGE_TA)
    assert await service.vm_destroyed(VM_A, "someone-else") == 0
    assert await service.vm_destroyed(VM_A, c.incarnation) == 2
    assert await service.vm_destroyed(VM_A, c.incarnation) == 0


async def test_a_ta_that_raises_is_dead(service: TeeService) -> None:
    c = await client(service)
    session = await c.open(ECHO_TA)
    assert (await c.invoke(session, ECHO_PANIC, []))[:2] == (TeeResult.TARGET_DEAD, Origin.TEE)
    assert (await c.invoke(session, 0, []))[:2] == (TeeResult.TARGET_DEAD, Origin.TEE)
    r = await service.close_session(VM_A, c.incarnation, session, service.epoch)
    assert r.ret == TeeResult.SUCCESS


async def test_cancel_sets_the_flag_of_the_matching_operation(service: TeeService) -> None:
    c = await client(service)
    session = await c.open(ECHO_TA)
    slow = asyncio.ensure_future(service.invoke(
        VM_A, c.incarnation, session, service.epoch, ECHO_SLEEP,
        [Param(ParamType.VALUE_INPUT, a=10_000)], cancel_id=5))
    await asyncio.sleep(0.01)
    await service.cancel(VM_A, c.incarnation, session, service.epoch, 4)  # another operation
    assert not slow.done()
    r = await service.cancel(VM_A, c.incarnation, session, service.epoch, 5)
    assert (r.ret, r.origin) == (TeeResult.SUCCESS, Origin.TEE)
    done = await asyncio.wait_for(slow, 30)
    assert (done.ret, done.origin) == (TeeResult.CANCEL, Origin.TRUSTED_APP)


# Device-enumeration PTA (OP-TEE core/pta/device.c) ---------------------------------------------


async def test_device_pta_lists_the_enumerable_tas(service: TeeService) -> None:
    c = await client(service)
    session = await c.open(DEVICE_ENUM_PTA)
    null = Param.received(ParamType.MEMREF_OUTPUT, 0, 0, b"", 0, True)
    ret, origin, out = await c.invoke(session, device_enum.PTA_CMD_GET_DEVICES, [null])
    assert (ret, origin, out[0].size) == (TeeResult.SHORT_BUFFER, Origin.TRUSTED_APP, 32)
    ret, _, out = await c.invoke(session, device_enum.PTA_CMD_GET_DEVICES, [mem_out(32)])
    assert ret == TeeResult.SUCCESS
    listed = {uuid.UUID(bytes=out[0].data[i:i + 16]) for i in (0, 16)}
    assert listed == {SECURE_STORAGE_TA, KEYED_MAC_TA}


async def test_device_pta_checks_types_and_commands_like_optee(service: TeeService) -> None:
    c = await client(service)
    session = await c.open(DEVICE_ENUM_PTA)
    assert (await c.invoke(session, 0, [mem_out(64), value_out()]))[0] == \
        TeeResult.BAD_PARAMETERS
    assert (await c.invoke(session, 0, [mem_in(b"x")]))[0] == TeeResult.BAD_PARAMETERS
    assert (await c.invoke(session, 9, [mem_out(64)]))[0] == TeeResult.NOT_IMPLEMENTED
    ret, _, out = await c.invoke(session, device_enum.PTA_CMD_GET_DEVICES_SUPP, [mem_out(64)])
    assert (ret, out[0].size) == (TeeResult.SUCCESS, 0)


async def test_device_pta_with_nothing_to_list(tmp_path: Path) -> None:
    service = TeeService((DeviceEnumPta,), tmp_path)
    c = await client(service)
    session = await c.open(DEVICE_ENUM_PTA)
    null = Param.received(ParamType.MEMREF_OUTPUT, 0, 0, b"", 0, True)
    ret, _, out = await c.invoke(session, device_enum.PTA_CMD_GET_DEVICES, [null])
    assert (ret, out[0].size) == (TeeResult.SUCCESS, 0)


# Secure storage -------------------------------------------------------------------------------


async def test_storage_commands_and_errors(service: TeeService) -> None:
    c = await client(service)
    s = await c.open(SECURE_STORAGE_TA)
    assert (await c.invoke(s, storage.CMD_CREATE, [mem_in(b"id"), mem_in(b"one")]))[0] == 0
    assert (await c.invoke(s, storage.CMD_CREATE, [mem_in(b"id"), mem_in(b"two")]))[0] == \
        TeeResult.ACCESS_CONFLICT
    assert (await c.invoke(s, storage.CMD_WRITE, [mem_in(b"nope"), mem_in(b"x")]))[0] == \
        TeeResult.ITEM_NOT_FOUND
    assert (await c.invoke(s, storage.CMD_WRITE, [mem_in(b"id"), mem_in(b"three")]))[0] == 0
    ret, _, out = await c.invoke(s, storage.CMD_READ, [mem_in(b"id"), mem_out(2)])
    assert (ret, out[1].size) == (TeeResult.SHORT_BUFFER, 5)
    ret, _, out = await c.invoke(s, storage.CMD_READ, [mem_in(b"id"), mem_out(5)])
    assert (ret, out[1].data) == (TeeResult.SUCCESS, b"three")
    assert (await c.invoke(s, storage.CMD_DELETE, [mem_in(b"id")]))[0] == TeeResult.SUCCESS
    assert (await c.invoke(s, storage.CMD_DELETE, [mem_in(b"id")]))[0] == TeeResult.ITEM_NOT_FOUND
    assert (await c.invoke(s, storage.CMD_READ, [mem_in(b"id"), mem_out(5)]))[0] == \
        TeeResult.ITEM_NOT_FOUND


@pytest.mark.parametrize("object_id", [b"", b"x" * 65])
async def test_storage_object_ids_are_1_to_64_bytes(service: TeeService, object_id: bytes) -> None:
    c = await client(service)
    s = await c.open(SECURE_STORAGE_TA)
    r = await c.invoke(s, storage.CMD_CREATE, [mem_in(object_id), mem_in(b"v")])
    assert r[:2] == (TeeResult.BAD_PARAMETERS, Origin.TRUSTED_APP)


async def test_storage_wrong_types_and_commands(service: TeeService) -> None:
    c = await client(service)
    s = await c.open(SECURE_STORAGE_TA)
    assert (await c.invoke(s, storage.CMD_READ, [mem_in(b"id")]))[0] == TeeResult.BAD_PARAMETERS
    assert (await c.invoke(s, 42, []))[0] == TeeResult.NOT_IMPLEMENTED


async def test_storage_is_namespaced_per_vm_and_persistent(tmp_path: Path) -> None:
    service = TeeService(BUILTIN, tmp_path)
    a, b = await client(service, VM_A), await client(service, VM_B)
    sa, sb = await a.open(SECURE_STORAGE_TA), await b.open(SECURE_STORAGE_TA)
    await a.invoke(sa, storage.CMD_CREATE, [mem_in(b"shared-id"), mem_in(b"a's")])
    assert (await b.invoke(sb, storage.CMD_READ, [mem_in(b"shared-id"), mem_out(8)]))[0] == \
        TeeResult.ITEM_NOT_FOUND
    restarted = TeeService(BUILTIN, tmp_path)  # a new run: new epoch, same disk
    assert restarted.epoch != service.epoch
    a2 = await client(restarted, VM_A)
    s2 = await a2.open(SECURE_STORAGE_TA)
    ret, _, out = await a2.invoke(s2, storage.CMD_READ, [mem_in(b"shared-id"), mem_out(8)])
    assert (ret, out[1].data) == (TeeResult.SUCCESS, b"a's")
    ret, _, out = await a2.invoke(s2, storage.CMD_LIST, [mem_out(64), value_out()])
    assert storage.decode_id_list(out[0].data) == [b"shared-id"] and out[1].a == 1


async def test_stored_objects_are_sealed(service: TeeService, tmp_path: Path) -> None:
    c = await client(service)
    s = await c.open(SECURE_STORAGE_TA)
    await c.invoke(s, storage.CMD_CREATE, [mem_in(b"id"), mem_in(b"plain secret text")])
    files = list((tmp_path / "ta" / str(SECURE_STORAGE_TA)).rglob("*.obj"))
    assert len(files) == 1 and b"plain secret text" not in files[0].read_bytes()
    # Moved into another VM's namespace, it does not unseal: CORRUPT_OBJECT, not a leak.
    other = tmp_path / "ta" / str(SECURE_STORAGE_TA) / VM_B.namespace
    other.mkdir()
    (other / files[0].name).write_bytes(files[0].read_bytes())
    b = await client(service, VM_B)
    sb = await b.open(SECURE_STORAGE_TA)
    assert (await b.invoke(sb, storage.CMD_READ, [mem_in(b"id"), mem_out(64)]))[0] == \
        TeeResult.CORRUPT_OBJECT


async def test_storage_quota_is_storage_no_space(service: TeeService) -> None:
    c = await client(service)
    s = await c.open(SECURE_STORAGE_TA)
    big = b"x" * (storage.MAX_OBJECT_BYTES + 1)
    assert (await c.invoke(s, storage.CMD_CREATE, [mem_in(b"big"), mem_in(big)]))[0] == \
        TeeResult.STORAGE_NO_SPACE


# Keyed MAC ------------------------------------------------------------------------------------


async def test_mac_keys_sign_and_verify_and_never_leave(service: TeeService,
                                                         tmp_path: Path) -> None:
    c = await client(service)
    m = await c.open(KEYED_MAC_TA)
    assert (await c.invoke(m, mac.CMD_GENERATE_KEY, [mem_in(b"k")]))[0] == TeeResult.SUCCESS
    assert (await c.invoke(m, mac.CMD_GENERATE_KEY, [mem_in(b"k")]))[0] == \
        TeeResult.ACCESS_CONFLICT
    ret, _, out = await c.invoke(m, mac.CMD_SIGN, [mem_in(b"k"), mem_in(b"msg"), mem_out(31)])
    assert (ret, out[2].size) == (TeeResult.SHORT_BUFFER, 32)
    ret, _, out = await c.invoke(m, mac.CMD_SIGN, [mem_in(b"k"), mem_in(b"msg"), mem_out(32)])
    tag = out[2].data
    assert ret == TeeResult.SUCCESS and len(tag) == 32
    assert (await c.invoke(m, mac.CMD_VERIFY, [mem_in(b"k"), mem_in(b"msg"), mem_in(tag)]))[0] \
        == TeeResult.SUCCESS
    flipped = bytes([tag[0] ^ 1]) + tag[1:]
    assert (await c.invoke(m, mac.CMD_VERIFY, [mem_in(b"k"), mem_in(b"msg"),
                                               mem_in(flipped)]))[:2] == \
        (TeeResult.MAC_INVALID, Origin.TRUSTED_APP)
    # No command hands out key bytes, and the key file holds a sealed blob, not the key.
    key_file = next((tmp_path / "ta" / str(KEYED_MAC_TA)).rglob("*.key"))
    assert len(key_file.read_bytes()) > mac.KEY_BYTES
    assert (await c.invoke(m, mac.CMD_DELETE_KEY, [mem_in(b"k")]))[0] == TeeResult.SUCCESS
    assert (await c.invoke(m, mac.CMD_SIGN, [mem_in(b"k"), mem_in(b"m"), mem_out(32)]))[0] == \
        TeeResult.ITEM_NOT_FOUND


async def test_mac_keys_are_per_vm(service: TeeService) -> None:
    a, b = await client(service, VM_A), await client(service, VM_B)
    ma, mb = await a.open(KEYED_MAC_TA), await b.open(KEYED_MAC_TA)
    await a.invoke(ma, mac.CMD_GENERATE_KEY, [mem_in(b"k")])
    assert (await b.invoke(mb, mac.CMD_SIGN, [mem_in(b"k"), mem_in(b"m"), mem_out(32)]))[0] == \
        TeeResult.ITEM_NOT_FOUND
    assert (await b.invoke(mb, mac.CMD_GENERATE_KEY, [mem_in(b"k")]))[0] == TeeResult.SUCCESS


# Sealing and discovery ------------------------------------------------------------------------


def test_master_key_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    first = load_master_key(tmp_path)
    blob = first.seal(b"data", b"aad")
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    assert load_master_key(tmp_path).unseal(blob, b"aad") == b"data"
    with pytest.raises(SealError):
        first.unseal(blob, b"other aad")
    with pytest.raises(SealError):
        first.for_app(SECURE_STORAGE_TA).unseal(blob, b"aad")


class Clash(TrustedApp):
    """A plugin claiming the storage TA's UUID."""

    uuid = SECURE_STORAGE_TA
    name = "clash"

    async def invoke(self, session: object, cmd: int, op: Operation) -> int:
        return TeeResult.SUCCESS


def test_discovery_adds_entry_point_apps_and_refuses_uuid_clashes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_entry_points(group: str) -> list[EntryPoint]:
        assert group == "hyperbroker.trusted_apps"
        return [EntryPoint("echo", "hyperbroker.testing.optee:EchoTa", group)]

    monkeypatch.setattr(apps_module, "entry_points", fake_entry_points)
    expected: tuple[type[TrustedApp], ...] = (*BUILTIN, EchoTa)
    assert {a.uuid for a in discover_trusted_apps()} == {a.uuid for a in expected}
    monkeypatch.setattr(apps_module, "entry_points", lambda group: [
        EntryPoint("clash", f"{__name__}:Clash", group)])
    with pytest.raises(ValueError, match="already served"):
        discover_trusted_apps()


def test_param_types_helper_pads_with_none() -> None:
    assert param_types(ParamType.MEMREF_INPUT) == (ParamType.MEMREF_INPUT,) + (ParamType.NONE,) * 3
    assert SecureStorageTa.device_enum and KeyedMacTa.device_enum
    assert not DeviceEnumPta.device_enum
