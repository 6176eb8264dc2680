"""examples/policy.yaml loads with the installed plugins and shows what the brief promises."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from hyperbroker.broker.kernel_filter import KernelFilterModel
from hyperbroker.broker.policy import DEFAULT_PROFILE, Action, Policy, load_policy
from hyperbroker.broker.policy.abis import AbiCatalog
from hyperbroker.handlers.api import ENTRY_POINT_GROUP, discover_plugins
from hyperbroker.kvm import FilterAction
from hyperbroker.smccc import (
    OWNER_OEM,
    OWNER_SIP,
    OWNER_VENDOR_HYP,
    merge_ranges,
    owner,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.yaml"
NAMED = AbiCatalog.from_plugins(discover_plugins()).ranges


def example() -> Policy:
    return load_policy(EXAMPLE.read_text(), discover_plugins())


def test_the_example_loads_with_the_installed_plugins_and_has_several_profiles() -> None:
    policy = example()
    assert DEFAULT_PROFILE in policy.profiles and len(policy.profiles) >= 2


def test_every_shipped_handler_has_an_instance_in_the_example() -> None:
    # Shipped = entry points into this project's handlers package (issue 2 item 3: the example
    # uses every shipped handler); plugins installed by tests or operators do not count.
    shipped = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)
               if ep.value.startswith("hyperbroker.handlers.")}
    assert shipped and shipped <= set(discover_plugins())
    assert {type(h).plugin for h in example().handlers.values()} >= shipped


def test_the_default_profile_forwards_the_whole_trng_abi_to_trng() -> None:
    profile = example().profiles[DEFAULT_PROFILE]
    forwarded = [e.range for e in profile.dispatch if e.handler == "trng"]
    assert merge_ranges(forwarded) == list(NAMED["trng"])


def test_every_handler_instance_serves_some_profile() -> None:
    policy = example()
    forwarded = {e.handler for p in policy.profiles.values() for e in p.dispatch}
    assert forwarded == set(policy.handlers)


def test_the_default_profile_forwards_psci_ffa_and_vendor_hyp_whole() -> None:
    profile = example().profiles[DEFAULT_PROFILE]
    for abi, handler in (("psci", "psci"), ("ffa", "ffa"), ("vendor-hyp", "memshare")):
        forwarded = [e.range for e in profile.dispatch if e.handler == handler]
        assert merge_ranges(forwarded) == list(NAMED[abi]), abi


def test_the_default_profile_denies_the_firmware_services_in_the_kernel() -> None:
    profile = example().profiles[DEFAULT_PROFILE]
    denied = [r for r, _ in profile.kernel_filter if r.action == FilterAction.DENY]
    assert denied and {owner(r.base) for r in denied} == {OWNER_SIP, OWNER_OEM}
    assert {rule.action for rule in profile.rules} >= {Action.FORWARD, Action.DENY}


def test_the_hyperv_guest_profile_gives_the_vendor_hyp_range_to_the_persona() -> None:
    profile = example().profiles["hyperv-guest"]
    forwarded = [e.range for e in profile.dispatch if e.handler == "hyperv"]
    assert merge_ranges(forwarded) == list(NAMED["vendor-hyp"])
    assert all(owner(e.range.base) != OWNER_VENDOR_HYP for e in profile.dispatch
               if e.handler != "hyperv")


def test_each_profile_is_a_filter_kvm_installs_on_a_fresh_vm() -> None:
    for profile in example().profiles.values():
        model = KernelFilterModel()
        assert [model.set_filter(r) for r, _ in profile.kernel_filter] == [0] * len(
            profile.kernel_filter)
