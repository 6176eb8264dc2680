"""Failover under load (issue 11, item 5): three broker replicas on one Redis behind HAProxy
(the shipped deploy/haproxy/hyperbroker.cfg), two real agents, 8 VMs x 4 vCPUs making stateful
calls; the replica serving a host is killed with SIGKILL mid-run. (A replica paused past its
lease while its host moves on is tested in test_replicas.py, and an agent giving a paused
broker up in test_broker_silence.py; behind HAProxy, its HTTP/2 health check takes a paused
replica out of the rotation.)

Counted against the guests' own view: every call is answered (its result or its rule's
fallback) within the rule's deadline plus 50 ms on the agent's clock; each VM's counter moves
by exactly one for every OK answer and for nothing else (no effect applied twice, none applied
behind a fallback), so the OK answers of a VM are exactly 1..N and its next call returns N+1;
each vCPU shares and unshares a granule of its own in turn (memshare), and none of those is
ever refused (a share applied twice, or behind a fallback, would make the next one fail); each
VM's FF-A endpoint ID is the same before and after. vCPU 0 of each VM also shares a page with
an FF-A partition and reclaims it (FFA_MEM_SHARE/FFA_MEM_RECLAIM: a second share of a page still
shared is DENIED), and powers a fifth vCPU on, which powers itself off (PSCI CPU_ON/CPU_OFF: a
CPU_ON of a vCPU still on is ALREADY_ON or ON_PENDING); none of those is refused, both go on
after the kill, and at the end every page can be shared again and every fifth vCPU is off
(AFFINITY_INFO), on whichever replica now serves the host.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from collections import defaultdict
from pathlib import Path

import pytest

from hyperbroker.calls import Outcome
from hyperbroker.handlers.ffa import abi as ffa
from hyperbroker.handlers.ffa.descriptors import (
    Constituent,
    EndpointAccess,
    build_mem_transaction,
    encode_mem_transaction,
)
from hyperbroker.testing.procs import (
    AgentProcess,
    Broker,
    LoadBalancer,
    RedisServer,
    free_port,
    start_agent,
    start_broker,
)
from hyperbroker.testing.vmm import GuestRam, VmmClient

from .conftest import plugin_env

pytestmark = pytest.mark.slow

INCREMENT = 0x8200_0001
MEM_SHARE, MEM_UNSHARE = 0xC600_0003, 0xC600_0004  # pKVM memshare: a granule shared or not
FFA_VERSION, FFA_ID_GET, FFA_V1_2 = 0x8400_0063, 0x8400_0069, 0x1_0002
CPU_OFF, CPU_ON64, AFFINITY_INFO64 = 0x8400_0002, 0xC400_0003, 0xC400_0004  # Arm DEN0022 §5.1
AFFINITY_OFF = 1  # AFFINITY_INFO: PSCI_0_2_AFFINITY_LEVEL_OFF (include/uapi/linux/psci.h)
RAM, RAM_SIZE = 0x4000_0000, 4 * 1024 * 1024
TX, RX, SHARED_PAGE = RAM + 0x10_0000, RAM + 0x11_0000, RAM + 0x20_0000  # FF-A buffers, a page
SHA_PARTITION = 0x8002  # the FF-A handler's built-in SHA-256 partition: the share's receiver
DEADLINE_MS = 8000  # longer than a failover takes, so no committed call is lost to a fallback
POLICY = f"""\
handlers:
  counter: {{plugin: test-counter}}
  memshare: {{}}
  ffa: {{}}
  psci: {{}}
profiles:
  default:
    rules:
      - {{name: counter, abi: sip, action: forward, handler: counter,
          deadline_ms: {DEADLINE_MS}, fallback: {{x0: -3}}}}
      - {{name: pkvm, abi: vendor-hyp, action: forward, handler: memshare,
          deadline_ms: {DEADLINE_MS}}}
      - {{name: ffa, abi: ffa, action: forward, handler: ffa, deadline_ms: {DEADLINE_MS}}}
      - {{name: psci, abi: psci, action: forward, handler: psci, deadline_ms: {DEADLINE_MS}}}
"""
HOSTS, VMS, VCPUS = 2, 4, 4  # 8 VMs x 4 vCPUs in all
# One more vCPU per VM that vCPU 0 powers on (PSCI CPU_ON) and that then powers itself off
# (CPU_OFF), in turn: a power state applied twice, or behind a fallback, makes the next CPU_ON
# fail (ALREADY_ON or ON_PENDING).
SECONDARY = VCPUS
SECONDARY_MPIDR = SECONDARY  # KVM's reset_mpidr: Aff0 = the vCPU index below 16


def serving(brokers: list[Broker], host: str) -> Broker:
    """The replica whose log last shows `host`'s agent connecting."""
    rx = re.compile(rf"agent for host {host} connected .*lease epoch (\d+)")
    best: tuple[int, Broker] | None = None
    for b in brokers:
        for line in b.process.lines:
            m = rx.search(line)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), b)
    assert best is not None, f"no replica served {host}"
    return best[1]


async def test_killing_the_replica_serving_a_host_loses_nothing(
        tmp_path: Path, redis_server: RedisServer) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("SKIPPING: haproxy is not installed and scripts/system_deps.sh could not "
                    "install it: broker failover behind a load balancer is NOT tested")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    store = f"{redis_server.url}?prefix=failover:"
    brokers = [start_broker(policy, None, store=store, port=free_port(), env=plugin_env(),
                            log_level="info") for _ in range(3)]
    lb = LoadBalancer([b.address for b in brokers]).start()
    agents: list[AgentProcess] = []
    clients: list[VmmClient] = []
    ok: dict[tuple[int, int], list[int]] = defaultdict(list)  # (host, vm) -> OK counters
    other: list[tuple[int, int, Outcome]] = []
    late: list[float] = []
    stop = asyncio.Event()
    try:
        for h in range(HOSTS):
            agents.append(start_agent(lb.address, f"host-f{h}", tmp_path / f"a{h}",
                                      log_level="info"))
            clients.append(await VmmClient.connect(str(agents[-1].socket), "seqpacket"))
        rams = [[GuestRam(RAM, RAM_SIZE, f"ram-{h}-{v}") for v in range(VMS)]
                for h in range(HOSTS)]
        regs = [[await clients[h].register(f"vm-{v}", VCPUS + 1, ram=rams[h][v])
                 for v in range(VMS)] for h in range(HOSTS)]

        async def endpoint_ids() -> list[int]:
            ids = []
            for h in range(HOSTS):
                for v in range(VMS):
                    await clients[h].call(regs[h][v].vm_id, 0, FFA_VERSION, [FFA_V1_2])
                    ids.append((await clients[h].call(regs[h][v].vm_id, 0, FFA_ID_GET)).x[2])
            return ids

        ffa_ids = await endpoint_ids()
        assert len(set(ffa_ids)) == HOSTS * VMS
        for h in range(HOSTS):
            for v in range(VMS):
                r = await clients[h].call(regs[h][v].vm_id, 0, ffa.FFA_RXTX_MAP_64, [TX, RX, 1])
                assert r.x[0] == ffa.FFA_SUCCESS_32, r

        async def ffa_share_and_reclaim(h: int, v: int) -> None:
            """FF-A MEM_SHARE of the VM's page with the SHA partition, then MEM_RECLAIM: a
            share applied twice or behind a fallback leaves the page shared, and the next
            MEM_SHARE of it is refused."""
            vm_id = regs[h][v].vm_id
            desc = encode_mem_transaction(build_mem_transaction(
                FFA_V1_2, ffa_ids[h * VMS + v] & 0xFFFF,
                (EndpointAccess(SHA_PARTITION, 0x2 | 0x1 << 2),), (Constituent(SHARED_PAGE, 1),),
                attributes=0x2F, flags=0))
            rams[h][v].write(TX, desc)
            r = await clients[h].call(vm_id, 0, ffa.FFA_MEM_SHARE_64, [len(desc), len(desc), 0, 0],
                                      timeout=DEADLINE_MS / 1e3 + 20)
            if r.outcome == Outcome.FALLBACK:
                other.append((h, v, Outcome(r.outcome)))
                return  # the broker undoes a share the guest did not see
            if r.x[0] != ffa.FFA_SUCCESS_32:
                refused.append((h, v, 0, ffa.FFA_MEM_SHARE_64))
                return
            shares.append((h, v))
            while True:  # as a guest's driver does: reclaim until it is answered
                rc = await clients[h].call(vm_id, 0, ffa.FFA_MEM_RECLAIM, [r.x[2], r.x[3], 0],
                                           timeout=DEADLINE_MS / 1e3 + 20)
                if rc.outcome != Outcome.FALLBACK:
                    break
                other.append((h, v, Outcome(rc.outcome)))
            if rc.x[0] != ffa.FFA_SUCCESS_32:
                refused.append((h, v, 0, ffa.FFA_MEM_RECLAIM))
        refused: list[tuple[int, int, int, int]] = []
        powered: list[tuple[int, int]] = []
        shares: list[tuple[int, int]] = []

        async def vcpu(h: int, v: int, cpu: int) -> None:
            vm_id = regs[h][v].vm_id
            shared = False
            while not stop.is_set():
                r = await clients[h].call(vm_id, cpu, INCREMENT, timeout=DEADLINE_MS / 1e3 + 20)
                if r.timing.agent_ns / 1e6 > DEADLINE_MS + 50:
                    late.append(r.timing.agent_ns / 1e6)
                if r.outcome == Outcome.OK:
                    ok[(h, v)].append(r.x[1])
                else:
                    other.append((h, v, Outcome(r.outcome)))
                fid = MEM_UNSHARE if shared else MEM_SHARE
                r = await clients[h].call(vm_id, cpu, fid, [RAM + cpu * 0x1000],
                                          timeout=DEADLINE_MS / 1e3 + 20)
                if r.outcome == Outcome.OK and r.x[0] == 0:  # SMCCC_RET_SUCCESS
                    shared = not shared
                elif r.outcome != Outcome.FALLBACK:
                    refused.append((h, v, cpu, fid))
                if cpu == 0:
                    await ffa_share_and_reclaim(h, v)
                    r = await clients[h].call(vm_id, 0, CPU_ON64, [SECONDARY_MPIDR, RAM, 0],
                                              timeout=DEADLINE_MS / 1e3 + 20)
                    if r.outcome == Outcome.OK and r.x[0] == 0:
                        powered.append((h, v))
                        # The secondary's first call shows it running; it stops at once.
                        r = await clients[h].call(vm_id, SECONDARY, CPU_OFF,
                                                  timeout=DEADLINE_MS / 1e3 + 20)
                        if r.outcome == Outcome.FALLBACK:
                            other.append((h, v, Outcome(r.outcome)))
                    elif r.outcome != Outcome.FALLBACK:
                        refused.append((h, v, cpu, CPU_ON64))
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(vcpu(h, v, c)) for h in range(HOSTS) for v in range(VMS)
                 for c in range(VCPUS)]
        await asyncio.sleep(1.5)
        before = sum(len(x) for x in ok.values())
        powered_before, shares_before = len(powered), len(shares)
        victim = serving(brokers, "host-f0")
        victim.process.signal(signal.SIGKILL)
        await asyncio.to_thread(victim.process.stop)
        survivors = [b for b in brokers if b is not victim]
        # The host's agent reconnects through HAProxy and another replica takes the lease.
        deadline = asyncio.get_running_loop().time() + 60
        while not any(re.search(r"agent for host host-f0 connected", line)
                      for b in survivors for line in b.process.lines):
            assert asyncio.get_running_loop().time() < deadline, "host-f0 was never taken over"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # calls go on against the replica that took over
        stop.set()
        await asyncio.gather(*tasks)
        after = sum(len(x) for x in ok.values())

        for (h, v), seen in sorted(ok.items()):
            final = await clients[h].call(regs[h][v].vm_id, 0, INCREMENT, timeout=30)
            assert final.outcome == Outcome.OK
            assert sorted(seen) == list(range(1, len(seen) + 1)), (h, v, sorted(seen))
            assert final.x[1] == len(seen) + 1, (h, v, final.x[1], len(seen))
        print(f"failover: {after} OK counter calls ({before} before the kill), as many memshare "
              f"calls, {len(other)} fallbacks, {len(late)} answered after deadline + 50 ms, "
              f"{len(refused)} shares, reclaims or CPU_ONs refused, {len(powered)} CPU_ON/CPU_OFF "
              f"cycles, {len(shares)} FF-A MEM_SHARE/MEM_RECLAIM cycles")
        assert late == []
        assert refused == []
        assert await endpoint_ids() == ffa_ids
        # Every secondary ended powered off (its last CPU_OFF held), on whichever replica.
        for h in range(HOSTS):
            for v in range(VMS):
                r = await clients[h].call(regs[h][v].vm_id, 0, AFFINITY_INFO64,
                                          [SECONDARY_MPIDR, 0], timeout=30)
                assert (r.outcome, r.x[0]) == (Outcome.OK, AFFINITY_OFF), (h, v, r)
        assert len(powered) >= HOSTS * VMS  # each VM's secondary was powered on at least once
        assert len(powered) > powered_before  # and power cycles went on after the kill
        assert len(shares) > shares_before
        for h in range(HOSTS):  # nothing is left shared: each VM's page can be shared again
            for v in range(VMS):
                before_final = len(shares)
                await ffa_share_and_reclaim(h, v)
                assert len(shares) == before_final + 1, (h, v, refused[-3:])
        assert after > before  # the fleet kept serving after the kill
        assert all(o is Outcome.FALLBACK for _, _, o in other), other
    finally:
        stop.set()
        for c in clients:
            c.close()
        for row in locals().get("rams", []):
            for ram in row:
                ram.close()
        for a in agents:
            a.process.stop()
        lb.stop()
        for b in brokers:
            b.process.stop()


async def test_redis_restarted_under_load_loses_nothing_committed(tmp_path: Path) -> None:
    """Redis (AOF on, fsync always) killed and started again while guests call: calls in
    between get their fallback, the broker reconnects by itself, and no effect a guest saw is
    lost or applied twice."""
    if shutil.which("redis-server") is None:
        pytest.skip("SKIPPING: redis-server is not installed and scripts/system_deps.sh "
                    "could not install it: a Redis restart is NOT tested")
    redis = RedisServer(tmp_path / "redis").start()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace(f"deadline_ms: {DEADLINE_MS}", "deadline_ms: 300"))
    broker = start_broker(policy, None, store=redis.url, env=plugin_env(), log_level="info")
    agent = start_agent(broker.address, "host-r", tmp_path / "agent", log_level="info")
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    ok: dict[int, list[int]] = defaultdict(list)
    fallbacks = 0
    stop = asyncio.Event()
    try:
        regs = [await client.register(f"vm-{v}", VCPUS) for v in range(VMS)]

        async def vcpu(v: int, cpu: int) -> None:
            nonlocal fallbacks
            while not stop.is_set():
                r = await client.call(regs[v].vm_id, cpu, INCREMENT, timeout=30)
                if r.outcome == Outcome.OK:
                    ok[v].append(r.x[1])
                else:
                    assert r.outcome == Outcome.FALLBACK, r.outcome
                    fallbacks += 1
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(vcpu(v, c)) for v in range(VMS) for c in range(VCPUS)]
        await asyncio.sleep(1.0)
        before = {v: max(ok[v], default=0) for v in range(VMS)}  # a slow start may have none
        redis.kill()
        await asyncio.sleep(1.5)
        redis.start()
        # Serving again: every VM gets an OK answer after the restart.
        deadline = asyncio.get_running_loop().time() + 60
        while not all(max(ok[v], default=0) > before[v] for v in range(VMS)):
            assert asyncio.get_running_loop().time() < deadline, "never served again"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        for v in range(VMS):
            seen = ok[v]
            final = await client.call(regs[v].vm_id, 0, INCREMENT, timeout=30)
            assert final.outcome == Outcome.OK
            assert len(set(seen)) == len(seen), "an effect was applied twice"
            # Everything a guest saw committed is still there (a write whose reply Redis never
            # sent may have landed as well: then the count is ahead, never behind).
            assert final.x[1] > max(seen, default=0) >= len(seen), (v, final.x[1], len(seen))
        print(f"redis restart: {sum(len(s) for s in ok.values())} OK, {fallbacks} fallbacks")
        assert fallbacks > 0  # the outage was seen, as fallbacks and not as errors
    finally:
        stop.set()
        client.close()
        agent.process.stop()
        broker.process.stop()
        redis.stop()
