"""broker.policy: one test per rule of the policy format, its validation and what it compiles to.

Validation mirrors KVM's SMCCC filter (reference/kvm-smccc.md §1.2, §1.3, §9): the errno each
refusal carries is what KVM_SET_DEVICE_ATTR would answer for the same record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import yaml

from hyperbroker.broker.policy import (
    Action,
    Policy,
    PolicyError,
    PolicyInvalid,
    load_policy,
    static_answers,
    to_json,
    to_proto,
)
from hyperbroker.calls import NOT_SUPPORTED, Call, MemoryWrite, Outcome, Result, VmmAction
from hyperbroker.calls import ActionKind as VmmActionKind
from hyperbroker.handlers.api import Abi, CallContext, Handler, HandlerConfigError
from hyperbroker.handlers.ffa.handler import FfaHandler
from hyperbroker.handlers.psci import abi as psci_abi
from hyperbroker.handlers.trng import abi as trng_abi
from hyperbroker.kvm import FilterAction
from hyperbroker.smccc import NOT_SUPPORTED_U64, FunctionRange
from hyperbroker.wire.v1 import broker_pb2

TRNG_VERSION = 0x8400_0050
TRNG_GET_UUID = 0x8400_0052
TRNG_RND32 = 0x8400_0053
TRNG_RND64 = 0xC400_0053
PSCI_VERSION = 0x8400_0000
PSCI_CPU_ON_64 = 0xC400_0003
KVM_PTP = 0x8600_0001


class FakeTrng(Handler):
    """Owns the TRNG ABI (DEN0098), names its functions, has static answers and a named fallback."""

    plugin = "trng"
    abi = Abi("trng", trng_abi.RANGES, trng_abi.FUNCTION_NAMES)

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return ("uuid",)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED

    def function_name(self, fid: int) -> str | None:
        return {TRNG_VERSION: "trng.version", TRNG_RND64: "trng.rnd64"}.get(fid)

    def static_answers(self) -> Mapping[int, Result]:
        return {
            TRNG_VERSION: Result.regs(0x1_0000),
            # Guest-memory writes cannot travel in a static answer: left to the broker.
            TRNG_GET_UUID: Result((0, 0, 0, 0), memory_writes=(MemoryWrite(0x1000, b"x"),)),
            0x8400_0070: Result.regs(1),  # not in the TRNG ABI: never compiled
        }

    def named_fallbacks(self) -> Mapping[str, Result]:
        return {
            "no_entropy": Result.regs(-3, outcome=Outcome.GUEST_ERROR),
            "power_off": Result.regs(0, actions=(VmmAction(VmmActionKind.SYSTEM_OFF),)),
        }


class PsciVersionOnly(Handler):
    """Owns the single function PSCI_VERSION, as the selftest's filters do (§9.2 rows 7, 8)."""

    plugin = "psci-version"
    abi = Abi("psci", psci_abi.RANGES, psci_abi.FUNCTION_NAMES)

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return (FunctionRange(PSCI_VERSION, 1),)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return Result.regs(0x1_0000)


class Picky(Handler):
    plugin = "picky"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__({})
        if config.get("level") != 3:
            raise HandlerConfigError(f"level: {config.get('level')!r} is not 3")

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return (FunctionRange(0xC600_0040, 2),)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED


class Crashes(Handler):
    plugin = "crashes"

    def __init__(self, config: Mapping[str, Any]) -> None:
        raise RuntimeError("no device")

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return ()

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED


PLUGINS: Mapping[str, type[Handler]] = {
    "trng": FakeTrng,
    "psci-version": PsciVersionOnly,
    "picky": Picky,
    "crashes": Crashes,
    "ffa": FfaHandler,  # only its ABI is used: the catalog reads it from the class
}

FORWARD_TRNG: dict[str, Any] = {
    "name": "trng", "abi": "trng", "action": "forward", "handler": "trng",
}


def document(rules: list[Any], handlers: Mapping[str, Any] | None = None,
             **profile: Any) -> dict[str, Any]:
    return {
        "handlers": {"trng": {}} if handlers is None else handlers,
        "profiles": {"default": {"rules": rules, **profile}},
    }


def load(rules: list[Any], handlers: Mapping[str, Any] | None = None, **profile: Any) -> Policy:
    return load_policy(yaml.safe_dump(document(rules, handlers, **profile)), PLUGINS)


def errors_of(text_or_rules: str | list[Any], handlers: Mapping[str, Any] | None = None,
              **profile: Any) -> list[PolicyError]:
    text = (text_or_rules if isinstance(text_or_rules, str)
            else yaml.safe_dump(document(text_or_rules, handlers, **profile)))
    with pytest.raises(PolicyInvalid) as refused:
        load_policy(text, PLUGINS)
    return refused.value.errors


def only_error(text_or_rules: str | list[Any], handlers: Mapping[str, Any] | None = None,
               **profile: Any) -> PolicyError:
    errors = errors_of(text_or_rules, handlers, **profile)
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


def deny(name: str, **selectors: Any) -> dict[str, Any]:
    return {"name": name, "action": "deny", **selectors}


# --- the format ------------------------------------------------------------------------------


def test_a_forward_rule_compiles_to_records_dispatch_deadline_and_fallback() -> None:
    policy = load([FORWARD_TRNG])
    profile = policy.profiles["default"]
    assert [(r.base, r.nr_functions, r.action, name) for r, name in profile.kernel_filter] == [
        (0x8400_0050, 0x10, FilterAction.FWD_TO_USER, "trng"),
        (0xC400_0050, 0x10, FilterAction.FWD_TO_USER, "trng"),
    ]
    (rule,) = profile.rules
    assert rule.action is Action.FORWARD and rule.handler == "trng"
    assert rule.ranges == trng_abi.RANGES
    assert rule.deadline_us == profile.default_deadline_us == 100_000
    assert rule.fallback.x == (NOT_SUPPORTED_U64, 0, 0, 0) and rule.fallback.mask == 0xF
    assert rule.fallback.outcome is Outcome.FALLBACK
    assert rule.agent_static
    assert [(e.range, e.handler) for e in profile.dispatch] == [
        (r, "trng") for r in trng_abi.RANGES
    ]


def test_hex_integers_in_yaml_are_function_ids() -> None:
    text = """
handlers: {}
profiles:
  default:
    rules:
      - {name: no-ptp, functions: [0x86000001], action: deny}
      - {name: vendor, ranges: [{base: 0x86000100, count: 0x10}], action: deny}
"""
    profile = load_policy(text, PLUGINS).profiles["default"]
    assert [(r.base, r.nr_functions) for r, _ in profile.kernel_filter] == [
        (KVM_PTP, 1), (0x8600_0100, 0x10),
    ]


def test_function_names_from_the_handlers_abis_resolve_to_ids() -> None:
    policy = load([deny("d", functions=["PSCI_CPU_ON64", "psci_cpu_off", "0x86000001"])],
                  handlers={})
    assert policy.profiles["default"].rules[0].ranges == (
        FunctionRange(0x8400_0002, 1), FunctionRange(KVM_PTP, 1), FunctionRange(PSCI_CPU_ON_64, 1),
    )


def test_a_rule_is_the_union_of_its_selectors_merged_and_sorted() -> None:
    policy = load([deny("d", functions=[0x8600_0011, 0x8600_0010],
                        ranges=[{"base": 0x8600_0012, "count": 2}, {"base": 0x8400_0050,
                                                                     "count": 1}])], handlers={})
    (rule,) = policy.profiles["default"].rules
    assert rule.ranges == (FunctionRange(0x8400_0050, 1), FunctionRange(0x8600_0010, 4))
    assert [(r.base, r.nr_functions) for r, _ in policy.profiles["default"].kernel_filter] == [
        (0x8400_0050, 1), (0x8600_0010, 4),
    ]


def test_abi_may_be_a_list_of_named_abis() -> None:
    policy = load([deny("d", abi=["trng", "ffa"])], handlers={})
    # TRNG 0x50..0x5F and FF-A 0x60..0xFF are adjacent: one range per width.
    assert policy.profiles["default"].rules[0].ranges == (
        FunctionRange(0x8400_0050, 0xB0), FunctionRange(0xC400_0050, 0xB0),
    )


def test_records_of_different_rules_are_never_merged() -> None:
    policy = load([deny("a", functions=[0x8600_0010]), deny("b", functions=[0x8600_0011])],
                  handlers={})
    assert [(r.base, name) for r, name in policy.profiles["default"].kernel_filter] == [
        (0x8600_0010, "a"), (0x8600_0011, "b"),
    ]


def test_compiled_records_are_24_byte_structs_with_zero_pad() -> None:
    # Selftest row 1 (pad must be zero) has no policy spelling: the engine always writes zeros.
    policy = load([FORWARD_TRNG, deny("d", functions=[KVM_PTP])])
    for record, _ in policy.profiles["default"].kernel_filter:
        packed = record.pack()
        assert len(packed) == 24 and packed[9:] == bytes(15)


def test_kernel_filter_is_sorted_by_base() -> None:
    policy = load([deny("high", functions=[0xC600_0000]), FORWARD_TRNG,
                   deny("low", functions=[0x0200_0000])])
    bases = [r.base for r, _ in policy.profiles["default"].kernel_filter]
    assert bases == sorted(bases) and len(bases) == 4


def test_handle_rules_compile_to_no_record() -> None:
    policy = load([{"name": "kernel-psci", "abi": "psci", "action": "handle"}], handlers={})
    profile = policy.profiles["default"]
    assert profile.kernel_filter == () and profile.dispatch == ()
    assert profile.rules[0].action is Action.HANDLE


def test_a_profile_without_rules_is_allowed_and_compiles_to_nothing() -> None:
    policy = load_policy("profiles: {default: {}, empty: {rules: []}}", PLUGINS)
    for profile in policy.profiles.values():
        assert profile.rules == () and profile.kernel_filter == () and profile.dispatch == ()


def test_version_1_is_accepted() -> None:
    assert load_policy("version: 1\nprofiles: {default: {}}", PLUGINS).profiles


@pytest.mark.parametrize("version", ["2", "'1'", "true"])
def test_another_format_version_is_refused(version: str) -> None:
    error = only_error(f"version: {version}\nprofiles: {{default: {{}}}}")
    assert "version" in error.message and error.errno_name == ""


@pytest.mark.parametrize(
    ("text", "where", "key"),
    [
        ("profiles: {default: {}}\nprofile: {}", "policy", "profile"),
        ("handlers: {trng: {plugn: trng}}\nprofiles: {default: {}}", "handler 'trng'", "plugn"),
        ("profiles: {default: {rule: []}}", "profile 'default'", "rule"),
        ("profiles: {default: {rules: [{name: d, abi: trng, action: deny, hanlder: x}]}}",
         "profile 'default', rule 'd'", "hanlder"),
        ("profiles: {default: {rules: [{name: d, ranges: [{base: 1, count: 1, end: 2}], "
         "action: deny}]}}", "profile 'default', rule 'd', range", "end"),
    ],
)
def test_an_unknown_key_is_named_with_where_it_is(text: str, where: str, key: str) -> None:
    error = only_error(text)
    assert error.message.startswith(where) and f"unknown key {key!r}" in error.message


def test_an_unknown_key_suggests_the_close_one() -> None:
    error = only_error([{**FORWARD_TRNG, "deadline": 5}])
    assert "did you mean 'deadline_ms'?" in error.message


def test_a_duplicate_yaml_key_is_refused() -> None:
    error = only_error("profiles:\n  default: {}\n  default: {rules: []}\n")
    assert "duplicate key 'default'" in error.message


def test_yaml_merge_keys_may_be_overridden() -> None:
    text = """
handlers: {trng: {}}
base: &fwd {name: trng, abi: trng, action: forward, handler: trng, deadline_ms: 10}
"""
    # `base` is an unknown top-level key: the merge itself is fine, the key is what is refused.
    errors = errors_of(text + "profiles: {default: {rules: [{<<: *fwd, deadline_ms: 20}]}}")
    assert [e.message for e in errors] == [
        "policy: unknown key 'base' (allowed: version, handlers, profiles)"
    ]


def test_invalid_yaml_is_one_error() -> None:
    error = only_error("profiles: {default: [")
    assert error.message.startswith("policy: not valid YAML")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text"])
def test_the_document_must_be_a_mapping(text: str) -> None:
    assert only_error(text).message.startswith("policy: the document is")


@pytest.mark.parametrize("text", ["handlers: {}", "profiles: {}", "profiles: [default]"])
def test_a_policy_needs_at_least_one_profile(text: str) -> None:
    assert "profiles: must map at least one profile" in only_error(text).message


def test_a_rule_needs_a_name() -> None:
    error = only_error([{"abi": "trng", "action": "deny"}])
    assert error.message == ("profile 'default', rule '#1': name: is required, a non-empty "
                             "string (got None)")


def test_a_rule_needs_a_selector() -> None:
    error = only_error([{"name": "d", "action": "deny"}])
    assert "selects no function IDs" in error.message and error.rules == ("d",)


def test_empty_selector_lists_select_nothing() -> None:
    error = only_error([deny("d", abi=[], functions=[])])
    assert "lists are empty" in error.message


def test_an_unknown_abi_is_refused() -> None:
    assert "unknown ABI 'tpm'" in only_error([deny("d", abi="tpm")]).message


def test_an_unknown_function_name_is_refused() -> None:
    error = only_error([deny("d", functions=["TRNG_RND128"])])
    assert "unknown function 'TRNG_RND128'" in error.message and error.errno_name == ""


@pytest.mark.parametrize("action", ["allow", None, 1])
def test_an_unknown_action_is_refused(action: object) -> None:
    error = only_error([{"name": "d", "abi": "trng", "action": action}])
    assert "must be one of forward, deny, handle" in error.message


@pytest.mark.parametrize("bad", [True, False])
def test_a_bool_is_not_an_integer(bad: bool) -> None:
    error = only_error([deny("d", ranges=[{"base": 0x8600_0000, "count": bad}])])
    assert "integer base: and count:" in error.message
    error = only_error([deny("d", functions=[bad])])
    assert "must be an ID" in error.message


def test_duplicate_rule_names_in_a_profile_are_refused() -> None:
    error = only_error([deny("d", functions=[0x8600_0010]), deny("d", functions=[0x8600_0011])])
    assert error.message == ("profile 'default': two rules are named 'd' (rules #1 and #2); "
                             "rule names are unique in a profile")
    assert error.errno_name == "" and error.rules == ("d",)


def test_the_same_rule_name_in_two_profiles_is_fine() -> None:
    text = yaml.safe_dump({"profiles": {
        "a": {"rules": [deny("d", functions=[KVM_PTP])]},
        "b": {"rules": [deny("d", functions=[KVM_PTP])]},
    }})
    assert set(load_policy(text, PLUGINS).profiles) == {"a", "b"}


# --- deadlines, fallbacks, agent_static --------------------------------------------------------


def test_deadlines_default_to_100ms_then_to_the_profile_then_to_the_rule() -> None:
    assert load([FORWARD_TRNG]).profiles["default"].rules[0].deadline_us == 100_000
    profile = load([FORWARD_TRNG], default_deadline_ms=250).profiles["default"]
    assert profile.default_deadline_us == 250_000 and profile.rules[0].deadline_us == 250_000
    rule = load([{**FORWARD_TRNG, "deadline_ms": 50}], default_deadline_ms=250).profiles[
        "default"].rules[0]
    assert rule.deadline_us == 50_000


@pytest.mark.parametrize("deadline", [0, 60_001, -5, 1.5, True, "10"])
def test_a_deadline_outside_1_to_60000_ms_is_refused(deadline: object) -> None:
    error = only_error([{**FORWARD_TRNG, "deadline_ms": deadline}])
    assert "deadline_ms" in error.message and "from 1 to 60000" in error.message
    assert error.errno_name == ""
    error = only_error([FORWARD_TRNG], default_deadline_ms=deadline)
    assert "default_deadline_ms" in error.message


def test_the_deadline_bounds_are_inclusive() -> None:
    for ms in (1, 60_000):
        assert load([{**FORWARD_TRNG, "deadline_ms": ms}]).profiles["default"].rules[
            0].deadline_us == ms * 1000


def test_a_named_fallback_of_the_handler_becomes_a_fallback_result() -> None:
    rule = load([{**FORWARD_TRNG, "fallback": "no_entropy"}]).profiles["default"].rules[0]
    assert rule.fallback.register(0) == (-3) & 0xFFFF_FFFF_FFFF_FFFF
    assert rule.fallback.outcome is Outcome.FALLBACK


def test_fallback_registers_are_sign_extended_and_the_rest_of_x0_x3_zeroed() -> None:
    rule = load([{**FORWARD_TRNG, "fallback": {"x0": -3, "x1": 7}}]).profiles["default"].rules[0]
    assert rule.fallback.x == ((-3) & 0xFFFF_FFFF_FFFF_FFFF, 7, 0, 0)
    assert rule.fallback.mask == 0xF and rule.fallback.outcome is Outcome.FALLBACK


def test_fallback_registers_beyond_x3_widen_the_mask() -> None:
    rule = load([{**FORWARD_TRNG, "fallback": {"x0": 0, "x5": 1}}]).profiles["default"].rules[0]
    assert rule.fallback.mask == 0x3F and rule.fallback.register(5) == 1


def test_not_supported_is_the_default_and_builtin_fallback() -> None:
    rule = load([{**FORWARD_TRNG, "fallback": "not_supported"}]).profiles["default"].rules[0]
    assert rule.fallback == load([FORWARD_TRNG]).profiles["default"].rules[0].fallback


def test_an_unknown_fallback_name_is_refused_listing_the_known_ones() -> None:
    error = only_error([{**FORWARD_TRNG, "fallback": "busy"}])
    assert error.message == ("profile 'default', rule 'trng': unknown fallback 'busy' for "
                             "handler 'trng' (known: not_supported, no_entropy, power_off)")
    assert error.errno_name == ""


def test_a_named_fallback_with_vmm_actions_is_refused() -> None:
    error = only_error([{**FORWARD_TRNG, "fallback": "power_off"}])
    assert "registers only" in error.message


@pytest.mark.parametrize(
    ("fallback", "text"),
    [
        ({"x18": 1}, "x0..x17"),
        ({"r0": 1}, "x0..x17"),
        ({"x0": 1 << 64}, "64-bit integer"),
        ({"x0": True}, "64-bit integer"),
        ({}, "empty"),
        (5, "fallback must be"),
    ],
)
def test_bad_fallback_registers_are_refused(fallback: object, text: str) -> None:
    assert text in only_error([{**FORWARD_TRNG, "fallback": fallback}]).message


def test_agent_static_serves_the_handlers_static_answers_inside_the_rule() -> None:
    policy = load([FORWARD_TRNG])
    answers = static_answers(policy, policy.profiles["default"])
    # FakeTrng's answer for 0x84000070 lies outside the rule, and GET_UUID's writes memory.
    assert list(answers) == [TRNG_VERSION]


def test_agent_static_false_keeps_every_call_on_the_broker() -> None:
    policy = load([{**FORWARD_TRNG, "agent_static": False}])
    assert static_answers(policy, policy.profiles["default"]) == {}


def test_agent_static_must_be_a_bool() -> None:
    assert "true or false" in only_error([{**FORWARD_TRNG, "agent_static": "yes"}]).message


@pytest.mark.parametrize("key", ["fallback", "deadline_ms", "agent_static", "handler"])
@pytest.mark.parametrize("action", ["deny", "handle"])
def test_forward_only_keys_are_refused_on_deny_and_handle(key: str, action: str) -> None:
    value = {"fallback": "not_supported", "deadline_ms": 5, "agent_static": True,
             "handler": "trng"}[key]
    error = only_error([{"name": "d", "functions": [KVM_PTP], "action": action, key: value}])
    assert error.message == (f"profile 'default', rule 'd': {key} applies to forward rules "
                             f"only, not {action}")


# --- handlers --------------------------------------------------------------------------------


def test_a_forward_rule_without_handler_is_refused() -> None:
    error = only_error([{"name": "t", "abi": "trng", "action": "forward"}])
    assert "a forward rule needs handler:" in error.message and error.rules == ("t",)


def test_a_forward_to_an_undeclared_handler_instance_is_refused() -> None:
    error = only_error([{**FORWARD_TRNG, "handler": "rng"}])
    assert error.message == ("profile 'default', rule 'trng': forwards to handler 'rng', which "
                             "handlers: does not declare (declared: trng)")
    assert error.errno_name == ""


def test_a_plugin_that_is_not_installed_is_refused() -> None:
    error = only_error([], handlers={"tee": {"plugin": "optee"}})
    assert error.message.startswith("handler 'tee': plugin 'optee' is not installed")
    assert "installed: crashes, ffa, picky, psci-version, trng" in error.message


def test_the_plugin_defaults_to_the_instance_name() -> None:
    assert isinstance(load([], handlers={"trng": None}).handlers["trng"], FakeTrng)


def test_two_instances_may_share_a_plugin() -> None:
    policy = load([{**FORWARD_TRNG, "handler": "rng-b"}],
                  handlers={"rng-a": {"plugin": "trng"}, "rng-b": {"plugin": "trng"}})
    assert policy.profiles["default"].rules[0].handler == "rng-b"
    assert set(policy.handlers) == {"rng-a", "rng-b"}


def test_a_handler_config_refused_by_the_plugin_is_reported_with_its_text() -> None:
    error = only_error([], handlers={"p": {"plugin": "picky", "config": {"level": 2}}})
    assert error.message == "handler 'p': plugin 'picky' refused its config: level: 2 is not 3"
    assert load([], handlers={"p": {"plugin": "picky", "config": {"level": 3}}}).handlers["p"]


def test_an_unknown_config_key_is_refused_by_the_handler_base_class() -> None:
    error = only_error([], handlers={"trng": {"config": {"seed": 1}}})
    assert "refused its config: unknown config key(s) ['seed']" in error.message


def test_a_plugin_whose_constructor_crashes_is_reported_not_raised() -> None:
    error = only_error([], handlers={"c": {"plugin": "crashes"}})
    assert error.message == "handler 'c': plugin 'crashes' failed to start: RuntimeError: no device"


def test_a_rule_forwarding_to_a_broken_handler_adds_no_second_error() -> None:
    error = only_error([{**FORWARD_TRNG, "handler": "p"}],
                       handlers={"p": {"plugin": "picky", "config": {}}})
    assert error.message.startswith("handler 'p'")


# --- ranges as KVM checks them (§1.3 step 3) ---------------------------------------------------


def test_an_empty_range_is_einval() -> None:
    error = only_error([deny("d", ranges=[{"base": 0x8400_0050, "count": 0}])])
    assert error.message == ("profile 'default', rule 'd': [0x84000050, 0x84000050) is empty "
                             "(count 0)")
    assert error.errno_name == "EINVAL" and error.rules == ("d",)


def test_base_zero_count_zero_is_eexist_as_kvm_reads_it_as_the_whole_space() -> None:
    error = only_error([deny("d", ranges=[{"base": 0, "count": 0}])])
    assert error.errno_name == "EEXIST" and "whole space" in error.message


def test_a_range_wrapping_past_0xffffffff_is_einval() -> None:
    error = only_error([deny("d", ranges=[{"base": 0xFFFF_FFF0, "count": 0x11}])])
    assert error.message == ("profile 'default', rule 'd': [0xfffffff0, 0x100000001) wraps "
                             "past 0xffffffff")
    assert error.errno_name == "EINVAL"


def test_a_range_ending_at_0xffffffff_is_valid() -> None:
    policy = load([deny("d", ranges=[{"base": 0xFFFF_FFF0, "count": 0x10}])], handlers={})
    assert policy.profiles["default"].rules[0].ranges == (FunctionRange(0xFFFF_FFF0, 0x10),)


@pytest.mark.parametrize("base", [-1, 1 << 32])
def test_a_base_outside_u32_is_einval(base: int) -> None:
    error = only_error([deny("d", ranges=[{"base": base, "count": 1}])])
    assert "outside the 32-bit function-ID space" in error.message
    assert error.errno_name == "EINVAL"


def test_a_function_id_outside_u32_is_einval() -> None:
    error = only_error([deny("d", functions=[1 << 32])])
    assert error.errno_name == "EINVAL" and "[0x100000000, 0x100000001)" in error.message
    error = only_error([deny("d", functions=["0x100000000"])])
    assert error.errno_name == "EINVAL"


@pytest.mark.parametrize("count", [-1, 1 << 32])
def test_a_count_that_does_not_fit_nr_functions_is_einval(count: int) -> None:
    error = only_error([deny("d", ranges=[{"base": 0, "count": count}])])
    assert "does not fit nr_functions" in error.message and error.errno_name == "EINVAL"


# --- overlaps (EEXIST, §1.2) -------------------------------------------------------------------


def test_two_rules_overlapping_is_eexist_naming_both_rules_and_ranges() -> None:
    error = only_error([deny("a", ranges=[{"base": 0x8600_0000, "count": 0x10}]),
                        deny("b", ranges=[{"base": 0x8600_0008, "count": 0x10}])])
    assert error.message == ("profile 'default': rule 'a' [0x86000000, 0x86000010) overlaps "
                             "rule 'b' [0x86000008, 0x86000018)")
    assert error.errno_name == "EEXIST" and error.rules == ("a", "b")


def test_ranges_overlapping_within_one_rule_is_eexist() -> None:
    error = only_error([deny("d", abi="psci", functions=["PSCI_CPU_ON"])])
    assert error.message == ("profile 'default', rule 'd': [0x84000000, 0x84000020) overlaps "
                             "[0x84000003, 0x84000004) of the same rule")
    assert error.errno_name == "EEXIST" and error.rules == ("d",)


def test_the_same_abi_twice_in_one_rule_overlaps_itself() -> None:
    errors = errors_of([deny("d", abi=["trng", "trng"])])
    assert len(errors) == 2 and {e.errno_name for e in errors} == {"EEXIST"}


def test_adjacent_ranges_do_not_overlap() -> None:
    policy = load([deny("a", ranges=[{"base": 0x8600_0000, "count": 0x10}]),
                   deny("b", ranges=[{"base": 0x8600_0010, "count": 0x10}])], handlers={})
    assert len(policy.profiles["default"].kernel_filter) == 2


def test_overlap_across_profiles_is_fine() -> None:
    text = yaml.safe_dump({"handlers": {"trng": {}}, "profiles": {
        "default": {"rules": [FORWARD_TRNG]},
        "locked": {"rules": [deny("no-trng", abi="trng")]},
    }})
    policy = load_policy(text, PLUGINS)
    assert policy.profiles["locked"].kernel_filter[0][0].action == FilterAction.DENY


@pytest.mark.parametrize("action", ["deny", "handle", "forward"])
@pytest.mark.parametrize(("fid", "reserved"), [
    (0x8000_8000, "[0x80000000, 0x80010000)"),  # ARM_SMCCC_ARCH_WORKAROUND_1
    (0xC000_FFFF, "[0xc0000000, 0xc0010000)"),
])
def test_the_arch_ranges_are_eexist_for_every_action(action: str, fid: int, reserved: str) -> None:
    rule: dict[str, Any] = {"name": "arch", "functions": [fid], "action": action}
    if action == "forward":
        rule["handler"] = "trng"
    errors = errors_of([rule])
    assert errors[0].errno_name == "EEXIST" and errors[0].rules == ("arch",)
    assert f"overlaps {reserved}, which the kernel keeps" in errors[0].message
    assert "misrepresented" in errors[0].message


def test_a_range_beside_the_arch_ranges_is_accepted() -> None:
    load([deny("d", ranges=[{"base": 0x7FFF_FFF0, "count": 0x10}, {"base": 0x8001_0000,
                                                                    "count": 1}])])


def test_handle_rules_take_part_in_overlap_checks() -> None:
    error = only_error([{"name": "k", "abi": "psci", "action": "handle"},
                        deny("d", functions=["PSCI_VERSION"])])
    assert error.errno_name == "EEXIST" and error.rules == ("k", "d")


# --- ABI ownership (DESIGN.md "Policy") --------------------------------------------------------


def test_a_forward_outside_the_handlers_ranges_is_refused() -> None:
    errors = errors_of([FORWARD_TRNG, {"name": "more", "functions": [0x8400_0060],
                                       "action": "forward", "handler": "trng"}])
    assert [e.message for e in errors] == [
        "profile 'default': rule 'more' forwards [0x84000060, 0x84000061) to handler 'trng', "
        "which does not serve it ([0x84000060, 0x84000061) outside its ranges [0x84000050, "
        "0x84000060), [0xc4000050, 0xc4000060))"
    ]
    assert errors[0].errno_name == "" and errors[0].rules == ("more",)


def test_forwarding_part_of_a_handlers_abi_is_a_split() -> None:
    error = only_error([{"name": "rnd", "functions": ["TRNG_RND32", "TRNG_RND64"],
                         "action": "forward", "handler": "trng"}])
    assert error.message == (
        "profile 'default': ABI of handler 'trng' split: [0x84000053, 0x84000054), "
        "[0xc4000053, 0xc4000054) forwarded by rule(s) 'rnd', [0x84000050, 0x84000053), "
        "[0x84000054, 0x84000060), [0xc4000050, 0xc4000053), [0xc4000054, 0xc4000060) not; a "
        "handler owns its ranges whole, forward all of [0x84000050, 0x84000060), "
        "[0xc4000050, 0xc4000060) to it or none")
    assert error.errno_name == "" and error.rules == ("rnd",)


def test_function_level_rules_that_cover_the_whole_abi_are_accepted() -> None:
    forward = {"action": "forward", "handler": "trng"}
    policy = load([
        {"name": "rnd", "functions": ["TRNG_RND32", "TRNG_RND64"], "deadline_ms": 200,
         "fallback": {"x0": -3}, **forward},
        {"name": "rest", "ranges": [
            {"base": 0x8400_0050, "count": 3}, {"base": 0x8400_0054, "count": 12},
            {"base": 0xC400_0050, "count": 3}, {"base": 0xC400_0054, "count": 12},
        ], **forward},
    ])
    profile = policy.profiles["default"]
    assert profile.lookup(TRNG_RND64).rule.name == "rnd"  # type: ignore[union-attr]
    assert profile.lookup(TRNG_VERSION).rule.name == "rest"  # type: ignore[union-attr]
    assert len(profile.kernel_filter) == 6


def test_another_rule_inside_a_forwarded_abi_is_refused() -> None:
    errors = errors_of([FORWARD_TRNG, deny("no-rnd32", functions=["TRNG_RND32"])])
    assert [e.errno_name for e in errors] == ["EEXIST", ""]
    assert errors[1].message == (
        "profile 'default': rule 'no-rnd32' (deny) covers [0x84000053, 0x84000054) of the ABI "
        "of handler 'trng' ([0x84000050, 0x84000060), [0xc4000050, 0xc4000060)), which rule(s) "
        "'trng' forward to it; an ABI is served by the kernel or by its handler, never both")
    assert errors[1].rules == ("no-rnd32", "trng")


def test_a_kernel_rule_inside_a_split_abi_is_named() -> None:
    errors = errors_of([
        {"name": "rnd", "functions": ["TRNG_RND64"], "action": "forward", "handler": "trng"},
        {"name": "kernel-rest", "ranges": [{"base": 0x8400_0050, "count": 0x10}],
         "action": "handle"},
    ])
    assert [e.rules for e in errors] == [("rnd",), ("kernel-rest", "rnd")]


def test_a_handler_not_forwarded_in_a_profile_imposes_nothing() -> None:
    policy = load([deny("no-rnd64", functions=["TRNG_RND64"])])
    assert policy.profiles["default"].kernel_filter[0][0].base == TRNG_RND64


# --- collecting -------------------------------------------------------------------------------


def test_every_error_is_collected_and_str_lists_one_per_line() -> None:
    text = """
version: 2
handlers: {tee: {plugin: optee}}
profiles:
  default:
    rules:
      - {name: a, ranges: [{base: 0x84000050, count: 0}], action: deny}
      - {name: b, functions: [SMCCC_VERSION], action: handle}
      - {name: c, abi: trng, action: forward}
  other:
    default_deadline_ms: 0
"""
    with pytest.raises(PolicyInvalid) as refused:
        load_policy(text, PLUGINS)
    errors = refused.value.errors
    assert [e.errno_name for e in errors] == ["", "", "EINVAL", "", "EEXIST", ""]
    assert str(refused.value).splitlines() == [str(e) for e in errors]
    assert str(errors[2]).endswith("[EINVAL]")


# --- the selftest table, translated (§9.2) -----------------------------------------------------


def test_selftest_2_zero_nr_functions_is_einval() -> None:
    error = only_error([deny("d", ranges=[{"base": PSCI_CPU_ON_64, "count": 0}])])
    assert error.errno_name == "EINVAL"


def test_selftest_3_overflow_nr_functions_is_einval() -> None:
    error = only_error([deny("d", ranges=[{"base": 0xFFFF_FFFF, "count": 0xFFFF_FFFF}])])
    assert error.errno_name == "EINVAL"


def test_selftest_4_reserved_action_has_no_policy_spelling() -> None:
    error = only_error([{"name": "d", "functions": [PSCI_CPU_ON_64], "action": 255}])
    assert "action 255 must be one of" in error.message


def test_selftest_5_reserved_ranges_are_eexist() -> None:
    for fid in (0x8000_8000, 0xC000_0000):
        assert only_error([deny("d", functions=[fid])]).errno_name == "EEXIST"


def test_selftest_6_the_same_filter_twice_is_eexist() -> None:
    error = only_error([deny("a", functions=[PSCI_CPU_ON_64]),
                        deny("b", functions=[PSCI_CPU_ON_64])])
    assert error.errno_name == "EEXIST" and error.rules == ("a", "b")


def test_selftest_7_deny_psci_version_compiles_to_the_selftests_record() -> None:
    profile = load([deny("d", functions=["PSCI_VERSION"])], handlers={}).profiles["default"]
    (record, _), = profile.kernel_filter
    assert (record.base, record.nr_functions, record.action) == (PSCI_VERSION, 1,
                                                                 FilterAction.DENY)


def test_selftest_8_forward_psci_version_compiles_to_the_selftests_record() -> None:
    profile = load([{"name": "v", "functions": ["PSCI_VERSION"], "action": "forward",
                     "handler": "pv"}], handlers={"pv": {"plugin": "psci-version"}}
                   ).profiles["default"]
    (record, _), = profile.kernel_filter
    assert (record.base, record.nr_functions, record.action) == (PSCI_VERSION, 1,
                                                                 FilterAction.FWD_TO_USER)
    assert profile.lookup(PSCI_VERSION) is not None


# --- compiled outputs -------------------------------------------------------------------------


def test_lookup_finds_the_forward_range_holding_an_id_and_nothing_else() -> None:
    profile = load([FORWARD_TRNG, deny("d", functions=[KVM_PTP])]).profiles["default"]
    for fid, hit in [(TRNG_VERSION, True), (0x8400_005F, True), (0x8400_0060, False),
                     (0x8400_004F, False), (TRNG_RND64, True), (KVM_PTP, False), (0, False),
                     (0xFFFF_FFFF, False)]:
        entry = profile.lookup(fid)
        assert (entry is not None) == hit, hex(fid)
        if entry is not None:
            assert fid in entry.range and entry.handler == "trng"


def test_function_name_prefers_the_handler_then_known_functions_then_the_class() -> None:
    policy = load([FORWARD_TRNG])
    assert policy.function_name(TRNG_VERSION) == "trng.version"
    assert policy.function_name(TRNG_RND32) == "TRNG_RND32"
    assert policy.function_name(0x8600_0123) == "vendor-hyp-fast32"


def test_named_functions_lists_the_served_ids_with_names() -> None:
    policy = load([FORWARD_TRNG])
    assert policy.named_functions(FunctionRange(0x8400_0050, 0x10), "trng") == {
        TRNG_VERSION: "trng.version", 0x8400_0051: "TRNG_FEATURES",
        TRNG_GET_UUID: "TRNG_GET_UUID", TRNG_RND32: "TRNG_RND32",
    }


def test_named_functions_of_a_huge_range_uses_known_names_only() -> None:
    policy = load([])
    names = policy.named_functions(FunctionRange(0x8000_0000, 0x7FFF_FFFF))
    assert names[0x8400_0050] == "TRNG_VERSION" and 0x8400_0059 not in names


def test_digest_is_the_sha256_of_the_text() -> None:
    text = yaml.safe_dump(document([FORWARD_TRNG]))
    assert load_policy(text, PLUGINS).digest == hashlib.sha256(text.encode()).hexdigest()


def test_to_proto_carries_records_agent_rules_static_answers_and_deadlines() -> None:
    policy = load([{**FORWARD_TRNG, "deadline_ms": 50, "fallback": {"x0": -3}},
                   deny("d", functions=[KVM_PTP])], default_deadline_ms=300)
    compiled = to_proto(policy, 7)
    assert compiled.version == 7 and compiled.digest == policy.digest
    (profile,) = compiled.profiles
    assert profile.name == "default" and profile.default_deadline_us == 300_000
    assert [(r.base, r.nr_functions, r.action, r.rule) for r in profile.kernel_filter] == [
        (0x8400_0050, 0x10, broker_pb2.FILTER_ACTION_FWD_TO_USER, "trng"),
        (KVM_PTP, 1, broker_pb2.FILTER_ACTION_DENY, "d"),
        (0xC400_0050, 0x10, broker_pb2.FILTER_ACTION_FWD_TO_USER, "trng"),
    ]
    assert [(r.base, r.deadline_us, list(r.fallback), r.fallback_mask, r.rule)
            for r in profile.rules] == [
        (base, 50_000, [(-3) & 0xFFFF_FFFF_FFFF_FFFF, 0, 0, 0], 0xF, "trng")
        for base in (0x8400_0050, 0xC400_0050)
    ]
    assert [(a.function_id, list(a.x), a.mask) for a in profile.static_answers] == [
        (TRNG_VERSION, [0x1_0000, 0, 0, 0], 0xF)
    ]
    assert broker_pb2.CompiledPolicy.FromString(compiled.SerializeToString()) == compiled


def test_to_json_is_json_and_names_the_served_functions() -> None:
    policy = load([FORWARD_TRNG, deny("d", functions=[KVM_PTP]),
                   {"name": "k", "abi": "psci", "action": "handle"}])
    out = json.loads(json.dumps(to_json(policy)))
    assert out["digest"] == policy.digest
    profile = out["profiles"]["default"]
    assert profile["kernel_filter"][1] == {"base": KVM_PTP, "nr_functions": 1,
                                           "action": "deny", "rule": "d"}
    first = profile["dispatch"][0]
    assert first["functions"]["0x84000050"] == "trng.version"
    assert first["fallback"] == [NOT_SUPPORTED_U64, 0, 0, 0] and first["deadline_us"] == 100_000
    assert [r["action"] for r in profile["rules"]] == ["forward", "deny", "handle"]
    assert profile["discovery"] == []  # FakeTrng makes no discovery claims
    assert out["handlers"]["trng"]["plugin"] == "trng"


def test_not_supported_is_the_abis_own_form_when_the_handler_names_one() -> None:
    """An FF-A guest reads errors from FFA_ERROR in x0, not from x0 = -1."""
    from hyperbroker.handlers.api import discover_plugins

    text = """
handlers: {ffa: {}}
profiles:
  default:
    rules:
      - {name: ffa, abi: ffa, action: forward, handler: ffa}
"""
    policy = load_policy(text, discover_plugins())
    rule = policy.profiles["default"].rules[0]
    assert rule.fallback.x[0] == 0x8400_0060  # FFA_ERROR
    assert rule.fallback.x[2] & 0xFFFF_FFFF == 0xFFFF_FFFF  # NOT_SUPPORTED (-1) in w2
