"""The guest side of the OP-TEE ABI, driven the way Linux's OP-TEE driver drives it.

A model of drivers/tee/optee/smc_abi.c, call.c and device.c for tests and tools: it lays messages
out in (simulated) guest RAM one per page, registers client buffers with REGISTER_SHM and page
lists, issues CALL_WITH_ARG and handles ETHREAD_LIMIT and foreign-interrupt RPCs as
optee_smc_do_call_with_arg does, and replays the driver's probe (Linux's drivers/tee/optee/smc_abi.c
optee_probe, in the order a Debian arm64 kernel was seen to make them). It needs an `Smc`
callable (registers in, registers out, guest memory updated) and the guest RAM to lay things out in;
it knows nothing of how the call reaches the proxy (FakeContext in unit tests, the agent in
end-to-end runs)."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hyperbroker.calls import Call
from hyperbroker.handlers.api import CallContext, Handler
from hyperbroker.handlers.optee import abi, msg
from hyperbroker.tee.gp import Login, Origin, ParamType, TeeResult
from hyperbroker.tee.uuids import DEVICE_ENUM_PTA

PAGE = msg.NONCONTIG_PAGE_SIZE
Smc = Callable[[Sequence[int]], Awaitable[tuple[int, ...]]]  # x0..x7 in, x0..x3 out


class GuestRam(Protocol):
    def poke(self, gpa: int, data: bytes) -> None: ...

    def peek(self, gpa: int, length: int) -> bytes: ...


class ProbeError(Exception):
    """The driver's probe would fail; the message is the one Linux prints."""


@dataclass
class GuestParam:
    """A client parameter as a TEE client API user fills it (TEEC_Parameter)."""

    type: ParamType = ParamType.NONE
    a: int = 0
    b: int = 0
    data: bytes = b""  # memref input bytes
    size: int = 0  # memref capacity (at least len(data)); after the call: the reported size
    null: bool = False  # a NULL memref (MEMREF_NULL)

    def __post_init__(self) -> None:
        self.type = ParamType(self.type)

    @classmethod
    def value_inout(cls, a: int, b: int = 0) -> GuestParam:
        return cls(ParamType.VALUE_INOUT, a, b)

    @classmethod
    def value_in(cls, a: int, b: int = 0) -> GuestParam:
        return cls(ParamType.VALUE_INPUT, a, b)

    @classmethod
    def value_out(cls) -> GuestParam:
        return cls(ParamType.VALUE_OUTPUT)

    @classmethod
    def mem_in(cls, data: bytes) -> GuestParam:
        return cls(ParamType.MEMREF_INPUT, data=data, size=len(data))

    @classmethod
    def mem_out(cls, capacity: int) -> GuestParam:
        return cls(ParamType.MEMREF_OUTPUT, size=capacity)

    @classmethod
    def mem_inout(cls, data: bytes, capacity: int | None = None) -> GuestParam:
        return cls(ParamType.MEMREF_INOUT, data=data,
                   size=len(data) if capacity is None else capacity)


@dataclass
class CallResult:
    """What TEEC_OpenSession / TEEC_InvokeCommand give the client."""

    ret: int
    origin: int
    session: int = 0
    params: list[GuestParam] = field(default_factory=list)  # outputs filled in
    outputs: list[bytes] = field(default_factory=list)  # memref output bytes per parameter


@dataclass
class Shm:
    """A registered buffer (a struct tee_shm): its cookie, pages and first-page offset."""

    cookie: int
    pages: list[int]
    offset: int
    size: int

    def gpa(self, pos: int) -> int:
        at = self.offset + pos
        return self.pages[at // PAGE] + at % PAGE


class PageAllocator:
    """Hands out 4 KiB guest pages from [base, base + size), highest first, so that a buffer
    of several pages is not physically contiguous, as with a real guest's page allocator."""

    def __init__(self, base: int, size: int) -> None:
        self.free = [base + i * PAGE for i in range(size // PAGE)]

    def alloc(self, n: int = 1) -> list[int]:
        if n > len(self.free):
            raise MemoryError("guest driver model out of pages")
        out, self.free = self.free[-n:][::-1], self.free[:-n]
        return out

    def release(self, pages: Sequence[int]) -> None:
        self.free.extend(pages)


class GuestDriver:
    """One guest's OP-TEE driver. `memref` selects how memory parameters travel: "rmem"
    (registered buffers, what Linux does with dynamic SHM) or "tmem" (temporary page lists)."""

    def __init__(self, smc: Smc, ram: GuestRam, base: int, size: int, *,
                 memref: str = "rmem") -> None:
        self.smc = smc
        self.ram = ram
        self.pages = PageAllocator(base, size)
        self.memref = memref
        self.next_cookie = 0xFFFF_0000_0000_1000  # tee_shm pointers look like kernel addresses
        self.rpc_yields = 0
        self.thread_waits = 0

    # Registers ---------------------------------------------------------------------------------

    async def fast(self, fid: int, *args: int) -> tuple[int, ...]:
        return await self.smc((fid, *args))

    async def call_with_arg(self, arg_gpa: int, fid: int = abi.CALL_WITH_ARG,
                            a3: int = 0) -> int:
        """optee_smc_do_call_with_arg: loop over ETHREAD_LIMIT and RPCs, return a0."""
        regs = [fid, arg_gpa >> 32, arg_gpa & 0xFFFF_FFFF, a3, 0, 0, 0, 0]
        for _ in range(100_000):
            res = await self.smc(regs)
            a0 = res[0] & 0xFFFF_FFFF
            if a0 == abi.SmcReturn.ETHREAD_LIMIT:
                self.thread_waits += 1
                continue
            if abi.is_rpc(a0):
                if a0 != abi.RPC_FOREIGN_INTR:
                    raise AssertionError(f"unexpected RPC {a0:#x} from the proxy")
                self.rpc_yields += 1
                regs = [abi.RETURN_FROM_RPC, res[1], res[2], res[3], 0, 0, 0, 0]
                continue
            return a0
        raise AssertionError("the call never completed")

    # Messages ----------------------------------------------------------------------------------

    def _message(self, header: msg.MsgHeader, params: Sequence[msg.MsgParam]) -> int:
        page = self.pages.alloc()[0]
        self.ram.poke(page, msg.build_arg(header, tuple(params)).ljust(PAGE, b"\0"))
        return page

    def _read_back(self, page: int, n: int) -> tuple[msg.MsgHeader, tuple[msg.MsgParam, ...]]:
        raw = self.ram.peek(page, msg.arg_size(n))
        return msg.MsgHeader.parse(raw), msg.parse_params(raw[msg.HEADER_SIZE:], n)

    async def send(self, header: msg.MsgHeader,
                   params: Sequence[msg.MsgParam]) -> tuple[int, msg.MsgHeader,
                                                            tuple[msg.MsgParam, ...]]:
        """One message: a0 of the SMC, and the message as the proxy left it."""
        page = self._message(header, params)
        try:
            a0 = await self.call_with_arg(page)
            out_header, out_params = self._read_back(page, len(params))
        finally:
            self.pages.release([page])
        return a0, out_header, out_params

    def page_list(self, pages: Sequence[int], offset: int) -> tuple[int, list[int]]:
        """optee_fill_pages_list: list pages holding `pages`; buf_ptr and the list's pages."""
        n_lists = -(-len(pages) // msg.PAGELIST_ENTRIES_PER_PAGE)
        lists = self.pages.alloc(n_lists)
        for i, lp in enumerate(lists):
            chunk = pages[i * msg.PAGELIST_ENTRIES_PER_PAGE:(i + 1) * msg.PAGELIST_ENTRIES_PER_PAGE]
            nxt = lists[i + 1] if i + 1 < len(lists) else 0
            entries = list(chunk) + [0] * (msg.PAGELIST_ENTRIES_PER_PAGE - len(chunk)) + [nxt]
            self.ram.poke(lp, struct.pack("<512Q", *entries))
        return lists[0] | offset, lists

    def alloc_buffer(self, size: int, offset: int = 0) -> Shm:
        """Zeroed pages, as optee_pool_op_alloc_helper allocates them (__GFP_ZERO)."""
        pages = self.pages.alloc(max(1, -(-(size + offset) // PAGE)))
        for page in pages:
            self.ram.poke(page, bytes(PAGE))
        self.next_cookie += 0x40
        return Shm(self.next_cookie, pages, offset, size)

    def fill(self, shm: Shm, data: bytes, pos: int = 0) -> None:
        for gpa, start, n in _chunks(shm, pos, len(data)):
            self.ram.poke(gpa, data[start : start + n])

    def read(self, shm: Shm, pos: int, n: int) -> bytes:
        return b"".join(self.ram.peek(gpa, k) for gpa, _, k in _chunks(shm, pos, n))

    async def register(self, shm: Shm) -> int:
        """optee_shm_register: REGISTER_SHM with a page list; the TEE result."""
        buf_ptr, lists = self.page_list(shm.pages, shm.offset)
        try:
            a0, h, _ = await self.send(
                msg.MsgHeader(msg.CMD_REGISTER_SHM, 0, 0, 0, 0, 0, 0, 1),
                [msg.MsgParam(msg.ATTR_TYPE_TMEM_OUTPUT | msg.ATTR_NONCONTIG, buf_ptr, shm.size,
                              shm.cookie)])
        finally:
            self.pages.release(lists)
        return TeeResult.COMMUNICATION if a0 else h.ret

    async def unregister(self, shm: Shm) -> int:
        a0, h, _ = await self.send(msg.MsgHeader(msg.CMD_UNREGISTER_SHM, 0, 0, 0, 0, 0, 0, 1),
                                   [msg.MsgParam(msg.ATTR_TYPE_RMEM_INPUT, 0, 0, shm.cookie)])
        return TeeResult.COMMUNICATION if a0 else h.ret

    async def _params_in(self, params: Sequence[GuestParam]
                         ) -> tuple[list[msg.MsgParam], list[Shm | None], list[int]]:
        out: list[msg.MsgParam] = []
        buffers: list[Shm | None] = []
        temp_lists: list[int] = []
        for p in params:
            if p.type.is_value:
                out.append(msg.MsgParam(int(p.type), p.a, p.b, 0))
                buffers.append(None)
            elif p.type.is_memref:
                kind = int(p.type) - ParamType.MEMREF_INPUT
                if p.null:
                    out.append(msg.MsgParam(msg.ATTR_TYPE_TMEM_INPUT + kind, 0, p.size, 0))
                    buffers.append(None)
                    continue
                shm = self.alloc_buffer(max(p.size, len(p.data), 1))
                self.fill(shm, p.data)
                buffers.append(shm)
                if self.memref == "rmem":
                    if await self.register(shm) != TeeResult.SUCCESS:
                        raise AssertionError("registering a client buffer failed")
                    out.append(msg.MsgParam(msg.ATTR_TYPE_RMEM_INPUT + kind, 0, p.size,
                                            shm.cookie))
                else:
                    buf_ptr, lists = self.page_list(shm.pages, shm.offset)
                    temp_lists.extend(lists)
                    out.append(msg.MsgParam((msg.ATTR_TYPE_TMEM_INPUT + kind) | msg.ATTR_NONCONTIG,
                                            buf_ptr, p.size, shm.cookie))
            else:
                out.append(msg.MsgParam(msg.ATTR_TYPE_NONE))
                buffers.append(None)
        return out, buffers, temp_lists

    async def _params_out(self, params: Sequence[GuestParam], out: Sequence[msg.MsgParam],
                          buffers: Sequence[Shm | None]) -> tuple[list[GuestParam], list[bytes]]:
        results, outputs = [], []
        for p, m, shm in zip(params, out, buffers, strict=True):
            r = GuestParam(p.type, p.a, p.b, p.data, p.size, p.null)
            data = b""
            if p.type in (ParamType.VALUE_OUTPUT, ParamType.VALUE_INOUT):
                r.a, r.b = m.a, m.b
            if p.type in (ParamType.MEMREF_OUTPUT, ParamType.MEMREF_INOUT):
                r.size = m.b
                if shm is not None:
                    data = self.read(shm, 0, min(m.b, max(p.size, len(p.data))))
            results.append(r)
            outputs.append(data)
            if shm is not None:
                if self.memref == "rmem":
                    await self.unregister(shm)
                self.pages.release(shm.pages)
        return results, outputs

    async def open_session(self, ta: uuid.UUID, params: Sequence[GuestParam] = (), *,
                           login: int = Login.PUBLIC, client: uuid.UUID | None = None,
                           cancel_id: int = 0) -> CallResult:
        """optee_open_session: two META values (TA UUID; client UUID and login), then params."""
        ta_a, ta_b = struct.unpack("<QQ", ta.bytes)
        cl_a, cl_b = struct.unpack("<QQ", (client or uuid.UUID(int=0)).bytes)
        meta = [
            msg.MsgParam(msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT, ta_a, ta_b, 0),
            msg.MsgParam(msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT, cl_a, cl_b, login),
        ]
        mparams, buffers, lists = await self._params_in(params)
        a0, h, out = await self.send(
            msg.MsgHeader(msg.CMD_OPEN_SESSION, 0, 0, cancel_id, 0, 0, 0, 2 + len(mparams)),
            meta + mparams)
        self.pages.release(lists)
        results, outputs = await self._params_out(params, out[2:], buffers)
        if a0:
            return CallResult(TeeResult.COMMUNICATION, Origin.COMMS, 0, results, outputs)
        return CallResult(h.ret, h.ret_origin, h.session, results, outputs)

    async def invoke(self, session: int, func: int, params: Sequence[GuestParam] = (),
                     cancel_id: int = 0) -> CallResult:
        mparams, buffers, lists = await self._params_in(params)
        a0, h, out = await self.send(
            msg.MsgHeader(msg.CMD_INVOKE_COMMAND, func, session, cancel_id, 0, 0, 0,
                          len(mparams)), mparams)
        self.pages.release(lists)
        results, outputs = await self._params_out(params, out, buffers)
        if a0:
            return CallResult(TeeResult.COMMUNICATION, Origin.COMMS, session, results, outputs)
        return CallResult(h.ret, h.ret_origin, session, results, outputs)

    async def close_session(self, session: int) -> CallResult:
        a0, h, _ = await self.send(msg.MsgHeader(msg.CMD_CLOSE_SESSION, 0, session, 0, 0, 0, 0, 0),
                                   [])
        if a0:
            return CallResult(TeeResult.COMMUNICATION, Origin.COMMS, session)
        return CallResult(h.ret, h.ret_origin, session)

    async def cancel(self, session: int, cancel_id: int) -> CallResult:
        a0, h, _ = await self.send(
            msg.MsgHeader(msg.CMD_CANCEL, 0, session, cancel_id, 0, 0, 0, 0), [])
        if a0:
            return CallResult(TeeResult.COMMUNICATION, Origin.COMMS, session)
        return CallResult(h.ret, h.ret_origin, session)

    # The probe ---------------------------------------------------------------------------------

    async def probe(self, nr_cpus: int = 1) -> list[uuid.UUID]:
        """optee_probe (smc_abi.c), Linux 6.12 order; the TEE bus devices it would register."""
        if (await self.fast(abi.CALLS_UID))[:4] != abi.MSG_UID:
            raise ProbeError("api uid mismatch")
        await self.fast(abi.GET_OS_REVISION)
        major, minor = (await self.fast(abi.CALLS_REVISION))[:2]
        if major != abi.MSG_REVISION[0] or minor < abi.MSG_REVISION[1]:
            raise ProbeError("api revision mismatch")
        await self.fast(abi.GET_THREAD_COUNT)
        res = await self.fast(abi.EXCHANGE_CAPABILITIES,
                              abi.NSEC_CAP_UNIPROCESSOR if nr_cpus == 1 else 0)
        if res[0] != abi.SmcReturn.OK:
            raise ProbeError("capabilities mismatch")
        sec_caps = res[1]
        rpc_param_count = res[3] & 0xFF if sec_caps & abi.SEC_CAP_RPC_ARG else 0
        if not sec_caps & abi.SEC_CAP_DYNAMIC_SHM:
            if not sec_caps & abi.SEC_CAP_HAVE_RESERVED_SHM:
                raise ProbeError("no shared memory")
            shm = await self.fast(abi.GET_SHM_CONFIG)
            if shm[0] != abi.SmcReturn.OK:
                raise ProbeError("static shm service not available")
        await self._loop_until(abi.DISABLE_SHM_CACHE, abi.SmcReturn.ENOTAVAIL)
        if not rpc_param_count:
            await self._loop_until(abi.ENABLE_SHM_CACHE, abi.SmcReturn.OK)
        return await self.enumerate_devices()

    async def _loop_until(self, fid: int, want: int, tries: int = 1000) -> None:
        for _ in range(tries):
            a0 = (await self.fast(fid))[0]
            if a0 == want:
                return
            if fid == abi.DISABLE_SHM_CACHE and a0 == abi.SmcReturn.OK:
                continue  # one cached buffer freed; ask again
        raise ProbeError(f"{abi.FUNCTION_NAMES[fid]} never answered {want:#x}: the probe hangs")

    async def enumerate_devices(self, func: int = 0) -> list[uuid.UUID]:
        """device.c __optee_enumerate_devices."""
        opened = await self.open_session(DEVICE_ENUM_PTA)
        if opened.ret != TeeResult.SUCCESS:
            return []  # "Device enumeration pseudo TA not found": not an error
        try:
            first = await self.invoke(opened.session, func, [GuestParam(
                ParamType.MEMREF_OUTPUT, null=True)])
            if first.ret not in (TeeResult.SUCCESS, TeeResult.SHORT_BUFFER):
                raise ProbeError(f"PTA_CMD_GET_DEVICES invoke function err: {first.ret:x}")
            size = first.params[0].size
            if not size:
                return []
            second = await self.invoke(opened.session, func, [GuestParam.mem_out(size)])
            if second.ret != TeeResult.SUCCESS:
                raise ProbeError(f"PTA_CMD_GET_DEVICES invoke function err: {second.ret:x}")
            blob = second.outputs[0]
            return [uuid.UUID(bytes=blob[i : i + 16]) for i in range(0, len(blob) - 15, 16)]
        finally:
            await self.close_session(opened.session)


def _chunks(shm: Shm, pos: int, n: int) -> list[tuple[int, int, int]]:
    """(gpa, position in the data, length) pieces of bytes [pos, pos+n) of a buffer."""
    out, done = [], 0
    while done < n:
        at = shm.offset + pos + done
        k = min(n - done, PAGE - at % PAGE)
        out.append((shm.pages[at // PAGE] + at % PAGE, done, k))
        done += k
    return out


def context_smc(handler: Handler, ctx: CallContext, commit: Callable[[], None],
                vcpu: int = 0) -> Smc:
    """An `Smc` that calls `handler` directly, as the broker would, and then applies the result:
    `commit()` lands the buffered guest-memory writes (FakeGuestMemory.commit), and registers the
    result does not write keep their values, as on a vCPU."""
    seq = 0

    async def smc(regs: Sequence[int]) -> tuple[int, ...]:
        nonlocal seq
        seq += 1
        x = tuple(r & 0xFFFF_FFFF_FFFF_FFFF for r in regs) + (0,) * (18 - len(regs))
        result = await handler.handle(Call(vcpu, seq, x[0] & 0xFFFF_FFFF, x), ctx)
        commit()
        out = [result.register(i) if result.mask >> i & 1 else x[i] for i in range(18)]
        return tuple(out[:4])

    return smc
