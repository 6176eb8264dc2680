"""HvCallPostMessage and HvCallSignalEvent: validated requests handed to a pluggable sink.

The persona checks what the TLFS lets it check without knowing the other end (privileges, the
RsvdZ fields, payload size, message type, connection IDs when the policy lists them); the sink
decides the rest and answers with a status, e.g. INSUFFICIENT_BUFFERS when its queue is full or
INVALID_CONNECTION_ID for a connection it does not know. The default sink counts and
acknowledges. Nothing here touches memory or the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hyperbroker.handlers.api import HANDLER_METRICS, VmInfo
from hyperbroker.handlers.hyperv import abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.layout import (
    CONNECTION_ID_MASK,
    PostMessageInput,
    SignalEventInput,
)
from hyperbroker.handlers.hyperv.persona import PersonaConfig
from hyperbroker.runtime.metrics import Counter

SYNIC_CALLS = Counter("hyperbroker_hyperv_synic_total",
                      "SynIC messages posted and events signalled by guests, by the default sink",
                      ["kind"], registry=HANDLER_METRICS)
SYNIC_CALLS.initialise(("post_message", "signal_event"))


@dataclass(frozen=True, slots=True)
class PostMessage:
    connection_id: int
    message_type: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class SignalEvent:
    connection_id: int
    flag_number: int


class SynicSink(Protocol):
    """Where the guest's SynIC traffic goes. Called from the broker's event loop: no blocking."""

    def post_message(self, vm: VmInfo, vp: int, message: PostMessage) -> HvStatus: ...

    def signal_event(self, vm: VmInfo, vp: int, event: SignalEvent) -> HvStatus: ...


class CountingSink:
    """The default sink: counts each message and event (a metric) and acknowledges it."""

    def post_message(self, vm: VmInfo, vp: int, message: PostMessage) -> HvStatus:
        SYNIC_CALLS.labels("post_message").inc()
        return HvStatus.SUCCESS

    def signal_event(self, vm: VmInfo, vp: int, event: SignalEvent) -> HvStatus:
        SYNIC_CALLS.labels("signal_event").inc()
        return HvStatus.SUCCESS


def _known(config: PersonaConfig, connection_id: int) -> bool:
    return config.connections is None or connection_id in config.connections


def post_message(config: PersonaConfig, raw: PostMessageInput) -> PostMessage | HvStatus:
    """TLFS HvCallPostMessage checks: privilege, connection ID, RsvdZ, type, payload size."""
    if not config.has(abi.HV_POST_MESSAGES):
        return HvStatus.ACCESS_DENIED
    if raw.connection_id & ~CONNECTION_ID_MASK or not _known(config, raw.connection_id):
        return HvStatus.INVALID_CONNECTION_ID
    if raw.reserved:
        return HvStatus.INVALID_PARAMETER
    # Message types with bit 31 set are the hypervisor's own (HVMSG_*); 0 is HVMSG_NONE.
    if raw.message_type == 0 or raw.message_type & 0x8000_0000:
        return HvStatus.INVALID_PARAMETER
    if raw.payload_size > abi.HV_MESSAGE_PAYLOAD_BYTE_COUNT:
        return HvStatus.INVALID_PARAMETER
    return PostMessage(raw.connection_id, raw.message_type, raw.payload)


def signal_event(config: PersonaConfig, raw: SignalEventInput) -> SignalEvent | HvStatus:
    """TLFS HvCallSignalEvent checks: privilege, connection ID, RsvdZ, flag number."""
    if not config.has(abi.HV_SIGNAL_EVENTS):
        return HvStatus.ACCESS_DENIED
    if raw.connection_id & ~CONNECTION_ID_MASK or not _known(config, raw.connection_id):
        return HvStatus.INVALID_CONNECTION_ID
    if raw.reserved:
        return HvStatus.INVALID_PARAMETER
    if raw.flag_number >= abi.HV_EVENT_FLAGS_COUNT:
        return HvStatus.INVALID_PARAMETER
    return SignalEvent(raw.connection_id, raw.flag_number)
