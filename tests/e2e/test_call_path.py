"""The forwarded-call path end to end: real broker and agent processes, a VMM in the test.

Each test starts its own broker and agent (tests/e2e/conftest.py) and plays the VMM over the
agent's sockets with hyperbroker.testing.vmm, in SEQPACKET mode (guest RAM passed as a memfd) and
in STREAM mode (guest RAM served by the VMM through messages).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import urllib.request

import pytest

from hyperbroker.calls import ActionKind, Outcome
from hyperbroker.smccc import NOT_SUPPORTED_U64, to_s64
from hyperbroker.testing.procs import AgentProcess, Broker
from hyperbroker.testing.vmm import AgentError, GuestRam, VmmClient
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.vmm import ResultSource

pytestmark = pytest.mark.slow

TRNG_VERSION, TRNG_RND64, TRNG_RND32 = 0x8400_0050, 0xC400_0053, 0x8400_0053
INCREMENT, READ_MEMORY, WRITE_MEMORY, FAIL, POWER_OFF, WIDE = (
    0x8200_0001, 0x8200_0003, 0x8200_0004, 0x8200_0005, 0x8200_0006, 0xC200_0007)
RAM_BASE = 0x4000_0000


async def connect(agent: AgentProcess, mode: str) -> VmmClient:
    path = agent.socket if mode == "seqpacket" else agent.stream_socket
    return await VmmClient.connect(str(path), mode)


@pytest.mark.parametrize("mode", ["seqpacket", "stream"])
async def test_trng_call_goes_through_the_broker_and_back(agent: AgentProcess, mode: str) -> None:
    client = await connect(agent, mode)
    reg = await client.register("vm-trng", 1)
    r = await client.call(reg.vm_id, 0, TRNG_RND64, [192])
    assert (r.outcome, r.timing.source) == (Outcome.OK, ResultSource.BROKER)
    assert r.x[0] == 0 and r.reg_mask == 0xF
    assert any(r.x[1:4])  # 192 fresh bits
    assert r.timing.handler_ns > 0 and r.timing.link_ns > 0
    r2 = await client.call(reg.vm_id, 0, TRNG_RND64, [192])
    assert r2.x[1:4] != r.x[1:4]
    client.close()


async def test_registration_returns_the_profiles_kernel_filter_records(
        agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    reg = await client.register("vm-filters", 2)
    records = {(f.base, f.nr_functions, f.action) for f in reg.filters}
    assert (0x8400_0050, 0x10, 2) in records and (0xC400_0050, 0x10, 2) in records
    assert (0x8200_0000, 0x1_0000, 2) in records  # the counter handler's SIP ranges
    assert all(f.pad == bytes(15) for f in reg.filters)
    assert reg.policy_version == 1
    client.close()


async def test_static_answers_come_from_the_agent(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    reg = await client.register("vm-static", 1)
    r = await client.call(reg.vm_id, 0, TRNG_VERSION)
    assert r.timing.source == ResultSource.AGENT and r.x[0] == 0x10000
    other = await client.register("vm-second-profile", 1, "second")
    r = await client.call(other.vm_id, 0, TRNG_VERSION)  # agent_static: false in that profile
    assert r.timing.source == ResultSource.BROKER and r.x[0] == 0x10000
    client.close()


async def test_a_call_no_rule_forwards_gets_not_supported_from_the_broker(
        agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    reg = await client.register("vm-unrouted", 1)
    r = await client.call(reg.vm_id, 0, 0x8600_0000)
    assert r.x[0] == NOT_SUPPORTED_U64 and r.outcome == Outcome.DENIED
    assert r.timing.source == ResultSource.BROKER
    client.close()


async def test_abi_errors_reach_the_guest_as_the_abis_codes(agent: AgentProcess) -> None:
    client = await connect(agent, "stream")
    reg = await client.register("vm-bad-bits", 1)
    r = await client.call(reg.vm_id, 0, TRNG_RND32, [97])
    assert to_s64(r.x[0]) == -2 and r.outcome == Outcome.GUEST_ERROR  # DEN0098 INVALID_PARAMETERS
    client.close()


async def test_a_failing_handler_gives_the_rules_fallback_and_the_stream_lives_on(
        agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    reg = await client.register("vm-fail", 1)
    r = await client.call(reg.vm_id, 0, FAIL)
    assert r.outcome == Outcome.INTERNAL_ERROR
    assert to_s64(r.x[0]) == -3 and r.x[1] == 0xFA11  # the rule's fallback registers
    r = await client.call(reg.vm_id, 0, INCREMENT)
    assert r.outcome == Outcome.OK and r.x[1] == 1
    client.close()


@pytest.mark.parametrize("mode", ["seqpacket", "stream"])
async def test_guest_memory_reads_and_writes_reach_guest_ram(agent: AgentProcess,
                                                             mode: str) -> None:
    client = await connect(agent, mode)
    ram = GuestRam(RAM_BASE, 1 << 20)
    pattern = bytes(range(256)) * 16
    ram.write(RAM_BASE + 0x1000, pattern)
    reg = await client.register(f"vm-mem-{mode}", 1, "", ram)
    r = await client.call(reg.vm_id, 0, READ_MEMORY, [RAM_BASE + 0x1000, len(pattern)])
    assert r.outcome == Outcome.OK
    assert r.x[1] == int.from_bytes(pattern[:8], "little")
    assert r.x[2] == int.from_bytes(hashlib.sha256(pattern).digest()[:8], "little")
    assert r.timing.memory_round_trips == 1
    r = await client.call(reg.vm_id, 0, WRITE_MEMORY, [RAM_BASE + 0x2000, 100, 0xAB])
    assert r.outcome == Outcome.OK
    assert ram.read(RAM_BASE + 0x2000, 101) == b"\xab" * 100 + b"\x00"  # applied before resume
    client.close()
    ram.close()


async def test_guest_memory_outside_the_vm_is_refused(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    ram = GuestRam(RAM_BASE, 1 << 20)
    reg = await client.register("vm-mem-oob", 1, "", ram)
    for gpa, n in [(RAM_BASE - 8, 16), (RAM_BASE + (1 << 20) - 4, 8), (0, 8)]:
        r = await client.call(reg.vm_id, 0, READ_MEMORY, [gpa, n])
        assert to_s64(r.x[0]) == -3, hex(gpa)
        r = await client.call(reg.vm_id, 0, WRITE_MEMORY, [gpa, n, 1])
        assert to_s64(r.x[0]) == -3, hex(gpa)
    client.close()
    ram.close()


async def test_actions_and_wide_results_reach_the_vmm(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    reg = await client.register("vm-actions", 1)
    r = await client.call(reg.vm_id, 0, POWER_OFF)
    assert [a.kind for a in r.actions] == [ActionKind.SYSTEM_OFF]
    r = await client.call(reg.vm_id, 0, WIDE)
    assert r.reg_mask == (1 << 18) - 1 and r.x == tuple(range(18))
    client.close()


async def test_a_reset_action_makes_every_handler_forget_the_boot(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    reg = await client.register("vm-reboot", 1)
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 2
    r = await client.call(reg.vm_id, 0, 0x8200_0008)
    assert [a.kind for a in r.actions] == [ActionKind.SYSTEM_RESET]
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
    client.close()


async def test_many_vms_and_vcpus_in_flight_at_once(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    regs = [await client.register(f"vm-many-{i}", 8) for i in range(4)]

    async def vcpu(vm_id: int, v: int) -> int:
        ok = 0
        for _ in range(25):
            r = await client.call(vm_id, v, TRNG_RND64, [64])
            ok += r.outcome == Outcome.OK
        return ok

    results = await asyncio.gather(*(vcpu(r.vm_id, v) for r in regs for v in range(8)))
    assert sum(results) == 4 * 8 * 25
    client.close()


# ---- bad input: every malformed frame gets an error, and hurts no other VM -------------------
async def raw_exchange(sock: socket.socket, data: bytes) -> proto.Frame:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    reply = await asyncio.wait_for(loop.sock_recv(sock, 1 << 18), 30)
    return proto.decode(reply)


@pytest.mark.parametrize(("frame", "code"), [
    (b"\x00" * 16, errno.EPROTO),  # bad magic
    (proto.header(0x03, 7, 10) + b"x" * 10, errno.EPROTO),  # CALL of the wrong size
    (proto.header(0x55, 7, 0), errno.EBADMSG),  # unknown type
    (proto.HEADER.pack(proto.MAGIC, 9, 0x03, 0, 7), errno.EPROTONOSUPPORT),  # version 9
    (proto.header(0x03, 7, 176) + b"x" * 10, errno.EPROTO),  # shorter than announced
    (b"HBP", errno.EPROTO),  # shorter than a header
    (proto.header(0x83, 7, proto.RESULT.size) + bytes(proto.RESULT.size), errno.EBADMSG),
])
async def test_a_malformed_seqpacket_frame_gets_an_error_and_the_connection_lives_on(
        agent: AgentProcess, frame: bytes, code: int) -> None:
    good = await connect(agent, "seqpacket")
    reg = await good.register("vm-bystander", 1)
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bad.setblocking(False)
    await asyncio.get_running_loop().sock_connect(bad, str(agent.socket))
    reply = await raw_exchange(bad, frame)
    assert isinstance(reply.message, proto.ErrorMsg) and reply.message.code == code
    assert reply.message.message  # says why
    reply = await raw_exchange(bad, proto.encode(proto.Ping(), 99))
    assert isinstance(reply.message, proto.Pong) and reply.tag == 99
    r = await good.call(reg.vm_id, 0, TRNG_RND64, [64])
    assert r.outcome == Outcome.OK
    bad.close()
    good.close()


async def test_an_oversized_seqpacket_frame_is_refused(agent: AgentProcess) -> None:
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bad.setblocking(False)
    await asyncio.get_running_loop().sock_connect(bad, str(agent.socket))
    big = proto.header(0x01, 5, 200_000) + bytes(200_000)
    reply = await raw_exchange(bad, big)
    assert isinstance(reply.message, proto.ErrorMsg)
    assert reply.message.code == errno.EMSGSIZE
    bad.close()


async def test_a_stream_that_loses_framing_is_closed_after_an_error(
        agent: AgentProcess) -> None:
    good = await connect(agent, "stream")
    reg = await good.register("vm-stream-bystander", 1)
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(bad, str(agent.stream_socket))
    reply = await raw_exchange(bad, b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(reply.message, proto.ErrorMsg) and reply.message.code == errno.EPROTO
    assert await asyncio.wait_for(loop.sock_recv(bad, 100), 30) == b""  # closed
    assert (await good.call(reg.vm_id, 0, TRNG_RND64, [8])).outcome == Outcome.OK
    bad.close()
    good.close()


async def test_a_vmm_cannot_act_for_another_vmms_vm(agent: AgentProcess) -> None:
    owner = await connect(agent, "seqpacket")
    reg = await owner.register("vm-owned", 2)
    intruder = await connect(agent, "seqpacket")
    with pytest.raises(AgentError) as e:
        await _foreign_call(intruder, reg.vm_id)
    assert e.value.code == errno.ENOENT
    with pytest.raises(AgentError) as e:
        await _foreign_call(owner, reg.vm_id, vcpu=5)  # no vCPU 5
    assert e.value.code == errno.EINVAL
    owner.close()
    intruder.close()


async def _foreign_call(client: VmmClient, vm_id: int, vcpu: int = 0) -> proto.ResultMsg:
    """A CALL frame built by hand, bypassing the client's own bookkeeping."""
    tag = 4242
    frame = proto.encode_call(proto.CallMsg(vm_id, vcpu, 1, TRNG_RND64, 0, 0,
                                            (TRNG_RND64,) + (0,) * 17), tag)
    reply = await client.request(frame, tag)
    assert isinstance(reply.message, proto.ResultMsg)
    return reply.message


async def test_a_second_call_on_a_busy_vcpu_is_refused(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    reg = await client.register("vm-busy", 1)
    slow = asyncio.ensure_future(client.call(reg.vm_id, 0, 0x8200_0002, [300]))
    await asyncio.sleep(0.1)
    with pytest.raises(AgentError) as e:
        await _foreign_call(client, reg.vm_id)
    assert e.value.code == errno.EBUSY
    assert (await slow).outcome == Outcome.OK
    client.close()


async def test_registration_errors_are_clear(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    await client.register("vm-dup", 1)
    with pytest.raises(AgentError) as e:
        await client.register("vm-dup", 1)
    assert e.value.code == errno.EEXIST and "vm-dup" in str(e.value)
    with pytest.raises(AgentError) as e:
        await client.register("vm-noprofile", 1, "no-such-profile")
    assert e.value.code == errno.ENOENT and "no-such-profile" in str(e.value)
    with pytest.raises(AgentError) as e:
        await client.register("vm-novcpus", 0)
    assert e.value.code == errno.EINVAL
    client.close()


async def test_a_closed_vmm_connection_destroys_its_vms(agent: AgentProcess) -> None:
    client = await connect(agent, "seqpacket")
    await client.register("vm-reborn", 1)
    client.close()
    await asyncio.sleep(0.2)
    again = await connect(agent, "seqpacket")
    reg = await again.register("vm-reborn", 1)  # the name is free again
    assert (await again.call(reg.vm_id, 0, TRNG_RND64, [8])).outcome == Outcome.OK
    again.close()


def test_both_processes_export_prometheus_metrics(agent: AgentProcess, broker: Broker) -> None:
    async def some_calls() -> None:
        client = await connect(agent, "seqpacket")
        reg = await client.register("vm-metrics", 1)
        for _ in range(5):
            await client.call(reg.vm_id, 0, TRNG_RND64, [64])
        client.close()

    asyncio.run(some_calls())
    b = urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics").read().decode()
    assert ('hyperbroker_broker_call_duration_seconds_count{function="TRNG_RND64",'
            'handler="trng",outcome="ok"} 5.0') in b
    assert 'le="1e-05"' in b  # microsecond-range buckets
    a = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics").read().decode()
    assert 'hyperbroker_agent_call_duration_seconds_count{outcome="ok",source="broker"} 5.0' in a
    assert "hyperbroker_agent_broker_stream_up 1.0" in a


@pytest.mark.parametrize("mode", ["seqpacket", "stream"])
async def test_a_reset_the_vmm_reports_makes_every_handler_forget_the_boot(
        agent: AgentProcess, mode: str) -> None:
    """HB_MSG_VM_RESET: a reset KVM served itself (in-kernel PSCI) still reaches the handlers."""
    client = await connect(agent, mode)
    reg = await client.register(f"vm-kvm-reset-{mode}", 1)
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 2
    assert await client.reset(reg.vm_id) == 0  # answered once the handlers have reset
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
    with pytest.raises(AgentError) as e:
        await client.reset(reg.vm_id + 100)
    assert e.value.code == errno.ENOENT
    client.close()
