"""Broker replicas on one Redis (issue 11, items 1, 2 and 8): real broker processes, a real
redis-server, the test speaking the broker protocol as an agent does.

Measured before: two brokers on one store each cached the FF-A handler's shared document and
wrote the whole of it back, so VMs on different brokers got the same endpoint ID; and a broker
that had lost a host to another kept committing (and cleaning up) that host's VMs. Now the IDs
come from an atomic pool in the store, and every write of a host's VMs names the lease epoch it
holds: a host that moved to another replica carries its state with it, and the replica it left
commits nothing more for it.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hyperbroker.broker.store import open_store
from hyperbroker.handlers.ffa import abi as ffa
from hyperbroker.handlers.ffa import endpoints
from hyperbroker.testing.procs import Broker, RedisServer, start_broker
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2

from .conftest import POLICY, agent_stream, next_result, plugin_env, scrape_value

pytestmark = pytest.mark.slow

INCREMENT = 0x8200_0001  # the test counter handler: per-VM counter += 1, x1 = counter
FFA_POLICY = POLICY.replace("handlers:\n", "handlers:\n  ffa: {}\n").replace(
    "    rules:\n", "    rules:\n      - {name: ffa, abi: ffa, action: forward, handler: ffa,"
    " deadline_ms: 3000}\n", 1)
_prefixes = itertools.count()


@pytest.fixture
def store_url(redis_server: RedisServer) -> str:
    """A Redis store of this test's own (its own key prefix on the session's server)."""
    return f"{redis_server.url}?prefix=replicas{next(_prefixes)}:"


@pytest.fixture
def replicas(tmp_path: Path, store_url: str) -> Iterator[list[Broker]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(FFA_POLICY)
    brokers: list[Broker] = []
    try:
        for _ in range(2):
            brokers.append(start_broker(policy, None, store=store_url, env=plugin_env(),
                                        log_level="info",
                                        extra=["--lease-ttl", "0.5", "--housekeeping", "0.2"]))
        yield brokers
    finally:
        for b in brokers:
            b.process.stop()


def registration(vm_id: int, name: str, incarnation: str = "boot-1"
                 ) -> broker_pb2.VmRegistered:
    return broker_pb2.VmRegistered(vm_id=vm_id, name=name, profile="default", policy_version=1,
                                   nr_vcpus=1, incarnation=incarnation)


async def call(stream: object, vm_id: int, seq: int, fid: int, *args: int) -> proto.ResultMsg:
    x = [fid, *args] + [0] * (18 - 1 - len(args))
    record = proto.CALL.pack(vm_id, 0, seq, fid, 0, 0, *x)
    await stream.write(broker_pb2.AgentFrame(calls=record))  # type: ignore[attr-defined]
    return await next_result(stream)


async def test_a_host_moves_with_its_state_and_the_replica_it_left_commits_nothing(
        replicas: list[Broker]) -> None:
    a, b = replicas
    chan_a, on_a = await agent_stream(a.address, "host-r", live={}, resumed=False)
    await on_a.write(broker_pb2.AgentFrame(vms_registered=[registration(1, "vm-r")]))
    assert [(await call(on_a, 1, seq, INCREMENT)).x[1] for seq in (1, 2)] == [1, 2]

    # The agent lost its stream to A (a partition, say) and reached B: B takes the host over.
    chan_b, on_b = await agent_stream(b.address, "host-r", live={1: "boot-1"}, resumed=True)
    await on_b.write(broker_pb2.AgentFrame(vms_registered=[registration(1, "vm-r")]))
    assert (await call(on_b, 1, 3, INCREMENT)).x[1] == 3  # the count lives on, in Redis

    # A still believes it serves the host: its next commit is fenced and the stream ends.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call(on_a, 1, 4, INCREMENT)
    assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert (await call(on_b, 1, 4, INCREMENT)).x[1] == 4  # A's stale 3 was never written
    fenced = 'hyperbroker_broker_hosts_abandoned_total{reason="fenced"}'
    assert scrape_value(a, fenced) == 1
    assert scrape_value(b, fenced) == 0
    await chan_a.close()
    await chan_b.close()


async def test_a_replica_stopped_past_its_lease_commits_nothing_when_it_wakes(
        replicas: list[Broker]) -> None:
    """SIGSTOP with a call waiting in its socket, longer than the lease; the host moves on."""
    a, b = replicas
    chan_a, on_a = await agent_stream(a.address, "host-s", live={}, resumed=False)
    await on_a.write(broker_pb2.AgentFrame(vms_registered=[registration(1, "vm-s")]))
    assert (await call(on_a, 1, 1, INCREMENT)).x[1] == 1
    a.process.signal(signal.SIGSTOP)
    try:
        record = proto.CALL.pack(1, 0, 2, INCREMENT, 0, 0, INCREMENT, *[0] * 17)
        await on_a.write(broker_pb2.AgentFrame(calls=record))  # waits in A's socket
        chan_b, on_b = await agent_stream(b.address, "host-s", live={1: "boot-1"}, resumed=True)
        await on_b.write(broker_pb2.AgentFrame(vms_registered=[registration(1, "vm-s")]))
        assert (await call(on_b, 1, 2, INCREMENT)).x[1] == 2
        await asyncio.sleep(1.0)  # past --lease-ttl 0.5: A's lease has lapsed as well
    finally:
        a.process.signal(signal.SIGCONT)
    with pytest.raises(grpc.aio.AioRpcError):  # A runs the waiting call; its commit is fenced
        await next_result(on_a)
    assert (await call(on_b, 1, 3, INCREMENT)).x[1] == 3  # A's stale 2 never reached the store
    await chan_a.close()
    await chan_b.close()


async def test_a_host_that_moved_is_not_destroyed_by_the_replica_it_left(
        tmp_path: Path, store_url: str) -> None:
    """The old replica's host expiry must not clean up VMs that live on elsewhere."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(FFA_POLICY)
    quick = ["--host-expiry", "1", "--lease-ttl", "30"]
    a = start_broker(policy, None, store=store_url, env=plugin_env(), log_level="info",
                     extra=quick)
    b = start_broker(policy, None, store=store_url, env=plugin_env(), log_level="info")
    try:
        chan, on_a = await agent_stream(a.address, "host-x", live={}, resumed=False)
        await on_a.write(broker_pb2.AgentFrame(vms_registered=[registration(1, "vm-x")]))
        await call(on_a, 1, 1, ffa.FFA_VERSION, ffa.VERSION_1_2)
        endpoint = (await call(on_a, 1, 2, ffa.FFA_ID_GET)).x[2]
        await chan.close()
        chan, on_b = await agent_stream(b.address, "host-x", live={1: "boot-1"}, resumed=True)
        await on_b.write(broker_pb2.AgentFrame(vms_registered=[registration(1, "vm-x")]))
        # A sees its stream gone; after its 1 s expiry it finds the lease taken and lets go.
        await asyncio.to_thread(a.process.wait_for, r"host host-x abandoned", 60)
        assert (await call(on_b, 1, 3, ffa.FFA_ID_GET)).x[2] == endpoint  # still allocated
        await chan.close()
        assert not any("vm host-x/vm-x destroyed" in line for line in a.process.lines)
    finally:
        a.process.stop()
        b.process.stop()


async def test_replicas_and_workers_hand_out_distinct_ffa_ids(tmp_path: Path,
                                                            store_url: str) -> None:
    """2 replicas of 2 workers each (SO_REUSEPORT) on one Redis: 200 VMs, 200 distinct IDs."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(FFA_POLICY)
    brokers = [start_broker(policy, None, store=store_url, env=plugin_env(),
                            port=free_port(), extra=["--workers", "2"], metrics=False)
               for _ in range(2)]
    try:
        async def host(broker: Broker, n: int) -> list[int]:
            chan, stream = await agent_stream(broker.address, f"host-{n}", live={},
                                              resumed=False)
            await stream.write(broker_pb2.AgentFrame(vms_registered=[
                registration(vm, f"vm-{vm}") for vm in range(1, 26)]))
            ids = []
            for vm in range(1, 26):
                await call(stream, vm, 1, ffa.FFA_VERSION, ffa.VERSION_1_2)
                got = await call(stream, vm, 2, ffa.FFA_ID_GET)
                assert got.x[0] == ffa.FFA_SUCCESS_32
                ids.append(got.x[2])
            await chan.close()
            return ids

        per_host = await asyncio.gather(*(host(brokers[n % 2], n) for n in range(8)))
        ids = [i for chunk in per_host for i in chunk]
        assert len(ids) == 200 and len(set(ids)) == 200, sorted(ids)
    finally:
        for b in brokers:
            b.process.stop()


def free_port() -> int:
    from hyperbroker.testing.procs import free_port as pick

    return pick()


async def test_a_host_whose_broker_died_and_agent_never_returned_is_cleaned_up(
        tmp_path: Path, store_url: str) -> None:
    """Nobody else would: the sweeper of a surviving replica takes the lapsed lease over and
    destroys the host's VMs with every handler's clean-up (the FF-A endpoint ID is freed)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(FFA_POLICY)
    quick = ["--host-expiry", "1", "--lease-ttl", "0.5", "--housekeeping", "0.2"]
    a = start_broker(policy, None, store=store_url, env=plugin_env(), extra=quick)
    b = start_broker(policy, None, store=store_url, env=plugin_env(), log_level="info",
                     extra=quick)
    try:
        chan, on_a = await agent_stream(a.address, "host-o", live={}, resumed=False)
        await on_a.write(broker_pb2.AgentFrame(vms_registered=[registration(1, "vm-o")]))
        await call(on_a, 1, 1, ffa.FFA_VERSION, ffa.VERSION_1_2)
        endpoint = (await call(on_a, 1, 2, ffa.FFA_ID_GET)).x[2]
        store = open_store(store_url)
        assert await store.id_owner(endpoints.POOL, endpoint) == "host-o/vm-o#boot-1"
        a.process.signal(signal.SIGKILL)
        await chan.close()
        await asyncio.to_thread(b.process.wait_for, r"host host-o: its broker is gone", 60)
        await asyncio.to_thread(b.process.wait_for, r"vm host-o/vm-o destroyed", 60)
        assert await store.id_owner(endpoints.POOL, endpoint) is None
        assert await store.host_vms("host-o") == {}
        assert await store.expired_leases(0.0) == []  # swept once, not again
        await store.close()
    finally:
        a.process.stop()
        b.process.stop()
