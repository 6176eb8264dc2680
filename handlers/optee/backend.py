"""The TEE backend as the proxy sees it: typed requests and replies, and the interface to call.

These mirror proto/hyperbroker/v1/tee.proto without depending on protobuf, so the proxy's logic
(handlers.optee.std) and its tests can run against any implementation of `TeeBackend`. The gRPC
client is handlers.optee.grpc_backend. A backend that cannot answer (unreachable, timed out,
protocol error) raises BackendUnavailable; TEE errors are values in `BackendReply`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Protocol

from hyperbroker.tee.gp import Origin, ParamType, TeeResult


@dataclass(frozen=True, slots=True)
class TeeVm:
    """The VM a request acts for: the broker's identity plus this boot's incarnation token."""

    host: str
    name: str
    incarnation: str


@dataclass(frozen=True, slots=True)
class TeeParam:
    """One TA parameter on the wire (tee.proto TeeParam)."""

    type: ParamType = ParamType.NONE
    a: int = 0
    b: int = 0
    data: bytes = b""
    size: int = 0
    null: bool = False


class BackendStatus(enum.IntEnum):
    OK = 0
    VM_UNKNOWN = 1
    SESSION_LOST = 2


@dataclass(frozen=True, slots=True)
class BackendReply:
    status: BackendStatus
    ret: int = TeeResult.SUCCESS
    origin: int = Origin.TEE
    session: int = 0
    epoch: int = 0
    params: tuple[TeeParam, ...] = ()


@dataclass(frozen=True, slots=True)
class OpenSessionRequest:
    vm: TeeVm
    ta: uuid.UUID
    login: int
    client: uuid.UUID
    cancel_id: int
    params: tuple[TeeParam, ...]


@dataclass(frozen=True, slots=True)
class InvokeRequest:
    vm: TeeVm
    session: int
    epoch: int
    func: int
    cancel_id: int
    params: tuple[TeeParam, ...]


@dataclass(frozen=True, slots=True)
class CloseRequest:
    vm: TeeVm
    session: int
    epoch: int


@dataclass(frozen=True, slots=True)
class CancelRequest:
    vm: TeeVm
    session: int
    epoch: int
    cancel_id: int


class BackendUnavailable(Exception):
    """The backend gave no TEE answer; `reason` is a bounded label (timeout, unavailable ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TeeBackend(Protocol):
    async def vm_created(self, vm: TeeVm, max_sessions: int) -> int:
        """Register this incarnation of the VM; returns the service epoch."""
        ...

    async def vm_destroyed(self, vm: TeeVm) -> int:
        """The VM is gone: the service closes its sessions; returns how many."""
        ...

    async def open_session(self, request: OpenSessionRequest) -> BackendReply: ...

    async def invoke_command(self, request: InvokeRequest) -> BackendReply: ...

    async def close_session(self, request: CloseRequest) -> BackendReply: ...

    async def cancel(self, request: CancelRequest) -> BackendReply: ...

    async def close(self) -> None:
        """Release connections."""
        ...
