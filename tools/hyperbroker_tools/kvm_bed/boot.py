"""Booting the bed: real broker and agent processes, and QEMU with a plan.

QEMU runs the L1 arm64 Linux under TCG with EL2 (virt,virtualization=on), so KVM works inside it;
the VMM reaches the host's agent over a virtio-serial port. Every process started here is killed
by its PID however the boot ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gzip
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from hyperbroker.testing import procs
from hyperbroker_tools.kvm_bed.build import Artifacts, newc_entry
from hyperbroker_tools.kvm_bed.host import QEMU, BedError
from hyperbroker_tools.kvm_bed.records import HB_RECORD, BootResult, parse_record, record_fields

# The QEMU machine: EL2 for KVM (virt,virtualization=on; QEMU docs/system/arm/virt.rst), the fast
# pointer-auth algorithm (pauth-impdef, docs/system/arm/cpu-features.rst), no NIC (its option ROM
# is not installed), the agent link on a virtio-serial port.
QEMU_MACHINE = ["-M", "virt,virtualization=on,gic-version=3", "-cpu", "max,pauth-impdef=on"]
AGENT_PORT_NAME = "agent"  # vmm/arm64/src/main.c looks the port up by this name
KERNEL_ARGS = "console=ttyAMA0 rdinit=/init panic=-1 quiet loglevel=1"
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h




def hyperbroker_command() -> list[str]:
    """The hyperbroker CLI of this interpreter's environment (as hyperbroker.testing.procs starts
    it)."""
    return [sys.executable, "-m", "hyperbroker.cli"]


def scrape(port: int) -> str:
    """The Prometheus text a metrics endpoint on 127.0.0.1:`port` serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


@dataclasses.dataclass(frozen=True, slots=True)
class MetricSample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_metrics(text: str) -> list[MetricSample]:
    """Prometheus text exposition format: one sample per non-comment line."""
    out: list[MetricSample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        with contextlib.suppress(ValueError):
            out.append(MetricSample(m.group(1), labels, float(m.group(3))))
    return out


class Services:
    """A real broker and agent (hyperbroker.testing.procs), for one policy, with state in `workdir`.
    """

    def __init__(self, policy: Path, workdir: Path, host_id: str = "kvm-bed") -> None:
        self.policy = policy
        self.workdir = workdir
        self.host_id = host_id
        self.broker: procs.Broker | None = None
        self.agent: procs.AgentProcess | None = None

    def start(self) -> Services:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker = procs.start_broker(self.policy, self.workdir / "state")
            self.agent = procs.start_agent(self.broker.address, self.host_id, self.workdir)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise BedError(f"broker/agent did not start: {e}") from e
        return self

    @property
    def stream_socket(self) -> Path:
        assert self.agent is not None, "start() first"
        return self.agent.stream_socket

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.process.stop()

    def stop(self) -> None:
        for managed in (self.agent, self.broker):
            if managed is not None:
                managed.process.stop()

    def broker_metrics(self) -> list[MetricSample]:
        assert self.broker is not None and self.broker.metrics_port is not None
        return parse_metrics(scrape(self.broker.metrics_port))

    def agent_metrics(self) -> list[MetricSample]:
        assert self.agent is not None and self.agent.metrics_port is not None
        return parse_metrics(scrape(self.agent.metrics_port))

    def logs(self) -> str:
        return "\n".join(
            f"--- {m.process.name}\n" + "\n".join(m.process.lines[-40:])
            for m in (self.broker, self.agent) if m is not None
        )

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()




def plan_initrd(artifacts: Artifacts, plan: Sequence[str], out: Path) -> Path:
    """The bed's initramfs with /plan (one step a line) appended as a second archive.

    The kernel unpacks concatenated (compressed) cpio archives in order (buffer-format.rst), so
    a boot's plan costs one small archive, and no plan is bound by the command line's size.
    """
    if any("\n" in step for step in plan):
        raise BedError("a plan step cannot hold a newline")
    extra = gzip.compress(
        newc_entry("plan", 0o100644, "".join(f"{step}\n" for step in plan).encode(), ino=1)
        + newc_entry("TRAILER!!!", 0),
        mtime=0,
    )
    out.write_bytes(artifacts.initramfs.read_bytes() + extra)
    return out


def qemu_command(artifacts: Artifacts, initrd: Path, agent_socket: Path | None) -> list[str]:
    cmd = [
        QEMU, *QEMU_MACHINE, "-smp", "1", "-m", "512", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot", "-nic", "none",
        "-kernel", str(artifacts.kernel.image), "-initrd", str(initrd),
        "-append", KERNEL_ARGS,
    ]
    if agent_socket is not None:
        cmd += [
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={agent_socket},server=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    return cmd


def _die_with_parent() -> None:
    """In the QEMU child: SIGKILL it if the harness dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(None)


def boot(artifacts: Artifacts, plan: Sequence[str], *, agent_socket: Path | None = None,
         timeout: float = 90, on_wait: Callable[[str], None] | None = None,
         on_line: Callable[[str], None] | None = None) -> BootResult:
    """Boots the L1 Linux, runs `plan` in the VMM, returns the parsed console.

    `on_wait(token)` is called when a guest waits for the host (hb_wait); the guest resumes
    when it returns. QEMU is killed by its PID however this ends.
    """
    result = BootResult([], None, 0.0)
    with tempfile.TemporaryDirectory(prefix="hb-bed-") as tmp:
        initrd = plan_initrd(artifacts, plan, Path(tmp) / "initrd.cpio.gz")
        return _boot(artifacts, initrd, agent_socket, timeout, on_wait, on_line, result)


def _boot(artifacts: Artifacts, initrd: Path, agent_socket: Path | None, timeout: float,
          on_wait: Callable[[str], None] | None, on_line: Callable[[str], None] | None,
          result: BootResult) -> BootResult:
    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(artifacts, initrd, agent_socket), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None and proc.stdin is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BedError(f"the bed did not finish in {timeout:.0f} s\n{result.console()}")
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            result.seconds = time.monotonic() - started
            result.lines.append(line)
            parse_record(result, line)
            if on_line is not None:
                on_line(line)
            m = HB_RECORD.match(line)
            if m and m.group("rest").startswith("wait "):
                token = record_fields(m.group("rest")).get("token", "")
                if on_wait is not None:
                    on_wait(token)
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
        result.returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        reader.join(timeout=5)
    result.seconds = time.monotonic() - started
    return result
