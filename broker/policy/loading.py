"""Loading a policy: YAML text and the installed handler classes in, a checked Policy out.

The YAML is composed within the bounds of broker.policy.bounds (size, rules, nesting, alias
expansion), then read safely and strictly (a duplicate key is an error, PyYAML would keep the last),
then walked key by key: handler instances (each plugin validates its own config), profiles,
rules, their selectors (`abi:` names the installed handlers declare, `ranges:`, `functions:`),
actions, deadlines and fallbacks. Each range is checked as kvm_smccc_set_filter() checks a
record (Linux arch/arm64/kvm/hypercalls.c: EINVAL for an empty, wrapping or out-of-space
range). Every error is collected, with the errno KVM would answer where there is one, and
PolicyInvalid carries them all. Pure: text in, values out; no files, sockets or streams.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import yaml

from hyperbroker.broker.policy import bounds
from hyperbroker.broker.policy.abis import AbiCatalog
from hyperbroker.broker.policy.checks import ProfileChecks
from hyperbroker.broker.policy.compiling import compile_profile
from hyperbroker.broker.policy.model import (
    BUILTIN_FALLBACK,
    DEADLINE_MS_RANGE,
    DEFAULT_DEADLINE_MS,
    DEFAULT_PROFILE,
    FORMAT_VERSION,
    FORWARD_ONLY,
    HANDLER_KEYS,
    NOT_SUPPORTED_FALLBACK,
    PROFILE_KEYS,
    RANGE_KEYS,
    RULE_KEYS,
    TOP_KEYS,
    U32_MAX,
    Action,
    Draft,
    Policy,
    PolicyError,
    PolicyInvalid,
    Profile,
    is_int,
    show_value,
)
from hyperbroker.calls import Outcome, Result
from hyperbroker.handlers.api import Handler, HandlerConfigError
from hyperbroker.smccc import NR_ARGS, FunctionRange, merge_ranges, parse_function


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
        node = bounds.compose(text)  # within every bound of broker.policy.bounds, or refused
        document = None if node is None else _StrictLoader("").construct_document(node)
    except bounds.DocumentTooLarge as exc:
        raise PolicyInvalid([PolicyError(f"policy: refused: {exc}", "", ())]) from None
    except (yaml.YAMLError, RecursionError) as exc:
        reason = bounds.clip(str(exc))
        raise PolicyInvalid([PolicyError(f"policy: not valid YAML: {reason}", "", ())]) from None
    return _Loader(plugins).load(text, document)


class _Loader(ProfileChecks):
    def __init__(self, plugins: Mapping[str, type[Handler]]) -> None:
        self.plugins = plugins
        self.errors: list[PolicyError] = []
        self.handlers: dict[str, Handler] = {}
        self.owned: dict[str, list[FunctionRange]] = {}  # D of each loaded handler, merged
        self.declared: set[str] = set()  # every instance name, loaded or not
        # The optional discovery protocol, asked once per instance (None: it does not say).
        self.served: dict[str, frozenset[int] | None] = {}
        self.claims: dict[str, Mapping[int, frozenset[int]]] = {}
        self.abis = AbiCatalog.from_plugins(plugins)
        self.names: Mapping[int, str] = self.abis.names

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
        self.check_keys("policy", document, TOP_KEYS)
        if "version" in document:
            version = document["version"]
            if not is_int(version) or version != FORMAT_VERSION:
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
            raise PolicyInvalid(bounds.first_errors(self.errors))
        return Policy(
            text=text,
            digest=hashlib.sha256(text.encode()).hexdigest(),
            handlers=MappingProxyType(dict(self.handlers)),
            profiles=MappingProxyType(profiles),
            names=MappingProxyType(dict(self.names)),
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
        self.check_keys(where, body, HANDLER_KEYS)
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
        if not is_int(value) or not low <= value <= high:
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
        self.check_keys(where, body, PROFILE_KEYS)
        default_us = self.deadline_us(
            where, "default_deadline_ms", body.get("default_deadline_ms"),
            DEFAULT_DEADLINE_MS * 1000,
        )
        raw_rules = body.get("rules")
        raw_rules = [] if raw_rules is None else raw_rules
        if not isinstance(raw_rules, list):
            self.error(f"{where}: rules must be a list of rules")
            raw_rules = []
        names: Counter[str] = Counter(r["name"] for r in raw_rules
                                      if isinstance(r, dict) and isinstance(r.get("name"), str))
        repeated = {n for n, times in names.items() if times > 1}
        drafts = [self.load_rule(name, i, raw, default_us, repeated)
                  for i, raw in enumerate(raw_rules)]
        self.check_names(name, drafts)
        self.check_overlaps(name, drafts)
        self.check_ownership(name, drafts)
        if len(self.errors) > errors_before:
            return None
        profile = compile_profile(name, drafts, default_us)
        discovery = self.check_discovery(profile)
        if len(self.errors) > errors_before:
            return None
        return dataclasses.replace(profile, discovery=discovery)

    def load_rule(self, profile: str, index: int, raw: object, default_us: int,
                  repeated: set[str]) -> Draft:
        draft = Draft(index=index, label=f"#{index + 1}", deadline_us=default_us)
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
        self.check_keys(where, raw, RULE_KEYS)
        selected = self.load_selectors(where, draft, raw)
        if not any(k in raw for k in ("abi", "ranges", "functions")):
            self.error(f"{where}: selects no function IDs; give abi:, ranges: or functions:", "",
                       (draft.label,))
        elif not selected:
            self.error(f"{where}: its abi:/ranges:/functions: lists are empty", "",
                       (draft.label,))
        self.load_action(where, draft, raw)
        return draft

    def load_selectors(self, where: str, draft: Draft, raw: Mapping[str, Any]) -> int:
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
                found = (self.abis.lookup(abi) if isinstance(abi, str)
                         else f"ABI {abi!r} must be a name")
                if isinstance(found, str):
                    self.error(f"{where}: {found}", "", rules)
                else:
                    draft.ranges.extend(found)
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
                shown = f"{{base: {show_value(base)}, count: {show_value(nr)}}}"
                self.check_keys(f"{where}, range {shown}", entry, RANGE_KEYS)
                if not (is_int(base) and is_int(nr)):
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
                if is_int(fid):
                    self.add_range(where, draft, FunctionRange(fid, 1))
                elif isinstance(fid, str):
                    try:
                        value = parse_function(fid, self.names)
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

    def add_range(self, where: str, draft: Draft, r: FunctionRange) -> None:
        """Keep `r` if KVM would take it as a record; else say what KVM answers."""
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

    def load_action(self, where: str, draft: Draft, raw: Mapping[str, Any]) -> None:
        rules = (draft.label,)
        value = raw.get("action")
        try:
            draft.action = Action(value)
        except ValueError:
            choices = ", ".join(a.value for a in Action)
            self.error(f"{where}: action {value!r} must be one of {choices}", "", rules)
            return
        if draft.action is not Action.FORWARD:
            for key in ("handler", *FORWARD_ONLY):
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

    def load_fallback(self, where: str, draft: Draft, value: object) -> Result:
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
                n = register_index(key)
                if n is None:
                    self.error(f"{where}: fallback register {key!r} must be x0..x{NR_ARGS - 1}",
                               "", rules)
                elif not is_int(reg) or not -(1 << 63) <= reg < (1 << 64):
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


def register_index(key: object) -> int | None:
    if isinstance(key, str) and key[:1] == "x" and key[1:].isdigit():
        n = int(key[1:])
        if n < NR_ARGS:
            return n
    return None
