"""Handlers that exist only for the tests, installed through the entry-point mechanism.

tests/plugins is put on PYTHONPATH of the broker processes the end-to-end tests start; the
`hb_test_plugins-0.0.0.dist-info` folder beside this package declares the entry points, exactly
as an operator's own plugin distribution would.
"""

from __future__ import annotations

import asyncio
import hashlib

from hyperbroker.calls import ActionKind, Call, Outcome, Result, VmmAction
from hyperbroker.handlers.api import Abi, CallContext, GuestMemoryError, Handler
from hyperbroker.smccc import OWNER_SERVICES

INCREMENT = 0x8200_0001  # state counter += 1; x1 = counter, x2 = calls this handler saw
SLOW_INCREMENT = 0x8200_0002  # the same after sleeping x1 milliseconds
READ_MEMORY = 0x8200_0003  # x1 = gpa, x2 = length: x1 = first 8 bytes, x2 = sha256[:8]
WRITE_MEMORY = 0x8200_0004  # x1 = gpa, x2 = length, x3 = byte: fill, x1 = length
FAIL = 0x8200_0005  # raises: the broker must answer with the rule's fallback
POWER_OFF = 0x8200_0006  # returns a SYSTEM_OFF action
WIDE = 0xC200_0007  # SMCCC 1.2 style: x0..x17 = 0..17
RESET = 0x8200_0008  # returns a SYSTEM_RESET action: the broker then calls vm_reset
INCREMENT_THEN_FAIL = 0x8200_0009  # counter += 1 is put, then the handler raises


class CounterHandler(Handler):
    """A stateful handler: proves state and last-result records survive a broker restart."""

    plugin = "test-counter"
    # A third-party plugin declares its ABI; this one serves SMCCC's SiP service owner whole.
    abi = Abi("sip", OWNER_SERVICES["sip"], {
        INCREMENT: "INCREMENT", SLOW_INCREMENT: "SLOW_INCREMENT", READ_MEMORY: "READ_MEMORY",
        WRITE_MEMORY: "WRITE_MEMORY", FAIL: "FAIL", POWER_OFF: "POWER_OFF", WIDE: "WIDE",
        INCREMENT_THEN_FAIL: "INCREMENT_THEN_FAIL"})
    eager = False

    def __init__(self, config: object) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.seen = 0

    async def vm_reset(self, ctx: CallContext) -> None:
        ctx.state.put({"counter": 0})

    async def undo(self, call: Call, result: Result, ctx: CallContext) -> None:
        if call.function_id in (INCREMENT, SLOW_INCREMENT):
            doc = ctx.state.get() or {"counter": 0}
            ctx.state.put({"counter": doc["counter"] - 1})

    def admin_view(self, ctx: CallContext) -> object:
        return {"vm": ctx.vm.key, "state": ctx.state.get()}

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        self.seen += 1
        fid = call.function_id
        if fid in (INCREMENT, SLOW_INCREMENT):
            if fid == SLOW_INCREMENT:
                await asyncio.sleep(call.arg(1) / 1000)
            doc = ctx.state.get() or {"counter": 0}
            doc["counter"] += 1
            ctx.state.put(doc)
            return Result.regs(0, doc["counter"], self.seen)
        if fid == READ_MEMORY:
            try:
                data = await ctx.memory.read(call.arg(1), call.arg(2))
            except GuestMemoryError:
                return Result.regs(-3, outcome=Outcome.GUEST_ERROR)
            return Result.regs(0, int.from_bytes(data[:8], "little"),
                               int.from_bytes(hashlib.sha256(data).digest()[:8], "little"))
        if fid == WRITE_MEMORY:
            try:
                ctx.memory.write(call.arg(1), bytes([call.arg(3) & 0xFF]) * call.arg(2))
            except GuestMemoryError:
                return Result.regs(-3, outcome=Outcome.GUEST_ERROR)
            return Result.regs(0, call.arg(2))
        if fid == FAIL:
            raise RuntimeError("this handler fails on purpose")
        if fid == INCREMENT_THEN_FAIL:
            doc = ctx.state.get() or {"counter": 0}
            ctx.state.put({"counter": doc["counter"] + 1})
            raise RuntimeError("this handler fails after changing its state")
        if fid == POWER_OFF:
            return Result.regs(0, actions=(VmmAction(ActionKind.SYSTEM_OFF),))
        if fid == WIDE:
            return Result.regs(*range(18))
        if fid == RESET:
            return Result.regs(0, actions=(VmmAction(ActionKind.SYSTEM_RESET),))
        return Result.regs(-1, outcome=Outcome.GUEST_ERROR)
