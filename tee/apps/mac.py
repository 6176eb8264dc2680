"""The keyed-MAC TA: HMAC-SHA256 keys that are generated in the TEE and never leave it.

A client names a key; the TA generates 32 random bytes for it, seals them on disk in the calling
VM's namespace (tee.sealing, associated data naming the namespace and the key name) and from then
on only computes and checks MACs with it. No command returns key material. Commands (parameters
are memory references):

- 0 GENERATE_KEY: [0] in: key name. ACCESS_CONFLICT when it exists, STORAGE_NO_SPACE.
- 1 SIGN: [0] in: key name, [1] in: message, [2] out: MAC (32 bytes). ITEM_NOT_FOUND,
  SHORT_BUFFER.
- 2 VERIFY: [0] in: key name, [1] in: message, [2] in: MAC. ITEM_NOT_FOUND, MAC_INVALID.
- 3 DELETE_KEY: [0] in: key name. ITEM_NOT_FOUND.

A key name is 1..64 bytes. Wrong parameter types are BAD_PARAMETERS; a sealed key that fails
authentication is CORRUPT_OBJECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from hyperbroker.tee.apps.storage import write_atomically
from hyperbroker.tee.gp import ParamType, TeeResult, param_types
from hyperbroker.tee.sealing import SealError
from hyperbroker.tee.ta import Operation, TaEnvironment, TrustedApp, VmIdentity
from hyperbroker.tee.uuids import KEYED_MAC_TA

CMD_GENERATE_KEY = 0
CMD_SIGN = 1
CMD_VERIFY = 2
CMD_DELETE_KEY = 3

KEY_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
KEY_NAME_MAX = 64
MAX_VM_KEYS = 256
SUFFIX = ".key"

_IN = ParamType.MEMREF_INPUT
TYPES = {
    CMD_GENERATE_KEY: param_types(_IN),
    CMD_SIGN: param_types(_IN, _IN, ParamType.MEMREF_OUTPUT),
    CMD_VERIFY: param_types(_IN, _IN, _IN),
    CMD_DELETE_KEY: param_types(_IN),
}


class KeyedMacTa(TrustedApp):
    uuid = KEYED_MAC_TA
    name = "keyed-mac"
    device_enum = True

    def __init__(self, env: TaEnvironment) -> None:
        super().__init__(env)
        self._locks: dict[str, asyncio.Lock] = {}

    def _path(self, vm: VmIdentity, key_name: bytes) -> Path:
        return self.env.state_dir / vm.namespace / (key_name.hex() + SUFFIX)

    def _associated(self, vm: VmIdentity, key_name: bytes) -> bytes:
        return b"mac-key\0" + vm.namespace.encode() + b"\0" + key_name

    async def invoke(self, session: object, cmd: int, op: Operation) -> int:
        expected = TYPES.get(cmd)
        if expected is None:
            return TeeResult.NOT_IMPLEMENTED
        if op.types != expected:
            return TeeResult.BAD_PARAMETERS
        vm, key_name = op.client.vm, op.params[0].data
        if not 0 < len(key_name) <= KEY_NAME_MAX:
            return TeeResult.BAD_PARAMETERS
        path = self._path(vm, key_name)
        if cmd in (CMD_GENERATE_KEY, CMD_DELETE_KEY):
            async with self._locks.setdefault(vm.namespace, asyncio.Lock()):
                if cmd == CMD_GENERATE_KEY:
                    return await asyncio.to_thread(self._generate, vm, key_name, path)
                return await asyncio.to_thread(_delete, path)
        try:
            blob = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return TeeResult.ITEM_NOT_FOUND
        try:
            key = self.env.sealer.unseal(blob, self._associated(vm, key_name))
        except SealError:
            return TeeResult.CORRUPT_OBJECT
        mac = hmac.new(key, op.params[1].data, hashlib.sha256).digest()
        if cmd == CMD_SIGN:
            ok = op.params[2].set_output(mac)
            return TeeResult.SUCCESS if ok else TeeResult.SHORT_BUFFER
        if hmac.compare_digest(mac, op.params[2].data):
            return TeeResult.SUCCESS
        return TeeResult.MAC_INVALID

    def _generate(self, vm: VmIdentity, key_name: bytes, path: Path) -> int:
        """Runs in a worker thread under the VM's lock, so exists-then-write cannot race."""
        if path.exists():
            return TeeResult.ACCESS_CONFLICT
        with contextlib.suppress(FileNotFoundError):
            if sum(1 for n in os.listdir(path.parent) if n.endswith(SUFFIX)) >= MAX_VM_KEYS:
                return TeeResult.STORAGE_NO_SPACE
        sealed = self.env.sealer.seal(secrets.token_bytes(KEY_BYTES),
                                      self._associated(vm, key_name))
        write_atomically(path, sealed)
        return TeeResult.SUCCESS


def _delete(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return TeeResult.ITEM_NOT_FOUND
    return TeeResult.SUCCESS
