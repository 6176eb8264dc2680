"""Memory sharing: FFA_MEM_SHARE/LEND (32, 64), FFA_MEM_FRAG_TX and FFA_MEM_RECLAIM.

The sender writes a transaction descriptor into its TX buffer, in one fragment or several
. Each step here is a pure transition over VmState: check the registers, take the bytes
the adapter read from TX, assemble fragments, validate the complete descriptor (parsed by
handlers.ffa.descriptors) against the sender, the partitions, the limits and the shares the VM
already has, then commit a `Share` under a handle with the hypervisor bit. Whether the
pages lie in the VM's memory needs guest-memory reads: the adapter probes `probe_addresses()`
between `validate` and `commit`. Nothing here does I/O or knows about registers beyond decoding.

Error choices, each from Arm DEN0077A (FF-A) as include/linux/arm_ffa.h and Hafnium's
inc/vmapi/hf/ffa.h encode it: dynamic buffers (x3/w4 != 0) are not offered (FFA_FEATURES w2 bit0 =
0) so they are INVALID_PARAMETERS (pKVM); a descriptor longer than the configured bound is NO_MEMORY
(pKVM "len > descriptor buffer"); a receiver that is a VM is NOT_SUPPORTED and device memory is
NOT_SUPPORTED (Xen); pages already shared or lent are DENIED (pKVM/Hafnium page-state checks);
reclaiming a handle the VM does not own is INVALID_PARAMETERS (Xen); more pages or shares than
configured is NO_MEMORY."""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass, replace

from hyperbroker.handlers.ffa import abi, descriptors
from hyperbroker.handlers.ffa.abi import FfaError, FragRx
from hyperbroker.handlers.ffa.descriptors import (
    CONSTITUENT_SIZE,
    DataAccess,
    InstructionAccess,
    MemTransaction,
)
from hyperbroker.handlers.ffa.mailbox import ADDRESS_MASK_32, tx_fragment
from hyperbroker.handlers.ffa.state import Grant, Pending, Share, ShareKind, VmState
from hyperbroker.smccc import is_smc64

# Transaction flags a sender may set on SHARE/LEND here: bit1 "time-slicing allowed".
# Bit0 (clear memory) and bit2 (clear after relinquish) would need the relayer to zero guest
# pages; bits[4:3], [8:5], 9 belong to retrieve requests; the rest is reserved.
FLAG_TIME_SLICE = 1 << 1
SEND_FLAGS_ALLOWED = FLAG_TIME_SLICE
# FFA_MEM_RECLAIM flags: bit0 clear memory (refused, as above), bit1 time-slicing.
RECLAIM_FLAG_CLEAR = 1 << 0
RECLAIM_FLAGS_ALLOWED = 1 << 1

HANDLE_COUNTER_MASK = 0xFFFF_FFFF
HANDLE_ENDPOINT_SHIFT = 32

LEND_FIDS = (abi.FFA_MEM_LEND_32, abi.FFA_MEM_LEND_64)
SEND_FIDS = (abi.FFA_MEM_SHARE_32, abi.FFA_MEM_SHARE_64, *LEND_FIDS)


@dataclass(frozen=True, slots=True)
class Limits:
    """Operator-configured bounds per VM (handler config)."""

    max_pages_per_share: int
    max_shares_per_vm: int
    max_descriptor_bytes: int


@dataclass(frozen=True, slots=True)
class SendRequest:
    kind: ShareKind
    total_length: int
    fragment_length: int
    address: int  # dynamic buffer address; 0 = TX buffer
    page_count: int


def decode_send(fid: int, x1: int, x2: int, x3: int, x4: int) -> SendRequest:
    """w1 = total length, w2 = fragment length, x3/w4 = dynamic buffer."""
    return SendRequest(
        kind=ShareKind.LEND if fid in LEND_FIDS else ShareKind.SHARE,
        total_length=x1 & abi.W_MASK,
        fragment_length=x2 & abi.W_MASK,
        address=x3 if is_smc64(fid) else x3 & ADDRESS_MASK_32,
        page_count=x4 & abi.W_MASK,
    )


def check_send(state: VmState, req: SendRequest, limits: Limits, version: int) -> int | FfaError:
    """The TX address to read the first fragment from, or why the call fails first."""
    if req.address or req.page_count:
        return FfaError.INVALID_PARAMETERS
    if not 0 < req.fragment_length <= req.total_length:
        return FfaError.INVALID_PARAMETERS
    if req.total_length > limits.max_descriptor_bytes:
        return FfaError.NO_MEMORY
    if req.fragment_length < descriptors.minimum_first_fragment(version):
        return FfaError.INVALID_PARAMETERS
    return tx_fragment(state, req.fragment_length)


def _allocate_handle(state: VmState, endpoint_id: int) -> tuple[VmState, int]:
    """Bit 63 (hypervisor allocator), the endpoint ID in [47:32], a counter in [31:0].

    Endpoint IDs are fleet-unique, so handles are too without a shared allocator.
    """
    used = {s.handle for s in state.shares} | ({state.pending.handle} if state.pending else set())
    counter = state.handle_counter
    while True:
        counter = counter % HANDLE_COUNTER_MASK + 1  # 1..2**32-1, never 0
        handle = abi.HANDLE_HYPERVISOR_BIT | (endpoint_id << HANDLE_ENDPOINT_SHIFT) | counter
        if handle not in used:
            return replace(state, handle_counter=counter), handle


@dataclass(frozen=True, slots=True)
class Assembled:
    """Every byte of a transaction has arrived: validate, probe, commit."""

    handle: int
    kind: ShareKind
    data: bytes


def start(
    state: VmState, req: SendRequest, fragment: bytes, endpoint_id: int
) -> tuple[VmState, Assembled | FragRx]:
    """The first fragment arrived. A transaction left unfinished is abandoned: the TX buffer
    can carry only one at a time, and a guest that rebooted mid-way must be able to share."""
    state, handle = _allocate_handle(replace(state, pending=None), endpoint_id)
    if req.fragment_length == req.total_length:
        return state, Assembled(handle, req.kind, fragment)
    pending = Pending(handle, req.kind, req.total_length, fragment)
    return replace(state, pending=pending), FragRx(handle, pending.offset)


@dataclass(frozen=True, slots=True)
class FragTxRequest:
    handle: int
    fragment_length: int
    sender: int


def decode_frag_tx(x1: int, x2: int, x3: int, x4: int) -> FragTxRequest:
    """w1/w2 = handle, w3 = fragment length, w4[31:16] = sender (hypervisor only)."""
    return FragTxRequest(abi.join_handle(x1, x2), x3 & abi.W_MASK, (x4 >> 16) & 0xFFFF)


def check_frag_tx(state: VmState, req: FragTxRequest, endpoint_id: int) -> int | FfaError:
    """The TX address of the next fragment. Later fragments hold whole constituents (pKVM)."""
    pending = state.pending
    if pending is None or pending.handle != req.handle or req.sender not in (0, endpoint_id):
        return FfaError.INVALID_PARAMETERS
    if req.fragment_length % CONSTITUENT_SIZE:
        return FfaError.INVALID_PARAMETERS
    if pending.offset + req.fragment_length > pending.total_length:
        return FfaError.INVALID_PARAMETERS
    return tx_fragment(state, req.fragment_length)


def append(state: VmState, fragment: bytes) -> tuple[VmState, Assembled | FragRx]:
    pending = state.pending
    assert pending is not None
    received = pending.received + fragment
    if len(received) == pending.total_length:
        return replace(state, pending=None), Assembled(pending.handle, pending.kind, received)
    grown = replace(pending, received=received)
    return replace(state, pending=grown), FragRx(pending.handle, grown.offset)


def _check_attributes(kind: ShareKind, attributes: int) -> FfaError | None:
    memory_type = (attributes >> descriptors.ATTR_TYPE_SHIFT) & 0x3
    if memory_type == descriptors.TYPE_DEVICE:
        return FfaError.NOT_SUPPORTED
    if kind is ShareKind.SHARE and memory_type != descriptors.TYPE_NORMAL:
        return FfaError.INVALID_PARAMETERS  # a share must say what it shares
    return None


def validate(
    data: bytes,
    kind: ShareKind,
    version: int,
    endpoint_id: int,
    partition_ids: Collection[int],
    state: VmState,
    limits: Limits,
) -> MemTransaction | FfaError:
    """A complete descriptor, checked against everything but the VM's memory layout."""
    tx = descriptors.parse_mem_transaction(data, version)
    if isinstance(tx, FfaError):
        return tx
    if tx.sender != endpoint_id or tx.handle != 0 or tx.flags & ~SEND_FLAGS_ALLOWED:
        return FfaError.INVALID_PARAMETERS
    error = _check_attributes(kind, tx.attributes)
    if error is not None:
        return error
    for r in tx.receivers:
        if not abi.is_secure(r.receiver):
            return FfaError.NOT_SUPPORTED  # VM-to-VM sharing is not offered (Xen)
        if r.receiver not in partition_ids:
            return FfaError.INVALID_PARAMETERS
        if r.data_access not in (DataAccess.RO, DataAccess.RW):
            return FfaError.INVALID_PARAMETERS
        if r.instruction_access == InstructionAccess.X:
            return FfaError.DENIED  # no partition here executes guest memory
    if tx.total_pages > limits.max_pages_per_share:
        return FfaError.NO_MEMORY
    if len(state.shares) >= limits.max_shares_per_vm:
        return FfaError.NO_MEMORY
    ranges = sorted(
        [(c.address, c.end) for s in state.shares for c in s.constituents]
        + [(c.address, c.end) for c in tx.constituents]
    )
    if any(a_end > b_start for (_, a_end), (b_start, _) in itertools.pairwise(ranges)):
        return FfaError.DENIED  # a page that is already shared or lent
    return tx


def probe_addresses(tx: MemTransaction) -> list[int]:
    """Guest addresses whose readability shows each range lies in the VM's memory."""
    out: list[int] = []
    for c in tx.constituents:
        out.append(c.address)
        if c.end - 1 != c.address:
            out.append(c.end - 1)
    return out


def commit(state: VmState, assembled: Assembled, tx: MemTransaction) -> tuple[VmState, Share]:
    share = Share(
        handle=assembled.handle,
        kind=assembled.kind,
        grants=tuple(Grant(r.receiver, r.permissions) for r in tx.receivers),
        constituents=tx.constituents,
        attributes=tx.attributes,
        flags=tx.flags,
        tag=tx.tag,
    )
    return state.with_share(share), share


@dataclass(frozen=True, slots=True)
class ReclaimRequest:
    handle: int
    flags: int


def decode_reclaim(x1: int, x2: int, x3: int) -> ReclaimRequest:
    """w1/w2 = handle, w3 = flags."""
    return ReclaimRequest(abi.join_handle(x1, x2), x3 & abi.W_MASK)


def check_reclaim(state: VmState, req: ReclaimRequest) -> Share | FfaError | None:
    """The share to take back; None for an unfinished transaction (abandoned, pKVM's abort)."""
    if req.flags & ~RECLAIM_FLAGS_ALLOWED:
        return FfaError.INVALID_PARAMETERS
    share = state.share(req.handle)
    if share is not None:
        return share
    if state.pending is not None and state.pending.handle == req.handle:
        return None
    return FfaError.INVALID_PARAMETERS  # not a handle this VM owns (Xen)


def reclaim(state: VmState, handle: int) -> VmState:
    if state.pending is not None and state.pending.handle == handle:
        return replace(state, pending=None)
    return state.without_share(handle)
