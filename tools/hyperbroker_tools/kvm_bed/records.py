"""The VMM's console records (vmm/arm64/src/log.h) parsed into one boot's result."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

HB_RECORD = re.compile(r"^HB (?:g\[(?P<guest>[^\]]*)\] )?(?P<rest>.*)$")
KEY_VALUE = re.compile(r'(\w+)=("([^"]*)"|\S*)')




def record_fields(text: str) -> dict[str, str]:
    return {m.group(1): m.group(3) if m.group(3) is not None else m.group(2)
            for m in KEY_VALUE.finditer(text)}


@dataclasses.dataclass(frozen=True, slots=True)
class CallRecord:
    """One SMCCC call as the L2 guest saw it."""

    guest: str
    label: str
    fid: int
    conduit: str
    x: tuple[int, int, int, int]
    ns: int
    profile: str = ""  # the policy profile of the VM that made it ("-" when the VMM answered)


@dataclasses.dataclass(frozen=True, slots=True)
class Samples:
    """Statistics of guest-observed round trips (nanoseconds), or of link pings."""

    source: str  # the guest program, or "ping"
    vm: str  # the VM the samples came from ("" for pings)
    local: bool  # the VMM answered the calls itself (no agent)
    fid: int | None
    n: int
    min_ns: int
    median_ns: int
    p90_ns: int
    max_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class RunRecord:
    guest: str
    reason: str
    status: int
    ok: bool
    hypercalls: int
    link_failures: int
    fids: Mapping[int, int]
    run_ms: int
    profile: str = ""
    mem_reads: int = 0  # the agent's guest-memory requests the VMM served in this run
    mem_writes: int = 0
    mem_refused: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeRecord:
    """What KVM_SET_DEVICE_ATTR returned for one raw filter record (or a ran marker)."""

    index: int
    ran: bool
    errno: str


@dataclasses.dataclass
class BootResult:
    lines: list[str]
    returncode: int | None
    seconds: float
    init_seconds: float | None = None
    kvm: dict[str, str] = dataclasses.field(default_factory=dict)
    calls: list[CallRecord] = dataclasses.field(default_factory=list)
    samples: list[Samples] = dataclasses.field(default_factory=list)
    runs: list[RunRecord] = dataclasses.field(default_factory=list)
    probes: list[ProbeRecord] = dataclasses.field(default_factory=list)
    filters: list[dict[str, str]] = dataclasses.field(default_factory=list)
    registrations: list[dict[str, str]] = dataclasses.field(default_factory=list)
    refusals: list[dict[str, str]] = dataclasses.field(default_factory=list)
    actions: list[dict[str, str]] = dataclasses.field(default_factory=list)
    destroyed: list[dict[str, str]] = dataclasses.field(default_factory=list)
    vm_resets: list[dict[str, str]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    done: dict[str, str] | None = None
    current_vm: dict[str, str] = dataclasses.field(default_factory=dict)

    def call(self, guest: str, label: str, profile: str | None = None) -> CallRecord:
        """The last call `label` of `guest` (run under `profile`, if given)."""
        found = [c for c in self.calls if c.guest == guest and c.label == label
                 and profile in (None, c.profile)]
        if not found:
            raise KeyError(f"no call {label!r} from guest {guest!r} (profile {profile}); "
                           f"console:\n{self.console()}")
        return found[-1]

    def run(self, guest: str, profile: str | None = None) -> RunRecord:
        found = [r for r in self.runs if r.guest == guest and profile in (None, r.profile)]
        if not found:
            raise KeyError(f"no run of guest {guest!r} (profile {profile}); "
                           f"console:\n{self.console()}")
        return found[-1]

    def actions_of(self, guest: str, profile: str | None = None) -> list[dict[str, str]]:
        """The VMM actions carried out for `guest`'s runs, in order."""
        return [a for a in self.actions if a.get("guest") == guest
                and profile in (None, a.get("profile"))]

    def samples_of(self, source: str, *, fid: int | None = None,
                   local: bool | None = None) -> Samples:
        found = [s for s in self.samples if s.source == source
                 and (fid is None or s.fid == fid) and (local is None or s.local == local)]
        if not found:
            raise KeyError(f"no samples from {source!r} (fid {fid}, local {local}); "
                           f"console:\n{self.console()}")
        return found[-1]

    def console(self, last: int = 80) -> str:
        return "\n".join(self.lines[-last:])


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text, 0) if text is not None else default
    except ValueError:
        return default


def parse_record(result: BootResult, line: str) -> None:
    """Folds one console line (an "HB ..." record of vmm/arm64/src/log.h) into `result`."""
    m = HB_RECORD.match(line)
    if not m:
        return
    guest, rest = m.group("guest"), m.group("rest")
    kind, _, tail = rest.partition(" ")
    f = record_fields(tail)
    if guest is not None:
        if kind == "call":
            x = tuple(_int(f.get(f"x{i}")) for i in range(4))
            result.calls.append(CallRecord(
                guest, f.get("label", ""), _int(f.get("fid")), f.get("conduit", "hvc"),
                (x[0], x[1], x[2], x[3]), _int(f.get("ns")), result.current_vm.get("profile", ""),
            ))
        elif kind == "samples":
            result.samples.append(Samples(
                guest, result.current_vm.get("vm", ""), result.current_vm.get("local") == "1",
                _int(f.get("fid")) if "fid" in f else None, _int(f.get("n")),
                _int(f.get("min_ns")), _int(f.get("median_ns")), _int(f.get("p90_ns")),
                _int(f.get("max_ns")),
            ))
        elif kind == "exception":
            result.problems.append(line)
        return
    if kind == "kvm":
        result.kvm = f
    elif kind == "run-end":
        fids = {}
        for item in f.get("fids", "-").split(","):
            fid, sep, count = item.partition(":")
            if sep:
                fids[_int(fid)] = _int(count)
        result.runs.append(RunRecord(
            f.get("guest", ""), f.get("reason", ""), _int(f.get("status")),
            f.get("ok") == "1", _int(f.get("hypercalls")), _int(f.get("link_failures")),
            fids, _int(f.get("run_ms")), result.current_vm.get("profile", ""),
            _int(f.get("mem_reads")), _int(f.get("mem_writes")), _int(f.get("mem_refused")),
        ))
    elif kind == "probe":
        result.probes.append(ProbeRecord(_int(f.get("index")), f.get("ran") == "1",
                                         f.get("errno", "")))
    elif kind == "run-begin":
        result.current_vm = f
    elif kind == "ping":
        result.samples.append(Samples(
            "ping", "", False, None, _int(f.get("n")), _int(f.get("min_ns")),
            _int(f.get("median_ns")), _int(f.get("p90_ns")), _int(f.get("max_ns")),
        ))
    elif kind == "filter":
        result.filters.append(f)
    elif kind == "action":
        result.actions.append({**f, "profile": result.current_vm.get("profile", "")})
    elif kind == "registered":
        result.registrations.append(f)
    elif kind == "register-refused":
        result.refusals.append(f)
    elif kind == "destroyed":
        result.destroyed.append(f)
    elif kind == "vm-reset":
        result.vm_resets.append({**f, "profile": result.current_vm.get("profile", "")})
    elif kind == "boot":
        result.init_seconds = result.seconds
    elif kind == "done":
        result.done = f
    elif kind in ("plan-error", "run-error", "probe-error", "kvm-error", "kvm-run-error",
                  "link-error", "unexpected-exit", "call-failed", "ping-error"):
        result.problems.append(line)
