"""The handler API: what a plugin implements and what the broker gives it per call.

A handler declares the ABI it serves (`abi`: its name in policies, its function-ID ranges and
function names; the policy engine learns named ABIs from the installed handlers), answers
`async handle(call, ctx) -> Result`, and keeps its
per-VM state through `ctx.state`. Guest memory reads are round trips to the agent; writes are
buffered and travel with the result. Handlers are discovered through the entry-point group
`hyperbroker.handlers`. This module must not know about gRPC, the store's backend or the agent.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from hyperbroker.calls import Call, Result
from hyperbroker.runtime.metrics import MetricSet
from hyperbroker.smccc import FunctionRange

ENTRY_POINT_GROUP = "hyperbroker.handlers"
# The families of every handler, shipped or plugin (`registry=HANDLER_METRICS`); the broker, the
# one process that runs handlers, exports them beside its own.
HANDLER_METRICS = MetricSet("handlers")

JsonValue = Any  # what json.dumps accepts: dict, list, str, int, float, bool, None


class HandlerConfigError(ValueError):
    """A handler's configuration in the policy is wrong; the message says which key and why."""


class GuestMemoryError(Exception):
    """A guest-memory access was refused: outside the VM's regions, too large, or the VMM failed."""


@dataclass(frozen=True, slots=True)
class Abi:
    """An ABI as a policy names it (`abi: NAME`): its function-ID ranges, taken whole, and the
    names of its functions (metric labels, `hyperbroker call NAME`). Two handlers may declare one
    name (Hyper-V and memshare both serve the vendor-hyp service) only with the same ranges."""

    name: str
    ranges: tuple[FunctionRange, ...]
    functions: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VmInfo:
    """Who is calling: the VM as the broker knows it."""

    host: str
    name: str
    nr_vcpus: int
    profile: str
    policy_version: int
    regions: tuple[tuple[int, int], ...] = ()  # guest RAM as (gpa, size), from registration

    @property
    def key(self) -> str:
        """Fleet-unique identity: host and VM name."""
        return f"{self.host}/{self.name}"


class GuestMemory(Protocol):
    async def read(self, gpa: int, length: int) -> bytes:
        """Read guest-physical memory; raises GuestMemoryError."""
        ...

    def write(self, gpa: int, data: bytes) -> None:
        """Buffer a write; it is applied by the agent before the vCPU resumes."""
        ...


class HandlerState(Protocol):
    """This VM's persistent state for this handler: one JSON document."""

    def get(self) -> JsonValue:
        """The stored document, or None when there is none yet."""
        ...

    def put(self, value: JsonValue) -> None:
        """Replace the document; committed with the call's result, before the guest sees it."""
        ...


class IdPools(Protocol):
    """Fleet-unique IDs (FF-A endpoint IDs, Hyper-V partition IDs), one per VM per pool.

    An allocation is one atomic operation in the store every broker replica and worker shares,
    keyed by the VM: asking again returns the VM's ID, so a retried call or another replica
    never hands out a second one, and no two VMs of the fleet ever hold one ID at once. An ID
    is not rolled back with a failed call (the VM keeps it); vm_destroyed releases it."""

    async def allocate(self, pool: str, first: int, last: int) -> int | None:
        """This VM's ID in `pool`, taken from first..last (round robin) if it has none; None
        when every ID of the range is taken. IDs are at most 2**31 - 1."""
        ...

    async def release(self, pool: str) -> None:
        """This VM no longer holds an ID in `pool`."""
        ...

    async def owner(self, pool: str, id_: int) -> str | None:
        """The key of the VM holding `id_` in `pool`, if any."""
        ...


class CallContext(Protocol):
    @property
    def vm(self) -> VmInfo: ...

    @property
    def state(self) -> HandlerState:
        """This VM's document for this handler."""
        ...

    @property
    def ids(self) -> IdPools:
        """Fleet-unique IDs for this VM, allocated atomically in the broker's store."""
        ...

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def log(self) -> logging.Logger: ...

    def now_ns(self) -> int:
        """Monotonic clock, nanoseconds."""
        ...


class Handler(abc.ABC):
    """Base class of every handler plugin.

    Subclasses set `plugin` (the entry-point name) and `abi`, and implement `handle`. The
    constructor takes the handler's `config:` mapping from the policy and raises
    HandlerConfigError on anything it does not accept.
    """

    plugin: ClassVar[str]
    abi: ClassVar[Abi]
    # True when handle() may start inside the broker's stream task: it then runs without a task
    # of its own until its first await (none at all when it never awaits). Such a handler must
    # not call asyncio.current_task(), asyncio.timeout() or anything that binds to the current
    # task before its first await. False (the default) gives every call its own task.
    eager: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        unknown = set(config) - set(self.config_keys())
        if unknown:
            raise HandlerConfigError(
                f"unknown config key(s) {sorted(unknown)}; {self.plugin} accepts "
                f"{sorted(self.config_keys()) or 'none'}"
            )
        self.config = dict(config)

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        """The configuration keys this handler accepts."""
        return ()

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        """The ABI ranges this handler owns; a policy must forward all of them to it or none.
        Those of `abi` unless a handler says otherwise (one that declares no `abi` must)."""
        abi: Abi | None = getattr(type(self), "abi", None)
        if abi is None:
            raise TypeError(f"{type(self).__name__} declares neither `abi` nor `ranges`")
        return abi.ranges

    @abc.abstractmethod
    async def handle(self, call: Call, ctx: CallContext) -> Result:
        """Answer one call. Never raise for guest input: return the ABI's error instead."""

    def function_name(self, fid: int) -> str | None:
        """A short name for `fid` (metrics label, CLI); None for 'not one of mine'."""
        abi: Abi | None = getattr(type(self), "abi", None)
        return abi.functions.get(fid) if abi is not None else None

    def static_answers(self) -> Mapping[int, Result]:
        """Calls whose answer depends on nothing but the function ID; the agent may serve them."""
        return {}

    def named_fallbacks(self) -> Mapping[str, Result]:
        """ABI-specific fallbacks a policy rule may name (e.g. a busy/retry code)."""
        return {}

    def admin_view(self, ctx: CallContext) -> JsonValue:
        """What this handler holds for ctx.vm, for the Admin API (GetVmHandlerView); None: none."""
        return None

    async def vm_destroyed(self, ctx: CallContext) -> None:  # noqa: B027 - optional hook
        """The VM is gone for good: release what it held (sessions, shares, records)."""

    async def undo(self, call: Call, result: Result, ctx: CallContext) -> None:  # noqa: B027
        """Undo `call`, which returned `result` and whose state changes were committed, but
        whose result the guest never saw: its agent had already answered with the rule's
        fallback (the result arrived after the deadline). The guest will retry, so leave the
        state as if the call had never run (e.g. PSCI: the CPU_ON target is off again). Runs
        at most once per call, in the order results were committed; default: nothing."""

    async def vm_reset(self, ctx: CallContext) -> None:  # noqa: B027 - optional hook
        """The VM was reset (a SYSTEM_RESET action was carried out): forget per-boot state."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """The broker is stopping or this policy version is retired: release connections."""


def discover_plugins() -> dict[str, type[Handler]]:
    """Every handler class installed under the entry-point group, by plugin name."""
    found: dict[str, type[Handler]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Handler)):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a Handler subclass")
        found[ep.name] = cls
    return found
