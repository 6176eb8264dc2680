"""A VMM's side of the agent protocol, in Python: register VMs, send calls, serve memory.

Used by `hyperbroker call`, the demo, the benchmark and the tests, and a worked example for a
Python VMM. Guest RAM is a `GuestRam`: over SEQPACKET it is a memfd whose descriptor is passed to
the agent at registration (the agent then reads and writes it directly); over STREAM the client
serves the agent's MEM_READ / MEM_WRITE messages from the same buffer.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import mmap
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hyperbroker.kvm import SmcccFilter
from hyperbroker.smccc import NR_ARGS
from hyperbroker.wire import vmm as proto


class AgentError(Exception):
    """The agent refused a message: `code` is the errno it gave."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{errno.errorcode.get(code, code)}: {message}")
        self.code = code


class GuestRam:
    """One region of guest RAM backed by a memfd (shareable with the agent)."""

    def __init__(self, gpa: int, size: int, name: str = "guest-ram") -> None:
        self.gpa = gpa
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        # The agent maps only RAM that cannot shrink under it (agent.memory).
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, size)

    def region(self) -> proto.MemRegion:
        return proto.MemRegion(self.gpa, self.size, 0, 0)

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.gpa
        return self.map[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa
        self.map[off : off + len(data)] = data

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass
class Registration:
    vm_id: int
    policy_version: int
    filters: tuple[SmcccFilter, ...]
    message: str
    seq: list[int] = field(default_factory=list)


class VmmClient:
    def __init__(self, sock: socket.socket, seqpacket: bool) -> None:
        self.sock = sock
        self.seqpacket = seqpacket
        self.framer = proto.StreamFramer()
        self.rams: dict[int, GuestRam] = {}
        self.vms: dict[int, Registration] = {}
        self._waiters: dict[int, asyncio.Future[proto.Frame]] = {}
        self._next_tag = 1
        self.closed = False
        self.errors: list[proto.ErrorMsg] = []
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def connect(cls, path: str, mode: str = "auto") -> VmmClient:
        """Connect to the agent socket at `path`; mode seqpacket, stream or auto (by the socket)."""
        kinds = {"seqpacket": [True], "stream": [False], "auto": [True, False]}[mode]
        last: OSError | None = None
        for seqpacket in kinds:
            s = socket.socket(socket.AF_UNIX,
                              socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError as e:  # EPROTOTYPE: the socket is of the other kind
                s.close()
                last = e
                continue
            return cls(s, seqpacket)
        assert last is not None
        raise last

    # ---- I/O --------------------------------------------------------------------------------
    def _readable(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(proto.HEADER.size + proto.MAX_PAYLOAD + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._fail_all(ConnectionError("agent closed the connection"))
                return
            frames = [data] if self.seqpacket else self.framer.feed(data)
            for raw in frames:
                self._on_frame(proto.decode(raw))

    def _on_frame(self, frame: proto.Frame) -> None:
        msg = frame.message
        if isinstance(msg, proto.MemRead):
            ram = self.rams.get(msg.vm_id)
            if ram is None or not ram.contains(msg.gpa, msg.length):
                reply = proto.MemReadReply(-errno.EFAULT, b"")
            else:
                reply = proto.MemReadReply(0, ram.read(msg.gpa, msg.length))
            self._send(proto.encode(reply, frame.tag))
            return
        if isinstance(msg, proto.MemWrite):
            ram = self.rams.get(msg.vm_id)
            if ram is None or not ram.contains(msg.gpa, len(msg.data)):
                self._send(proto.encode(proto.ErrorMsg(errno.EFAULT, frame.type,
                                                       "write outside guest RAM"), frame.tag))
            else:
                ram.write(msg.gpa, msg.data)
            return
        if isinstance(msg, proto.Ping):
            self._send(proto.encode(proto.Pong(), frame.tag))
            return
        fut = self._waiters.pop(frame.tag, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)
        elif isinstance(msg, proto.ErrorMsg):
            self.errors.append(msg)

    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds).tobytes())])
            return
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                time.sleep(0.0001)  # the agent always drains; a full buffer is momentary
                continue
            view = view[n:]

    def _fail_all(self, exc: Exception) -> None:
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()

    def _tag(self) -> int:
        tag = self._next_tag
        self._next_tag = (tag + 1) & 0xFFFF_FFFF or 1
        return tag

    async def request(self, frame: bytes, tag: int, fds: Sequence[int] = (),
                      timeout: float = 30.0) -> proto.Frame:
        if self.closed:
            raise ConnectionError("agent connection is closed")
        fut: asyncio.Future[proto.Frame] = self._loop.create_future()
        self._waiters[tag] = fut
        self._send(frame, fds)
        reply = await asyncio.wait_for(fut, timeout)
        if isinstance(reply.message, proto.ErrorMsg):
            raise AgentError(reply.message.code, reply.message.message)
        return reply

    # ---- the protocol -----------------------------------------------------------------------
    async def register(self, name: str, nr_vcpus: int, profile: str = "",
                       ram: GuestRam | None = None, boot_id: bytes = b"") -> Registration:
        """REGISTER_VM; `boot_id` (BOOT_ID_LEN bytes) names this boot, so registering again
        with it (after the agent restarted) resumes the VM's state at the broker."""
        share = ram is not None and self.seqpacket
        regions = (ram.region(),) if ram is not None else ()
        tag = self._tag()
        flags = (proto.REGISTER_MEM_FDS if share else 0) | (
            proto.REGISTER_BOOT_ID if boot_id else 0)
        msg = proto.RegisterVm(name, profile, nr_vcpus, regions, flags, boot_id)
        assert ram is not None or not share
        reply = await self.request(proto.encode(msg, tag), tag, [ram.fd] if share and ram else [])
        r = reply.message
        assert isinstance(r, proto.RegisterVmReply)
        if r.status != 0:
            raise AgentError(-r.status, r.message)
        reg = Registration(r.vm_id, r.policy_version, r.filters, r.message, [0] * nr_vcpus)
        self.vms[r.vm_id] = reg
        if ram is not None:
            self.rams[r.vm_id] = ram
        return reg

    async def report_filters(self, vm_id: int, errnos: Sequence[int]) -> None:
        self._send(proto.encode(proto.FilterReport(vm_id, tuple(errnos)), self._tag()))

    async def call(self, vm_id: int, vcpu: int, function_id: int, args: Sequence[int] = (),
                   flags: int = 0, timeout: float = 30.0) -> proto.ResultMsg:
        """One hypercall from `vcpu`: x0 = function_id, x1.. = args."""
        reg = self.vms[vm_id]
        reg.seq[vcpu] += 1
        x = (function_id, *args)
        if len(x) > NR_ARGS:
            raise ValueError(f"at most {NR_ARGS - 1} arguments")
        x = x + (0,) * (NR_ARGS - len(x))
        tag = self._tag()
        frame = proto.encode_call(proto.CallMsg(vm_id, vcpu, reg.seq[vcpu], function_id, flags,
                                                time.monotonic_ns(), x), tag)
        reply = await self.request(frame, tag, timeout=timeout)
        assert isinstance(reply.message, proto.ResultMsg)
        return reply.message

    async def reset(self, vm_id: int) -> int:
        """Tell the agent the VM was reset; 0 once every handler has forgotten the old boot."""
        tag = self._tag()
        reply = await self.request(proto.encode(proto.VmReset(vm_id), tag), tag)
        assert isinstance(reply.message, proto.VmResetReply)
        return reply.message.status  # seq numbers go on increasing: they span resets

    async def destroy(self, vm_id: int) -> int:
        tag = self._tag()
        reply = await self.request(proto.encode(proto.DestroyVm(vm_id), tag), tag)
        assert isinstance(reply.message, proto.StatusReply)
        self.vms.pop(vm_id, None)
        self.rams.pop(vm_id, None)
        return reply.message.status

    def close(self) -> None:
        if not self.closed:
            self._fail_all(ConnectionError("closed"))
        self.sock.close()
