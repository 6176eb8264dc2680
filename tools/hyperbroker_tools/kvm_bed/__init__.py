"""The real arm64 KVM test bed: QEMU, an L1 Linux, the reference VMM, real broker and agent.

An x86-64 host runs qemu-system-aarch64 (TCG) with EL2; the L1 arm64 Linux boots with KVM and
runs vmm/arm64's static VMM as /init; the VMM runs small L2 guest programs whose SMCCC calls
travel through the real KVM SMCCC filter, over a virtio-serial link, to an agent on the host.
The package installs what the bed needs and fetches the arm64 kernel (`host`), builds VMM,
guests and initramfs (`build`), starts broker and agent processes and boots QEMU with a plan
(`boot`), parses the VMM's console records (`records`), and derives the latency figures
(`latency`) and the live demo (`demo`). It must not know what any handler answers: checks live
in tests/kvm_bed, and the VMM's record format in vmm/arm64/src/log.h. docs/kvm-bed.md has more.
"""

from __future__ import annotations

from hyperbroker_tools.kvm_bed.boot import (
    AGENT_PORT_NAME,
    KERNEL_ARGS,
    PR_SET_PDEATHSIG,
    QEMU_MACHINE,
    MetricSample,
    Services,
    boot,
    hyperbroker_command,
    parse_metrics,
    plan_initrd,
    qemu_command,
    scrape,
)
from hyperbroker_tools.kvm_bed.build import (
    Artifacts,
    RanBefore,
    build_initramfs,
    build_vmm,
    filters_step,
    guest_programs,
    local_step,
    ping_step,
    prepare,
    run_step,
)
from hyperbroker_tools.kvm_bed.demo import (
    BROKER_CALLS_METRIC,
    DEMO_POLICY,
    run_demo,
)
from hyperbroker_tools.kvm_bed.host import (
    ARM64_IMAGE_MAGIC,
    DEBIAN_KEYRING,
    HOST_PACKAGES,
    KERNEL_FALLBACK_PACKAGE,
    KERNEL_METAPACKAGE,
    QEMU,
    REPO_ROOT,
    VMM_BUILD_DIR,
    VMM_DIR,
    BedError,
    BedUnavailable,
    Kernel,
    cache_dir,
    ensure_host_packages,
    fetch_kernel,
)
from hyperbroker_tools.kvm_bed.latency import (
    TRNG_RND64,
    TRNG_VERSION,
    LatencyFigures,
    latency_figures,
    latency_markdown,
    latency_plan,
)
from hyperbroker_tools.kvm_bed.records import (
    HB_RECORD,
    KEY_VALUE,
    BootResult,
    CallRecord,
    ProbeRecord,
    RunRecord,
    Samples,
    parse_record,
)

__all__ = [
    "AGENT_PORT_NAME",
    "ARM64_IMAGE_MAGIC",
    "BROKER_CALLS_METRIC",
    "DEBIAN_KEYRING",
    "DEMO_POLICY",
    "HB_RECORD",
    "HOST_PACKAGES",
    "KERNEL_ARGS",
    "KERNEL_FALLBACK_PACKAGE",
    "KERNEL_METAPACKAGE",
    "KEY_VALUE",
    "PR_SET_PDEATHSIG",
    "QEMU",
    "QEMU_MACHINE",
    "REPO_ROOT",
    "TRNG_RND64",
    "TRNG_VERSION",
    "VMM_BUILD_DIR",
    "VMM_DIR",
    "Artifacts",
    "BedError",
    "BedUnavailable",
    "BootResult",
    "CallRecord",
    "Kernel",
    "LatencyFigures",
    "MetricSample",
    "ProbeRecord",
    "RanBefore",
    "RunRecord",
    "Samples",
    "Services",
    "boot",
    "build_initramfs",
    "build_vmm",
    "cache_dir",
    "ensure_host_packages",
    "fetch_kernel",
    "filters_step",
    "guest_programs",
    "hyperbroker_command",
    "latency_figures",
    "latency_markdown",
    "latency_plan",
    "local_step",
    "parse_metrics",
    "parse_record",
    "ping_step",
    "plan_initrd",
    "prepare",
    "qemu_command",
    "run_demo",
    "run_step",
    "scrape",
]
