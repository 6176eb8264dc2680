"""Policy and userspace PSCI: a profile forwards the PSCI range whole or not at all (issue 6
item 2), because the handler declares the PSCI range as its ABI and the policy engine
(hyperbroker.broker.policy) refuses a split ABI."""

from __future__ import annotations

import pytest

from hyperbroker.broker.policy import PolicyInvalid, load_policy
from hyperbroker.handlers.psci import PsciHandler

PLUGINS = {"psci": PsciHandler}


def policy(rules: str) -> str:
    head = "handlers:\n  psci: {config: {version: '1.3'}}\n"
    return head + "profiles:\n  default:\n    rules:\n" + rules


def test_a_profile_forwarding_all_of_psci_is_accepted() -> None:
    loaded = load_policy(policy(
        "      - {name: psci, abi: psci, action: forward, handler: psci}\n"), PLUGINS)
    entry = loaded.profiles["default"].lookup(0xC400_0003)  # CPU_ON64
    assert entry is not None and entry.handler == "psci"


@pytest.mark.parametrize("selector", [
    "functions: [PSCI_CPU_ON]",  # only CPU_ON (what QEMU's hotplug RFC forwards)
    "ranges: [{base: 0x84000000, count: 0x20}]",  # the SMC32 half only
])
def test_a_profile_forwarding_part_of_psci_is_refused(selector: str) -> None:
    with pytest.raises(PolicyInvalid, match="split"):
        load_policy(policy(
            f"      - {{name: half, {selector}, action: forward, handler: psci}}\n"), PLUGINS)
