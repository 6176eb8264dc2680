"""Message builders and the SMC conduit for the OP-TEE message tests.
"""

from __future__ import annotations

import struct
import uuid

from hyperbroker.calls import Call, Result
from hyperbroker.handlers.optee import abi, msg
from hyperbroker.tee.gp import Login, TeeResult
from hyperbroker.testing.optee import (
    ECHO_TA,
    RAM_BASE,
    Guest,
    Harness,
)

PARG = RAM_BASE + 0x10000  # a page-aligned message address below the driver model's pages
META = msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT
U32 = 0xFFFF_FFFF


def meta_params(ta: uuid.UUID, login: int = Login.PUBLIC) -> list[msg.MsgParam]:
    a, b = struct.unpack("<QQ", ta.bytes)
    return [msg.MsgParam(META, a, b, 0), msg.MsgParam(META, 0, 0, login)]


def header(cmd: int, n: int, *, session: int = 0, func: int = 0, cancel_id: int = 0,
           ret: int = 0xDEAD, origin: int = 0xBEEF) -> msg.MsgHeader:
    return msg.MsgHeader(cmd, func, session, cancel_id, 0, ret, origin, n)


async def smc(h: Harness, g: Guest, *regs: int, vcpu: int = 0) -> Result:
    x = tuple(regs) + (0,) * (18 - len(regs))
    result = await h.handler.handle(Call(vcpu, 1, regs[0], x), g.ctx)
    g.memory.commit()
    return result


async def send(h: Harness, g: Guest, hdr: msg.MsgHeader, params: list[msg.MsgParam],
               fid: int = abi.CALL_WITH_ARG, parg: int = PARG
               ) -> tuple[Result, msg.MsgHeader, tuple[msg.MsgParam, ...]]:
    g.memory.poke(parg, msg.build_arg(hdr, tuple(params)))
    r = await smc(h, g, fid, parg >> 32, parg & U32)
    raw = g.memory.peek(parg, msg.arg_size(len(params)))
    return r, msg.MsgHeader.parse(raw), msg.parse_params(raw[32:], len(params))


async def open_echo(g: Guest) -> int:
    r = await g.driver.open_session(ECHO_TA)
    assert r.ret == TeeResult.SUCCESS
    return r.session
