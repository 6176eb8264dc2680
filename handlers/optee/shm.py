"""Guest shared memory as OP-TEE sees it: non-contiguous page lists and the buffers they describe.

A TMEM parameter with OPTEE_MSG_ATTR_NONCONTIG points at a page list: 4 KiB pages of 511 page
addresses and a pointer to the next list page, with the buffer's offset into its first page in the
low 12 bits of buf_ptr (OPTEE_MSG_ATTR_*, optee_msg.h; OP-TEE core/kernel/msg_param.c). REGISTER_SHM
keeps such a buffer under a cookie for later RMEM parameters and CALL_WITH_REGD_ARG. A
`SharedBuffer` stores the pages as extents of contiguous pages (compact in the per-VM JSON
state) and maps a byte range of the buffer to guest-physical runs. Walking a list reads guest
memory through the `read` callable it is given; this module does no other I/O.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hyperbroker.handlers.api import GuestMemory, GuestMemoryError
from hyperbroker.handlers.optee.msg import NONCONTIG_PAGE_SIZE, PAGE_MASK, PAGELIST_ENTRIES_PER_PAGE

MAX_READ = 64 * 1024  # the agent bounds one guest-memory read (handlers.testing.FakeGuestMemory)

Run = tuple[int, int]  # (guest-physical address, length in bytes)
Reader = Callable[[int, int], Awaitable[bytes]]


class PageListError(enum.Enum):
    MALFORMED = "malformed"  # unaligned entry or list pointer, or size 0: BAD_PARAMETERS
    UNREADABLE = "unreadable"  # a list page is not guest RAM: BAD_PARAMETERS
    TOO_LARGE = "too-large"  # more pages than the proxy allows per buffer: OUT_OF_MEMORY


@dataclass(frozen=True, slots=True)
class SharedBuffer:
    """`size` bytes starting `page_offset` bytes into the first of the buffer's pages."""

    page_offset: int
    size: int
    extents: tuple[tuple[int, int], ...]  # (first page's address, number of pages), in order

    @property
    def num_pages(self) -> int:
        return sum(n for _, n in self.extents)

    def runs(self, offset: int, length: int) -> list[Run] | None:
        """Guest ranges holding bytes [offset, offset+length) of the buffer; None if outside it."""
        if offset < 0 or length < 0 or offset + length > self.size:
            return None
        out: list[Run] = []
        if length == 0:
            return out
        start = self.page_offset + offset
        end = start + length
        base = 0  # buffer-relative address of the current extent's first byte (page_offset incl.)
        for gpa, n in self.extents:
            ext_end = base + n * NONCONTIG_PAGE_SIZE
            lo, hi = max(start, base), min(end, ext_end)
            if lo < hi:
                addr = gpa + (lo - base)
                if out and out[-1][0] + out[-1][1] == addr:
                    out[-1] = (out[-1][0], out[-1][1] + hi - lo)
                else:
                    out.append((addr, hi - lo))
            base = ext_end
            if base >= end:
                break
        return out

    def to_json(self) -> dict[str, Any]:
        return {"o": self.page_offset, "s": self.size, "x": [list(e) for e in self.extents]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SharedBuffer:
        return cls(int(doc["o"]), int(doc["s"]),
                   tuple((int(gpa), int(n)) for gpa, n in doc["x"]))

    @classmethod
    def from_pages(cls, page_offset: int, size: int, pages: Sequence[int]) -> SharedBuffer:
        return cls(page_offset, size, tuple(_extents(pages)))


def _extents(pages: Sequence[int]) -> Iterator[tuple[int, int]]:
    start, count = None, 0
    for page in pages:
        if start is not None and page == start + count * NONCONTIG_PAGE_SIZE:
            count += 1
            continue
        if start is not None:
            yield start, count
        start, count = page, 1
    if start is not None:
        yield start, count


def pages_needed(buf_ptr: int, size: int) -> int:
    """msg_param_mobj_from_noncontig: pages covering `size` bytes after the first-page offset."""
    return (size + (buf_ptr & PAGE_MASK) - 1) // NONCONTIG_PAGE_SIZE + 1


async def read_page_list(read: Reader, buf_ptr: int, size: int,
                         max_pages: int) -> SharedBuffer | PageListError:
    """Walk the page list at buf_ptr (list address | first-page offset) describing `size` bytes.

    Every entry and every next-list pointer must be 4 KiB aligned (msg_param_extract_pages).
    A size of 0 is refused: OP-TEE's own arithmetic wraps on it.
    """
    if size <= 0:
        return PageListError.MALFORMED
    num_pages = pages_needed(buf_ptr, size)
    if num_pages > max_pages:
        return PageListError.TOO_LARGE
    list_page = buf_ptr & ~PAGE_MASK
    pages: list[int] = []
    while len(pages) < num_pages:
        try:
            raw = await read(list_page, NONCONTIG_PAGE_SIZE)
        except GuestMemoryError:
            return PageListError.UNREADABLE
        entries = struct.unpack("<512Q", raw)
        take = min(PAGELIST_ENTRIES_PER_PAGE, num_pages - len(pages))
        for entry in entries[:take]:
            if entry & PAGE_MASK:
                return PageListError.MALFORMED
            pages.append(entry)
        if len(pages) < num_pages:
            list_page = entries[PAGELIST_ENTRIES_PER_PAGE]
            if list_page & PAGE_MASK:
                return PageListError.MALFORMED
    return SharedBuffer.from_pages(buf_ptr & PAGE_MASK, size, pages)


def contiguous(gpa: int, length: int) -> list[Run]:
    return [(gpa, length)] if length else []


def split_runs(runs: Sequence[Run], offset: int, length: int) -> list[Run]:
    """The part [offset, offset+length) of the bytes `runs` describe, as runs."""
    out: list[Run] = []
    pos = 0
    for gpa, n in runs:
        lo, hi = max(offset, pos), min(offset + length, pos + n)
        if lo < hi:
            out.append((gpa + lo - pos, hi - lo))
        pos += n
    return out


async def read_runs(memory: GuestMemory, runs: Sequence[Run]) -> bytes:
    """The bytes of `runs`, read in chunks the agent accepts; raises GuestMemoryError."""
    parts = []
    for gpa, n in runs:
        for off in range(0, n, MAX_READ):
            parts.append(await memory.read(gpa + off, min(MAX_READ, n - off)))
    return b"".join(parts)


def write_runs(memory: GuestMemory, runs: Sequence[Run], data: bytes) -> None:
    """Buffer writes of `data` across `runs` (data may be shorter than the runs)."""
    pos = 0
    for gpa, n in runs:
        if pos >= len(data):
            return
        chunk = data[pos : pos + n]
        memory.write(gpa, chunk)
        pos += len(chunk)
