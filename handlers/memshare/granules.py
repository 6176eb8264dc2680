"""A set of guest-physical granules kept as sorted, disjoint, non-adjacent byte ranges.

A guest shares memory a granule at a time, but mostly in long runs (swiotlb buffers, virtio
rings), so ranges keep a record of tens of thousands of granules small in the store. Pure value
type with a JSON form; knows nothing of hypercalls or policy.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GranuleSet:
    """[start, end) byte ranges, sorted, disjoint and never touching each other."""

    ranges: tuple[tuple[int, int], ...] = ()

    def _index(self, address: int) -> int:
        """The index of the range containing `address`, or -1."""
        i = bisect.bisect_right(self.ranges, (address, 1 << 128)) - 1
        if i >= 0 and self.ranges[i][0] <= address < self.ranges[i][1]:
            return i
        return -1

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self._index(address) >= 0

    def intersects(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self.ranges, (end, 0))
        return i > 0 and self.ranges[i - 1][1] > start

    def add(self, start: int, end: int) -> GranuleSet:
        """The union with [start, end), which must not intersect the set."""
        assert start < end and not self.intersects(start, end)
        out = list(self.ranges)
        i = bisect.bisect_left(out, (start, end))
        if i > 0 and out[i - 1][1] == start:
            i -= 1
            start = out[i][0]
            del out[i]
        if i < len(out) and out[i][0] == end:
            end = out[i][1]
            del out[i]
        out.insert(i, (start, end))
        return GranuleSet(tuple(out))

    def remove(self, start: int, end: int) -> GranuleSet:
        """The set without [start, end), which must lie inside one of its ranges."""
        i = self._index(start)
        assert i >= 0 and end <= self.ranges[i][1]
        lo, hi = self.ranges[i]
        pieces = [(a, b) for a, b in ((lo, start), (end, hi)) if a < b]
        return GranuleSet(self.ranges[:i] + tuple(pieces) + self.ranges[i + 1 :])

    @property
    def size(self) -> int:
        """Bytes covered."""
        return sum(b - a for a, b in self.ranges)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.ranges)

    def to_json(self) -> list[list[int]]:
        return [[a, b] for a, b in self.ranges]

    @classmethod
    def from_json(cls, doc: Any) -> GranuleSet:
        """The stored form, as to_json wrote it."""
        return cls(tuple((int(a), int(b)) for a, b in doc or ()))
