"""The guest-backed view of a VM's shares that one partition receives for one request.

It implements handlers.ffa.partitions.SharedMemory over the handler API's guest memory: only
shares of the calling VM whose EMADs name this partition are visible; offsets are checked
against the share's size before any guest address is formed; writes need read-write access.
Offsets run through the share's constituents in descriptor order, as the sender listed them.
Reads go in chunks no larger than the agent serves per read. It knows nothing of registers or
of the handler's state document.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hyperbroker.handlers.api import GuestMemory, GuestMemoryError
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.descriptors import PAGE_SIZE, DataAccess
from hyperbroker.handlers.ffa.partitions import MAX_READ, ShareGrant
from hyperbroker.handlers.ffa.state import Share, ShareKind


def _slices(share: Share, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(guest address, byte count) pieces covering [offset, offset+length) of the share."""
    cursor = 0
    for c in share.constituents:
        size = c.page_count * PAGE_SIZE
        lo, hi = max(offset, cursor), min(offset + length, cursor + size)
        if lo < hi:
            yield c.address + (lo - cursor), hi - lo
        cursor += size


class GuestShares:
    """SharedMemory for partition `receiver` over `shares` of one VM."""

    def __init__(self, memory: GuestMemory, shares: Sequence[Share], receiver: int) -> None:
        self._memory = memory
        self._by_handle: dict[int, tuple[Share, bool]] = {}
        for s in shares:
            grant = s.grant_for(receiver)
            if grant is not None:
                writable = grant.permissions & 0x3 == DataAccess.RW
                self._by_handle[s.handle] = (s, writable)
        self._grants = tuple(
            ShareGrant(s.handle, s.size, writable, s.kind is ShareKind.LEND)
            for s, writable in self._by_handle.values()
        )

    @property
    def grants(self) -> Sequence[ShareGrant]:
        return self._grants

    def _locate(self, handle: int, offset: int, length: int) -> tuple[Share, bool] | FfaError:
        entry = self._by_handle.get(handle)
        if entry is None:
            return FfaError.INVALID_PARAMETERS
        if offset < 0 or length < 0 or offset + length > entry[0].size:
            return FfaError.INVALID_PARAMETERS
        return entry

    async def read(self, handle: int, offset: int, length: int) -> bytes | FfaError:
        entry = self._locate(handle, offset, length)
        if isinstance(entry, FfaError):
            return entry
        out = bytearray()
        try:
            for gpa, n in _slices(entry[0], offset, length):
                for at in range(0, n, MAX_READ):
                    out += await self._memory.read(gpa + at, min(MAX_READ, n - at))
        except GuestMemoryError:
            return FfaError.ABORTED  # the range left the VM's memory after it was shared
        return bytes(out)

    async def write(self, handle: int, offset: int, data: bytes) -> FfaError | None:
        entry = self._locate(handle, offset, len(data))
        if isinstance(entry, FfaError):
            return entry
        if not entry[1]:
            return FfaError.DENIED
        try:
            done = 0
            for gpa, n in _slices(entry[0], offset, len(data)):
                self._memory.write(gpa, data[done : done + n])
                done += n
        except GuestMemoryError:
            return FfaError.ABORTED
        return None
