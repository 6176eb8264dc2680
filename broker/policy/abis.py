"""The named ABIs a rule may select (`abi: NAME`), learned from the installed handlers.

Each handler class declares the ABI it serves (handlers.api.Abi: a name, its ranges, its
function names); SMCCC's own service owners (vendor-hyp, std-hyp, sip, oem) are named by
hyperbroker.smccc. So a third-party plugin adds a named ABI by declaring it, without editing
hyperbroker. Two plugins may declare one name only with the same ranges (Hyper-V and memshare
both serve vendor-hyp); a rule that names a name declared two ways is refused, naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hyperbroker.handlers.api import Abi, Handler
from hyperbroker.smccc import ARCH_FUNCTIONS, OWNER_SERVICES, FunctionRange, merge_ranges

SMCCC = "SMCCC"  # who declares the owner services, in messages


@dataclass
class AbiCatalog:
    ranges: dict[str, tuple[FunctionRange, ...]] = field(default_factory=dict)
    declared_by: dict[str, list[str]] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # name -> "who: ranges"
    names: dict[int, str] = field(default_factory=lambda: dict(ARCH_FUNCTIONS))

    @classmethod
    def from_plugins(cls, plugins: Mapping[str, type[Handler]]) -> AbiCatalog:
        catalog = cls()
        for name, ranges in OWNER_SERVICES.items():
            catalog.add(name, ranges, SMCCC)
        for plugin, handler in sorted(plugins.items()):
            abi = getattr(handler, "abi", None)
            if isinstance(abi, Abi):
                catalog.add(abi.name, abi.ranges, f"plugin {plugin}")
                for fid, fname in abi.functions.items():
                    catalog.names.setdefault(fid, fname)
        return catalog

    def add(self, name: str, ranges: tuple[FunctionRange, ...], who: str) -> None:
        merged = tuple(merge_ranges(ranges))
        known = self.ranges.setdefault(name, merged)
        self.declared_by.setdefault(name, []).append(who)
        if known != merged:
            shown = [f"{w}: {', '.join(str(r) for r in self.ranges[name])}"
                     for w in self.declared_by[name][:1]]
            self.conflicts.setdefault(name, shown).append(
                f"{who}: {', '.join(str(r) for r in merged)}")

    def lookup(self, name: str) -> tuple[FunctionRange, ...] | str:
        """The ranges of `name`, or why it cannot be used."""
        if name in self.conflicts:
            return (f"ABI {name!r} is declared with different ranges "
                    f"({'; '.join(self.conflicts[name])})")
        if name not in self.ranges:
            return f"unknown ABI {name!r} (known: {', '.join(sorted(self.ranges))})"
        return self.ranges[name]
