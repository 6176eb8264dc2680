"""Policy and the vendor-hyp range: a profile selects the Hyper-V persona or the memshare handler
for the whole vendor-hyp ABI, never both and never a part (issue 6 items 1 and 3)."""

from __future__ import annotations

import pytest

from hyperbroker.broker.policy import PolicyInvalid, load_policy
from hyperbroker.handlers.api import Handler
from hyperbroker.handlers.hyperv import HypervHandler
from hyperbroker.handlers.memshare import MemshareHandler

PLUGINS: dict[str, type[Handler]] = {"hyperv": HypervHandler, "memshare": MemshareHandler}
HEAD = "handlers:\n  hyperv: {}\n  memshare: {}\nprofiles:\n"


def test_each_profile_selects_one_vendor_hyp_handler() -> None:
    loaded = load_policy(HEAD + (
        "  hyperv-guests:\n    rules:\n"
        "      - {name: hv, abi: vendor-hyp, action: forward, handler: hyperv}\n"
        "  pkvm-guests:\n    rules:\n"
        "      - {name: ms, abi: vendor-hyp, action: forward, handler: memshare}\n"), PLUGINS)
    for profile, handler in (("hyperv-guests", "hyperv"), ("pkvm-guests", "memshare")):
        entry = loaded.profiles[profile].lookup(0x8600_FF01)  # VENDOR_HYP_CALL_UID
        assert entry is not None and entry.handler == handler


def test_both_handlers_in_one_profile_are_refused() -> None:
    with pytest.raises(PolicyInvalid):
        load_policy(HEAD + (
            "  both:\n    rules:\n"
            "      - {name: ms, abi: vendor-hyp, action: forward, handler: memshare}\n"
            "      - {name: hv, functions: [HV_FUNC_ID], action: forward, handler: hyperv}\n"),
            PLUGINS)


def test_forwarding_only_hv_func_id_is_refused() -> None:
    # KVM would go on answering VENDOR_HYP_CALL_UID with its own UID: the guest would never
    # look for Hyper-V, and KVM_FEATURES would describe a service the profile took away.
    with pytest.raises(PolicyInvalid, match="split"):
        load_policy(HEAD + (
            "  partial:\n    rules:\n"
            "      - {name: hv, functions: [HV_FUNC_ID], action: forward, handler: hyperv}\n"),
            PLUGINS)
