"""broker.store: one contract, checked against every backend (memory, SQLite, a real Redis).

The store keeps policy versions, each VM's handler documents, each vCPU's last result and each
VM's registration, a lease per host with a fencing epoch, and fleet-unique ID pools. A batch is
all or nothing; a write under a lease another broker has taken since changes nothing."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hyperbroker.broker.store import (
    Fenced,
    Lease,
    Store,
    StoreBatch,
    StoredPolicy,
    StoreUnavailable,
    StoreUrlError,
    open_store,
)
from hyperbroker.broker.store.redis_store import RedisStore
from hyperbroker.broker.store.sqlite import SqliteStore
from hyperbroker.testing.procs import RedisServer

HOST = "host-a"
VM_A = "host-a/vm-1#boot-1"
VM_B = "host-a/vm-10#boot-1"  # shares a prefix with VM_A on purpose
VM_C = "host-b/vm-1#boot-1"
_prefixes = itertools.count()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        s: Store = open_store(f"{server.url}?prefix=t{next(_prefixes)}:")
    else:
        s = open_store("memory://" if request.param == "memory" else f"sqlite://{tmp_path}/st")
    yield s
    await s.close()


@pytest.fixture
async def lease(store: Store) -> Lease:
    return await store.take_lease(HOST, "broker-1", 30.0)


async def commit(store: Store, lease: Lease, **parts: Any) -> None:
    await store.commit(lease, StoreBatch(**parts))


# ---- policies -----------------------------------------------------------------------------------


async def test_an_empty_store_has_no_policy(store: Store) -> None:
    assert await store.latest_policy() is None
    assert await store.get_policy(1) is None


async def test_policy_versions_increase_from_one(store: Store) -> None:
    assert [await store.add_policy(f"text {i}", f"digest {i}") for i in range(3)] == [1, 2, 3]


async def test_the_same_digest_as_the_newest_keeps_its_version(store: Store) -> None:
    assert await store.add_policy("a", "da") == 1
    assert await store.add_policy("a", "da") == 1
    assert await store.add_policy("b", "db") == 2
    assert await store.add_policy("a", "da") == 3  # not the newest any more: a new version


async def test_get_policy_returns_each_version_as_stored(store: Store) -> None:
    await store.add_policy("first ✓", "d1")
    await store.add_policy("second", "d2")
    assert await store.get_policy(1) == StoredPolicy(1, "first ✓", "d1")
    assert await store.get_policy(2) == StoredPolicy(2, "second", "d2")
    assert await store.latest_policy() == StoredPolicy(2, "second", "d2")
    assert await store.get_policy(3) is None


# ---- VM documents and results -------------------------------------------------------------------


async def test_a_vm_has_nothing_until_committed(store: Store) -> None:
    loaded = await store.load_vm(VM_A)
    assert loaded.docs == {} and loaded.results == {}


async def test_documents_put_replace_and_delete(store: Store, lease: Lease) -> None:
    await commit(store, lease, vm_state={(VM_A, "ffa"): '{"a":1}', (VM_A, "psci"): "[]"})
    await commit(store, lease, vm_state={(VM_A, "ffa"): '{"a":2}'})
    assert (await store.load_vm(VM_A)).docs == {"ffa": '{"a":2}', "psci": "[]"}
    await commit(store, lease, vm_state={(VM_A, "psci"): None, (VM_A, "absent"): None})
    assert (await store.load_vm(VM_A)).docs == {"ffa": '{"a":2}'}


async def test_documents_keep_text_exactly(store: Store, lease: Lease) -> None:
    text = '{"b": 1,   "a": "ü\\u0000\\n"}'
    await commit(store, lease, vm_state={(VM_A, "h"): text})
    assert (await store.load_vm(VM_A)).docs["h"] == text


async def test_results_are_per_vm_and_vcpu_and_keep_every_byte(store: Store,
                                                               lease: Lease) -> None:
    blob = bytes(range(256)) * 3
    await commit(store, lease, last_results={(VM_A, 0): (5, blob), (VM_A, 1): (9, b""),
                                             (VM_B, 0): (1, b"b")})
    await commit(store, lease, last_results={(VM_A, 0): (2**64 - 1, b"later")})
    assert (await store.load_vm(VM_A)).results == {0: (2**64 - 1, b"later"), 1: (9, b"")}
    assert (await store.load_vm(VM_B)).results == {0: (1, b"b")}


async def test_records_per_host_and_forget_drops_only_that_vm(store: Store,
                                                              lease: Lease) -> None:
    other = await store.take_lease("host-b", "broker-1", 30.0)
    await store.put_vm(lease, VM_A, b"reg-a")
    await store.put_vm(lease, VM_B, b"reg-b")
    await store.put_vm(other, VM_C, b"reg-c")
    for vm in (VM_A, VM_B):
        await commit(store, lease, vm_state={(vm, "ffa"): "doc"}, last_results={(vm, 0): (1, b"r")})
    assert await store.host_vms(HOST) == {VM_A: b"reg-a", VM_B: b"reg-b"}
    await store.forget_vm(lease, VM_A)
    await store.forget_vm(lease, "host-a/never-seen")
    assert await store.host_vms(HOST) == {VM_B: b"reg-b"}
    assert await store.host_vms("host-b") == {VM_C: b"reg-c"}
    gone = await store.load_vm(VM_A)
    assert gone.docs == {} and gone.results == {}
    assert (await store.load_vm(VM_B)).docs == {"ffa": "doc"}


async def test_a_bad_batch_is_refused_whole(store: Store, lease: Lease) -> None:
    await commit(store, lease, vm_state={(VM_A, "ffa"): "before"},
                 last_results={(VM_A, 0): (1, b"before")})
    for bad in ({"vm_state": {(VM_A, "zz"): {"not": "a str"}}},
                {"last_results": {(VM_A, 9): ("not an int", b"")}}):
        batch = StoreBatch(vm_state={(VM_A, "ffa"): "after"},
                           last_results={(VM_A, 0): (2, b"after")})
        for part, entries in bad.items():
            getattr(batch, part).update(entries)
        with pytest.raises(TypeError):
            await store.commit(lease, batch)
    loaded = await store.load_vm(VM_A)
    assert loaded.docs == {"ffa": "before"} and loaded.results == {0: (1, b"before")}
    assert not StoreBatch()


# ---- leases and fencing -------------------------------------------------------------------------


async def test_every_takeover_raises_the_epoch(store: Store) -> None:
    first = await store.take_lease(HOST, "broker-1", 30.0)
    second = await store.take_lease(HOST, "broker-2", 30.0)
    third = await store.take_lease(HOST, "broker-1", 30.0)
    assert first.epoch < second.epoch < third.epoch
    assert (await store.take_lease("host-b", "broker-1", 30.0)).epoch == 1


async def test_a_broker_that_lost_the_lease_changes_nothing(store: Store) -> None:
    old = await store.take_lease(HOST, "broker-1", 30.0)
    await commit(store, old, vm_state={(VM_A, "psci"): "mine"})
    await store.put_vm(old, VM_A, b"reg")
    new = await store.take_lease(HOST, "broker-2", 30.0)
    with pytest.raises(Fenced):
        await commit(store, old, vm_state={(VM_A, "psci"): "stale", (VM_A, "x"): "new"},
                     last_results={(VM_A, 0): (7, b"stale")})
    with pytest.raises(Fenced):
        await store.put_vm(old, VM_B, b"stale")
    with pytest.raises(Fenced):
        await store.forget_vm(old, VM_A)
    assert not await store.renew_lease(old, 30.0)
    await store.release_lease(old)  # harmless: the newer holder keeps the lease
    assert await store.renew_lease(new, 30.0)
    loaded = await store.load_vm(VM_A)
    assert loaded.docs == {"psci": "mine"} and loaded.results == {}
    assert await store.host_vms(HOST) == {VM_A: b"reg"}
    await commit(store, new, vm_state={(VM_A, "psci"): "theirs"})
    assert (await store.load_vm(VM_A)).docs == {"psci": "theirs"}


async def test_a_lease_never_taken_fences_every_write(store: Store) -> None:
    with pytest.raises(Fenced):
        await commit(store, Lease(HOST, "broker-1", 1), vm_state={(VM_A, "h"): "x"})


async def test_lapsed_leases_are_listed_until_taken_or_dropped(store: Store) -> None:
    held = await store.take_lease(HOST, "broker-1", 30.0)
    lapsed = await store.take_lease("host-b", "broker-1", 0.001)
    released = await store.take_lease("host-c", "broker-1", 30.0)
    await store.release_lease(released)
    await asyncio.sleep(0.05)
    assert sorted(await store.expired_leases(0.0)) == ["host-b", "host-c"]
    assert await store.expired_leases(3600.0) == []  # not lapsed that long ago
    await store.drop_lease(lapsed)
    retaken = await store.take_lease("host-c", "broker-2", 30.0)
    assert await store.expired_leases(0.0) == []
    assert retaken.epoch == released.epoch + 1 and await store.renew_lease(held, 30.0)


async def test_leases_of_two_hosts_are_apart(store: Store) -> None:
    a = await store.take_lease(HOST, "broker-1", 30.0)
    await store.take_lease("host-b", "broker-2", 30.0)
    await commit(store, a, vm_state={(VM_A, "h"): "ok"})
    assert await store.renew_lease(a, 30.0)


# ---- ID pools -----------------------------------------------------------------------------------


async def test_an_owner_keeps_its_id_and_ids_go_round_robin(store: Store) -> None:
    assert await store.allocate_id("ffa", "vm-a", 1, 3) == 1
    assert await store.allocate_id("ffa", "vm-b", 1, 3) == 2
    assert await store.allocate_id("ffa", "vm-a", 1, 3) == 1  # its own, not a second one
    await store.release_id("ffa", "vm-a")
    assert await store.id_owner("ffa", 1) is None
    assert await store.allocate_id("ffa", "vm-c", 1, 3) == 3
    assert await store.allocate_id("ffa", "vm-d", 1, 3) == 1  # freed 1 comes back last
    assert await store.allocate_id("ffa", "vm-e", 1, 3) is None  # full
    assert await store.id_owner("ffa", 2) == "vm-b"
    assert await store.allocate_id("other-pool", "vm-e", 1, 3) == 1


async def test_a_large_id_range_is_exact(store: Store) -> None:
    top = 2**31 - 1
    assert await store.allocate_id("hv", "a", top - 1, top) == top - 1
    assert await store.allocate_id("hv", "b", top - 1, top) == top
    assert await store.id_owner("hv", top) == "b"
    with pytest.raises(ValueError):
        await store.allocate_id("hv", "c", 1, 2**32)


async def test_concurrent_allocations_are_distinct(store: Store) -> None:
    got = await asyncio.gather(*(store.allocate_id("ffa", f"vm-{i}", 1, 0x7FFF)
                                 for i in range(200)))
    assert sorted(got) == list(range(1, 201))  # type: ignore[type-var]


# ---- backends: URLs, durability, processes ------------------------------------------------------


@pytest.mark.parametrize("url", ["", "sqlite://relative", "postgres://x/y", "sqlite:///",
                                 "redis://:hunter2@127.0.0.1:6379/0"])
def test_store_urls_that_cannot_work_are_refused_clearly(url: str) -> None:
    with pytest.raises(StoreUrlError, match="--store"):
        open_store(url)


async def test_sqlite_reopened_sees_everything_committed(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path)
    await first.add_policy("v1", "d1")
    lease = await first.take_lease(HOST, "b", 30.0)
    await first.commit(lease, StoreBatch(vm_state={(VM_A, "ffa"): "a"},
                                         last_results={(VM_A, 0): (7, b"\x00\x01")}))
    await first.put_vm(lease, VM_A, b"reg")
    await first.close()
    second = SqliteStore(tmp_path)
    try:
        assert await second.latest_policy() == StoredPolicy(1, "v1", "d1")
        loaded = await second.load_vm(VM_A)
        assert loaded.docs == {"ffa": "a"} and loaded.results == {0: (7, b"\x00\x01")}
        assert await second.host_vms(HOST) == {VM_A: b"reg"}
        assert (await second.take_lease(HOST, "b", 30.0)).epoch == lease.epoch + 1
        assert await second.add_policy("v2", "d2") == 2
    finally:
        await second.close()


async def test_redis_restarted_with_aof_keeps_every_commit(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        store = open_store(server.url)
        lease = await store.take_lease(HOST, "b", 30.0)
        await store.commit(lease, StoreBatch(vm_state={(VM_A, "ffa"): "kept"}))
        assert await store.allocate_id("ffa", VM_A, 1, 10) == 1
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.commit(lease, StoreBatch(vm_state={(VM_A, "ffa"): "lost"}))
        server.start()  # the same port and directory
        loaded = await store.load_vm(VM_A)  # the client reconnects by itself
        assert loaded.docs == {"ffa": "kept"}
        assert await store.allocate_id("ffa", VM_B, 1, 10) == 2
        assert await store.renew_lease(lease, 30.0)
        await store.close()
    finally:
        server.stop()


async def test_redis_over_tls_with_a_password(tmp_path: Path) -> None:
    """rediss:// with the server's CA, and a password given apart from the URL."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = (tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    ca.cert_pem.write_to_path(paths[2])
    server = RedisServer(tmp_path / "redis", password="s3cret pass", tls=paths).start()
    try:
        refused = open_store(server.url, password="wrong")
        with pytest.raises(StoreUnavailable):
            await refused.add_policy("p", "d")
        await refused.close()
        store = open_store(server.url, password="s3cret pass")
        assert await store.add_policy("p", "d") == 1
        lease = await store.take_lease(HOST, "b", 30.0)
        await store.commit(lease, StoreBatch(vm_state={(VM_A, "h"): "over tls"}))
        assert (await store.load_vm(VM_A)).docs == {"h": "over tls"}
        await store.close()
    finally:
        server.stop()


def _open_and_add(url: str) -> int:
    async def go() -> int:
        store = open_store(url)
        try:
            return await store.add_policy("same text", "same digest")
        finally:
            await store.close()
    return asyncio.run(go())


def _allocate_many(url: str, worker: int) -> list[int | None]:
    async def go() -> list[int | None]:
        store = open_store(url)
        try:
            return [await store.allocate_id("ffa", f"w{worker}-vm{i}", 1, 0x7FFF)
                    for i in range(50)]
        finally:
            await store.close()
    return asyncio.run(go())


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_processes_on_one_store_agree(backend: str, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    """Workers (`serve --workers N`) and replicas open one store at once: one policy version
    for the same text, and 200 distinct FF-A IDs from 4 processes allocating together."""
    if backend == "redis":
        url = f"{request.getfixturevalue('redis_server').url}?prefix=procs{next(_prefixes)}:"
    else:
        url = f"sqlite://{tmp_path}/shared"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        versions = pool.map(_open_and_add, [url] * 8)
        ids = pool.starmap(_allocate_many, [(url, w) for w in range(4)])
    assert versions == [1] * 8
    flat = [i for chunk in ids for i in chunk]
    assert len(flat) == 200 and len(set(flat)) == 200 and None not in flat


def test_redis_store_is_a_store() -> None:
    assert isinstance(RedisStore.from_url("redis://127.0.0.1:1/0"), RedisStore)
