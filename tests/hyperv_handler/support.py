"""Guest RAM layout, the handler under test and builders of control words and inputs.
"""

from __future__ import annotations

import struct
from typing import Any

from hyperbroker.calls import Call, Result
from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.hyperv import HypervHandler, abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.layout import (
    VpHeader,
)
from hyperbroker.testing.context import FakeContext, FakeGuestMemory, MemoryPools

RAM = 0x4000_0000
IN = RAM + 0x1000
OUT = RAM + 0x2000
SELF_P = abi.HV_PARTITION_ID_SELF
SELF_VP = abi.HV_VP_INDEX_SELF


class ClockContext(FakeContext):
    """A FakeContext whose monotonic clock the test sets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock_ns = 1_000_000_000

    def now_ns(self) -> int:
        return self.clock_ns


def make(config: dict[str, Any] | None = None, nr_vcpus: int = 2, name: str = "vm",
         pools: MemoryPools | None = None, **kwargs: Any) -> tuple[HypervHandler, ClockContext]:
    memory = FakeGuestMemory(regions={RAM: bytearray(0x1_0000)})
    ctx = ClockContext(VmInfo("host", name, nr_vcpus, "p", 1), memory=memory, pools=pools)
    return HypervHandler(config or {}, **kwargs), ctx


def control(code: int, *, fast: bool = False, count: int = 0, start: int = 0,
            extra: int = 0) -> int:
    return (code | (abi.FAST_BIT if fast else 0) | count << abi.REP_COUNT_SHIFT
            | start << abi.REP_START_SHIFT | extra)


async def hv(h: HypervHandler, ctx: FakeContext, x1: int, *regs: int, vcpu: int = 0) -> Result:
    x = (abi.HV_FUNC_ID, x1, *regs) + (0,) * (16 - len(regs))
    result = await h.handle(Call(vcpu=vcpu, seq=0, function_id=abi.HV_FUNC_ID, x=x), ctx)
    ctx.memory.commit()  # the agent applies the writes with the result
    return result


def status(result: Result) -> HvStatus:
    return HvStatus(result.x[0] & 0xFFFF)


def reps(result: Result) -> int:
    return (result.x[0] >> 32) & 0xFFF


async def set_fast(h: HypervHandler, ctx: FakeContext, name: int, value: int,
                   vcpu: int = 0) -> Result:
    """hv_set_vpreg: x2 = partition self, x3 = VP self, x4 = name, x6 = value."""
    x1 = control(abi.HVCALL_SET_VP_REGISTERS, fast=True, count=1)
    return await hv(h, ctx, x1, SELF_P, SELF_VP, name, 0, value & (2**64 - 1), value >> 64,
                    vcpu=vcpu)


async def get_fast(h: HypervHandler, ctx: FakeContext, name: int,
                   vcpu: int = 0) -> tuple[Result, int]:
    """hv_get_vpreg_128: the value comes back in x6 (low) and x7 (high)."""
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1)
    result = await hv(h, ctx, x1, SELF_P, SELF_VP, name, vcpu=vcpu)
    return result, result.x[6] | result.x[7] << 64


def header(pid: int = SELF_P, vp: int = SELF_VP, vtl: int = 0, reserved: int = 0) -> bytes:
    return VpHeader(pid, vp, vtl, reserved).pack()


def get_input(*names: int, **kw: int) -> bytes:
    return header(**kw) + b"".join(struct.pack("<I", n) for n in names)


def values(ctx: FakeContext, count: int) -> list[int]:
    data = ctx.memory.peek(OUT, 16 * count)
    return [int.from_bytes(data[16 * i : 16 * i + 16], "little") for i in range(count)]
