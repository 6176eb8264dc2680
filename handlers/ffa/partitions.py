"""Partitions: the secure endpoints a guest discovers and messages, as pluggable backends.

A `Partition` has fixed `PartitionInfo` (ID with the secure bit, UUID, execution contexts,
properties) and answers direct requests. Memory a VM shared with it is reachable only through
the `SharedMemory` it is handed per request, which checks handle, receiver, bounds and
permissions, so a partition can never touch pages it was not given, nor another VM's. Two
built-in partitions live here: `EchoPartition` and `Sha256Partition` (hashes a range of a share,
so memory sharing does real work). The gRPC-backed one is in handlers.ffa.remote. This module
knows nothing of registers, the broker or handler state.

Sha256Partition's message protocol (this project's own; docs/ffa.md):
- DIRECT_REQ_64: x3 = handle, x4 = offset, x5 = length (0 = to the end of the share).
  DIRECT_RESP_64: x3 = status (0 or an FF-A error code, sign-extended), x4..x7 = the digest,
  bytes [8i, 8i+8) as a little-endian u64 in x(4+i), so storing x4..x7 in order gives the bytes.
- DIRECT_REQ2: x4 = handle, x5 = offset, x6 = length; RESP2: x4 = status, x5..x8 = digest.
- DIRECT_REQ_32 has no room for a digest: status NOT_SUPPORTED.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.smccc import U64_MASK

MAX_READ = 64 * 1024  # guest-memory reads are bounded per read (handlers.api)


class MessageKind(enum.Enum):
    REQ_32 = "direct_req_32"
    REQ_64 = "direct_req_64"
    REQ2 = "direct_req2"

    @property
    def payload_length(self) -> int:
        return 14 if self is MessageKind.REQ2 else 5  # x4..x17 or x3..x7


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """What FFA_PARTITION_INFO_GET reports about a partition."""

    name: str  # operator-chosen, a bounded metrics label
    partition_id: int
    uuid: uuid.UUID
    exec_contexts: int = 1
    properties: int = abi.PROP_DIRECT_REQ_RECV | abi.PROP_AARCH64 | abi.PROP_DIRECT_REQ2_RECV

    def properties_for(self, version: int) -> int:
        """v1.2's REQ2 bits are reserved for older callers."""
        if version < abi.VERSION_1_2:
            return self.properties & ~abi.PROPS_V1_2_ONLY
        return self.properties

    @property
    def receives_direct_req(self) -> bool:
        return bool(self.properties & abi.PROP_DIRECT_REQ_RECV)

    @property
    def receives_direct_req2(self) -> bool:
        return bool(self.properties & abi.PROP_DIRECT_REQ2_RECV)


@dataclass(frozen=True, slots=True)
class DirectMessage:
    """A direct request as a partition sees it; payload already masked to the call's width."""

    vm: str  # the fleet-unique VM key (host/name), for logs and remote services
    sender: int
    receiver: int
    kind: MessageKind
    uuid: uuid.UUID | None  # REQ2's target service; None when nil or not REQ2
    payload: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ShareGrant:
    """A share the calling VM gave this partition, as the partition may see it."""

    handle: int
    size: int  # bytes
    writable: bool
    lent: bool


class SharedMemory(Protocol):
    """The calling VM's shares with one partition, for the duration of one request."""

    @property
    def grants(self) -> Sequence[ShareGrant]: ...

    async def read(self, handle: int, offset: int, length: int) -> bytes | FfaError:
        """Bytes [offset, offset+length) of share `handle`, in share order; any size."""
        ...

    async def write(self, handle: int, offset: int, data: bytes) -> FfaError | None:
        """Store into a share given read-write; applied before the vCPU resumes."""
        ...


Reply = tuple[int, ...] | FfaError  # a payload for DIRECT_RESP, or FFA_ERROR(code)


class Partition(abc.ABC):
    """A backend serving one secure endpoint."""

    def __init__(self, info: PartitionInfo) -> None:
        self.info = info

    @abc.abstractmethod
    async def direct_request(self, msg: DirectMessage, memory: SharedMemory) -> Reply:
        """Answer one direct request. Never raise for guest input; raise only for bugs."""

    async def reclaim(self, vm: str, sender: int, handle: int) -> FfaError | None:
        """The VM takes back `handle`. The broker mediates every access, so after this returns
        without an error the partition can no longer reach the pages; DENIED means "in use"."""
        return None

    async def vm_destroyed(self, vm: str, endpoint_id: int) -> None:  # noqa: B027 - optional
        """The VM is gone; forget whatever was kept for it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """The handler is closing: release connections."""


class EchoPartition(Partition):
    """Answers every direct request with its own payload: the smallest useful SP."""

    async def direct_request(self, msg: DirectMessage, memory: SharedMemory) -> Reply:
        return msg.payload


def _status(code: FfaError | None) -> int:
    return 0 if code is None else int(code) & U64_MASK


class Sha256Partition(Partition):
    """SHA-256 of a range of memory the caller shared with it (protocol in the module doc)."""

    async def direct_request(self, msg: DirectMessage, memory: SharedMemory) -> Reply:
        if msg.kind is MessageKind.REQ_32:
            return (_status(FfaError.NOT_SUPPORTED), 0, 0, 0, 0)
        handle, offset, length = msg.payload[0], msg.payload[1], msg.payload[2]
        grant = next((g for g in memory.grants if g.handle == handle), None)
        if grant is None:
            outcome: bytes | FfaError = FfaError.INVALID_PARAMETERS
        else:
            if length == 0:
                length = max(grant.size - offset, 0)
            outcome = await memory.read(handle, offset, length)
        if isinstance(outcome, FfaError):
            words: tuple[int, ...] = (_status(outcome), 0, 0, 0, 0)
        else:
            digest = hashlib.sha256(outcome).digest()
            words = (0, *(int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8)))
        return words if msg.kind is MessageKind.REQ_64 else words + (0,) * 9


def digest_words(data: bytes) -> tuple[int, int, int, int]:
    """The four digest registers Sha256Partition answers for `data` (for guests and tests)."""
    digest = hashlib.sha256(data).digest()
    a, b, c, d = (int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8))
    return a, b, c, d


class PartitionSet:
    """The configured partitions, in the order FFA_PARTITION_INFO_GET reports them."""

    def __init__(self, partitions: Iterable[Partition]) -> None:
        self.ordered: tuple[Partition, ...] = tuple(partitions)
        self.by_id = {p.info.partition_id: p for p in self.ordered}
        if len(self.by_id) != len(self.ordered):
            raise ValueError("two partitions share an ID")

    def get(self, partition_id: int) -> Partition | None:
        return self.by_id.get(partition_id)

    def matching(self, wanted: uuid.UUID | None) -> tuple[Partition, ...]:
        """All partitions (nil UUID) or those with that UUID (filter)."""
        if wanted is None:
            return self.ordered
        return tuple(p for p in self.ordered if p.info.uuid == wanted)

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.ordered)

    def __len__(self) -> int:
        return len(self.ordered)
