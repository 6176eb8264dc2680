"""broker.policy: the policy format, one test per rule: keys, selectors, deadlines, fallbacks."""

from __future__ import annotations

import pytest
import yaml

from hyperbroker.broker.policy import (
    Action,
    load_policy,
    static_answers,
)
from hyperbroker.calls import Outcome
from hyperbroker.handlers.trng import abi as trng_abi
from hyperbroker.kvm import FilterAction
from hyperbroker.smccc import NOT_SUPPORTED_U64, FunctionRange

from .support import (
    FORWARD_TRNG,
    KVM_PTP,
    PLUGINS,
    PSCI_CPU_ON_64,
    TRNG_VERSION,
    deny,
    errors_of,
    load,
    only_error,
)

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
