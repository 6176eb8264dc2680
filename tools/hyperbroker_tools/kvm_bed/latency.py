"""Latency figures from a boot that timed calls each way (docs/kvm-bed.md)."""

from __future__ import annotations

import dataclasses

from hyperbroker_tools.kvm_bed.build import local_step, ping_step, run_step
from hyperbroker_tools.kvm_bed.host import Kernel
from hyperbroker_tools.kvm_bed.records import BootResult, Samples

# The calls the latency figures time (Arm DEN0098 TRNG IDs, include/linux/arm-smccc.h): RND64 is
# answered by the broker's handler; VERSION has a static answer the agent serves itself.
TRNG_VERSION = 0x8400_0050
TRNG_RND64 = 0xC400_0053


def latency_plan(n: int = 1000) -> list[str]:
    """Steps timing `n` calls each way, and `n` link pings (needs TRNG forwarded to the broker)."""
    return [
        run_step("latency", args=[TRNG_RND64, n, 64]),
        run_step("latency", args=[TRNG_VERSION, n]),
        local_step("latency", [(TRNG_RND64, 1)], args=[TRNG_RND64, n, 64]),
        ping_step(n),
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyFigures:
    broker: Samples  # guest HVC -> VMM -> agent -> broker handler -> back
    agent_static: Samples  # guest HVC -> VMM -> agent's static answer -> back
    local: Samples  # guest HVC -> VMM answers in L1 -> back
    link: Samples  # VMM -> agent -> VMM, HB_MSG_PING, no guest

    def as_json(self) -> dict[str, dict[str, int]]:
        return {name: {k: v for k, v in dataclasses.asdict(getattr(self, name)).items()
                       if k.endswith("_ns") or k == "n"}
                for name in ("broker", "agent_static", "local", "link")}


def latency_figures(result: BootResult) -> LatencyFigures:
    return LatencyFigures(
        broker=result.samples_of("latency", fid=TRNG_RND64, local=False),
        agent_static=result.samples_of("latency", fid=TRNG_VERSION, local=False),
        local=result.samples_of("latency", fid=TRNG_RND64, local=True),
        link=result.samples_of("ping"),
    )


def latency_markdown(fig: LatencyFigures, kernel: Kernel) -> str:
    """The table docs/performance.md carries, from one bed run."""
    def row(what: str, s: Samples) -> str:
        return (f"| {what} | {s.n} | {s.median_ns / 1000:.0f} | {s.p90_ns / 1000:.0f} | "
                f"{s.min_ns / 1000:.0f} |")

    return "\n".join([
        f"Measured on the bed (QEMU TCG, L1 kernel {kernel.package} {kernel.version}, one vCPU),"
        " guest-observed with the virtual counter around each HVC:",
        "",
        "| round trip | calls | median µs | p90 µs | min µs |",
        "| --- | ---: | ---: | ---: | ---: |",
        row("forwarded, answered by the broker (TRNG_RND64)", fig.broker),
        row("forwarded, static answer from the agent (TRNG_VERSION)", fig.agent_static),
        row("answered by the VMM in L1, no agent (TRNG_RND64)", fig.local),
        row("VMM <-> agent link alone (HB_MSG_PING, no guest)", fig.link),
        "",
    ])
