"""The secure-storage TA: persistent objects, namespaced per VM, sealed at rest.

Each VM sees only its own objects: the namespace comes from the client's VM identity, never from
the request, and every object is sealed with the TA's key and associated data naming the
namespace and the object id (tee.sealing), so a file copied into another VM's directory does not
unseal. Objects survive restarts of the service and of the VM. Commands (all parameters are
memory references unless noted):

- 0 CREATE: [0] in: id, [1] in: data. ACCESS_CONFLICT when it exists, STORAGE_NO_SPACE.
- 1 READ: [0] in: id, [1] out: data. ITEM_NOT_FOUND, SHORT_BUFFER (size = the object's).
- 2 WRITE: [0] in: id, [1] in: data, replacing the content. ITEM_NOT_FOUND, STORAGE_NO_SPACE.
- 3 DELETE: [0] in: id. ITEM_NOT_FOUND.
- 4 LIST: [0] out: ids, [1] value out: a = count. SHORT_BUFFER.

An id is 1..64 bytes (TEE_OBJECT_ID_MAX_LEN). LIST returns the ids sorted, each as a 16-bit
little-endian length followed by the id. Wrong parameter types are BAD_PARAMETERS; a sealed file
that fails authentication is CORRUPT_OBJECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
from pathlib import Path

from hyperbroker.tee.gp import ParamType, TeeResult, param_types
from hyperbroker.tee.sealing import SealError
from hyperbroker.tee.ta import Operation, TaEnvironment, TrustedApp, VmIdentity
from hyperbroker.tee.uuids import SECURE_STORAGE_TA

CMD_CREATE = 0
CMD_READ = 1
CMD_WRITE = 2
CMD_DELETE = 3
CMD_LIST = 4

OBJECT_ID_MAX = 64  # GP TEE Internal Core API TEE_OBJECT_ID_MAX_LEN
MAX_OBJECT_BYTES = 1 << 20
MAX_VM_BYTES = 16 << 20
MAX_VM_OBJECTS = 1024
SUFFIX = ".obj"

_IN = ParamType.MEMREF_INPUT
_OUT = ParamType.MEMREF_OUTPUT
TYPES = {
    CMD_CREATE: param_types(_IN, _IN),
    CMD_READ: param_types(_IN, _OUT),
    CMD_WRITE: param_types(_IN, _IN),
    CMD_DELETE: param_types(_IN),
    CMD_LIST: param_types(_OUT, ParamType.VALUE_OUTPUT),
}


def encode_id_list(ids: list[bytes]) -> bytes:
    return b"".join(struct.pack("<H", len(i)) + i for i in sorted(ids))


def decode_id_list(blob: bytes) -> list[bytes]:
    """The inverse of LIST's encoding; raises ValueError on a malformed list."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 2 > len(blob):
            raise ValueError("truncated length")
        (n,) = struct.unpack_from("<H", blob, pos)
        pos += 2
        if pos + n > len(blob):
            raise ValueError("truncated id")
        out.append(blob[pos : pos + n])
        pos += n
    return out


class SecureStorageTa(TrustedApp):
    uuid = SECURE_STORAGE_TA
    name = "secure-storage"
    device_enum = True

    def __init__(self, env: TaEnvironment) -> None:
        super().__init__(env)
        self._locks: dict[str, asyncio.Lock] = {}

    def _dir(self, vm: VmIdentity) -> Path:
        return self.env.state_dir / vm.namespace

    def _associated(self, vm: VmIdentity, object_id: bytes) -> bytes:
        return b"storage\0" + vm.namespace.encode() + b"\0" + object_id

    async def invoke(self, session: object, cmd: int, op: Operation) -> int:
        expected = TYPES.get(cmd)
        if expected is None:
            return TeeResult.NOT_IMPLEMENTED
        if op.types != expected:
            return TeeResult.BAD_PARAMETERS
        vm = op.client.vm
        if cmd == CMD_LIST:
            ids = await asyncio.to_thread(_list_ids, self._dir(vm))
            op.params[1].set_value(len(ids))
            ok = op.params[0].set_output(encode_id_list(ids))
            return TeeResult.SUCCESS if ok else TeeResult.SHORT_BUFFER
        object_id = op.params[0].data
        if not 0 < len(object_id) <= OBJECT_ID_MAX:
            return TeeResult.BAD_PARAMETERS
        path = self._dir(vm) / (object_id.hex() + SUFFIX)
        lock = self._locks.setdefault(vm.namespace, asyncio.Lock())
        async with lock:
            if cmd == CMD_READ:
                blob = await asyncio.to_thread(_read, path)
                if blob is None:
                    return TeeResult.ITEM_NOT_FOUND
                try:
                    data = self.env.sealer.unseal(blob, self._associated(vm, object_id))
                except SealError:
                    return TeeResult.CORRUPT_OBJECT
                ok = op.params[1].set_output(data)
                return TeeResult.SUCCESS if ok else TeeResult.SHORT_BUFFER
            if cmd == CMD_DELETE:
                found = await asyncio.to_thread(_delete, path)
                return TeeResult.SUCCESS if found else TeeResult.ITEM_NOT_FOUND
            data = op.params[1].data
            exists = await asyncio.to_thread(path.exists)
            if cmd == CMD_CREATE and exists:
                return TeeResult.ACCESS_CONFLICT
            if cmd == CMD_WRITE and not exists:
                return TeeResult.ITEM_NOT_FOUND
            if len(data) > MAX_OBJECT_BYTES:
                return TeeResult.STORAGE_NO_SPACE
            sealed = self.env.sealer.seal(data, self._associated(vm, object_id))
            if not await asyncio.to_thread(_fits, self._dir(vm), path, len(sealed)):
                return TeeResult.STORAGE_NO_SPACE
            await asyncio.to_thread(write_atomically, path, sealed)
            return TeeResult.SUCCESS


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _delete(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _list_ids(directory: Path) -> list[bytes]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    ids = []
    for name in names:
        if name.endswith(SUFFIX):
            with contextlib.suppress(ValueError):
                ids.append(bytes.fromhex(name[: -len(SUFFIX)]))
    return ids


def _fits(directory: Path, path: Path, new_size: int) -> bool:
    """The VM's quota holds after `path` becomes `new_size` bytes."""
    total, count = new_size, 1
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(SUFFIX) and entry.path != str(path):
                total += entry.stat().st_size
                count += 1
    return total <= MAX_VM_BYTES and count <= MAX_VM_OBJECTS


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
