"""The OP-TEE path end to end with real processes: TEE service, broker, agent (issue 5, "Tests").

`python -m hyperbroker.tee.server` runs as a process on a free port with its own state directory; a
real broker's policy forwards the OP-TEE ABI (core/arch/arm/include/sm/optee_smc.h: owner 50 fast
and yielding, owner 63) to an `optee` handler pointed at that service; a real agent sits in front of
it. The test plays the VMM with hyperbroker.testing.vmm: guest RAM is a memfd (GuestRam) that the
agent maps itself over SEQPACKET, or that the test serves through MEM_READ / MEM_WRITE over STREAM.
The guest's OP-TEE driver is hyperbroker.testing.optee_guest.GuestDriver, the model of Linux's
drivers/tee/optee: it lays `struct optee_msg_arg` out one message per page in that RAM, registers
client buffers with REGISTER_SHM page lists and passes them as RMEM, issues CALL_WITH_ARG with the
page's address in a1:a2, and resumes foreign-interrupt RPCs with RETURN_FROM_RPC as
optee_smc_do_call_with_arg does.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from hyperbroker.handlers.optee import abi
from hyperbroker.smccc import NR_ARGS
from hyperbroker.tee.apps import mac, storage
from hyperbroker.tee.apps.storage import decode_id_list
from hyperbroker.tee.gp import Origin, ParamType, TeeResult
from hyperbroker.tee.uuids import KEYED_MAC_TA, SECURE_STORAGE_TA
from hyperbroker.testing.optee import TeeProcess, start_tee_process
from hyperbroker.testing.optee_guest import CallResult, GuestDriver, GuestParam
from hyperbroker.testing.procs import AgentProcess, Broker, start_agent, start_broker
from hyperbroker.testing.vmm import GuestRam, VmmClient
from hyperbroker.wire.vmm import ResultSource

pytestmark = pytest.mark.slow

RAM_BASE = 0x4000_0000
RAM_SIZE = 4 << 20
DRIVER_BASE = RAM_BASE + (1 << 20)  # the driver lays messages and buffers out above this
HOST = "host-tee"

# The optee ABI forwarded whole, in two rules as docs/tee-proxy.md recommends: the fast calls
# (owners 50 and 63) with the default fallback, the yielding calls with the
# "foreign-interrupt" fallback, so a message that outlives its deadline resumes with
# RETURN_FROM_RPC instead of being lost.
POLICY = """\
handlers:
  optee:
    plugin: optee
    config: {{backend: "{backend}", timeout_ms: 3000}}
profiles:
  default:
    rules:
      - {{name: optee-fast, ranges: [{{base: 0xB2000000, count: 0x10000}},
                                    {{base: 0xBF000000, count: 0x10000}}],
         action: forward, handler: optee, deadline_ms: 2000}}
      - {{name: optee-yield, ranges: [{{base: 0x32000000, count: 0x10000}}],
         action: forward, handler: optee, deadline_ms: 2000, fallback: foreign-interrupt}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text from 127.0.0.1:`port`, as {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = frozenset(tuple(p.split("=", 1)) for p in labels.rstrip("}").split(",") if p)
        out[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= ls)


@dataclass
class TeeStack:
    tee: TeeProcess
    tee_metrics_port: int
    broker: Broker
    agent: AgentProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeeStack]:
    """One TEE service, broker and agent for the module; each test uses VMs of its own."""
    tmp_path = tmp_path_factory.mktemp("optee-path")
    tee_metrics_port = free_port()
    tee = start_tee_process(tmp_path / "tee-state",
                            extra=("--metrics-port", str(tee_metrics_port)))
    policy = tmp_path / "optee-policy.yaml"
    policy.write_text(POLICY.format(backend=tee.address))
    broker: Broker | None = None
    agent: AgentProcess | None = None
    try:
        broker = start_broker(policy, tmp_path / "broker-state", log_level="info")
        agent = start_agent(broker.address, HOST, tmp_path, log_level="info")
        yield TeeStack(tee, tee_metrics_port, broker, agent)
    finally:
        for managed in (agent, broker):
            if managed is not None:
                managed.process.stop()
        tee.stop()


@dataclass
class AgentVm:
    """One VM registered with the real agent, seen by the driver model: its RAM (GuestRam, a
    memfd) and its SMC conduit (a CALL to the agent; registers the result leaves out of its
    mask keep their values, as on a vCPU)."""

    client: VmmClient
    vm_id: int
    ram: GuestRam
    driver: GuestDriver = field(init=False)
    served_by: list[tuple[int, ResultSource]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.driver = GuestDriver(self.smc, self, DRIVER_BASE, RAM_BASE + RAM_SIZE - DRIVER_BASE)

    def poke(self, gpa: int, data: bytes) -> None:
        self.ram.write(gpa, data)

    def peek(self, gpa: int, length: int) -> bytes:
        return self.ram.read(gpa, length)

    async def smc(self, regs: Sequence[int]) -> tuple[int, ...]:
        x = tuple(r & 0xFFFF_FFFF_FFFF_FFFF for r in regs) + (0,) * (NR_ARGS - len(regs))
        r = await self.client.call(self.vm_id, 0, x[0] & 0xFFFF_FFFF, x[1:])
        self.served_by.append((x[0] & 0xFFFF_FFFF, r.timing.source))
        return tuple(r.x[i] if r.reg_mask >> i & 1 else x[i] for i in range(4))

    def sources_of(self, fid: int) -> set[ResultSource]:
        return {source for f, source in self.served_by if f == fid}


async def register(client: VmmClient, name: str) -> AgentVm:
    ram = GuestRam(RAM_BASE, RAM_SIZE, name)
    reg = await client.register(name, 1, "default", ram)
    return AgentVm(client, reg.vm_id, ram)


@pytest.fixture(params=["seqpacket", "stream"])
async def client(request: pytest.FixtureRequest, stack: TeeStack) -> AsyncIterator[VmmClient]:
    """SEQPACKET: the agent maps the memfd; STREAM: the test serves MEM_READ / MEM_WRITE."""
    mode = request.param
    path = stack.agent.socket if mode == "seqpacket" else stack.agent.stream_socket
    c = await VmmClient.connect(str(path), mode)
    yield c
    c.close()


def vm_name(client: VmmClient, name: str) -> str:
    """VM names differ per transport: the service keeps objects per (host, name) for good."""
    return f"{name}-{'seqpacket' if client.seqpacket else 'stream'}"


async def open_ok(vm: AgentVm, ta: uuid.UUID) -> int:
    r = await vm.driver.open_session(ta)
    assert (r.ret, r.origin) == (TeeResult.SUCCESS, Origin.TRUSTED_APP)
    assert r.session != 0
    return r.session


async def invoke(vm: AgentVm, session: int, cmd: int, *params: GuestParam) -> CallResult:
    return await vm.driver.invoke(session, cmd, list(params))


async def test_guest_driver_stores_reads_back_signs_and_closes(client: VmmClient,
                                                               stack: TeeStack) -> None:
    """Probe, a storage object written and read back, the MAC TA, sessions closed."""
    vm = await register(client, vm_name(client, "vm-tee"))
    assert set(await vm.driver.probe()) == {SECURE_STORAGE_TA, KEYED_MAC_TA}

    st = await open_ok(vm, SECURE_STORAGE_TA)
    blob = bytes(range(256)) * 20  # 5 KiB: the client buffer spans two non-contiguous pages
    r = await invoke(vm, st, storage.CMD_CREATE, GuestParam.mem_in(b"config"),
                     GuestParam.mem_in(blob))
    assert (r.ret, r.origin) == (TeeResult.SUCCESS, Origin.TRUSTED_APP)
    r = await invoke(vm, st, storage.CMD_READ, GuestParam.mem_in(b"config"),
                     GuestParam.mem_out(len(blob)))
    assert r.ret == TeeResult.SUCCESS and r.params[1].size == len(blob) and r.outputs[1] == blob
    r = await invoke(vm, st, storage.CMD_WRITE, GuestParam.mem_in(b"config"),
                     GuestParam.mem_in(b"version 2"))
    assert r.ret == TeeResult.SUCCESS
    r = await invoke(vm, st, storage.CMD_READ, GuestParam.mem_in(b"config"),
                     GuestParam.mem_out(4))
    assert (r.ret, r.origin, r.params[1].size) == (TeeResult.SHORT_BUFFER,
                                                    Origin.TRUSTED_APP, 9)
    r = await invoke(vm, st, storage.CMD_READ, GuestParam.mem_in(b"config"),
                     GuestParam.mem_out(64))
    assert r.ret == TeeResult.SUCCESS and r.outputs[1] == b"version 2"
    r = await invoke(vm, st, storage.CMD_LIST, GuestParam.mem_out(256),
                     GuestParam(ParamType.VALUE_OUTPUT))
    assert decode_id_list(r.outputs[0]) == [b"config"] and r.params[1].a == 1

    m = await open_ok(vm, KEYED_MAC_TA)
    r = await invoke(vm, m, mac.CMD_GENERATE_KEY, GuestParam.mem_in(b"k1"))
    assert r.ret == TeeResult.SUCCESS
    signed = await invoke(vm, m, mac.CMD_SIGN, GuestParam.mem_in(b"k1"),
                          GuestParam.mem_in(b"message"), GuestParam.mem_out(32))
    assert signed.ret == TeeResult.SUCCESS and signed.params[2].size == mac.MAC_BYTES
    tag = signed.outputs[2]
    assert len(tag) == mac.MAC_BYTES and any(tag)
    r = await invoke(vm, m, mac.CMD_VERIFY, GuestParam.mem_in(b"k1"),
                     GuestParam.mem_in(b"message"), GuestParam.mem_in(tag))
    assert r.ret == TeeResult.SUCCESS
    flipped = bytes([tag[0] ^ 1]) + tag[1:]
    r = await invoke(vm, m, mac.CMD_VERIFY, GuestParam.mem_in(b"k1"),
                     GuestParam.mem_in(b"message"), GuestParam.mem_in(flipped))
    assert (r.ret, r.origin) == (TeeResult.MAC_INVALID, Origin.TRUSTED_APP)

    for session in (st, m):
        r = await vm.driver.close_session(session)
        assert (r.ret, r.origin) == (TeeResult.SUCCESS, Origin.TEE)
    r = await invoke(vm, m, mac.CMD_SIGN, GuestParam.mem_in(b"k1"), GuestParam.mem_in(b"x"),
                     GuestParam.mem_out(32))
    assert (r.ret, r.origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)  # the session is gone

    # Static answers come from the agent's compiled policy; messages from the broker's handler.
    assert vm.sources_of(abi.CALLS_UID) == {ResultSource.AGENT}
    assert vm.sources_of(abi.CALL_WITH_ARG) == {ResultSource.BROKER}
    assert vm.sources_of(abi.EXCHANGE_CAPABILITIES) == {ResultSource.BROKER}
    broker = scrape(stack.broker.metrics_port or 0)
    for ta in ("keyed-mac", "secure-storage", "device-enum"):
        assert metric(broker, "hyperbroker_tee_sessions_open", ta=ta) == 0
    assert await client.destroy(vm.vm_id) == 0
    vm.ram.close()


async def test_two_vms_cannot_see_each_others_objects(client: VmmClient) -> None:
    """Per-VM namespaces at the service, per-VM session IDs at the proxy."""
    a = await register(client, vm_name(client, "vm-a"))
    b = await register(client, vm_name(client, "vm-b"))
    sa = await open_ok(a, SECURE_STORAGE_TA)
    r = await invoke(b, sa, storage.CMD_LIST, GuestParam.mem_out(64),
                     GuestParam(ParamType.VALUE_OUTPUT))
    assert (r.ret, r.origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)  # not vm-b's session
    r = await invoke(a, sa, storage.CMD_CREATE, GuestParam.mem_in(b"secret"),
                     GuestParam.mem_in(b"of vm-a"))
    assert r.ret == TeeResult.SUCCESS

    sb = await open_ok(b, SECURE_STORAGE_TA)
    r = await invoke(b, sb, storage.CMD_READ, GuestParam.mem_in(b"secret"),
                     GuestParam.mem_out(64))
    assert (r.ret, r.origin) == (TeeResult.ITEM_NOT_FOUND, Origin.TRUSTED_APP)
    r = await invoke(b, sb, storage.CMD_LIST, GuestParam.mem_out(64),
                     GuestParam(ParamType.VALUE_OUTPUT))
    assert r.ret == TeeResult.SUCCESS and r.params[1].a == 0
    r = await invoke(b, sb, storage.CMD_CREATE, GuestParam.mem_in(b"secret"),
                     GuestParam.mem_in(b"of vm-b"))
    assert r.ret == TeeResult.SUCCESS  # no ACCESS_CONFLICT: a name of its own
    for vm, session, content in ((a, sa, b"of vm-a"), (b, sb, b"of vm-b")):
        r = await invoke(vm, session, storage.CMD_READ, GuestParam.mem_in(b"secret"),
                         GuestParam.mem_out(64))
        assert r.ret == TeeResult.SUCCESS and r.outputs[1] == content

    ma, mb = await open_ok(a, KEYED_MAC_TA), await open_ok(b, KEYED_MAC_TA)
    r = await invoke(a, ma, mac.CMD_GENERATE_KEY, GuestParam.mem_in(b"shared-name"))
    assert r.ret == TeeResult.SUCCESS
    r = await invoke(b, mb, mac.CMD_SIGN, GuestParam.mem_in(b"shared-name"),
                     GuestParam.mem_in(b"m"), GuestParam.mem_out(32))
    assert (r.ret, r.origin) == (TeeResult.ITEM_NOT_FOUND, Origin.TRUSTED_APP)

    for vm, sessions in ((a, (sa, ma)), (b, (sb, mb))):
        for session in sessions:
            assert (await vm.driver.close_session(session)).ret == TeeResult.SUCCESS
        assert await client.destroy(vm.vm_id) == 0
        vm.ram.close()


async def test_a_destroyed_vms_sessions_are_closed_at_the_service(stack: TeeStack) -> None:
    """Lifecycle (docs/tee-proxy.md): DESTROY_VM reaches the service, which closes the VM's
    sessions; objects stay for the VM's next boot."""
    c = await VmmClient.connect(str(stack.agent.socket), "seqpacket")
    try:
        vm = await register(c, "vm-gone")
        st = await open_ok(vm, SECURE_STORAGE_TA)
        await open_ok(vm, KEYED_MAC_TA)
        r = await invoke(vm, st, storage.CMD_CREATE, GuestParam.mem_in(b"kept"),
                         GuestParam.mem_in(b"across boots"))
        assert r.ret == TeeResult.SUCCESS
        tee = scrape(stack.tee_metrics_port)
        assert metric(tee, "hyperbroker_tee_backend_sessions", ta="secure-storage") == 1
        assert metric(tee, "hyperbroker_tee_backend_sessions", ta="keyed-mac") == 1
        destroyed = metric(tee, "hyperbroker_tee_backend_requests_total", method="VmDestroyed")
        assert await c.destroy(vm.vm_id) == 0
        vm.ram.close()

        deadline = time.monotonic() + 10
        while True:
            tee = scrape(stack.tee_metrics_port)
            if metric(tee, "hyperbroker_tee_backend_requests_total",
                      method="VmDestroyed") > destroyed:
                break
            assert time.monotonic() < deadline, "VmDestroyed never reached the TEE service"
            await asyncio.sleep(0.05)
        assert metric(tee, "hyperbroker_tee_backend_sessions") == 0
        assert metric(tee, "hyperbroker_tee_backend_vms") == 0

        again = await register(c, "vm-gone")  # the same VM, booted again
        st = await open_ok(again, SECURE_STORAGE_TA)
        r = await invoke(again, st, storage.CMD_READ, GuestParam.mem_in(b"kept"),
                         GuestParam.mem_out(64))
        assert r.ret == TeeResult.SUCCESS and r.outputs[1] == b"across boots"
        assert await c.destroy(again.vm_id) == 0
        again.ram.close()
    finally:
        c.close()
