"""One VM's FF-A state as an immutable value, and its JSON form in the broker's store.

`VmState` is everything the handler remembers about a VM between calls: the negotiated version,
its endpoint ID, its RX/TX mailbox and who owns RX, its completed memory shares and a
multi-fragment transaction in progress. The state machines (version, mailbox, memshare) take a
`VmState` and return a new one; the adapter stores `to_json()` through ctx.state and rebuilds
it with `from_json()` on the next call, so a broker restart loses nothing. This module knows
nothing of registers, guest memory or partitions.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, replace
from typing import Any

from hyperbroker.handlers.ffa.descriptors import PAGE_SIZE, Constituent

SCHEMA = 1  # bump when the JSON layout changes; from_json refuses unknown schemas


class ShareKind(enum.Enum):
    SHARE = "share"
    LEND = "lend"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """The RX/TX buffer pair registered with FFA_RXTX_MAP."""

    tx: int
    rx: int
    pages: int
    rx_held: bool = False  # the guest owns RX (it was written for it) until FFA_RX_RELEASE

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Grant:
    """One receiver of a share and the permissions byte the sender gave it (EMAD)."""

    receiver: int
    permissions: int


@dataclass(frozen=True, slots=True)
class Share:
    """A completed MEM_SHARE/MEM_LEND transaction, live until the sender reclaims it."""

    handle: int
    kind: ShareKind
    grants: tuple[Grant, ...]
    constituents: tuple[Constituent, ...]
    attributes: int
    flags: int
    tag: int

    @property
    def pages(self) -> int:
        return sum(c.page_count for c in self.constituents)

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE

    def grant_for(self, receiver: int) -> Grant | None:
        return next((g for g in self.grants if g.receiver == receiver), None)


@dataclass(frozen=True, slots=True)
class Pending:
    """A fragmented transaction being assembled: the bytes received so far."""

    handle: int
    kind: ShareKind
    total_length: int
    received: bytes

    @property
    def offset(self) -> int:
        return len(self.received)


@dataclass(frozen=True, slots=True)
class VmState:
    version: int | None = None  # the version the guest asked for, clamped to ours
    frozen: bool = False  # a non-VERSION call was made: the version can no longer change
    endpoint_id: int | None = None
    mailbox: Mailbox | None = None
    shares: tuple[Share, ...] = ()
    pending: Pending | None = None
    handle_counter: int = 0  # the last handle sequence number given out

    def share(self, handle: int) -> Share | None:
        return next((s for s in self.shares if s.handle == handle), None)

    def with_share(self, share: Share) -> VmState:
        return replace(self, shares=(*self.shares, share))

    def without_share(self, handle: int) -> VmState:
        return replace(self, shares=tuple(s for s in self.shares if s.handle != handle))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": self.version,
            "frozen": self.frozen,
            "endpoint_id": self.endpoint_id,
            "mailbox": None if self.mailbox is None else {
                "tx": self.mailbox.tx,
                "rx": self.mailbox.rx,
                "pages": self.mailbox.pages,
                "rx_held": self.mailbox.rx_held,
            },
            "shares": [_share_to_json(s) for s in self.shares],
            "pending": None if self.pending is None else {
                "handle": self.pending.handle,
                "kind": self.pending.kind.value,
                "total_length": self.pending.total_length,
                "received": base64.b64encode(self.pending.received).decode("ascii"),
            },
            "handle_counter": self.handle_counter,
        }

    @classmethod
    def from_json(cls, doc: Any) -> VmState:
        """The state stored by to_json(); None (nothing stored yet) is the initial state.

        The document is the handler's own; a malformed one is a bug or a store corruption, and
        raises (the broker counts it as an internal error) rather than guessing.
        """
        if doc is None:
            return cls()
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError(f"FF-A state document has an unknown schema: {doc!r:.200}")
        mb = doc["mailbox"]
        pending = doc["pending"]
        return cls(
            version=doc["version"],
            frozen=bool(doc["frozen"]),
            endpoint_id=doc["endpoint_id"],
            mailbox=None if mb is None else Mailbox(
                int(mb["tx"]), int(mb["rx"]), int(mb["pages"]), bool(mb["rx_held"])
            ),
            shares=tuple(_share_from_json(s) for s in doc["shares"]),
            pending=None if pending is None else Pending(
                handle=int(pending["handle"]),
                kind=ShareKind(pending["kind"]),
                total_length=int(pending["total_length"]),
                received=base64.b64decode(pending["received"]),
            ),
            handle_counter=int(doc["handle_counter"]),
        )


def _share_to_json(s: Share) -> dict[str, Any]:
    return {
        "handle": s.handle,
        "kind": s.kind.value,
        "grants": [[g.receiver, g.permissions] for g in s.grants],
        "constituents": [[c.address, c.page_count] for c in s.constituents],
        "attributes": s.attributes,
        "flags": s.flags,
        "tag": s.tag,
    }


def _share_from_json(d: dict[str, Any]) -> Share:
    return Share(
        handle=int(d["handle"]),
        kind=ShareKind(d["kind"]),
        grants=tuple(Grant(int(r), int(p)) for r, p in d["grants"]),
        constituents=tuple(Constituent(int(a), int(n)) for a, n in d["constituents"]),
        attributes=int(d["attributes"]),
        flags=int(d["flags"]),
        tag=int(d["tag"]),
    )
