"""Rendering a policy for people and tools: the compiled tables as JSON (`policy check --json`,
Admin ValidatePolicy), with every forwarded range's named functions and the discovery proofs."""

from __future__ import annotations

from typing import Any

from hyperbroker.broker.policy.compiling import FILTER_ACTION_JSON, static_answers
from hyperbroker.broker.policy.model import Policy, function_name_of
from hyperbroker.kvm import FilterAction
from hyperbroker.smccc import FunctionRange, merge_ranges


def discovery_name(policy: Policy, handler: str, fid: int) -> str:
    """`fid`'s name as `handler` (or, for KERNEL, the SMCCC tables) calls it: several handlers
    may own one range (hyperv and memshare both own vendor-hyp)."""
    first = [policy.handlers[handler]] if handler in policy.handlers else []
    return function_name_of([*first, *policy.handlers.values()], fid, policy.names)


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
                    "action": FILTER_ACTION_JSON[FilterAction(record.action)],
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
