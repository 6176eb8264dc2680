"""The policy engine: YAML policy text in, validated profiles and their compiled forms out.

A policy names handler instances and profiles of rules; a VM registers with one profile, whose
rules become that VM's KVM SMCCC filter records (DENY and FWD_TO_USER), the broker's dispatch
table and the agent's deadlines, fallbacks and static answers (DESIGN.md "Policy"). Validation
mirrors kvm_smccc_set_filter() exactly (reference/kvm-smccc.md §1.2, §1.3, §9) and adds the rules
KVM cannot see: a handler owns its ABI ranges whole, every forward has a handler that serves
it, and every discovery answer of a forwarded handler claims only functions the profile serves
(docs/policy.md "Discovery that never lies"). All errors are collected, each naming the profile,
the rules, the ranges and the errno KVM would answer. It is pure: text and plugin classes in,
values out; it knows nothing of files, sockets, gRPC streams or how a VMM installs the records.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeGuard, TypeVar

import yaml

from hyperbroker.broker.kernel_filter import KernelFilterModel, errno_name
from hyperbroker.calls import Outcome, Result
from hyperbroker.handlers.api import Handler, HandlerConfigError
from hyperbroker.kvm import FilterAction, SmcccFilter
from hyperbroker.smccc import (
    KNOWN_FUNCTIONS,
    NAMED_ABIS,
    NOT_SUPPORTED_U64,
    NR_ARGS,
    RESERVED_ARCH_RANGES,
    FunctionRange,
    default_function_name,
    merge_ranges,
    parse_function,
    subtract_ranges,
)
from hyperbroker.wire.v1 import broker_pb2

FORMAT_VERSION = 1  # the only `version:` this engine reads
DEFAULT_PROFILE = "default"  # the profile of a VM whose VMM names none
DEFAULT_DEADLINE_MS = 100
DEADLINE_MS_RANGE = (1, 60_000)  # no vCPU waits longer than a minute for its fallback
BUILTIN_FALLBACK = "not_supported"
U32_MAX = 0xFFFF_FFFF  # struct kvm_smccc_filter base and nr_functions are __u32 (§1.1)

# SMCCC_RET_NOT_SUPPORTED in x0, x1..x3 zero: what KVM itself answers a DENY (§1.3).
NOT_SUPPORTED_FALLBACK = Result.regs(NOT_SUPPORTED_U64, outcome=Outcome.FALLBACK)

# IDs examined when listing a forwarded range's named functions; larger ranges list only
# KNOWN_FUNCTIONS and the handler's static answers (a plugin may own millions of IDs).
NAME_SCAN_LIMIT = 1 << 20

_KNOWN_NAMES: Mapping[int, str] = {fid: name for name, fid in KNOWN_FUNCTIONS.items()}

# SMCCC_VERSION and SMCCC_ARCH_FEATURES: inside the Arm-architecture range KVM keeps in every
# filter (reference/kvm-smccc.md §1.3, §4.3), so the kernel serves them in every profile and a
# handler may claim them (Linux asks PSCI_FEATURES(SMCCC_VERSION) before it uses SMCCC 1.1).
KERNEL_SERVED = frozenset(KNOWN_FUNCTIONS[n] for n in ("SMCCC_VERSION", "SMCCC_ARCH_FEATURES"))
KERNEL = "kernel"  # DiscoveryClaim.served_by for KERNEL_SERVED IDs


class Action(enum.Enum):
    FORWARD = "forward"  # KVM_SMCCC_FILTER_FWD_TO_USER: the broker's handler answers
    DENY = "deny"  # KVM_SMCCC_FILTER_DENY: the kernel answers SMCCC NOT_SUPPORTED
    HANDLE = "handle"  # no record: KVM's default, the kernel serves it


_FILTER_ACTION = {Action.DENY: FilterAction.DENY, Action.FORWARD: FilterAction.FWD_TO_USER}
_FILTER_ACTION_JSON = {FilterAction.DENY: "deny", FilterAction.FWD_TO_USER: "fwd_to_user"}
_FILTER_ACTION_PROTO = {
    FilterAction.DENY: broker_pb2.FILTER_ACTION_DENY,
    FilterAction.FWD_TO_USER: broker_pb2.FILTER_ACTION_FWD_TO_USER,
}


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

    def function_name(self, fid: int) -> str:
        """A bounded label: its owner handler's name, a KNOWN_FUNCTIONS name, or its class."""
        return _function_name(self.handlers.values(), fid)

    def named_functions(self, r: FunctionRange, handler: str | None = None) -> dict[int, str]:
        """The IDs in `r` that have a specific name (not a class label), by ID.

        `handler`'s own names win; then KNOWN_FUNCTIONS. Ranges above NAME_SCAN_LIMIT IDs are not
        walked: only KNOWN_FUNCTIONS and the handler's static answers are looked at there.
        """
        inst = self.handlers.get(handler) if handler else None
        if r.count <= NAME_SCAN_LIMIT:
            candidates: Iterable[int] = range(r.base, r.end)
        else:
            extra = inst.static_answers().keys() if inst else ()
            candidates = sorted({*_KNOWN_NAMES, *extra})
        out: dict[int, str] = {}
        for fid in candidates:
            if fid not in r:
                continue
            name = (_handler_name(inst, fid) if inst else None) or _KNOWN_NAMES.get(fid)
            if name:
                out[fid] = name
        return out


def _handler_name(handler: Handler, fid: int) -> str | None:
    """`handler`'s name for `fid`, asked only for IDs it owns."""
    if any(fid in r for r in handler.ranges):
        return handler.function_name(fid)
    return None


def _function_name(handlers: Iterable[Handler], fid: int) -> str:
    """The first of `handlers` to name `fid`, else its KNOWN_FUNCTIONS name, else its class."""
    for handler in handlers:
        name = _handler_name(handler, fid)
        if name:
            return name
    return _KNOWN_NAMES.get(fid) or default_function_name(fid)


# ---------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` keys may be overridden; that is what they are for
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:
            continue  # unhashable key: the constructor below reports it
        if first is not key_node:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_policy(text: str, plugins: Mapping[str, type[Handler]]) -> Policy:
    """Parse, validate and compile `text`; `plugins` are the installed handler classes by name.

    Raises PolicyInvalid with every error found.
    """
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyInvalid([PolicyError(f"policy: not valid YAML: {exc}", "", ())]) from None
    return _Loader(plugins).load(text, document)


@dataclass
class _Draft:
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


_TOP_KEYS = ("version", "handlers", "profiles")
_HANDLER_KEYS = ("plugin", "config")
_PROFILE_KEYS = ("default_deadline_ms", "rules")
_RULE_KEYS = (
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
_RANGE_KEYS = ("base", "count")
_FORWARD_ONLY = ("fallback", "deadline_ms", "agent_static")


def _fmt(ranges: Iterable[FunctionRange]) -> str:
    return ", ".join(str(r) for r in ranges)


def _shown(drafts: Iterable[_Draft]) -> str:
    return ", ".join(d.shown for d in drafts)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _value(value: object) -> str:
    """A YAML value in a message: integers in hex, as function IDs are written."""
    return hex(value) if _is_int(value) else repr(value)


class _Loader:
    def __init__(self, plugins: Mapping[str, type[Handler]]) -> None:
        self.plugins = plugins
        self.errors: list[PolicyError] = []
        self.handlers: dict[str, Handler] = {}
        self.owned: dict[str, list[FunctionRange]] = {}  # D of each loaded handler, merged
        self.declared: set[str] = set()  # every instance name, loaded or not
        # The optional discovery protocol, asked once per instance (None: it does not say).
        self.served: dict[str, frozenset[int] | None] = {}
        self.claims: dict[str, Mapping[int, frozenset[int]]] = {}

    def error(self, message: str, errno_name: str = "", rules: Iterable[str] = ()) -> None:
        self.errors.append(PolicyError(message, errno_name, tuple(rules)))

    def check_keys(self, where: str, body: Mapping[Any, Any], allowed: Sequence[str]) -> None:
        for key in body:
            if key in allowed:
                continue
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            maybe = f"; did you mean {hint[0]!r}?" if hint else ""
            self.error(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)}){maybe}")

    # -- the document ------------------------------------------------------------------------

    def load(self, text: str, document: object) -> Policy:
        if not isinstance(document, dict):
            kind = "empty" if document is None else f"a {type(document).__name__}"
            raise PolicyInvalid(
                [PolicyError(f"policy: the document is {kind}; it must be a mapping with "
                             "profiles: (and usually handlers:)", "", ())]
            )
        self.check_keys("policy", document, _TOP_KEYS)
        if "version" in document:
            version = document["version"]
            if not _is_int(version) or version != FORMAT_VERSION:
                self.error(f"policy: version {version!r} is not supported; this engine reads "
                           f"version {FORMAT_VERSION}")
        self.load_handlers(document.get("handlers"))
        profiles: dict[str, Profile] = {}
        raw_profiles = document.get("profiles")
        if not isinstance(raw_profiles, dict) or not raw_profiles:
            self.error("policy: profiles: must map at least one profile name to its rules "
                       f"(a VM whose VMM names none gets {DEFAULT_PROFILE!r})")
        else:
            for name, body in raw_profiles.items():
                profile = self.load_profile(name, body)
                if profile is not None:
                    profiles[name] = profile
        if self.errors:
            raise PolicyInvalid(self.errors)
        return Policy(
            text=text,
            digest=hashlib.sha256(text.encode()).hexdigest(),
            handlers=MappingProxyType(dict(self.handlers)),
            profiles=MappingProxyType(profiles),
        )

    # -- handlers ----------------------------------------------------------------------------

    def load_handlers(self, raw: object) -> None:
        if raw is None:
            return
        if not isinstance(raw, dict):
            self.error("policy: handlers: must map instance names to {plugin, config}")
            return
        for name, body in raw.items():
            if not isinstance(name, str) or not name.strip():
                self.error(f"policy: handler instance name {name!r} must be a non-empty string")
                continue
            self.declared.add(name)
            self.load_handler(name, {} if body is None else body)

    def load_handler(self, name: str, body: object) -> None:
        where = f"handler {name!r}"
        if not isinstance(body, dict):
            self.error(f"{where}: must be a mapping with plugin: and config:")
            return
        self.check_keys(where, body, _HANDLER_KEYS)
        plugin = body.get("plugin", name)
        config = body.get("config")
        config = {} if config is None else config
        if not isinstance(plugin, str):
            self.error(f"{where}: plugin must be a plugin name, not {plugin!r}")
            return
        if not isinstance(config, dict):
            self.error(f"{where}: config must be a mapping, not {type(config).__name__}")
            return
        cls = self.plugins.get(plugin)
        if cls is None:
            installed = ", ".join(sorted(self.plugins)) or "none"
            self.error(f"{where}: plugin {plugin!r} is not installed (entry-point group "
                       f"hyperbroker.handlers; installed: {installed})")
            return
        try:
            handler = cls(config)
            owned = list(handler.ranges)
        except HandlerConfigError as exc:
            self.error(f"{where}: plugin {plugin!r} refused its config: {exc}")
            return
        except Exception as exc:  # a third-party constructor: report it, do not crash the check
            self.error(f"{where}: plugin {plugin!r} failed to start: {type(exc).__name__}: {exc}")
            return
        bad = [r for r in owned if not (isinstance(r, FunctionRange) and r.is_valid())]
        if bad:
            self.error(f"{where}: plugin {plugin!r} declares invalid ranges {bad}")
            return
        self.handlers[name] = handler
        self.owned[name] = merge_ranges(owned)

    # -- profiles ----------------------------------------------------------------------------

    def deadline_us(self, where: str, key: str, value: object, default_us: int) -> int:
        if value is None:
            return default_us
        low, high = DEADLINE_MS_RANGE
        if not _is_int(value) or not low <= value <= high:
            self.error(f"{where}: {key} {value!r} must be an integer from {low} to {high} (ms)")
            return default_us
        return value * 1000

    def load_profile(self, name: object, body: object) -> Profile | None:
        if not isinstance(name, str) or not name.strip():
            self.error(f"policy: profile name {name!r} must be a non-empty string")
            return None
        where = f"profile {name!r}"
        body = {} if body is None else body
        if not isinstance(body, dict):
            self.error(f"{where}: must be a mapping with rules: (and default_deadline_ms:)")
            return None
        errors_before = len(self.errors)
        self.check_keys(where, body, _PROFILE_KEYS)
        default_us = self.deadline_us(
            where, "default_deadline_ms", body.get("default_deadline_ms"),
            DEFAULT_DEADLINE_MS * 1000,
        )
        raw_rules = body.get("rules")
        raw_rules = [] if raw_rules is None else raw_rules
        if not isinstance(raw_rules, list):
            self.error(f"{where}: rules must be a list of rules")
            raw_rules = []
        names = [r.get("name") for r in raw_rules if isinstance(r, dict)]
        repeated = {n for n in names if isinstance(n, str) and names.count(n) > 1}
        drafts = [self.load_rule(name, i, raw, default_us, repeated)
                  for i, raw in enumerate(raw_rules)]
        self.check_names(name, drafts)
        self.check_overlaps(name, drafts)
        self.check_ownership(name, drafts)
        if len(self.errors) > errors_before:
            return None
        profile = _compile_profile(name, drafts, default_us)
        discovery = self.check_discovery(profile)
        if len(self.errors) > errors_before:
            return None
        return dataclasses.replace(profile, discovery=discovery)

    def check_names(self, profile: str, drafts: list[_Draft]) -> None:
        first: dict[str, _Draft] = {}
        for d in drafts:
            if not d.named:
                continue
            seen = first.setdefault(d.label, d)
            if seen is not d:
                self.error(f"profile {profile!r}: two rules are named {d.label!r} (rules "
                           f"#{seen.index + 1} and #{d.index + 1}); rule names are unique in a "
                           "profile", "", (d.label,))

    def check_overlaps(self, profile: str, drafts: list[_Draft]) -> None:
        """EEXIST, as KVM's maple tree answers: any two ranges, or one and a reserved range."""
        items = sorted((r.base, r.end, d.index, r) for d in drafts for r in d.ranges)
        active: list[tuple[FunctionRange, _Draft]] = []
        for _, _, index, r in items:
            d = drafts[index]
            active = [(a, ad) for a, ad in active if a.end > r.base]
            for a, ad in active:
                if ad is d:
                    self.error(f"profile {profile!r}, rule {d.shown}: {a} overlaps {r} of "
                               "the same rule", "EEXIST", (d.label,))
                else:
                    one, two = sorted(((a, ad), (r, d)), key=lambda x: x[1].index)
                    self.error(f"profile {profile!r}: rule {one[1].shown} {one[0]} overlaps "
                               f"rule {two[1].shown} {two[0]}", "EEXIST",
                               (one[1].label, two[1].label))
            active.append((r, d))
            for reserved in RESERVED_ARCH_RANGES:
                if r.overlaps(reserved):
                    self.error(
                        f"profile {profile!r}, rule {d.shown}: {r} overlaps {reserved}, "
                        "which the kernel keeps for the Arm architecture calls (SMCCC_VERSION, "
                        "SMCCC_ARCH_FEATURES, the Spectre workarounds) so that mitigation "
                        "status is never misrepresented; no rule may name it, whatever its action",
                        "EEXIST", (d.label,),
                    )

    def check_ownership(self, profile: str, drafts: list[_Draft]) -> None:
        """A handler owns its ABI ranges whole: the kernel or the handler serves them, not both."""
        where = f"profile {profile!r}"
        forwarded: dict[str, list[_Draft]] = {}
        for d in drafts:
            if d.action is Action.FORWARD and d.handler in self.owned:
                forwarded.setdefault(d.handler, []).append(d)
        for handler, fwd in forwarded.items():
            owned = self.owned[handler]
            for d in fwd:
                for r in d.merged():
                    outside = list(subtract_ranges(r, owned))
                    if outside:
                        self.error(
                            f"{where}: rule {d.shown} forwards {r} to handler {handler!r}, "
                            f"which does not serve it ({_fmt(outside)} outside its ranges "
                            f"{_fmt(owned)})", "", (d.label,))
            covered = merge_ranges(r for d in fwd for r in d.ranges)
            missing = [p for o in owned for p in subtract_ranges(o, covered)]
            if missing:
                served = [p for o in owned for p in _intersect(o, covered)]
                touching = [d for d in fwd if any(_intersect(o, d.ranges) for o in owned)]
                touching = touching or fwd
                self.error(
                    f"{where}: ABI of handler {handler!r} split: {_fmt(served) or 'nothing'} "
                    f"forwarded by rule(s) {_shown(touching)}, {_fmt(missing)} not; a handler "
                    f"owns its ranges whole, forward all of {_fmt(owned)} to it or none", "",
                    [d.label for d in touching])
            for other in drafts:
                if other.action is None or any(other is d for d in fwd):
                    continue
                if other.action is Action.FORWARD and other.handler not in self.owned:
                    continue  # its forward to an unknown or broken handler is reported already
                hit = [p for o in owned for p in _intersect(o, other.ranges)]
                if hit:
                    what = other.action.value
                    if other.action is Action.FORWARD:
                        what += f" to {other.handler!r}"
                    self.error(
                        f"{where}: rule {other.shown} ({what}) covers {_fmt(hit)} of the ABI "
                        f"of handler {handler!r} ({_fmt(owned)}), which rule(s) {_shown(fwd)} "
                        "forward to it; an ABI is served by the kernel or by its handler, never "
                        "both", "", [other.label, *(d.label for d in fwd)])

    # -- discovery ---------------------------------------------------------------------------

    def ask(self, name: str, method: str, parse: Callable[[object], _T | None],
            shape: str) -> _T | None:
        """Handler `name`'s answer to an optional protocol method; None when it has none, did
        not load (reported already), or fails or answers something `parse` refuses (reported
        as not `shape`)."""
        fn = getattr(self.handlers.get(name), method, None)
        if fn is None:
            return None
        try:
            value = parse(fn())
        except Exception as exc:  # a third-party handler: report it, do not crash the check
            self.error(f"handler {name!r}: {method}() failed: {type(exc).__name__}: {exc}")
            return None
        if value is None:
            self.error(f"handler {name!r}: {method}() must return {shape}")
        return value

    def served_functions(self, name: str) -> frozenset[int] | None:
        if name not in self.served:
            self.served[name] = self.ask(name, "served_functions", _id_set,
                                         "a set of function IDs")
        return self.served[name]

    def discovery_claims(self, name: str) -> Mapping[int, frozenset[int]]:
        if name not in self.claims:
            self.claims[name] = self.ask(
                name, "discovery_claims", _claim_map,
                "a mapping of discovery function ID to a set of function IDs") or {}
        return self.claims[name]

    def function_name(self, fid: int, *prefer: str) -> str:
        """`fid`'s name, asking the instances `prefer` first (two may own one range)."""
        first = [self.handlers[n] for n in prefer if n in self.handlers]
        return _function_name([*first, *self.handlers.values()], fid)

    def check_discovery(self, profile: Profile) -> tuple[DiscoveryClaim, ...]:
        """Discovery never lies: every ID a forwarded discovery call claims is served.

        For each handler the profile forwards to, each of its discovery_claims() whose discovery
        call the profile forwards to it: every claimed ID must be KERNEL_SERVED or forwarded to
        a handler whose served_functions() holds it (a handler that does not say is trusted).
        Returns the proof, one DiscoveryClaim per discovery call; errors name what is missing.
        """
        where = f"profile {profile.name!r}"
        proven: list[DiscoveryClaim] = []
        for name in dict.fromkeys(e.handler for e in profile.dispatch):
            for call, claimed in sorted(self.discovery_claims(name).items()):
                asked = profile.lookup(call)
                if asked is None or asked.handler != name:
                    continue  # the guest never hears this answer from `name` in this profile
                served_by: list[tuple[int, str]] = []
                for fid in sorted(claimed):
                    server, reason, rules = self.server(profile, fid)
                    if server is not None:
                        served_by.append((fid, server))
                        continue
                    self.error(
                        f"{where}: handler {name!r} claims through "
                        f"{self.function_name(call, name)} ({call:#010x}) that "
                        f"{self.function_name(fid, name)} ({fid:#010x}) is served, but "
                        f"{reason}; a discovery call may claim only what the profile forwards "
                        "to a handler that serves it", "", (asked.rule.name, *rules))
                proven.append(DiscoveryClaim(name, call, tuple(served_by)))
        return tuple(proven)

    def server(self, profile: Profile, fid: int) -> tuple[str | None, str, tuple[str, ...]]:
        """Who serves `fid` in `profile`: (handler instance or KERNEL, "", ()), or (None, why
        not, the rules involved)."""
        if fid in KERNEL_SERVED:
            return KERNEL, "", ()
        entry = profile.lookup(fid)
        if entry is not None:
            served = self.served_functions(entry.handler)
            if served is None or fid in served:
                return entry.handler, "", ()
            return (None, f"rule {entry.rule.name!r} forwards it to handler {entry.handler!r}, "
                    "whose served_functions() does not hold it", (entry.rule.name,))
        rule = next((r for r in profile.rules if any(fid in x for x in r.ranges)), None)
        if rule is None:
            return None, "no rule forwards it: the kernel answers it, as without a filter", ()
        if rule.action is Action.DENY:
            return None, f"rule {rule.name!r} denies it (the kernel answers NOT_SUPPORTED)", (
                rule.name,)
        return None, (f"rule {rule.name!r} leaves it to the kernel (handle), whose answer "
                      "depends on the VMM's firmware registers"), (rule.name,)

    # -- rules -------------------------------------------------------------------------------

    def load_rule(self, profile: str, index: int, raw: object, default_us: int,
                  repeated: set[str]) -> _Draft:
        draft = _Draft(index=index, label=f"#{index + 1}", deadline_us=default_us)
        if not isinstance(raw, dict):
            self.error(f"profile {profile!r}, rule #{index + 1}: must be a mapping with name:, "
                       "a selector (abi/ranges/functions) and action:")
            return draft
        name = raw.get("name")
        if isinstance(name, str) and name.strip():
            draft.label, draft.named, draft.duplicate = name, True, name in repeated
        where = f"profile {profile!r}, rule {draft.shown}"
        if not draft.named:
            self.error(f"{where}: name: is required, a non-empty string (got {name!r})", "",
                       (draft.label,))
        self.check_keys(where, raw, _RULE_KEYS)
        selected = self.load_selectors(where, draft, raw)
        if not any(k in raw for k in ("abi", "ranges", "functions")):
            self.error(f"{where}: selects no function IDs; give abi:, ranges: or functions:", "",
                       (draft.label,))
        elif not selected:
            self.error(f"{where}: its abi:/ranges:/functions: lists are empty", "",
                       (draft.label,))
        self.load_action(where, draft, raw)
        return draft

    def load_selectors(self, where: str, draft: _Draft, raw: Mapping[str, Any]) -> int:
        """Collect the rule's ranges; returns how many were written, valid or not."""
        count = 0
        rules = (draft.label,)
        if "abi" in raw:
            abis = raw["abi"]
            abis = [abis] if isinstance(abis, str) else abis
            if not isinstance(abis, list):
                self.error(f"{where}: abi must be an ABI name or a list of them", "", rules)
                abis = []
            for abi in abis:
                count += 1
                if isinstance(abi, str) and abi in NAMED_ABIS:
                    draft.ranges.extend(NAMED_ABIS[abi])
                else:
                    self.error(f"{where}: unknown ABI {abi!r} (known: {', '.join(NAMED_ABIS)})",
                               "", rules)
        if "ranges" in raw:
            entries = raw["ranges"]
            if not isinstance(entries, list):
                self.error(f"{where}: ranges must be a list of {{base, count}}", "", rules)
                entries = []
            for entry in entries:
                count += 1
                if not isinstance(entry, dict):
                    self.error(f"{where}: range {entry!r} must be a mapping {{base, count}}", "",
                               rules)
                    continue
                base, nr = entry.get("base"), entry.get("count")
                shown = f"{{base: {_value(base)}, count: {_value(nr)}}}"
                self.check_keys(f"{where}, range {shown}", entry, _RANGE_KEYS)
                if not (_is_int(base) and _is_int(nr)):
                    self.error(f"{where}: range {shown} needs integer base: and count: "
                               "(true/false are not integers)", "", rules)
                    continue
                self.add_range(where, draft, FunctionRange(base, nr))
        if "functions" in raw:
            fids = raw["functions"]
            if not isinstance(fids, list):
                self.error(f"{where}: functions must be a list of IDs or names", "", rules)
                fids = []
            for fid in fids:
                count += 1
                if _is_int(fid):
                    self.add_range(where, draft, FunctionRange(fid, 1))
                elif isinstance(fid, str):
                    try:
                        value = parse_function(fid)
                    except ValueError as exc:
                        try:  # an integer literal past 32 bits: add_range says EINVAL
                            value = int(fid.strip(), 0)
                        except ValueError:
                            self.error(f"{where}: {exc}", "", rules)
                            continue
                    self.add_range(where, draft, FunctionRange(value, 1))
                else:
                    self.error(f"{where}: function {fid!r} must be an ID or a known name", "",
                               rules)
        return count

    def add_range(self, where: str, draft: _Draft, r: FunctionRange) -> None:
        """Keep `r` if KVM would take it as a record; else say what KVM answers (§1.3 step 3)."""
        rules = (draft.label,)
        if not 0 <= r.base <= U32_MAX:
            self.error(f"{where}: {r}: base {r.base:#x} is outside the 32-bit function-ID space",
                       "EINVAL", rules)
        elif not 0 <= r.count <= U32_MAX:
            self.error(f"{where}: {r}: count {r.count:#x} does not fit nr_functions (u32)",
                       "EINVAL", rules)
        elif r.count == 0 and r.base == 0:
            # u32 end = 0 + 0 - 1 = 0xFFFFFFFF is not below base: KVM takes the whole space and
            # refuses it for touching its reserved ranges.
            self.error(f"{where}: {r} is empty; KVM reads base 0 with nr_functions 0 as the "
                       "whole space [0x00000000, 0xffffffff], which overlaps its reserved ranges",
                       "EEXIST", rules)
        elif r.count == 0:
            self.error(f"{where}: {r} is empty (count 0)", "EINVAL", rules)
        elif r.end > U32_MAX + 1:
            self.error(f"{where}: {r} wraps past 0xffffffff", "EINVAL", rules)
        else:
            draft.ranges.append(r)

    def load_action(self, where: str, draft: _Draft, raw: Mapping[str, Any]) -> None:
        rules = (draft.label,)
        value = raw.get("action")
        try:
            draft.action = Action(value)
        except ValueError:
            choices = ", ".join(a.value for a in Action)
            self.error(f"{where}: action {value!r} must be one of {choices}", "", rules)
            return
        if draft.action is not Action.FORWARD:
            for key in ("handler", *_FORWARD_ONLY):
                if key in raw:
                    self.error(f"{where}: {key} applies to forward rules only, not "
                               f"{draft.action.value}", "", rules)
            draft.agent_static = False
            return
        handler = raw.get("handler")
        if handler is None:
            self.error(f"{where}: a forward rule needs handler: (declared: "
                       f"{', '.join(sorted(self.declared)) or 'none'})", "", rules)
        elif not isinstance(handler, str) or handler not in self.declared:
            self.error(f"{where}: forwards to handler {handler!r}, which handlers: does not "
                       f"declare (declared: {', '.join(sorted(self.declared)) or 'none'})", "",
                       rules)
        else:
            draft.handler = handler
        draft.deadline_us = self.deadline_us(where, "deadline_ms", raw.get("deadline_ms"),
                                             draft.deadline_us)
        static = raw.get("agent_static", True)
        if isinstance(static, bool):
            draft.agent_static = static
        else:
            self.error(f"{where}: agent_static must be true or false, not {static!r}", "", rules)
        draft.fallback = self.load_fallback(where, draft, raw.get("fallback", BUILTIN_FALLBACK))

    def load_fallback(self, where: str, draft: _Draft, value: object) -> Result:
        rules = (draft.label,)
        if isinstance(value, str):
            handler = self.handlers.get(draft.handler) if draft.handler else None
            if handler is None:
                return NOT_SUPPORTED_FALLBACK  # the handler's own error is reported already
            named = handler.named_fallbacks()
            if value == BUILTIN_FALLBACK and value not in named:
                return NOT_SUPPORTED_FALLBACK  # SMCCC NOT_SUPPORTED, for ABIs without their own
            if value not in named:
                known = ", ".join([BUILTIN_FALLBACK, *sorted(named)])
                self.error(f"{where}: unknown fallback {value!r} for handler {draft.handler!r} "
                           f"(known: {known})", "", rules)
                return NOT_SUPPORTED_FALLBACK
            result = named[value]
            if result.actions or result.memory_writes:
                self.error(f"{where}: fallback {value!r} of handler {draft.handler!r} carries "
                           "VMM actions or memory writes; a fallback is registers only", "",
                           rules)
                return NOT_SUPPORTED_FALLBACK
            return dataclasses.replace(result, outcome=Outcome.FALLBACK)
        if isinstance(value, dict):
            regs: dict[int, int] = {}
            for key, reg in value.items():
                n = _register_index(key)
                if n is None:
                    self.error(f"{where}: fallback register {key!r} must be x0..x{NR_ARGS - 1}",
                               "", rules)
                elif not _is_int(reg) or not -(1 << 63) <= reg < (1 << 64):
                    self.error(f"{where}: fallback {key} = {reg!r} must be a 64-bit integer", "",
                               rules)
                else:
                    regs[n] = reg
            if not value:
                self.error(f"{where}: fallback registers are empty; give at least x0", "", rules)
            if not regs:
                return NOT_SUPPORTED_FALLBACK
            values = [regs.get(i, 0) for i in range(max(regs) + 1)]
            return Result.regs(*values, outcome=Outcome.FALLBACK)
        self.error(f"{where}: fallback must be {BUILTIN_FALLBACK!r}, a handler's named fallback "
                   f"or registers {{x0: ..}}, not {value!r}", "", rules)
        return NOT_SUPPORTED_FALLBACK


_T = TypeVar("_T")


def _id_set(value: object) -> frozenset[int] | None:
    """A set of function IDs (any collection of integers), or None."""
    if isinstance(value, AbstractSet | Sequence) and not isinstance(value, str | bytes):
        items = list(value)
        if all(_is_int(v) for v in items):
            return frozenset(items)
    return None


def _claim_map(value: object) -> dict[int, frozenset[int]] | None:
    """discovery_claims()'s answer: discovery function ID -> the IDs it claims, or None."""
    if not isinstance(value, Mapping):
        return None
    out: dict[int, frozenset[int]] = {}
    for call, claimed in value.items():
        ids = _id_set(claimed)
        if not _is_int(call) or ids is None:
            return None
        out[call] = ids
    return out


def _register_index(key: object) -> int | None:
    if isinstance(key, str) and key[:1] == "x" and key[1:].isdigit():
        n = int(key[1:])
        if n < NR_ARGS:
            return n
    return None


def _intersect(r: FunctionRange, parts: Iterable[FunctionRange]) -> list[FunctionRange]:
    out = []
    for p in merge_ranges(parts):
        lo, hi = max(r.base, p.base), min(r.end, p.end)
        if lo < hi:
            out.append(FunctionRange(lo, hi - lo))
    return out


def _compile_profile(name: str, drafts: Sequence[_Draft], default_us: int) -> Profile:
    rules: list[Rule] = []
    records: list[tuple[SmcccFilter, str]] = []
    dispatch: list[DispatchEntry] = []
    for d in drafts:
        assert d.action is not None  # a draft without an action was an error
        rule = Rule(
            name=d.label,
            ranges=tuple(d.merged()),
            action=d.action,
            handler=d.handler,
            fallback=d.fallback,
            deadline_us=d.deadline_us,
            agent_static=d.agent_static,
        )
        rules.append(rule)
        if rule.action in _FILTER_ACTION:
            action = _FILTER_ACTION[rule.action]
            records.extend((SmcccFilter(r.base, r.count, action), rule.name) for r in rule.ranges)
        if rule.action is Action.FORWARD:
            assert rule.handler is not None
            dispatch.extend(DispatchEntry(r, rule, rule.handler) for r in rule.ranges)
    records.sort(key=lambda rec: rec[0].base)
    dispatch.sort(key=lambda e: e.range.base)
    # One table, two sources: the records must be ones KVM accepts, in this order, on a fresh VM.
    model = KernelFilterModel()
    for record, rule_name in records:
        err = model.set_filter(record)
        if err:
            raise AssertionError(f"profile {name!r}, rule {rule_name!r}: compiled record "
                                 f"{record} refused by the kernel model: {errno_name(err)}")
    return Profile(name, tuple(rules), tuple(records), tuple(dispatch), default_us)


# ---------------------------------------------------------------------------------------------
# Compiled outputs


def static_answers(policy: Policy, profile: Profile) -> dict[int, Result]:
    """The calls the agent may answer itself in `profile`, by function ID.

    A handler's static answer counts where an agent_static forward rule to it covers the ID. An
    answer carrying VMM actions or memory writes is left to the broker: the agent sends only
    registers.
    """
    out: dict[int, Result] = {}
    for entry in profile.dispatch:
        if not entry.rule.agent_static:
            continue
        for fid, result in policy.handlers[entry.handler].static_answers().items():
            if fid in entry.range and not (result.actions or result.memory_writes):
                out[fid] = result
    return dict(sorted(out.items()))


def to_proto(policy: Policy, version: int) -> broker_pb2.CompiledPolicy:
    """What the agent needs: per profile, the filter records, per-range deadline and fallback,
    and static answers."""
    out = broker_pb2.CompiledPolicy(version=version, digest=policy.digest)
    for profile in policy.profiles.values():
        compiled = out.profiles.add(
            name=profile.name, default_deadline_us=profile.default_deadline_us
        )
        for record, rule in profile.kernel_filter:
            compiled.kernel_filter.add(
                base=record.base,
                nr_functions=record.nr_functions,
                action=_FILTER_ACTION_PROTO[FilterAction(record.action)],
                rule=rule,
            )
        for entry in profile.dispatch:
            compiled.rules.add(
                base=entry.range.base,
                nr_functions=entry.range.count,
                deadline_us=entry.rule.deadline_us,
                fallback=entry.rule.fallback.x,
                fallback_mask=entry.rule.fallback.mask,
                rule=entry.rule.name,
            )
        for fid, result in static_answers(policy, profile).items():
            compiled.static_answers.add(function_id=fid, x=result.x, mask=result.mask)
    return out


def discovery_name(policy: Policy, handler: str, fid: int) -> str:
    """`fid`'s name as `handler` (or, for KERNEL, the SMCCC tables) calls it: several handlers
    may own one range (hyperv and memshare both own vendor-hyp)."""
    first = [policy.handlers[handler]] if handler in policy.handlers else []
    return _function_name([*first, *policy.handlers.values()], fid)


def _range_json(r: FunctionRange) -> dict[str, int]:
    return {"base": r.base, "nr_functions": r.count}


def to_json(policy: Policy) -> dict[str, Any]:
    """The compiled policy as JSON-ready values (`hyperbroker policy check --json`)."""
    profiles: dict[str, Any] = {}
    for profile in policy.profiles.values():
        profiles[profile.name] = {
            "default_deadline_us": profile.default_deadline_us,
            "kernel_filter": [
                {
                    "base": record.base,
                    "nr_functions": record.nr_functions,
                    "action": _FILTER_ACTION_JSON[FilterAction(record.action)],
                    "rule": rule,
                }
                for record, rule in profile.kernel_filter
            ],
            "dispatch": [
                {
                    **_range_json(entry.range),
                    "handler": entry.handler,
                    "rule": entry.rule.name,
                    "deadline_us": entry.rule.deadline_us,
                    "fallback": list(entry.rule.fallback.x),
                    "fallback_mask": entry.rule.fallback.mask,
                    "agent_static": entry.rule.agent_static,
                    "functions": {
                        f"{fid:#010x}": name
                        for fid, name in policy.named_functions(entry.range, entry.handler).items()
                    },
                }
                for entry in profile.dispatch
            ],
            "static_answers": [
                {
                    "function_id": fid,
                    "name": policy.function_name(fid),
                    "x": list(result.x),
                    "mask": result.mask,
                }
                for fid, result in static_answers(policy, profile).items()
            ],
            "rules": [
                {
                    "name": rule.name,
                    "action": rule.action.value,
                    "handler": rule.handler,
                    "ranges": [_range_json(r) for r in rule.ranges],
                }
                for rule in profile.rules
            ],
            "discovery": [
                {
                    "handler": claim.handler,
                    "function_id": claim.call,
                    "name": discovery_name(policy, claim.handler, claim.call),
                    "claims": [
                        {
                            "function_id": fid,
                            "name": discovery_name(policy, server, fid),
                            "served_by": server,
                        }
                        for fid, server in claim.served_by
                    ],
                }
                for claim in profile.discovery
            ],
        }
    return {
        "digest": policy.digest,
        "handlers": {
            name: {
                "plugin": type(handler).plugin,
                "ranges": [_range_json(r) for r in merge_ranges(handler.ranges)],
            }
            for name, handler in policy.handlers.items()
        },
        "profiles": profiles,
    }
