"""Guest memory as the agent sees it: the VM's regions, and the mappings of their fds.

Every access is checked against the regions the VMM declared at registration; an access
that is not wholly inside one region is refused (EFAULT), a write to a read-only one too.
In SEQPACKET mode the regions arrive as file descriptors and are mmapped here, so guest-memory
traffic never involves the VMM. A mapping whose file shrinks under it faults (SIGBUS) and would
kill the agent for every VM of the host, so an fd is accepted only when it cannot shrink: a memfd
sealed with F_SEAL_SHRINK (memfd_create(2), fcntl(2) "File Sealing"; QEMU's memory-backend-memfd
seals so by default) whose size covers the region. In stream mode the agent relays through the
VMM instead (agent.vmm) and only uses the region map for checks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import os
from collections.abc import Sequence

from hyperbroker.wire.vmm import REGION_READONLY, MemRegion


class MemoryAccessError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class RegionMap:
    def __init__(self, regions: Sequence[MemRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.gpa)
        for r in ordered:
            if r.size == 0 or r.gpa + r.size > 1 << 64:
                raise MemoryAccessError(errno.EINVAL,
                                        f"region at {r.gpa:#x} of {r.size:#x} bytes is empty or "
                                        "wraps")
        for a, b in itertools.pairwise(ordered):
            if b.gpa < a.end:
                raise MemoryAccessError(errno.EINVAL,
                                        f"regions at {a.gpa:#x} and {b.gpa:#x} overlap")
        self.regions = tuple(ordered)

    def locate(self, gpa: int, length: int, write: bool) -> tuple[int, int]:
        """(region index, offset) of [gpa, gpa+length), which must lie inside one region."""
        end = gpa + length
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa and end <= r.end:
                if write and r.flags & REGION_READONLY:
                    raise MemoryAccessError(errno.EACCES,
                                            f"[{gpa:#x}, {end:#x}) is read-only guest memory")
                return i, gpa - r.gpa
        raise MemoryAccessError(errno.EFAULT, f"[{gpa:#x}, {end:#x}) is not guest RAM of this VM")


class MappedRam:
    """The VM's regions mmapped from the fds the VMM passed with SCM_RIGHTS."""

    def __init__(self, regions: RegionMap, fds: Sequence[int]) -> None:
        if len(fds) != len(regions.regions):
            raise MemoryAccessError(errno.EINVAL,
                                    f"{len(fds)} file descriptors for {len(regions.regions)} "
                                    "regions")
        self.regions = regions
        self.maps: list[mmap.mmap] = []
        try:
            for r, fd in zip(regions.regions, fds, strict=True):
                if r.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                    raise MemoryAccessError(errno.EINVAL,
                                            f"mmap_offset {r.mmap_offset:#x} is not page-aligned")
                check_unshrinkable(fd, r)
                prot = mmap.PROT_READ | (0 if r.flags & REGION_READONLY else mmap.PROT_WRITE)
                try:
                    self.maps.append(mmap.mmap(fd, r.size, mmap.MAP_SHARED, prot,
                                               offset=r.mmap_offset))
                except (OSError, ValueError) as e:
                    raise MemoryAccessError(errno.EINVAL,
                                            f"cannot map region at {r.gpa:#x}: {e}") from None
        except BaseException:
            self.close()
            raise

    def read(self, gpa: int, length: int) -> bytes:
        i, off = self.regions.locate(gpa, length, write=False)
        return self.maps[i][off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        i, off = self.regions.locate(gpa, len(data), write=True)
        self.maps[i][off : off + len(data)] = data

    def close(self) -> None:
        for m in self.maps:
            m.close()
        self.maps.clear()


def check_unshrinkable(fd: int, r: MemRegion) -> None:
    """Refuse (EINVAL) an fd that could shrink under the agent's mapping, or is too short."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a file that supports seals (only memfds and shmem do)
    if not seals & fcntl.F_SEAL_SHRINK:
        raise MemoryAccessError(errno.EINVAL,
                                f"region at {r.gpa:#x}: the fd must be a memfd sealed with "
                                "F_SEAL_SHRINK (memfd_create MFD_ALLOW_SEALING, then "
                                "fcntl F_ADD_SEALS), so it cannot shrink under the agent")
    size = os.fstat(fd).st_size
    if r.mmap_offset + r.size > size:
        raise MemoryAccessError(errno.EINVAL,
                                f"region at {r.gpa:#x}: mmap_offset {r.mmap_offset:#x} + size "
                                f"{r.size:#x} is past the end of its {size:#x}-byte file")


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
