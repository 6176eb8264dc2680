"""The policy model: what a validated policy is, its errors, and the constants of the format.

A policy names handler instances and profiles of rules; a VM registers with one profile, whose
rules become that VM's KVM SMCCC filter records, the broker's dispatch table and the agent's
deadlines, fallbacks and static answers. These are plain frozen values: loading
(hyperbroker.broker.policy.loading) builds them, the checks (.checks) prove them, compiling
(.compiling) and rendering (.rendering) turn them into what the agent, the VMM and people read.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

from hyperbroker.calls import Outcome, Result
from hyperbroker.handlers.api import Handler
from hyperbroker.kvm import SmcccFilter
from hyperbroker.smccc import (
    ARCH_FUNCTIONS,
    NOT_SUPPORTED_U64,
    SMCCC_ARCH_FEATURES,
    SMCCC_VERSION,
    FunctionRange,
    default_function_name,
    merge_ranges,
)

FORMAT_VERSION = 1  # the only `version:` this engine reads
DEFAULT_PROFILE = "default"  # the profile of a VM whose VMM names none
DEFAULT_DEADLINE_MS = 100
DEADLINE_MS_RANGE = (1, 60_000)  # no vCPU waits longer than a minute for its fallback
BUILTIN_FALLBACK = "not_supported"
U32_MAX = 0xFFFF_FFFF  # struct kvm_smccc_filter base and nr_functions are __u32

# The keys of each mapping of the format: the loader refuses any other, `policy schema` lists
# them (hyperbroker.broker.policy.schema).
TOP_KEYS = ("version", "handlers", "profiles")
HANDLER_KEYS = ("plugin", "config")
PROFILE_KEYS = ("default_deadline_ms", "rules")
RULE_KEYS = (
    "name",
    "abi",
    "ranges",
    "functions",
    "action",
    "handler",
    "fallback",
    "deadline_ms",
    "agent_static",
)
RANGE_KEYS = ("base", "count")
FORWARD_ONLY = ("fallback", "deadline_ms", "agent_static")

# SMCCC_RET_NOT_SUPPORTED in x0, x1..x3 zero: what KVM itself answers a DENY.
NOT_SUPPORTED_FALLBACK = Result.regs(NOT_SUPPORTED_U64, outcome=Outcome.FALLBACK)

# IDs examined when listing a forwarded range's named functions; larger ranges list only the
# known names and the handler's static answers (a plugin may own millions of IDs).
NAME_SCAN_LIMIT = 1 << 20

# SMCCC_VERSION and SMCCC_ARCH_FEATURES: inside the Arm-architecture range KVM keeps in every
# filter (arch/arm64/kvm/hypercalls.c), so the kernel serves them in every profile and a
# handler may claim them (Linux asks PSCI_FEATURES(SMCCC_VERSION) before it uses SMCCC 1.1).
KERNEL_SERVED = frozenset({SMCCC_VERSION, SMCCC_ARCH_FEATURES})
KERNEL = "kernel"  # DiscoveryClaim.served_by for KERNEL_SERVED IDs


class Action(enum.Enum):
    FORWARD = "forward"  # KVM_SMCCC_FILTER_FWD_TO_USER: the broker's handler answers
    DENY = "deny"  # KVM_SMCCC_FILTER_DENY: the kernel answers SMCCC NOT_SUPPORTED
    HANDLE = "handle"  # no record: KVM's default, the kernel serves it


@dataclass(frozen=True)
class PolicyError:
    """One refusal. `errno_name` is what KVM answers for the same filter record, "" if none."""

    message: str
    errno_name: str
    rules: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.message} [{self.errno_name}]" if self.errno_name else self.message


class PolicyInvalid(Exception):
    """The policy was refused; `errors` holds every reason found, in file order."""

    def __init__(self, errors: Iterable[PolicyError]) -> None:
        self.errors = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class Rule:
    name: str
    ranges: tuple[FunctionRange, ...]  # merged, sorted
    action: Action
    handler: str | None  # the handler instance, forward rules only
    fallback: Result  # outcome FALLBACK; what the agent answers when the deadline passes
    deadline_us: int
    agent_static: bool  # the agent may serve the handler's static answers for these ranges


@dataclass(frozen=True)
class DispatchEntry:
    range: FunctionRange
    rule: Rule
    handler: str


@dataclass(frozen=True)
class DiscoveryClaim:
    """What one discovery call of a forwarded handler tells the guest is served, and who serves
    each claimed ID in the profile: a handler instance, or KERNEL for KERNEL_SERVED."""

    handler: str  # the instance the discovery call is forwarded to
    call: int  # the discovery function ID
    served_by: tuple[tuple[int, str], ...]  # (claimed ID, who serves it), sorted by ID


@dataclass(frozen=True)
class Profile:
    name: str
    rules: tuple[Rule, ...]
    kernel_filter: tuple[tuple[SmcccFilter, str], ...]  # (record, rule name), sorted by base
    dispatch: tuple[DispatchEntry, ...]  # forwarded ranges, sorted by base
    default_deadline_us: int
    discovery: tuple[DiscoveryClaim, ...] = ()  # proven claims, in dispatch then ID order
    _bases: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bases", tuple(e.range.base for e in self.dispatch))

    def lookup(self, fid: int) -> DispatchEntry | None:
        """The forward range holding `fid`, or None: the call is not this profile's to forward."""
        i = bisect.bisect_right(self._bases, fid) - 1
        if i >= 0 and fid in self.dispatch[i].range:
            return self.dispatch[i]
        return None


@dataclass(frozen=True)
class Policy:
    text: str
    digest: str  # sha256 hex of `text` (UTF-8)
    handlers: Mapping[str, Handler]  # instances, by instance name
    profiles: Mapping[str, Profile]
    # Every function the installed handlers and SMCCC name, whether or not this policy uses
    # their handler: a denied PSCI call is still labelled PSCI_CPU_ON.
    names: Mapping[int, str] = field(default_factory=lambda: dict(ARCH_FUNCTIONS))

    def function_name(self, fid: int) -> str:
        """A bounded label: its owner handler's name, a known function's name, or its class."""
        return function_name_of(self.handlers.values(), fid, self.names)

    def named_functions(self, r: FunctionRange, handler: str | None = None) -> dict[int, str]:
        """The IDs in `r` that have a specific name (not a class label), by ID.

        `handler`'s own names win; then the known names. Ranges above NAME_SCAN_LIMIT IDs are not
        walked: only the known names and the handler's static answers are looked at there.
        """
        inst = self.handlers.get(handler) if handler else None
        if r.count <= NAME_SCAN_LIMIT:
            candidates: Iterable[int] = range(r.base, r.end)
        else:
            extra = inst.static_answers().keys() if inst else ()
            candidates = sorted({*self.names, *extra})
        out: dict[int, str] = {}
        for fid in candidates:
            if fid not in r:
                continue
            name = (handler_name(inst, fid) if inst else None) or self.names.get(fid)
            if name:
                out[fid] = name
        return out


def handler_name(handler: Handler, fid: int) -> str | None:
    """`handler`'s name for `fid`, asked only for IDs it owns."""
    if any(fid in r for r in handler.ranges):
        return handler.function_name(fid)
    return None


def function_name_of(handlers: Iterable[Handler], fid: int, names: Mapping[int, str]) -> str:
    """The first of `handlers` to name `fid`, else its name in `names`, else its class."""
    for handler in handlers:
        name = handler_name(handler, fid)
        if name:
            return name
    return names.get(fid) or default_function_name(fid)


@dataclass
class Draft:
    """A rule while it is being checked: what parsed so far (its errors are already recorded)."""

    index: int
    label: str  # its name, or "#N" when it has none
    ranges: list[FunctionRange] = field(default_factory=list)  # the valid ones, as written
    action: Action | None = None
    handler: str | None = None
    fallback: Result = NOT_SUPPORTED_FALLBACK
    deadline_us: int = 0
    agent_static: bool = True
    named: bool = False
    duplicate: bool = False  # another rule of the profile has the same name

    @property
    def shown(self) -> str:
        """How messages name it: the quoted name, with its position when the name repeats."""
        return f"{self.label!r} (#{self.index + 1})" if self.duplicate else repr(self.label)

    def merged(self) -> list[FunctionRange]:
        return merge_ranges(self.ranges)


def fmt_ranges(ranges: Iterable[FunctionRange]) -> str:
    return ", ".join(str(r) for r in ranges)


def shown(drafts: Iterable[Draft]) -> str:
    return ", ".join(d.shown for d in drafts)


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def show_value(value: object) -> str:
    """A YAML value in a message: integers in hex, as function IDs are written."""
    return hex(value) if is_int(value) else repr(value)
