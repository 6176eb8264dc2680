"""Resets a VMM reports (HB_MSG_VM_RESET): asked of the broker, answered when it confirms.

The VMM waits for VM_RESET_REPLY before its VM runs again, so the handlers have forgotten the
old boot first; the broker confirms with BrokerFrame.resets_done, and a reset it does not confirm
within RESET_TIMEOUT_S is answered -ETIMEDOUT (the VM may then run with its old boot's state).
"""

from __future__ import annotations

import asyncio
import errno
import logging

from hyperbroker.agent.link import BrokerLink
from hyperbroker.agent.vmm import VmmConnection
from hyperbroker.kvm import errno_name
from hyperbroker.runtime.loglimit import PeerLog
from hyperbroker.wire import vmm as proto

log = PeerLog(logging.getLogger("hyperbroker.agent"))  # a VMM may reset as often as it likes

RESET_TIMEOUT_S = 2.0  # a VMM waits at most this long for the handlers to forget a boot


class Resets:
    def __init__(self, loop: asyncio.AbstractEventLoop, link: BrokerLink) -> None:
        self._loop = loop
        self._link = link
        self._waiting: dict[int, tuple[VmmConnection, int, asyncio.TimerHandle]] = {}
        self._next = 1

    def ask(self, conn: VmmConnection, tag: int, vm_id: int) -> None:
        """Ask the broker to reset `vm_id`; the VMM's reply (tag) goes out when it is done."""
        if not self._link.up:
            conn.send(proto.encode(proto.VmResetReply(-errno.ENOTCONN), tag))
            return
        request_id = self._next
        self._next += 1
        timer = self._loop.call_later(RESET_TIMEOUT_S, self.done, request_id, -errno.ETIMEDOUT)
        self._waiting[request_id] = (conn, tag, timer)
        self._link.frame.vms_reset.add(vm_id=vm_id, request_id=request_id)
        self._link.mark()
        self._link.flush_soon()

    def done(self, request_id: int, status: int) -> None:
        entry = self._waiting.pop(request_id, None)
        if entry is None:
            return
        conn, tag, timer = entry
        timer.cancel()
        if status:
            log.warning(conn.peer, "reset %d not confirmed by the broker: %s", request_id,
                        errno_name(-status))
        conn.send(proto.encode(proto.VmResetReply(status), tag))
