"""Direct messaging: FFA_MSG_SEND_DIRECT_REQ (32, 64) and DIRECT_REQ2, routed to partitions.

Decoding checks what the guest may say: the source in w1[31:16] must be the caller itself and
the destination someone else (Xen); w2 must be zero, so framework messages (bit 31), which only
a hypervisor or SPMD sends, are refused with INVALID_PARAMETERS as Hafnium refuses a non-zero
w2; a non-secure destination is VM-to-VM messaging, NOT_SUPPORTED (Xen). Routing finds the
partition and its REQ or REQ2 capability and, for REQ2, the service UUID in x2/x3. The answer
is DIRECT_RESP of the request's width, or RESP2 with x4..x17. A guest never has a request
outstanding towards it, so its own DIRECT_RESP/RESP2 is DENIED. Pure: no I/O, no state.
"""

from __future__ import annotations

from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.abi import DirectResponse, FfaError
from hyperbroker.handlers.ffa.discovery import uuid_from_pair
from hyperbroker.handlers.ffa.partitions import (
    DirectMessage,
    MessageKind,
    Partition,
    PartitionSet,
    Reply,
)

_KIND = {
    abi.FFA_MSG_SEND_DIRECT_REQ_32: MessageKind.REQ_32,
    abi.FFA_MSG_SEND_DIRECT_REQ_64: MessageKind.REQ_64,
    abi.FFA_MSG_SEND_DIRECT_REQ2: MessageKind.REQ2,
}
_RESPONSE_FID = {
    MessageKind.REQ_32: abi.FFA_MSG_SEND_DIRECT_RESP_32,
    MessageKind.REQ_64: abi.FFA_MSG_SEND_DIRECT_RESP_64,
    MessageKind.REQ2: abi.FFA_MSG_SEND_DIRECT_RESP2,
}
REQUEST_FIDS = tuple(_KIND)
RESPONSE_FIDS = tuple(_RESPONSE_FID.values())


def decode_request(
    fid: int, x: tuple[int, ...], endpoint_id: int, vm: str
) -> DirectMessage | FfaError:
    """A direct request from the guest whose endpoint is `endpoint_id`; `x` is x0..x17."""
    kind = _KIND[fid]
    regs = x + (0,) * (18 - len(x))
    source, destination = abi.unpack_target(regs[1] & abi.W_MASK)
    if source != endpoint_id or destination == endpoint_id:
        return FfaError.INVALID_PARAMETERS
    service = None
    if kind is MessageKind.REQ2:
        service = uuid_from_pair(regs[2], regs[3])
        payload = regs[4:18]
    else:
        if regs[2] & abi.W_MASK:
            return FfaError.INVALID_PARAMETERS  # framework message or reserved flags
        payload = regs[3:8]
        if kind is MessageKind.REQ_32:
            payload = tuple(v & abi.W_MASK for v in payload)  # Xen masks x2..x7 for SMC32
    if not abi.is_secure(destination):
        return FfaError.NOT_SUPPORTED
    return DirectMessage(vm, source, destination, kind, service, payload)


def route(msg: DirectMessage, partitions: PartitionSet) -> Partition | FfaError:
    partition = partitions.get(msg.receiver)
    if partition is None:
        return FfaError.INVALID_PARAMETERS
    if msg.kind is MessageKind.REQ2:
        if not partition.info.receives_direct_req2:
            return FfaError.DENIED
        if msg.uuid is not None and msg.uuid != partition.info.uuid:
            return FfaError.INVALID_PARAMETERS
    elif not partition.info.receives_direct_req:
        return FfaError.DENIED
    return partition


def respond(msg: DirectMessage, reply: Reply) -> DirectResponse | FfaError:
    """The partition's reply as the guest sees it: padded or cut to the call's payload width."""
    if isinstance(reply, FfaError):
        return reply
    n = msg.kind.payload_length
    mask = abi.W_MASK if msg.kind is MessageKind.REQ_32 else (1 << 64) - 1
    payload = tuple(v & mask for v in reply[:n]) + (0,) * max(0, n - len(reply))
    return DirectResponse(_RESPONSE_FID[msg.kind], msg.receiver, msg.sender, payload)
