"""The per-VM record of memory a pKVM guest shares with its host, and the MMIO it guards.

MEM_SHARE and MEM_UNSHARE move one protection granule between "private" and "shared"; MMIO_GUARD
marks one granule as emulated MMIO (Documentation/virt/kvm/arm/hypercalls.rst). The only error a
guest can be told is INVALID_PARAMETER (-3), so the record also says why it refused, for logs and
metrics. Limits and deny ranges come from policy. A pure state machine over an immutable value with
a JSON form; it knows nothing of registers, the store or metrics."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hyperbroker.handlers.memshare.granules import GranuleSet


@dataclass(frozen=True, slots=True)
class IpaRange:
    """[base, base + size) of intermediate physical addresses."""

    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def covers(self, start: int, end: int) -> bool:
        return self.base <= start and end <= self.end

    def intersects(self, start: int, end: int) -> bool:
        return self.base < end and start < self.end


@dataclass(frozen=True, slots=True)
class MemsharePolicy:
    """What the policy's handler config sets (validated by the adapter)."""

    granule: int = 4096  # pKVM's protection granule: the host's PAGE_SIZE
    max_shared_bytes: int | None = None
    max_guarded_granules: int | None = None
    deny: tuple[IpaRange, ...] = ()  # granules the guest may never share
    ram: tuple[IpaRange, ...] = ()  # guest RAM; empty: not known, any IPA may be RAM or MMIO
    mmio_guard: bool = True


class Refusal(enum.Enum):
    """Why a call got INVALID_PARAMETER; the values are metric labels (a bounded set)."""

    MBZ = "mbz"  # a Reserved / Must be zero argument was not zero
    UNALIGNED = "unaligned"  # the IPA is not the base of a granule
    NOT_RAM = "not_ram"  # share/unshare outside guest RAM
    IS_RAM = "is_ram"  # MMIO guard over guest RAM
    DENIED = "denied"  # the granule touches a deny range of the policy
    ALREADY_SHARED = "already_shared"
    NOT_SHARED = "not_shared"
    GUARDED = "guarded"  # sharing an MMIO granule
    SHARED = "shared"  # guarding a shared (hence RAM) granule
    LIMIT = "limit"  # the policy's limit on shared bytes or guarded granules


@dataclass(frozen=True, slots=True)
class MemshareRecord:
    shared: GranuleSet = field(default_factory=GranuleSet)
    guarded: GranuleSet = field(default_factory=GranuleSet)

    def to_json(self) -> dict[str, Any]:
        return {"shared": self.shared.to_json(), "guarded": self.guarded.to_json()}

    @classmethod
    def from_json(cls, doc: Any) -> MemshareRecord:
        if not isinstance(doc, dict):
            return cls()
        return cls(GranuleSet.from_json(doc.get("shared")),
                   GranuleSet.from_json(doc.get("guarded")))


Transition = MemshareRecord | Refusal


def _granule(policy: MemsharePolicy, ipa: int, mbz: Sequence[int]) -> tuple[int, int] | Refusal:
    if any(mbz):
        return Refusal.MBZ
    if ipa % policy.granule:
        return Refusal.UNALIGNED
    return ipa, ipa + policy.granule


def _in_ram(policy: MemsharePolicy, start: int, end: int) -> bool | None:
    """True/False when the policy describes guest RAM, None when it does not."""
    if not policy.ram:
        return None
    return any(r.covers(start, end) for r in policy.ram)


def share(policy: MemsharePolicy, record: MemshareRecord, ipa: int,
          mbz: Sequence[int]) -> Transition:
    """MEM_SHARE: the granule at `ipa` becomes visible to the host."""
    g = _granule(policy, ipa, mbz)
    if isinstance(g, Refusal):
        return g
    start, end = g
    if _in_ram(policy, start, end) is False:
        return Refusal.NOT_RAM
    if any(d.intersects(start, end) for d in policy.deny):
        return Refusal.DENIED
    if start in record.shared:
        return Refusal.ALREADY_SHARED  # pKVM: only an owned (private) page can be shared
    if record.guarded.intersects(start, end):
        return Refusal.GUARDED
    if (policy.max_shared_bytes is not None
            and record.shared.size + policy.granule > policy.max_shared_bytes):
        return Refusal.LIMIT
    return replace(record, shared=record.shared.add(start, end))


def unshare(policy: MemsharePolicy, record: MemshareRecord, ipa: int,
            mbz: Sequence[int]) -> Transition:
    """MEM_UNSHARE: revoke the host's access to a granule shared earlier."""
    g = _granule(policy, ipa, mbz)
    if isinstance(g, Refusal):
        return g
    start, end = g
    if start not in record.shared:
        return Refusal.NOT_SHARED
    return replace(record, shared=record.shared.remove(start, end))


def guard(policy: MemsharePolicy, record: MemshareRecord, ipa: int,
          mbz: Sequence[int]) -> Transition:
    """MMIO_GUARD: accesses to the granule are emulated MMIO from now on.

    Guarding a granule twice succeeds: the Linux guest's ioremap hook issues MMIO_GUARD for
    every mapping of a page and warns on any failure (drivers/virt/coco/pkvm-guest).
    """
    g = _granule(policy, ipa, mbz)
    if isinstance(g, Refusal):
        return g
    start, end = g
    if start in record.guarded:
        return record
    if any(r.intersects(start, end) for r in policy.ram):
        return Refusal.IS_RAM
    if record.shared.intersects(start, end):
        return Refusal.SHARED
    if (policy.max_guarded_granules is not None
            and record.guarded.size // policy.granule >= policy.max_guarded_granules):
        return Refusal.LIMIT
    return replace(record, guarded=record.guarded.add(start, end))


def describe(policy: MemsharePolicy, record: MemshareRecord) -> dict[str, Any]:
    """The record as the Admin API shows it (JSON)."""
    return {
        "granule": policy.granule,
        "shared_bytes": record.shared.size,
        "shared_granules": record.shared.size // policy.granule,
        "shared": record.shared.to_json(),
        "guarded_granules": record.guarded.size // policy.granule,
        "guarded": record.guarded.to_json(),
    }
