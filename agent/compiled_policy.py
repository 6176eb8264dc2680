"""The compiled policy as the agent uses it: filter records, deadlines, fallbacks, static answers.

Built from the CompiledPolicy the broker sends (welcome, or a push after an Admin apply). Each VM
keeps the version it registered with, because its kernel filter cannot change after it ran.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from hyperbroker.calls import NOT_SUPPORTED
from hyperbroker.kvm import SmcccFilter
from hyperbroker.smccc import SMCCC_1_1_RESULT_MASK
from hyperbroker.wire.v1 import broker_pb2

DEFAULT_DEADLINE_US = 100_000


@dataclass(frozen=True, slots=True)
class RuleView:
    deadline_s: float
    fallback: tuple[int, ...]
    fallback_mask: int
    rule: str


class AgentProfile:
    def __init__(self, pb: broker_pb2.CompiledProfile) -> None:
        self.name = pb.name
        self.filters = tuple(
            SmcccFilter(r.base, r.nr_functions, int(r.action)) for r in pb.kernel_filter
        )
        rules = sorted(pb.rules, key=lambda r: r.base)
        self._bases = [r.base for r in rules]
        self._ends = [r.base + r.nr_functions for r in rules]
        self._views = [
            RuleView(r.deadline_us / 1e6, tuple(r.fallback) or NOT_SUPPORTED.x,
                     r.fallback_mask or SMCCC_1_1_RESULT_MASK, r.rule)
            for r in rules
        ]
        deadline = (pb.default_deadline_us or DEFAULT_DEADLINE_US) / 1e6
        self.default = RuleView(deadline, NOT_SUPPORTED.x, SMCCC_1_1_RESULT_MASK, "")
        self.static: dict[int, tuple[tuple[int, ...], int]] = {
            s.function_id: (tuple(s.x), s.mask) for s in pb.static_answers
        }

    def rule_for(self, fid: int) -> RuleView:
        i = bisect.bisect_right(self._bases, fid) - 1
        if i >= 0 and fid < self._ends[i]:
            return self._views[i]
        return self.default


class AgentPolicy:
    def __init__(self, pb: broker_pb2.CompiledPolicy) -> None:
        self.version = pb.version
        self.digest = pb.digest
        self.profiles = {p.name: AgentProfile(p) for p in pb.profiles}
