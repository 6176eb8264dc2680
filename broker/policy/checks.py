"""The checks KVM cannot make: names, overlaps, whole ABIs, and discovery that never lies.

Overlaps are refused as KVM's maple tree refuses them (EEXIST, the reserved Arm-architecture
ranges included: Linux arch/arm64/kvm/hypercalls.c kvm_smccc_filter_insert_reserved). The rest
is ours: a handler owns its ABI ranges whole (the kernel or one handler serves an ABI, never
both), and every ID a forwarded discovery call claims (FEATURES, UIDs, bitmaps) is served in the
profile (docs/policy.md "Discovery that never lies"). `ProfileChecks` is mixed into the loader,
whose error list and loaded handlers it uses; every refusal names the rules and the ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TypeVar

from hyperbroker.broker.policy.bounds import clip
from hyperbroker.broker.policy.model import (
    KERNEL,
    KERNEL_SERVED,
    Action,
    DiscoveryClaim,
    Draft,
    PolicyError,
    Profile,
    fmt_ranges,
    function_name_of,
    is_int,
    shown,
)
from hyperbroker.handlers.api import Handler
from hyperbroker.smccc import RESERVED_ARCH_RANGES, FunctionRange, merge_ranges, subtract_ranges

_T = TypeVar("_T")


def id_set(value: object) -> frozenset[int] | None:
    """A set of function IDs (any collection of integers), or None."""
    if isinstance(value, AbstractSet | Sequence) and not isinstance(value, str | bytes):
        items = list(value)
        if all(is_int(v) for v in items):
            return frozenset(items)
    return None


def claim_map(value: object) -> dict[int, frozenset[int]] | None:
    """discovery_claims()'s answer: discovery function ID -> the IDs it claims, or None."""
    if not isinstance(value, Mapping):
        return None
    out: dict[int, frozenset[int]] = {}
    for call, claimed in value.items():
        ids = id_set(claimed)
        if not is_int(call) or ids is None:
            return None
        out[call] = ids
    return out


def intersect(r: FunctionRange, parts: Iterable[FunctionRange]) -> list[FunctionRange]:
    out = []
    for p in merge_ranges(parts):
        lo, hi = max(r.base, p.base), min(r.end, p.end)
        if lo < hi:
            out.append(FunctionRange(lo, hi - lo))
    return out


class ProfileChecks:
    """The checks of one profile's drafts, reporting into the loader's error list."""

    errors: list[PolicyError]
    handlers: dict[str, Handler]
    owned: dict[str, list[FunctionRange]]
    served: dict[str, frozenset[int] | None]
    claims: dict[str, Mapping[int, frozenset[int]]]
    names: Mapping[int, str]

    def error(self, message: str, errno_name: str = "", rules: Iterable[str] = ()) -> None:
        self.errors.append(PolicyError(clip(message), errno_name, tuple(rules)))

    def check_names(self, profile: str, drafts: list[Draft]) -> None:
        first: dict[str, Draft] = {}
        for d in drafts:
            if not d.named:
                continue
            seen = first.setdefault(d.label, d)
            if seen is not d:
                self.error(f"profile {profile!r}: two rules are named {d.label!r} (rules "
                           f"#{seen.index + 1} and #{d.index + 1}); rule names are unique in a "
                           "profile", "", (d.label,))

    def check_overlaps(self, profile: str, drafts: list[Draft]) -> None:
        """EEXIST, as KVM's maple tree answers: any two ranges, or one and a reserved range."""
        items = sorted((r.base, r.end, d.index, r) for d in drafts for r in d.ranges)
        active: list[tuple[FunctionRange, Draft]] = []
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

    def check_ownership(self, profile: str, drafts: list[Draft]) -> None:
        """A handler owns its ABI ranges whole: the kernel or the handler serves them, not both."""
        where = f"profile {profile!r}"
        forwarded: dict[str, list[Draft]] = {}
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
                            f"which does not serve it ({fmt_ranges(outside)} outside its ranges "
                            f"{fmt_ranges(owned)})", "", (d.label,))
            covered = merge_ranges(r for d in fwd for r in d.ranges)
            missing = [p for o in owned for p in subtract_ranges(o, covered)]
            if missing:
                served = [p for o in owned for p in intersect(o, covered)]
                touching = [d for d in fwd if any(intersect(o, d.ranges) for o in owned)]
                touching = touching or fwd
                self.error(
                    f"{where}: ABI of handler {handler!r} split: {fmt_ranges(served) or 'nothing'} "
                    f"forwarded by rule(s) {shown(touching)}, {fmt_ranges(missing)} not; a handler "
                    f"owns its ranges whole, forward all of {fmt_ranges(owned)} to it or none", "",
                    [d.label for d in touching])
            for other in drafts:
                if other.action is None or any(other is d for d in fwd):
                    continue
                if other.action is Action.FORWARD and other.handler not in self.owned:
                    continue  # its forward to an unknown or broken handler is reported already
                hit = [p for o in owned for p in intersect(o, other.ranges)]
                if hit:
                    what = other.action.value
                    if other.action is Action.FORWARD:
                        what += f" to {other.handler!r}"
                    self.error(
                        f"{where}: rule {other.shown} ({what}) covers {fmt_ranges(hit)} of the ABI "
                        f"of handler {handler!r} ({fmt_ranges(owned)}), which rule(s) {shown(fwd)} "
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
            self.served[name] = self.ask(name, "served_functions", id_set,
                                         "a set of function IDs")
        return self.served[name]

    def discovery_claims(self, name: str) -> Mapping[int, frozenset[int]]:
        if name not in self.claims:
            self.claims[name] = self.ask(
                name, "discovery_claims", claim_map,
                "a mapping of discovery function ID to a set of function IDs") or {}
        return self.claims[name]

    def function_name(self, fid: int, *prefer: str) -> str:
        """`fid`'s name, asking the instances `prefer` first (two may own one range)."""
        first = [self.handlers[n] for n in prefer if n in self.handlers]
        return function_name_of([*first, *self.handlers.values()], fid, self.names)

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
