"""Issue 6 on the real-KVM bed: userspace PSCI on two vCPUs, the Hyper-V persona and memory-share
tracking, each served by its handler in a real broker to a real arm64 guest under real KVM.

One boot runs three guest programs (vmm/arm64/guests/psci_power.c, hyperv.c, memshare.c) under
this module's policy: the profiles "psci-hyperv" and "psci-memshare" forward the whole PSCI
range to the psci handler (with `agent_static: false`, so even PSCI_VERSION is answered by the
broker) and the whole vendor-hyp range to the hyperv or the memshare handler. A VM's handler view
exists only while the VM is registered, so the hyperv and memshare guests end by waiting for the
host (hb_wait): while they wait, the harness reads the view with `hyperbroker inspect` (the Admin
API's GetVmHandlerView) and scrapes the broker's metrics. References: Arm DEN0022 (PSCI) as
arch/arm64/kvm/psci.c serves it; the Hyper-V TLFS as Linux's arch/arm64/hyperv/ and
include/hyperv/hvgdk_mini.h use it; KVM's vendor hypervisor service and the pKVM guest calls in
include/linux/arm-smccc.h and Documentation/virt/kvm/arm/hypercalls.rst; docs/psci.md,
docs/hyperv.md, docs/memshare.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperbroker.smccc import U64_MASK
from hyperbroker_tools import kvm_bed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HOST = "kvm-bed"  # kvm_bed.Services' default host id
DENIED_BASE = 0x40E0_0000  # memshare's deny range: 1 MiB inside the guest's 16 MiB of RAM
HV_PARTITION_ID = 7
HV_BUILD = 26100
POLICY = f"""\
handlers:
  psci: {{plugin: psci, config: {{}}}}
  hyperv:
    plugin: hyperv
    config: {{partition_id: {HV_PARTITION_ID},
              hypervisor_version: {{major: 10, minor: 0, build: {HV_BUILD}}}}}
  memshare:
    plugin: memshare
    config: {{ram: [{{base: 0x40000000, size: 0x1000000}}],
              deny: [{{base: {DENIED_BASE:#x}, size: 0x100000}}]}}
profiles:
  psci-hyperv:
    rules:
      - {{name: psci, abi: psci, action: forward, handler: psci, agent_static: false,
         fallback: not_supported, deadline_ms: 2000}}
      - {{name: hyperv, abi: vendor-hyp, action: forward, handler: hyperv,
         fallback: not_supported, deadline_ms: 2000}}
  psci-memshare:
    rules:
      - {{name: psci, abi: psci, action: forward, handler: psci, agent_static: false,
         fallback: not_supported, deadline_ms: 2000}}
      - {{name: memshare, abi: vendor-hyp, action: forward, handler: memshare,
         fallback: not_supported, deadline_ms: 2000}}
"""
# hb_wait token -> the handler whose view of the waiting VM the harness reads.
WAITS = {"hyperv-crash": "hyperv", "memshare-record": "memshare"}

NOT_SUPPORTED = -1 & U64_MASK
PSCI_ALREADY_ON = -4 & U64_MASK
PKVM_INVALID_PARAMETER = -3 & U64_MASK  # the pKVM calls' only error (SMCCC_RET_INVALID_PARAMETER)

# PSCI IDs (include/uapi/linux/psci.h).
PSCI_VERSION = 0x8400_0000
PSCI_CPU_OFF = 0x8400_0002
PSCI_CPU_ON64 = 0xC400_0003
PSCI_AFFINITY_INFO64 = 0xC400_0004
PSCI_SYSTEM_OFF = 0x8400_0008
PSCI_FEATURES = 0x8400_000A
PSCI_CONTEXT = 0xC0FF_EE01  # guests/psci_power.c CONTEXT_ID
AFFINITY_ON, AFFINITY_OFF = 0, 1

# Hyper-V (include/hyperv/hvgdk_mini.h, arch/arm64/include/asm/mshyperv.h).
VENDOR_HYP_CALL_UID = 0x8600_FF01
KVM_FEATURES = 0x8600_0000
HV_FUNC_ID = 0x4600_0001
# ARM_SMCCC_VENDOR_HYP_UID_HYPERV_REG_0..3 (include/linux/arm-smccc.h)
HYPERV_UID_REGS = (0x4D32_BA58, 0xCD24_4764, 0x8EEF_6C75, 0x1659_7024)
HV_SUCCESS_1_REP = 1 << 32  # TLFS hypercall result: status 0 in 15:0, 1 rep completed in 43:32
GUEST_OS_ID = 0x8100_0006_0C00_0000  # guests/hyperv.c: Linux vendor 0x8100, version 6.12
HV_PRIVILEGES = 0x32_0000_0062  # the persona's default: every bit it serves (docs/hyperv.md)
HV_MISC_FEATURES = 0x100  # HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE, arm64 bit 8
HV_CRASH_CTL_CAPS = 0xC000_0000_0000_0000  # CRASH_NOTIFY | CRASH_NOTIFY_MSG
HV_CONTEXT = 0x4879_C0DE  # guests/hyperv.c CONTEXT_ID
POISON = 0x5A5A_5A5A_5A5A_5A5A  # guests/hyperv.c: x5..x7 of every GetVpRegisters going in
PANIC_TEXT = "Kernel panic - not syncing: hyperbroker bed crash test\n"

# KVM vendor services and pKVM (include/linux/arm-smccc.h).
KVM_UID_REGS = (0xB66F_B428, 0xE911_C52E, 0x564B_CAA9, 0x743A_004D)
HYP_MEMINFO = 0xC600_0002
MEM_SHARE = 0xC600_0003
MEM_UNSHARE = 0xC600_0004
MMIO_GUARD = 0xC600_0007
GRANULE = 4096
TESTDEV_PAGE = 0x0900_0000  # vmm/arm64/include/hb_testdev.h HB_TESTDEV_BASE


@dataclasses.dataclass
class Inspection:
    """`hyperbroker inspect HOST/VM HANDLER` and the broker's metrics, while the VM waited."""

    vm: str
    returncode: int
    stdout: str
    stderr: str
    metrics: list[kvm_bed.MetricSample]

    def view(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stderr
        doc = json.loads(self.stdout)
        assert isinstance(doc, dict)
        return doc


@dataclasses.dataclass
class HvRun:
    result: kvm_bed.BootResult
    inspections: dict[str, Inspection]  # by hb_wait token
    after: dict[str, Inspection]  # the same query once the VM was destroyed
    metrics_after: list[kvm_bed.MetricSample]
    broker_log: list[str]


def _inspect(services: kvm_bed.Services, vm: str, handler: str) -> Inspection:
    assert services.broker is not None
    cmd = [*kvm_bed.hyperbroker_command(), "inspect", f"{HOST}/{vm}", handler,
           "--broker", services.broker.address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    return Inspection(vm, proc.returncode, proc.stdout, proc.stderr, services.broker_metrics())


@pytest.fixture(scope="module")
def hv_run(bed: kvm_bed.Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HvRun]:
    work = tmp_path_factory.mktemp("kvm-bed-hv")
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    plan = [
        kvm_bed.run_step("psci_power", profile="psci-hyperv", vcpus=2),
        kvm_bed.run_step("hyperv", profile="psci-hyperv", vcpus=2),
        kvm_bed.run_step("memshare", profile="psci-memshare", args=[DENIED_BASE]),
    ]
    registered: list[str] = []
    inspections: dict[str, Inspection] = {}
    with kvm_bed.Services(policy, work) as services:

        def on_line(line: str) -> None:
            if line.startswith("HB registered "):
                registered.append(_fields(line)["vm"])

        def on_wait(token: str) -> None:
            inspections[token] = _inspect(services, registered[-1], WAITS[token])

        try:
            result = kvm_bed.boot(bed, plan, agent_socket=services.stream_socket, timeout=120,
                                  on_wait=on_wait, on_line=on_line)
        except kvm_bed.BedError as e:
            pytest.fail(f"{e}\n{services.logs()}")
        after = {token: _inspect(services, inspections[token].vm, WAITS[token])
                 for token in inspections}
        assert services.broker is not None
        yield HvRun(result, inspections, after, services.broker_metrics(),
                    list(services.broker.process.lines))


def _fields(text: str) -> dict[str, str]:
    """The key=value fields of a console record or guest line."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _vm(run: HvRun, guest: str) -> str:
    [vm] = [r["vm"] for r in run.result.registrations if r["guest"] == guest]
    return vm


def _guest_lines(run: HvRun, guest: str) -> list[str]:
    return [line.removeprefix(f"HB g[{guest}] ") for line in run.result.lines
            if line.startswith(f"HB g[{guest}] ")]


def _fields_of(run: HvRun, guest: str, kind: str) -> list[dict[str, str]]:
    """The key=value fields of guest lines starting with `kind` (e.g. "out")."""
    return [_fields(line.removeprefix(kind)) for line in _guest_lines(run, guest)
            if line.startswith(f"{kind} ")]


def _out(run: HvRun, label: str) -> tuple[int, int]:
    """x6 and x7 after the Hyper-V call `label` (guests/hyperv.c prints them)."""
    [f] = [f for f in _fields_of(run, "hyperv", "out") if f["label"] == label]
    return int(f["x6"], 0), int(f["x7"], 0)


def _counter(samples: list[kvm_bed.MetricSample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _served_by_broker(samples: list[kvm_bed.MetricSample], handler: str) -> set[str]:
    return {s.labels["function"] for s in samples
            if s.name == kvm_bed.BROKER_CALLS_METRIC and s.labels.get("handler") == handler
            and s.value}


def test_the_policy_with_both_profiles_passes_policy_check(tmp_path: Path) -> None:
    """Discovery consistency (issue 6 item 4) holds for psci+hyperv and psci+memshare."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    proc = subprocess.run([*kvm_bed.hyperbroker_command(), "policy", "check", str(policy)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "profile 'psci-hyperv'" in proc.stdout and "profile 'psci-memshare'" in proc.stdout


# --------------------------------------------------------------------------- PSCI


def test_psci_version_and_features_come_from_the_broker(hv_run: HvRun) -> None:
    """PSCI_VERSION = 1.3 (the handler's default), PSCI_FEATURES true for what is served and
    nothing else (DEN0022 §5.1.14; docs/psci.md "Supported calls"); both left the kernel and
    were answered by the broker's psci handler."""
    call = hv_run.result.call
    assert call("psci_power", "version").x[0] == 0x1_0003
    for label in ("cpu_on", "affinity_info", "cpu_off", "system_off", "smccc_version"):
        assert call("psci_power", f"features.{label}").x[0] == 0, label
    assert call("psci_power", "features.system_off2").x[0] == 1  # HIBERNATE_OFF supported
    assert call("psci_power", "features.migrate").x[0] == NOT_SUPPORTED
    run = hv_run.result.run("psci_power")
    assert run.fids[PSCI_VERSION] == 1 and run.fids[PSCI_FEATURES] == 7
    served = _served_by_broker(hv_run.metrics_after, "psci")
    assert {"PSCI_VERSION", "PSCI_FEATURES", "PSCI_AFFINITY_INFO64", "PSCI_CPU_ON64",
            "PSCI_CPU_OFF", "PSCI_SYSTEM_OFF"} <= served, served


def test_cpu_on_starts_vcpu_1_at_its_entry_with_its_context_id(hv_run: HvRun) -> None:
    """CPU_ON: vCPU 1 was OFF, starts at the entry point with x0 = context id and
    writes it to a marker word that vCPU 0 reads; a second CPU_ON is ALREADY_ON."""
    call = hv_run.result.call
    assert call("psci_power", "affinity.before").x[0] == AFFINITY_OFF
    assert call("psci_power", "cpu_on").x[0] == 0
    lines = _guest_lines(hv_run, "psci_power")
    assert f"secondary up vcpu=1 marker={PSCI_CONTEXT:#x}" in lines
    assert f"primary saw marker={PSCI_CONTEXT:#x}" in lines
    assert call("psci_power", "cpu_on.again").x[0] == PSCI_ALREADY_ON
    [cpu_on] = [a for a in hv_run.result.actions_of("psci_power") if a["kind"] == "cpu-on"]
    assert (cpu_on["vcpu"], cpu_on["by_vcpu"], cpu_on["result"]) == ("1", "0", "done")
    assert int(cpu_on["value"], 0) == PSCI_CONTEXT


def test_affinity_info_reports_vcpu_1_on_then_off_after_its_cpu_off(hv_run: HvRun) -> None:
    """AFFINITY_INFO: ON once vCPU 1 runs; CPU_OFF from vCPU 1 turns it OFF."""
    assert hv_run.result.call("psci_power", "affinity.on").x[0] == AFFINITY_ON
    assert hv_run.result.call("psci_power", "affinity.off").x[0] == AFFINITY_OFF
    [cpu_off] = [a for a in hv_run.result.actions_of("psci_power") if a["kind"] == "cpu-off"]
    assert (cpu_off["vcpu"], cpu_off["by_vcpu"], cpu_off["result"]) == ("1", "1", "done")


def test_system_off_from_the_psci_handler_ends_the_two_vcpu_vm(hv_run: HvRun) -> None:
    """SYSTEM_OFF: the handler's action ends the VM; the call never returns."""
    run = hv_run.result.run("psci_power")
    assert (run.reason, run.status, run.ok) == ("system-off", 0, True), hv_run.result.console()
    assert run.fids[PSCI_CPU_ON64] == 2 and run.fids[PSCI_CPU_OFF] == 1
    assert run.fids[PSCI_SYSTEM_OFF] == 1 and run.fids[PSCI_AFFINITY_INFO64] >= 3
    kinds = [a["kind"] for a in hv_run.result.actions_of("psci_power")]
    assert kinds == ["cpu-on", "cpu-off", "system-off"]
    assert "psci returned" not in _guest_lines(hv_run, "psci_power")


# --------------------------------------------------------------------------- Hyper-V


def test_the_vendor_uid_is_hyper_vs_and_kvm_services_are_hidden(hv_run: HvRun) -> None:
    """Hyper-V's Call UID; KVM_FEATURES is NOT_SUPPORTED behind it (docs/hyperv.md)."""
    assert hv_run.result.call("hyperv", "uid").x == HYPERV_UID_REGS
    assert hv_run.result.call("hyperv", "kvm_features").x[0] == NOT_SUPPORTED


def test_guest_os_id_is_set_and_read_back_with_the_x6_x7_convention(hv_run: HvRun) -> None:
    """hv_set_vpreg (name x4, value x6) and hv_get_vpreg_128 (value in x6/x7: the guest
    put POISON there, so both halves were written by the persona)."""
    assert hv_run.result.call("hyperv", "set.guest_os_id").x[0] == HV_SUCCESS_1_REP
    assert hv_run.result.call("hyperv", "get.guest_os_id").x[0] == HV_SUCCESS_1_REP
    assert _out(hv_run, "get.guest_os_id") == (GUEST_OS_ID, 0)


def test_the_feature_registers_hold_the_policys_configuration(hv_run: HvRun) -> None:
    """Privileges in 63:0 and misc features in 95:64; hints; the version register
    with the build from the policy (build 31:0, minor 47:32, major 63:48)."""
    for label in ("get.privileges", "get.features_info", "get.version", "get.crash_ctl"):
        assert hv_run.result.call("hyperv", label).x[0] == HV_SUCCESS_1_REP, label
    assert _out(hv_run, "get.privileges") == (HV_PRIVILEGES, HV_MISC_FEATURES)
    assert _out(hv_run, "get.features_info") == (0, 0)
    assert _out(hv_run, "get.version") == (10 << 48 | HV_BUILD, 0)
    assert _out(hv_run, "get.crash_ctl") == (HV_CRASH_CTL_CAPS, 0)


def test_vp_index_is_each_vcpus_own(hv_run: HvRun) -> None:
    """VP_INDEX per vCPU: vCPU 0 reads 0, vCPU 1 (started by the psci handler) reads 1, and
    vCPU 0 naming VP 1 reads 1."""
    assert _out(hv_run, "get.vp_index") == (0, 0)
    assert _out(hv_run, "secondary.vp_index") == (1, 0)
    assert _out(hv_run, "get.vp_index.1") == (1, 0)
    [cpu_on] = [a for a in hv_run.result.actions_of("hyperv") if a["kind"] == "cpu-on"]
    assert int(cpu_on["value"], 0) == HV_CONTEXT


def test_bad_hypercall_input_gets_its_status_code(hv_run: HvRun) -> None:
    """TLFS statuses: INVALID_PARAMETER (unknown register), INVALID_HYPERCALL_INPUT (reserved
    control bit), INVALID_HYPERCALL_CODE, INVALID_VP_INDEX, ACCESS_DENIED (read-only VP_INDEX)."""
    expected = {"bad.register": 0x5, "bad.reserved_bit": 0x3, "bad.code": 0x2,
                "bad.vp_index": 0xE, "bad.set_read_only": 0x6}
    got = {label: hv_run.result.call("hyperv", label).x[0] for label in expected}
    assert got == expected
    for label in ("bad.register", "bad.reserved_bit", "bad.code", "bad.vp_index"):
        assert _out(hv_run, label) == (POISON, POISON), label  # a failure writes only x0


def test_get_partition_id_writes_the_output_page(hv_run: HvRun) -> None:
    """HvCallGetPartitionId, slow: x0 = SUCCESS and the output page holds the partition ID."""
    assert hv_run.result.call("hyperv", "partition_id").x[0] == 0
    assert f"partition page id={HV_PARTITION_ID:#x}" in _guest_lines(hv_run, "hyperv")


def _crash_reported(run: HvRun) -> dict[str, str]:
    [f] = _fields_of(run, "hyperv", "crash reported")
    return f


def test_the_crash_is_in_the_vms_view_through_the_admin_api(hv_run: HvRun) -> None:
    """Both crash reports (hyperv_report_panic, hv_kmsg_dump) are events in the VM's state,
    read with `hyperbroker inspect` while the VM was registered."""
    assert hv_run.result.call("hyperv", "crash.notify").x[0] == HV_SUCCESS_1_REP
    assert hv_run.result.call("hyperv", "crash.message").x[0] == HV_SUCCESS_1_REP
    reported = _crash_reported(hv_run)
    inspection = hv_run.inspections["hyperv-crash"]
    assert inspection.vm == _vm(hv_run, "hyperv")
    view = inspection.view()
    assert view["partition_id"] == HV_PARTITION_ID
    assert view["guest_os_id"] == f"{GUEST_OS_ID:#x}"
    assert view["crash_count"] == 2
    notify, message = view["crashes"]
    assert (notify["kind"], notify["vcpu"], notify["host"], notify["vm"]) == (
        "notify", 0, HOST, inspection.vm)
    assert notify["params"] == [f"{v:#x}" for v in (
        0xB, GUEST_OS_ID, int(reported["pc"], 0), int(reported["sp"], 0), 0)]
    assert notify["guest_os_id"] == f"{GUEST_OS_ID:#x}"
    assert message["kind"] == "message"
    assert message["params"][3] == reported["text"]
    assert message["message"] == PANIC_TEXT and message["message_error"] is None


def test_the_crash_is_logged_and_counted_by_the_broker(hv_run: HvRun) -> None:
    """The ERROR log line and hyperbroker_hyperv_guest_crashes_total / _guest_crashed on the
    broker's metrics port (docs/hyperv.md "Crash reporting")."""
    vm = _vm(hv_run, "hyperv")
    reported = _crash_reported(hv_run)
    logged = [line for line in hv_run.broker_log if "guest crash:" in line]
    assert any("ERROR" in line and f"host={HOST} vm={vm} vcpu=0 kind=notify" in line
               and f"guest_os_id={GUEST_OS_ID:#x} error=0xb pc={reported['pc']}" in line
               for line in logged), hv_run.broker_log[-40:]
    assert any(f"vm={vm} vcpu=0 kind=message" in line and "hyperbroker bed crash test" in line
               for line in logged), logged
    during = hv_run.inspections["hyperv-crash"].metrics
    crashes = "hyperbroker_hyperv_guest_crashes_total"
    assert _counter(during, crashes, kind="notify") == 1
    assert _counter(during, crashes, kind="message") == 1
    assert _counter(during, "hyperbroker_hyperv_guest_crashed", host=HOST, vm=vm) == 1
    # Destroying the VM clears its "crashed" gauge and its view; the crash counters stay.
    assert not [s for s in hv_run.metrics_after
                if s.name == "hyperbroker_hyperv_guest_crashed" and s.labels.get("vm") == vm]
    assert _counter(hv_run.metrics_after, crashes) == 2
    assert hv_run.after["hyperv-crash"].returncode == 1
    assert "NOT_FOUND" in hv_run.after["hyperv-crash"].stderr


def test_the_hyperv_guest_ran_through_the_persona(hv_run: HvRun) -> None:
    run = hv_run.result.run("hyperv")
    assert run.ok and run.link_failures == 0, hv_run.result.console()
    assert run.fids[VENDOR_HYP_CALL_UID] == 1 and run.fids[KVM_FEATURES] == 1
    assert run.fids[HV_FUNC_ID] == 27  # every HV_FUNC_ID call of guests/hyperv.c
    assert [a["kind"] for a in hv_run.result.actions_of("hyperv")] == ["cpu-on", "cpu-off"]
    assert "HvCallGetVpRegisters" in {
        s.labels.get("call") for s in hv_run.metrics_after
        if s.name == "hyperbroker_hyperv_hypercalls_total" and s.value}


# --------------------------------------------------------------------------- memshare


def test_memshare_discovery_is_kvms_with_exactly_the_served_bits(hv_run: HvRun) -> None:
    """KVM's vendor hypervisor service: KVM's UID, KVM_FEATURES = FEATURES, HYP_MEMINFO,
    MEM_SHARE, MEM_UNSHARE, MMIO_GUARD (0x9D); PTP needs the host kernel and is hidden;
    HYP_MEMINFO = the granule."""
    call = hv_run.result.call
    assert call("memshare", "uid").x == KVM_UID_REGS
    assert call("memshare", "features").x == (0x9D, 0, 0, 0)
    assert call("memshare", "ptp").x[0] == NOT_SUPPORTED
    assert call("memshare", "meminfo").x[0] == GRANULE


def test_shares_unshares_and_guards_succeed_and_refusals_are_invalid_parameter(
    hv_run: HvRun,
) -> None:
    """pKVM guest calls: 0 for each good call, -3 INVALID_PARAMETER for every bad one."""
    good = [f"share.{i}" for i in range(8)] + ["unshare.2", "unshare.5", "share.2.again",
                                               "guard", "guard.again"]
    assert {label: hv_run.result.call("memshare", label).x[0] for label in good} == dict.fromkeys(
        good, 0)
    bad = ["bad.meminfo_mbz", "bad.share_mbz", "bad.share_unaligned", "bad.share_denied",
           "bad.share_outside_ram", "bad.share_twice", "bad.unshare_not_shared",
           "bad.guard_ram"]
    assert {label: hv_run.result.call("memshare", label).x[0] for label in bad} == dict.fromkeys(
        bad, PKVM_INVALID_PARAMETER)


def test_the_memshare_record_matches_what_the_guest_did(hv_run: HvRun) -> None:
    """Shared: granules {0,1,2,3,4,6,7} of the buffer as two ranges; guarded: the test device's
    page (docs/memshare.md "The record"), read through the Admin API while the VM ran."""
    [buffer] = _fields_of(hv_run, "memshare", "buffer")
    base = int(buffer["base"], 0)
    inspection = hv_run.inspections["memshare-record"]
    assert inspection.vm == _vm(hv_run, "memshare")
    assert inspection.view() == {
        "granule": GRANULE,
        "shared_bytes": 7 * GRANULE,
        "shared_granules": 7,
        "shared": [[base, base + 5 * GRANULE], [base + 6 * GRANULE, base + 8 * GRANULE]],
        "guarded_granules": 1,
        "guarded": [[TESTDEV_PAGE, TESTDEV_PAGE + GRANULE]],
    }


def test_memshare_metrics_count_each_result_and_the_record_goes_with_the_vm(
    hv_run: HvRun,
) -> None:
    vm = _vm(hv_run, "memshare")
    during = hv_run.inspections["memshare-record"].metrics
    calls = "hyperbroker_memshare_calls_total"
    expected = {
        ("KVM_HYP_MEMINFO", "ok"): 1, ("KVM_HYP_MEMINFO", "mbz"): 1,
        ("KVM_MEM_SHARE", "ok"): 9, ("KVM_MEM_SHARE", "mbz"): 1,
        ("KVM_MEM_SHARE", "unaligned"): 1, ("KVM_MEM_SHARE", "denied"): 1,
        ("KVM_MEM_SHARE", "not_ram"): 1, ("KVM_MEM_SHARE", "already_shared"): 1,
        ("KVM_MEM_UNSHARE", "ok"): 2, ("KVM_MEM_UNSHARE", "not_shared"): 1,
        ("KVM_MMIO_GUARD", "ok"): 2, ("KVM_MMIO_GUARD", "is_ram"): 1,
    }
    got = {(s.labels["function"], s.labels["result"]): s.value for s in during
           if s.name == calls and s.value}
    assert got == expected
    assert _counter(during, "hyperbroker_memshare_shared_bytes", vm=vm) == 7 * GRANULE
    assert _counter(during, "hyperbroker_memshare_guarded_granules", vm=vm) == 1
    gone = [s for s in hv_run.metrics_after if s.labels.get("vm") == vm
            and s.name.startswith("hyperbroker_memshare_")]
    assert not gone
    assert hv_run.after["memshare-record"].returncode == 1
    run = hv_run.result.run("memshare")
    assert run.ok and run.link_failures == 0, hv_run.result.console()
    assert run.fids[MEM_SHARE] == 14 and run.fids[MEM_UNSHARE] == 3
    assert run.fids[MMIO_GUARD] == 3 and run.fids[HYP_MEMINFO] == 2
