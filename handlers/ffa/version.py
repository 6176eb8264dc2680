"""FFA_VERSION negotiation and call admission: which calls a VM may make, and when.

FFA_VERSION: the callee answers its own version (never FFA_SUCCESS); bit 31 set or a
major other than 1 is NOT_SUPPORTED; the guest's version is the one it asked for, clamped to
ours (Xen `ffa_negotiate_version`), and may be asked again until the first other call, after
which only the same version is accepted (Hafnium `api_ffa_version`; Xen "negotiation is final
only when the guest makes its first non-VERSION call"). A call before any FFA_VERSION is
NOT_SUPPORTED (Xen, citing the FF-A 1.2 FFA_VERSION rules). Calls a version does not define are
NOT_SUPPORTED for callers at that version. Pure: knows only VmState and the ABI constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.abi import FfaError, VersionAnswer
from hyperbroker.handlers.ffa.state import VmState

# The calls this endpoint serves, and the version that introduced each ("Ver").
SERVED_SINCE: Mapping[int, int] = {
    abi.FFA_VERSION: abi.VERSION_1_0,
    abi.FFA_FEATURES: abi.VERSION_1_0,
    abi.FFA_RX_RELEASE: abi.VERSION_1_0,
    abi.FFA_RXTX_MAP_32: abi.VERSION_1_0,
    abi.FFA_RXTX_MAP_64: abi.VERSION_1_0,
    abi.FFA_RXTX_UNMAP: abi.VERSION_1_0,
    abi.FFA_PARTITION_INFO_GET: abi.VERSION_1_0,
    abi.FFA_ID_GET: abi.VERSION_1_0,
    abi.FFA_MSG_SEND_DIRECT_REQ_32: abi.VERSION_1_0,
    abi.FFA_MSG_SEND_DIRECT_REQ_64: abi.VERSION_1_0,
    abi.FFA_MSG_SEND_DIRECT_RESP_32: abi.VERSION_1_0,
    abi.FFA_MSG_SEND_DIRECT_RESP_64: abi.VERSION_1_0,
    abi.FFA_MEM_LEND_32: abi.VERSION_1_0,
    abi.FFA_MEM_LEND_64: abi.VERSION_1_0,
    abi.FFA_MEM_SHARE_32: abi.VERSION_1_0,
    abi.FFA_MEM_SHARE_64: abi.VERSION_1_0,
    abi.FFA_MEM_RECLAIM: abi.VERSION_1_0,
    abi.FFA_MEM_FRAG_TX: abi.VERSION_1_0,
    abi.FFA_SPM_ID_GET: abi.VERSION_1_1,
    abi.FFA_PARTITION_INFO_GET_REGS: abi.VERSION_1_2,
    abi.FFA_MSG_SEND_DIRECT_REQ2: abi.VERSION_1_2,
    abi.FFA_MSG_SEND_DIRECT_RESP2: abi.VERSION_1_2,
}


def served_at(fid: int, version: int) -> bool:
    """Whether a caller that negotiated `version` may invoke `fid` here."""
    since = SERVED_SINCE.get(fid)
    return since is not None and since <= version


def requested_version(w1: int) -> int | None:
    """The version a caller at `w1` will speak with us, or None when we cannot serve it."""
    w1 &= abi.W_MASK
    if w1 & abi.VERSION_MBZ or abi.version_major(w1) != abi.version_major(abi.OUR_VERSION):
        return None
    return min(w1, abi.OUR_VERSION)  # a newer 1.x caller downgrades to us


def negotiate(state: VmState, w1: int) -> tuple[VmState, VersionAnswer]:
    """FFA_VERSION(w1)."""
    wanted = requested_version(w1)
    if wanted is None:
        return state, VersionAnswer(None)
    if state.frozen and wanted != state.version:
        return state, VersionAnswer(None)
    return replace(state, version=wanted), VersionAnswer(abi.OUR_VERSION)


def admit(state: VmState, fid: int) -> VmState | FfaError:
    """A non-VERSION call: refused before negotiation or when its version is too new; freezes.

    Only calls this endpoint serves freeze the version, so an unknown ID's answer depends on
    nothing but the ID and the agent may serve it (handlers.api static_answers).
    """
    if state.version is None or not served_at(fid, state.version):
        return FfaError.NOT_SUPPORTED
    return state if state.frozen else replace(state, frozen=True)
