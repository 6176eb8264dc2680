"""broker.policy: every error collected, the kernel selftest's cases, and what a policy compiles to.

The selftest is tools/testing/selftests/kvm/arm64/smccc_filter.c in Linux (aarch64/ in older
trees); each case is translated into a policy and must be refused (or compiled) exactly as the
kernel answers it.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from hyperbroker.broker.policy import (
    PolicyInvalid,
    load_policy,
    to_json,
    to_proto,
)
from hyperbroker.kvm import FilterAction
from hyperbroker.smccc import NOT_SUPPORTED_U64, FunctionRange
from hyperbroker.wire.v1 import broker_pb2

from .support import (
    FORWARD_TRNG,
    KVM_PTP,
    PLUGINS,
    PSCI_CPU_ON_64,
    PSCI_VERSION,
    TRNG_GET_UUID,
    TRNG_RND32,
    TRNG_RND64,
    TRNG_VERSION,
    deny,
    document,
    load,
    only_error,
)

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


# --- the kernel selftest's cases, translated ----------------------------------------------------


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
