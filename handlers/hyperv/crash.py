"""A guest crash as the persona reports it: one structured event, its log line, its JSON form.

Linux reports a panic through the crash registers (HV_REGISTER_*, include/hyperv/hvgdk_mini.h):
either hyperv_report_panic (P0 = error, P1 = guest OS ID, P2 = PC, P3 = SP, then CRASH_CTL =
CRASH_NOTIFY) or hv_kmsg_dump (P3 = GPA of a page of panic text, P4 = its length, then CRASH_CTL =
CRASH_NOTIFY_MSG). Plain values; the adapter fills in the message from guest memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from hyperbroker.handlers.hyperv.registers import CrashReport


@dataclass(frozen=True, slots=True)
class GuestCrash:
    host: str
    vm: str
    vcpu: int
    notify: bool  # CRASH_NOTIFY: the parameters carry error, guest id, PC, SP
    params: tuple[int, int, int, int, int]
    guest_os_id: int
    message: str | None  # CRASH_NOTIFY_MSG: the panic text, decoded leniently
    message_error: str | None  # why the text could not be read, if it could not
    at_unix_ns: int

    @classmethod
    def from_report(cls, report: CrashReport, host: str, vm: str, message: str | None,
                    message_error: str | None, at_unix_ns: int) -> GuestCrash:
        return cls(host, vm, report.vp, report.notify, report.params, report.guest_os_id,
                   message, message_error, at_unix_ns)

    KINDS: ClassVar[tuple[str, ...]] = ("notify", "message")

    @property
    def kind(self) -> str:
        """A metric label: "message" when the guest sent its panic text, else "notify"."""
        return "message" if self.message is not None or self.message_error else "notify"

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "hyperv.guest_crash",
            "host": self.host,
            "vm": self.vm,
            "vcpu": self.vcpu,
            "kind": self.kind,
            "params": [f"{p:#x}" for p in self.params],
            "guest_os_id": f"{self.guest_os_id:#x}",
            "message": self.message,
            "message_error": self.message_error,
            "at_unix_ns": self.at_unix_ns,
        }

    def log_line(self) -> str:
        p = self.params
        head = (f"guest crash: host={self.host} vm={self.vm} vcpu={self.vcpu} kind={self.kind} "
                f"guest_os_id={self.guest_os_id:#x}")
        if self.notify:
            head += f" error={p[0]:#x} pc={p[2]:#x} sp={p[3]:#x}"
        if self.message:
            last = self.message.strip().splitlines()[-1:] or [""]
            head += f" last_line={last[0][:200]!r}"
        if self.message_error:
            head += f" message_error={self.message_error!r}"
        return head
