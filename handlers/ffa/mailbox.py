"""RX/TX buffers: FFA_RXTX_MAP, FFA_RXTX_UNMAP, FFA_RX_RELEASE and RX ownership.

A VM registers one TX buffer (it writes, we read: memory descriptors) and one RX buffer (we write,
it reads: partition descriptors). After we write RX it belongs to the guest until FFA_RX_RELEASE.
Errors follow Arm DEN0077A (FF-A) as include/linux/arm_ffa.h and Hafnium's inc/vmapi/hf/ffa.h encode
it exactly: DENIED for a second map (pKVM, Xen); INVALID_PARAMETERS to unmap nothing, DENIED to
unmap while the guest still holds RX (Xen); DENIED to release an unmapped or already free RX (Xen);
BUSY to fill an RX the guest holds (Xen `ffa_rx_acquire`), DENIED when no RX is mapped (Xen).
Checking that the buffers lie in the VM's memory needs guest-memory reads and is the adapter's job;
everything else is decided here."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.descriptors import PAGE_SIZE
from hyperbroker.handlers.ffa.state import Mailbox, VmState

RXTX_PAGE_COUNT_MASK = 0xFFFF_FFFF  # w3; its exact width is UNVERIFIED, w3 holds it all
ADDRESS_MASK_32 = 0xFFFF_FFFF  # Xen masks SMC32 RXTX_MAP addresses to 32 bits


@dataclass(frozen=True, slots=True)
class MapRequest:
    tx: int
    rx: int
    pages: int

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE


def decode_map(fid: int, x1: int, x2: int, x3: int) -> MapRequest:
    """x1 = TX address, x2 = RX address, w3 = page count in 4 KiB units."""
    if fid == abi.FFA_RXTX_MAP_32:
        x1 &= ADDRESS_MASK_32
        x2 &= ADDRESS_MASK_32
    return MapRequest(tx=x1, rx=x2, pages=x3 & RXTX_PAGE_COUNT_MASK)


def check_map(state: VmState, req: MapRequest, max_pages: int) -> FfaError | None:
    """Everything about FFA_RXTX_MAP that does not need guest memory."""
    if state.mailbox is not None:
        return FfaError.DENIED
    if not 1 <= req.pages <= max_pages:
        return FfaError.INVALID_PARAMETERS
    if req.tx % PAGE_SIZE or req.rx % PAGE_SIZE:
        return FfaError.INVALID_PARAMETERS
    if req.tx + req.size > 1 << 64 or req.rx + req.size > 1 << 64:
        return FfaError.INVALID_PARAMETERS
    if req.tx < req.rx + req.size and req.rx < req.tx + req.size:
        return FfaError.INVALID_PARAMETERS  # TX and RX overlap
    return None


def map_buffers(state: VmState, req: MapRequest) -> VmState:
    """Record the pair; RX starts free for us to fill."""
    return replace(state, mailbox=Mailbox(req.tx, req.rx, req.pages, rx_held=False))


def _names_self_or_nobody(w1_id: int, own_id: int) -> bool:
    """A VM may name only itself (older Linux) or nobody (newer Linux) in an endpoint field."""
    return w1_id in (0, own_id)


def unmap(state: VmState, w1: int, own_id: int) -> VmState | FfaError:
    """FFA_RXTX_UNMAP: w1[31:16] = endpoint ID, which only a hypervisor may set to another."""
    if not _names_self_or_nobody((w1 >> 16) & abi.ENDPOINT_ID_MASK, own_id) or w1 & 0xFFFF:
        return FfaError.INVALID_PARAMETERS
    if state.mailbox is None:
        return FfaError.INVALID_PARAMETERS
    if state.mailbox.rx_held:
        return FfaError.DENIED
    # A fragmented transaction reads its next fragments from TX: it cannot go on without it.
    return replace(state, mailbox=None, pending=None)


def rx_release(state: VmState, w1: int, own_id: int) -> VmState | FfaError:
    """FFA_RX_RELEASE: w1[15:0] = receiver ID, settable to another only by a hypervisor."""
    if not _names_self_or_nobody(w1 & abi.ENDPOINT_ID_MASK, own_id) or w1 >> 16 & 0xFFFF:
        return FfaError.INVALID_PARAMETERS
    if state.mailbox is None or not state.mailbox.rx_held:
        return FfaError.DENIED
    return replace(state, mailbox=replace(state.mailbox, rx_held=False))


def acquire_rx(state: VmState, length: int) -> Mailbox | FfaError:
    """The RX buffer we may fill with `length` bytes, before handing it to the guest."""
    if state.mailbox is None:
        return FfaError.DENIED
    if state.mailbox.rx_held:
        return FfaError.BUSY
    if length > state.mailbox.size:
        return FfaError.NO_MEMORY
    return state.mailbox


def hand_over_rx(state: VmState) -> VmState:
    """We wrote RX: it now belongs to the guest until FFA_RX_RELEASE."""
    assert state.mailbox is not None
    return replace(state, mailbox=replace(state.mailbox, rx_held=True))


def tx_fragment(state: VmState, length: int) -> int | FfaError:
    """The guest address of a `length`-byte fragment at the start of TX."""
    if state.mailbox is None:
        return FfaError.INVALID_PARAMETERS  # pKVM: no host TX buffer -> INVALID_PARAMETERS
    if not 0 < length <= state.mailbox.size:
        return FfaError.INVALID_PARAMETERS
    return state.mailbox.tx
