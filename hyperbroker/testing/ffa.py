"""A scripted FF-A guest for driving FfaHandler without a broker, a VMM or a real guest.

`FfaGuest` makes calls the way a guest's driver does (function ID in x0, arguments in x1..x17),
keeps a FakeContext as the broker would (guest memory with buffered writes committed after each
result, the VM's state document and the ID pools), and reads answers back as registers. Tests,
the Linux probe replay and future end-to-end checks use it; the guest program for the real-KVM
bed makes the same calls from inside a VM. Nothing here is used by the handler itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hyperbroker.calls import Call, Result
from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.descriptors import (
    Constituent,
    EndpointAccess,
    build_mem_transaction,
    encode_mem_transaction,
)
from hyperbroker.handlers.ffa.handler import FfaHandler
from hyperbroker.smccc import NR_ARGS
from hyperbroker.testing.context import FakeContext, FakeGuestMemory, MemoryPools

RAM_BASE = 0x4000_0000
RAM_SIZE = 8 * 1024 * 1024
TX_ADDRESS = RAM_BASE + 0x10_0000
RX_ADDRESS = RAM_BASE + 0x11_0000
BUFFER_ADDRESS = RAM_BASE + 0x20_0000  # where tests put data they share
RW_NX = 0x2 | 0x1 << 2  # data RW, instruction NX: what Linux's tee driver asks for


def make_context(name: str = "vm-1", *, host: str = "host-a", pools: MemoryPools | None = None,
                 ram_size: int = RAM_SIZE) -> FakeContext:
    """A VM with one RAM region at RAM_BASE, sharing ID `pools` with other VMs."""
    memory = FakeGuestMemory(regions={RAM_BASE: bytearray(ram_size)})
    vm = VmInfo(host=host, name=name, nr_vcpus=2, profile="default", policy_version=1)
    return FakeContext(vm, memory=memory, pools=pools)


@dataclass
class FfaGuest:
    handler: FfaHandler
    ctx: FakeContext = field(default_factory=make_context)
    vcpu: int = 0
    seq: int = 0
    version: int = abi.VERSION_1_2
    endpoint_id: int = 0

    async def call(self, fid: int, *args: int) -> Result:
        """One SMCCC call: x0 = fid, x1.. = args; guest memory writes land afterwards."""
        self.seq += 1
        regs = (fid, *args) + (0,) * (NR_ARGS - 1 - len(args))
        result = await self.handler.handle(Call(self.vcpu, self.seq, fid, regs), self.ctx)
        self.ctx.memory.commit()
        return result

    async def setup(self, version: int = abi.VERSION_1_2, *, pages: int = 1) -> None:
        """VERSION, ID_GET, RXTX_MAP_64: what every driver does first."""
        self.version = version
        answer = await self.call(abi.FFA_VERSION, version)
        assert answer.x[0] == abi.OUR_VERSION, hex(answer.x[0])
        ident = await self.call(abi.FFA_ID_GET)
        assert ident.x[0] == abi.FFA_SUCCESS_32, ident
        self.endpoint_id = ident.x[2] & 0xFFFF
        mapped = await self.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, pages)
        assert mapped.x[0] == abi.FFA_SUCCESS_32, mapped

    def poke(self, gpa: int, data: bytes) -> None:
        self.ctx.memory.poke(gpa, data)

    def peek(self, gpa: int, length: int) -> bytes:
        return self.ctx.memory.peek(gpa, length)

    def descriptor(
        self,
        receivers: tuple[int, ...],
        constituents: tuple[tuple[int, int], ...],
        *,
        permissions: int = RW_NX,
        attributes: int = 0x2F,
        flags: int = 0,
        sender: int | None = None,
    ) -> bytes:
        """A lend/share descriptor laid out as Linux lays it out for this guest's version."""
        tx = build_mem_transaction(
            self.version,
            self.endpoint_id if sender is None else sender,
            tuple(EndpointAccess(r, permissions) for r in receivers),
            tuple(Constituent(a, n) for a, n in constituents),
            attributes=attributes,
            flags=flags,
        )
        return encode_mem_transaction(tx)

    async def share(self, receivers: tuple[int, ...], constituents: tuple[tuple[int, int], ...],
                    *, fid: int = abi.FFA_MEM_SHARE_64, **kw: int) -> Result:
        """Write the descriptor into TX and send it in one fragment."""
        data = self.descriptor(receivers, constituents, **kw)
        self.poke(TX_ADDRESS, data)
        return await self.call(fid, len(data), len(data), 0, 0)


def handle_of(result: Result) -> int:
    """The handle of an FFA_SUCCESS answer to MEM_SHARE/LEND (w2 low, w3 high)."""
    return abi.join_handle(result.x[2], result.x[3])


def error_of(result: Result) -> abi.FfaError | None:
    """The FF-A error an answer carries, or None for anything but FFA_ERROR."""
    if result.x[0] != abi.FFA_ERROR:
        return None
    code = result.x[2] & abi.W_MASK
    return abi.FfaError(code - (1 << 32) if code >> 31 else code)

