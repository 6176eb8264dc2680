"""Session fixtures of the real arm64 KVM bed: one build, one kernel fetch, few boots.

`bed` prepares everything once (host packages, kernel, VMM, guests, initramfs) and skips the
bed's tests only when QEMU cannot run here at all. `main_run` boots once with real broker and
agent processes and runs every guest-side check of issue 3 item 4 that needs no host action in
the middle; the fallback check boots on its own (it stops the broker mid-run).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.kvm import FilterAction, SmcccFilter
from hyperbroker_tools import kvm_bed

# The bed's policy (docs/policy.md format). "default": TRNG served by the broker's handler with a
# 50 ms deadline and SMCCC NOT_SUPPORTED as fallback, one vendor-hyp function denied in the
# kernel, PSCI left to KVM. "psci": PSCI served by the psci handler, so power changes reach the
# VMM as actions. "ffa": FF-A served by the ffa handler, which reads and writes guest memory.
DENIED_FUNCTION = 0x8600_0100
UNSERVED_FUNCTION = 0x8400_005F  # inside the TRNG range DEN0098 leaves unallocated
DEADLINE_MS = 50
TRNG_RULE = (f"{{name: trng, abi: trng, action: forward, handler: trng, fallback: not_supported,"
             f" deadline_ms: {DEADLINE_MS}}}")
BED_POLICY = f"""\
handlers:
  trng: {{plugin: trng, config: {{}}}}
  psci: {{plugin: psci, config: {{}}}}
  ffa: {{plugin: ffa, config: {{}}}}
profiles:
  default:
    rules:
      - {TRNG_RULE}
      - {{name: deny-x, functions: [{DENIED_FUNCTION:#x}], action: deny}}
  psci:
    rules:
      - {TRNG_RULE}
      - {{name: psci, abi: psci, action: forward, handler: psci, fallback: not_supported,
         deadline_ms: 200}}
  ffa:
    rules:
      - {{name: ffa, abi: ffa, action: forward, handler: ffa, fallback: not_supported,
         deadline_ms: 200}}
"""

FWD = FilterAction.FWD_TO_USER
DENY = FilterAction.DENY


def _pad(index: int, value: int = 1) -> bytes:
    pad = bytearray(15)
    pad[index] = value
    return bytes(pad)


# Raw filter records against one VM, in order, with what the kernel answers (kvm_smccc_set_filter()
# in arch/arm64/kvm/hypercalls.c, measured on the bed's kernel). RanBefore: the vCPU ran once.
FILTER_TABLE: list[tuple[SmcccFilter | kvm_bed.RanBefore, str | None]] = [
    (SmcccFilter(0x8400_0060, 0xA0, FWD), "OK"),                  # FF-A SMC32 range
    (SmcccFilter(0xC400_0060, 0xA0, FWD), "OK"),                  # FF-A SMC64 range
    (SmcccFilter(0x8400_0060, 0xA0, FWD), "EEXIST"),              # the same range again
    (SmcccFilter(0x8400_0050, 0x20, FWD), "EEXIST"),              # partial overlap
    (SmcccFilter(0x8400_0070, 0x10, DENY), "EEXIST"),             # a sub-range
    (SmcccFilter(0x8400_0100, 0x10, FWD), "OK"),                  # adjacent is no overlap
    (SmcccFilter(0x8000_0000, 0x1, FWD), "EEXIST"),               # SMC32 arch range
    (SmcccFilter(0x8000_FFFF, 0x2, FWD), "EEXIST"),               # touching its end
    (SmcccFilter(0xC000_0000, 0x10, DENY), "EEXIST"),             # SMC64 arch range
    (SmcccFilter(0x8500_0000, 0x0, FWD), "EINVAL"),               # empty
    (SmcccFilter(0x8500_0000, 0x1, 3), "EINVAL"),                 # action 3 does not exist
    (SmcccFilter(0x8500_0000, 0x1, FWD, _pad(0)), "EINVAL"),      # non-zero pad
    (SmcccFilter(0x8500_0000, 0x1, FWD, _pad(14, 0xFF)), "EINVAL"),
    (SmcccFilter(0xFFFF_FFF0, 0x20, FWD), "EINVAL"),              # wraps past 0xFFFFFFFF
    (SmcccFilter(0x0, 0x0, FWD), "EEXIST"),                       # base 0, nr 0: whole space
    (SmcccFilter(0x8600_0100, 0x1, DENY), "OK"),                  # a deny record
    (SmcccFilter(0x8700_0000, 0x1, FilterAction.HANDLE), "OK"),   # HANDLE is a valid action
    (kvm_bed.RanBefore(), None),
    (SmcccFilter(0x8500_0000, 0x1, FWD), "EBUSY"),                # frozen after the first run
    (SmcccFilter(0x8400_0060, 0x1, FWD), "EBUSY"),                # busy comes before overlap
    (SmcccFilter(0x8500_0000, 0x1, FWD, _pad(3)), "EINVAL"),      # pad comes before busy
    (SmcccFilter(0x8500_0000, 0x0, FWD), "EINVAL"),               # so does an empty range
]

CHECK_CALLS = [DENIED_FUNCTION, 0, UNSERVED_FUNCTION, 0]
UNKNOWN_PROFILE = "no-such-profile"
# Steps of main_run's plan that must fail: the registration under UNKNOWN_PROFILE.
EXPECTED_FAILED_STEPS = 1


@dataclasses.dataclass
class MainRun:
    result: kvm_bed.BootResult
    broker_metrics: list[kvm_bed.MetricSample]
    agent_metrics: list[kvm_bed.MetricSample]
    artifacts: kvm_bed.Artifacts
    policy: Path


@pytest.fixture(scope="session")
def bed() -> kvm_bed.Artifacts:
    try:
        return kvm_bed.prepare()
    except kvm_bed.BedUnavailable as e:
        pytest.skip(f"QEMU cannot run here: {e}")


@pytest.fixture(scope="session")
def bed_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kvm-bed") / "policy.yaml"
    path.write_text(BED_POLICY)
    return path


@pytest.fixture(scope="session")
def main_run(bed: kvm_bed.Artifacts, bed_policy: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[MainRun]:
    plan = [
        kvm_bed.run_step("trng"),
        kvm_bed.run_step("calls", args=CHECK_CALLS),
        kvm_bed.run_step("smp", vcpus=2),
        kvm_bed.run_step("reset"),
        kvm_bed.run_step("smp", profile="psci", vcpus=2),
        kvm_bed.run_step("reset", profile="psci"),
        kvm_bed.run_step("ffa_mem", profile="ffa"),
        kvm_bed.run_step("calls", profile=UNKNOWN_PROFILE, args=CHECK_CALLS),
        kvm_bed.filters_step(record for record, _ in FILTER_TABLE),
        *kvm_bed.latency_plan(1000),
    ]
    work = tmp_path_factory.mktemp("kvm-bed-services")
    with kvm_bed.Services(bed_policy, work) as services:
        try:
            result = kvm_bed.boot(bed, plan, agent_socket=services.stream_socket, timeout=100)
        except kvm_bed.BedError as e:
            pytest.fail(f"{e}\n{services.logs()}")
        run = MainRun(result, services.broker_metrics(), services.agent_metrics(), bed,
                      bed_policy)
    cache = kvm_bed.cache_dir()
    if all(s.n for s in result.samples):
        figures = kvm_bed.latency_figures(result)
        (cache / "latency.json").write_text(json.dumps(figures.as_json(), indent=1))
        (cache / "latency.md").write_text(kvm_bed.latency_markdown(figures, bed.kernel))
    yield run
