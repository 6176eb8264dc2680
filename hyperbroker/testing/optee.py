"""Test support for the OP-TEE proxy: a test TA, a faulty backend, harnesses, a TEE process.

`Harness` wires one OpteeHandler to the real reference TEE (tee.service.TeeService in the same
process, through LocalTeeBackend) and to simulated guests (FakeContext RAM driven by
hyperbroker.testing.optee_guest.GuestDriver). `FaultyBackend` makes the backend slow, unreachable,
or restarted (a new service epoch on the same state directory). `start_tee_process` runs `python -m
hyperbroker.tee.server` as a real process and waits for its "listening" line.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.optee.backend import (
    BackendReply,
    BackendUnavailable,
    CancelRequest,
    CloseRequest,
    InvokeRequest,
    OpenSessionRequest,
    TeeBackend,
    TeeVm,
)
from hyperbroker.handlers.optee.handler import OpteeHandler
from hyperbroker.tee.apps import BUILTIN
from hyperbroker.tee.gp import ParamType, TeeResult
from hyperbroker.tee.service import TeeService
from hyperbroker.tee.ta import Operation, TrustedApp
from hyperbroker.testing.context import FakeContext, FakeGuestMemory
from hyperbroker.testing.optee_guest import GuestDriver, context_smc
from hyperbroker.testing.tee_backend import LocalTeeBackend

RAM_BASE = 0x4000_0000
RAM_SIZE = 4 << 20
DRIVER_BASE = RAM_BASE + (1 << 20)  # the driver model lays messages and buffers out above this

ECHO_TA = uuid.UUID("5e1f0000-0000-4000-8000-0000000000e1")
ECHO_MIRROR = 0  # [0] mem in, [1] mem out <- [0], [2] value inout (a+1, b+1), [3] value out
ECHO_SLEEP = 1  # [0] value in: a = milliseconds; CANCEL if cancelled meanwhile
ECHO_PANIC = 2  # raises: the TA is dead from then on
ECHO_FILL = 3  # [0] value in: a = n, [1] mem out: n bytes of 0xA5 (SHORT_BUFFER if too small)
ECHO_INOUT = 4  # [0] mem inout: reversed in place


class EchoTa(TrustedApp):
    """A TA that exercises every parameter direction, delays, cancellation and panics."""

    uuid = ECHO_TA
    name = "echo"

    async def invoke(self, session: object, cmd: int, op: Operation) -> int:
        p = op.params
        if cmd == ECHO_MIRROR:
            if not p[1].set_output(p[0].data):
                return TeeResult.SHORT_BUFFER
            p[2].set_value(p[2].a + 1, p[2].b + 1)
            p[3].set_value(len(p[0].data), 7)
            return TeeResult.SUCCESS
        if cmd == ECHO_SLEEP:
            try:
                await asyncio.wait_for(op.cancelled.wait(), p[0].a / 1000)
            except TimeoutError:
                return TeeResult.SUCCESS
            return TeeResult.CANCEL
        if cmd == ECHO_PANIC:
            raise RuntimeError("echo TA panics on purpose")
        if cmd == ECHO_FILL:
            ok = p[1].set_output(b"\xa5" * p[0].a)
            return TeeResult.SUCCESS if ok else TeeResult.SHORT_BUFFER
        if cmd == ECHO_INOUT and p[0].type == ParamType.MEMREF_INOUT:
            p[0].set_output(p[0].data[::-1])
            return TeeResult.SUCCESS
        return TeeResult.NOT_IMPLEMENTED


@dataclass
class FaultyBackend:
    """Wraps a backend: `down` makes every call unreachable, `delay` slows every call."""

    inner: TeeBackend
    down: bool = False
    delay: float = 0.0
    calls: list[str] = field(default_factory=list)

    async def _gate(self, name: str) -> None:
        self.calls.append(name)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise BackendUnavailable("unavailable", "FaultyBackend is down")

    async def vm_created(self, vm: TeeVm, max_sessions: int) -> int:
        await self._gate("vm_created")
        return await self.inner.vm_created(vm, max_sessions)

    async def vm_destroyed(self, vm: TeeVm) -> int:
        await self._gate("vm_destroyed")
        return await self.inner.vm_destroyed(vm)

    async def open_session(self, request: OpenSessionRequest) -> BackendReply:
        await self._gate("open_session")
        return await self.inner.open_session(request)

    async def invoke_command(self, request: InvokeRequest) -> BackendReply:
        await self._gate("invoke_command")
        return await self.inner.invoke_command(request)

    async def close_session(self, request: CloseRequest) -> BackendReply:
        await self._gate("close_session")
        return await self.inner.close_session(request)

    async def cancel(self, request: CancelRequest) -> BackendReply:
        await self._gate("cancel")
        return await self.inner.cancel(request)

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Guest:
    """One simulated VM: its context (RAM, state) and its OP-TEE driver."""

    ctx: FakeContext
    driver: GuestDriver

    @property
    def memory(self) -> FakeGuestMemory:
        assert isinstance(self.ctx.memory, FakeGuestMemory)
        return self.ctx.memory


def guest_of(handler: OpteeHandler, name: str = "vm-1", host: str = "host-a",
             memref: str = "rmem") -> Guest:
    """A simulated VM with 4 MiB of RAM whose OP-TEE driver calls `handler`."""
    vm = VmInfo(host=host, name=name, nr_vcpus=1, profile="default", policy_version=1)
    memory = FakeGuestMemory(regions={RAM_BASE: bytearray(RAM_SIZE)})
    ctx = FakeContext(vm, memory=memory)
    smc = context_smc(handler, ctx, memory.commit)
    return Guest(ctx, GuestDriver(smc, memory, DRIVER_BASE, RAM_BASE + RAM_SIZE - DRIVER_BASE,
                                  memref=memref))


class Harness:
    """An OpteeHandler in front of an in-process TeeService, with guests to drive it."""

    def __init__(self, state_dir: Path, config: Mapping[str, Any] | None = None,
                 apps: tuple[type[TrustedApp], ...] = (*BUILTIN, EchoTa),
                 max_sessions_per_vm: int = 32) -> None:
        self.state_dir = state_dir
        self.apps = apps
        self.max_sessions_per_vm = max_sessions_per_vm
        self.service = TeeService(apps, state_dir, max_sessions_per_vm=max_sessions_per_vm)
        self.local = LocalTeeBackend(self.service)
        self.backend = FaultyBackend(self.local)
        self.config = dict(config or {})
        self.handler = OpteeHandler(self.config, backend=self.backend)

    def guest(self, name: str = "vm-1", host: str = "host-a", memref: str = "rmem") -> Guest:
        return guest_of(self.handler, name, host, memref)

    def restart_service(self) -> None:
        """The TEE service restarts: same state directory, new epoch, no sessions."""
        self.service = TeeService(self.apps, self.state_dir,
                                  max_sessions_per_vm=self.max_sessions_per_vm)
        self.local.service = self.service

    def restart_broker(self) -> None:
        """The broker restarts: a new handler instance; per-VM state survives in ctx.state."""
        self.handler = OpteeHandler(self.config, backend=self.backend)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` until it holds (a test watching another task make progress)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.002)


@dataclass
class TeeProcess:
    """`python -m hyperbroker.tee.server` running as a real process."""

    proc: subprocess.Popen[str]
    port: int
    lines: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_tee_process(state_dir: Path, port: int = 0, extra: tuple[str, ...] = (),
                      timeout: float = 30.0) -> TeeProcess:
    """Start the TEE service on 127.0.0.1:`port`; returns once it prints its listening line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hyperbroker.tee.server", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(state_dir), "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lines:
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                return TeeProcess(proc, int(m.group(1)), lines)
        if proc.poll() is not None:
            raise RuntimeError(f"tee.server exited with {proc.returncode}: {lines[-20:]}")
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"tee.server did not start within {timeout} s: {lines[-20:]}")
