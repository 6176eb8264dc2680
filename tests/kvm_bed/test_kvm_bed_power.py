"""VM and vCPU lifetime on the reference VMM: a second vCPU, reset, power-off, and a VM the
agent refuses to register. Each runs twice: under the "default" profile PSCI stays in KVM (in-kernel
CPU_ON, KVM_EXIT_SYSTEM_EVENT); under "psci" the broker's psci handler serves it and the VMM
carries out the CPU_ON / CPU_OFF / SYSTEM_RESET / SYSTEM_OFF actions of its results (Arm DEN0022,
PSCI). Guest programs: vmm/arm64/guests/smp.c and reset.c.
"""

from __future__ import annotations

import pytest

from .conftest import UNKNOWN_PROFILE, MainRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PSCI_CPU_ON = 0xC400_0003
PSCI_CPU_OFF = 0x8400_0002
PSCI_SYSTEM_RESET = 0x8400_0009
PSCI_SYSTEM_OFF = 0x8400_0008
TRNG_RND64 = 0xC400_0053
SMP_ENTRY_CONTEXT = 0x5EC0_DD00  # guests/smp.c CONTEXT_ID


def _guest_lines(main_run: MainRun, guest: str, vm: str) -> list[str]:
    """What the guest printed during the run of VM `vm` (between its run-begin and run-end)."""
    out, inside = [], False
    for line in main_run.result.lines:
        if line.startswith("HB run-begin ") and f" vm={vm} " in line:
            inside = True
        elif line.startswith("HB run-end ") and f" vm={vm} " in line:
            inside = False
        elif inside and line.startswith(f"HB g[{guest}] "):
            out.append(line.removeprefix(f"HB g[{guest}] "))
    return out


def _vm(main_run: MainRun, guest: str, profile: str) -> str:
    [vm] = [r["vm"] for r in main_run.result.registrations
            if r["guest"] == guest and r["profile"] == profile]
    return vm


@pytest.mark.parametrize("profile", ["default", "psci"])
def test_a_secondary_vcpu_starts_calls_and_powers_off(main_run: MainRun, profile: str) -> None:
    """PSCI CPU_ON: vCPU 1 starts at its entry point with its context id, makes a
    forwarded call of its own, and CPU_OFF parks it."""
    result = main_run.result
    assert result.call("smp", "cpu_on", profile).x[0] == 0  # PSCI SUCCESS
    secondary = result.call("smp", "secondary.rnd64", profile)
    assert secondary.x[0] == 0 and secondary.x[3] != 0  # answered by the broker's handler
    lines = _guest_lines(main_run, "smp", _vm(main_run, "smp", profile))
    assert f"secondary up vcpu=1 context={SMP_ENTRY_CONTEXT:#x}" in lines
    assert (f"primary vcpu=0 cpu_on=0x0 secondary_done=1 secondary_context="
            f"{SMP_ENTRY_CONTEXT:#x}") in lines
    run = result.run("smp", profile)
    assert run.ok, result.console()
    if profile == "default":  # KVM served PSCI: only the TRNG call left the kernel
        assert run.fids == {TRNG_RND64: 1}
        assert not result.actions_of("smp", profile)
    else:
        assert run.fids == {PSCI_CPU_ON: 1, TRNG_RND64: 1, PSCI_CPU_OFF: 1}
        actions = [(a["kind"], a["vcpu"], a["by_vcpu"], a["result"])
                   for a in result.actions_of("smp", profile)]
        assert actions == [("cpu-on", "1", "0", "done"), ("cpu-off", "1", "1", "done")]
        [cpu_on] = [a for a in result.actions_of("smp", profile) if a["kind"] == "cpu-on"]
        assert int(cpu_on["value"], 0) == SMP_ENTRY_CONTEXT


@pytest.mark.parametrize("profile", ["default", "psci"])
def test_system_reset_restarts_the_program_and_system_off_ends_the_vm(
    main_run: MainRun, profile: str,
) -> None:
    """SYSTEM_RESET reloads the program, SYSTEM_OFF ends the VM cleanly."""
    lines = _guest_lines(main_run, "reset", _vm(main_run, "reset", profile))
    assert lines == ["boot count=1", "boot count=2"]
    run = main_run.result.run("reset", profile)
    assert (run.reason, run.status, run.ok) == ("system-off", 0, True)
    resets = [(r["guest"], r["status"]) for r in main_run.result.vm_resets
              if r["profile"] == profile]
    if profile == "psci":
        assert run.fids == {PSCI_SYSTEM_RESET: 1, PSCI_SYSTEM_OFF: 1}
        kinds = [a["kind"] for a in main_run.result.actions_of("reset", profile)]
        assert kinds == ["system-reset", "system-off"]
        assert resets == []  # the psci handler asked for it: the handlers knew already
    else:
        assert run.fids == {}  # KVM_EXIT_SYSTEM_EVENT, no hypercall exit
        # KVM reset the guest itself: the VMM told the agent (HB_MSG_VM_RESET), and the broker's
        # handlers forgot the boot before the guest ran again.
        assert resets == [("reset", "OK")]


def test_a_vm_the_agent_refuses_to_register_never_runs_and_the_vmm_goes_on(
    main_run: MainRun,
) -> None:
    [refusal] = main_run.result.refusals
    assert refusal["profile"] == UNKNOWN_PROFILE and refusal["status"] == "ENOENT"
    assert UNKNOWN_PROFILE in refusal["message"]
    assert [r.guest for r in main_run.result.runs].count("calls") == 1  # only the good one ran
    assert main_run.result.runs[-1].guest == "latency"  # the later steps still ran


def test_every_registered_vm_is_destroyed_with_the_agent_at_the_end(main_run: MainRun) -> None:
    registered = [(r["vm"], r["vm_id"]) for r in main_run.result.registrations]
    destroyed = [(d["vm"], d["vm_id"]) for d in main_run.result.destroyed
                 if d["status"] == "OK"]
    assert registered == destroyed
    assert len(registered) == len({vm_id for _, vm_id in registered})  # one vm_id each
