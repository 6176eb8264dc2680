"""Compiling a profile: its rules become the VM's kernel filter, the broker's dispatch table
and what the agent answers alone.

The kernel filter is DENY and FWD_TO_USER records sorted by base (HANDLE is KVM's default: no
record); every compiled table is replayed through the model of kvm_smccc_set_filter()
(hyperbroker.broker.kernel_filter) so a record KVM would refuse can never reach a VMM. The
agent gets, per forwarded range, its deadline and fallback, and the handlers' static answers
where a rule allows them.
"""

from __future__ import annotations

from collections.abc import Sequence

from hyperbroker.broker.kernel_filter import KernelFilterModel
from hyperbroker.broker.policy.model import (
    Action,
    DispatchEntry,
    Draft,
    Policy,
    Profile,
    Rule,
)
from hyperbroker.calls import Result
from hyperbroker.kvm import FilterAction, SmcccFilter, errno_name
from hyperbroker.wire.v1 import broker_pb2

FILTER_ACTION = {Action.DENY: FilterAction.DENY, Action.FORWARD: FilterAction.FWD_TO_USER}
FILTER_ACTION_JSON = {FilterAction.DENY: "deny", FilterAction.FWD_TO_USER: "fwd_to_user"}
FILTER_ACTION_PROTO = {
    FilterAction.DENY: broker_pb2.FILTER_ACTION_DENY,
    FilterAction.FWD_TO_USER: broker_pb2.FILTER_ACTION_FWD_TO_USER,
}


def compile_profile(name: str, drafts: Sequence[Draft], default_us: int) -> Profile:
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
        if rule.action in FILTER_ACTION:
            action = FILTER_ACTION[rule.action]
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
                action=FILTER_ACTION_PROTO[FilterAction(record.action)],
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
