"""broker.policy: handlers, ranges and overlaps as KVM checks them, and ABI ownership."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from hyperbroker.broker.policy import (
    load_policy,
)
from hyperbroker.kvm import FilterAction
from hyperbroker.smccc import FunctionRange

from .support import (
    FORWARD_TRNG,
    PLUGINS,
    TRNG_RND64,
    TRNG_VERSION,
    FakeTrng,
    deny,
    errors_of,
    load,
    only_error,
)

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


# --- ranges as kvm_smccc_set_filter() checks them --------------------------------------------


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


# --- overlaps (EEXIST, as vm.rst documents) ----------------------------------------------------


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


# --- ABI ownership: a handler's ABI is forwarded whole or not at all ----------------------------


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
