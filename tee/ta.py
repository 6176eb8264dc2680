"""What a trusted application is: the plugin interface of the reference TEE service.

A TA mirrors the GlobalPlatform entry points (TA_OpenSessionEntryPoint, TA_InvokeCommandEntryPoint,
TA_CloseSessionEntryPoint) with Python types: four `Param`s whose memory references are byte
strings already copied in from the client, and a result code (tee.gp.TeeResult). TAs are found
through the entry-point group `hyperbroker.trusted_apps` (tee.apps.discover_trusted_apps). A TA
knows its client's VM identity and login, its own state directory and sealing key; it knows
nothing of gRPC, guest memory or other VMs.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from hyperbroker.tee.gp import NUM_PARAMS, ParamType, TeeResult
from hyperbroker.tee.sealing import Sealer

ENTRY_POINT_GROUP = "hyperbroker.trusted_apps"


@dataclass(frozen=True, slots=True)
class VmIdentity:
    """The VM a client runs in, as the proxy names it (TeeVm host and name)."""

    host: str
    name: str

    @property
    def namespace(self) -> str:
        """A file-name-safe, fixed-length name for this VM's persistent data."""
        return hashlib.sha256(f"{self.host}\0{self.name}".encode()).hexdigest()[:32]

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"


@dataclass(frozen=True, slots=True)
class Client:
    """Who opened the session: the VM, the login method and the client UUID (zero when PUBLIC)."""

    vm: VmIdentity
    login: int
    uuid: uuid.UUID


@dataclass(slots=True)
class Param:
    """One TA parameter (TEE_Param).

    Values: `a`, `b` (32-bit). Memory references: `data` holds the input bytes (MEMREF_INPUT and
    INOUT); `capacity` is the size of the client's buffer; `null` marks a NULL reference. A TA
    answers through `set_output`, which also records the size it reports.
    """

    type: ParamType = ParamType.NONE
    a: int = 0
    b: int = 0
    data: bytes = b""
    capacity: int = 0
    null: bool = False
    size: int = 0  # memref size as the client will see it after the call
    written: bool = False  # set_output stored data to copy back to the client

    def set_output(self, data: bytes) -> bool:
        """Return `data` in an output memref; False when it does not fit (answer SHORT_BUFFER).

        The reported size becomes len(data) either way, as GP requires for SHORT_BUFFER.
        """
        self.size = len(data)
        if len(data) > self.capacity or (self.null and data):
            self.written = False
            return False
        self.data = bytes(data)
        self.written = True
        return True

    def set_value(self, a: int, b: int = 0) -> None:
        self.a = a & 0xFFFF_FFFF
        self.b = b & 0xFFFF_FFFF

    @classmethod
    def received(cls, kind: ParamType, a: int, b: int, data: bytes, size: int,
                 null: bool) -> Param:
        """A parameter as tee.proto TeeParam carries it in a request: MEMREF_INPUT's capacity is
        its data, MEMREF_OUTPUT's is `size`, MEMREF_INOUT's the larger of the two."""
        if kind.is_value:
            return cls(kind, a=a & 0xFFFF_FFFF, b=b & 0xFFFF_FFFF)
        if not kind.is_memref:
            return cls()
        if null:
            return cls(kind, null=True)
        if kind == ParamType.MEMREF_OUTPUT:
            return cls(kind, capacity=size, size=size)
        capacity = max(size, len(data)) if kind == ParamType.MEMREF_INOUT else len(data)
        return cls(kind, data=bytes(data), capacity=capacity, size=capacity)

    def reply(self) -> tuple[int, int, bytes, int]:
        """(a, b, data, size) as a reply carries them: outputs only, data only when set."""
        if self.type.is_value and self.type.is_output:
            return self.a & 0xFFFF_FFFF, self.b & 0xFFFF_FFFF, b"", 0
        if self.type.is_memref and self.type.is_output:
            return 0, 0, self.data[: self.capacity] if self.written else b"", self.size
        return 0, 0, b"", 0


def no_params() -> list[Param]:
    return [Param() for _ in range(NUM_PARAMS)]


@dataclass(eq=False, slots=True)
class Operation:
    """One open-session or invoke-command operation as a TA sees it."""

    client: Client
    params: list[Param] = field(default_factory=no_params)
    cancel_id: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def types(self) -> tuple[ParamType, ...]:
        return tuple(p.type for p in self.params)

    def is_cancelled(self) -> bool:
        """TEE_GetCancellationFlag: the client asked (CANCEL) to stop this operation."""
        return self.cancelled.is_set()


@dataclass(frozen=True, slots=True)
class TaInfo:
    uuid: uuid.UUID
    name: str
    device_enum: bool


@dataclass(frozen=True, slots=True)
class TaEnvironment:
    """What the service gives a TA instance."""

    state_dir: Path  # this TA's own directory under the service's state directory
    sealer: Sealer  # this TA's own sealing key
    catalogue: tuple[TaInfo, ...]  # every TA the service hosts, itself included


class TrustedApp(abc.ABC):
    """Base class of every trusted application plugin. One instance serves every VM."""

    uuid: ClassVar[uuid.UUID]
    name: ClassVar[str]
    # Listed as a TEE bus device by the device-enumeration PTA (OP-TEE TA_FLAG_DEVICE_ENUM).
    device_enum: ClassVar[bool] = False

    def __init__(self, env: TaEnvironment) -> None:
        self.env = env

    @classmethod
    def info(cls) -> TaInfo:
        return TaInfo(cls.uuid, cls.name, cls.device_enum)

    async def open_session(self, op: Operation) -> tuple[int, object]:
        """TA_OpenSessionEntryPoint: a result code and the session context (kept by the service)."""
        return TeeResult.SUCCESS, None

    @abc.abstractmethod
    async def invoke(self, session: object, cmd: int, op: Operation) -> int:
        """TA_InvokeCommandEntryPoint: the result code; outputs go into op.params."""

    async def close_session(self, session: object) -> None:  # noqa: B027 - optional hook
        """TA_CloseSessionEntryPoint."""
