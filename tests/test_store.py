"""broker.store: the same behaviours from MemoryStore and SqliteStore.

The store keeps policy versions, each VM's handler documents, shared handler documents and each
vCPU's last result (the broker answers a re-sent call from the vCPU's last-result record). A
StoreBatch is one transaction: all of it or none of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperbroker.broker.store import MemoryStore, SqliteStore, Store, StoreBatch, StoredPolicy

VM_A = "host-a/vm-1"
VM_B = "host-a/vm-10"  # shares a prefix with VM_A on purpose
VM_C = "host-b/vm-1"


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "state")
    yield s
    s.close()


def commit(store: Store, **parts: Any) -> None:
    store.commit(StoreBatch(**parts))


# ---- policies -----------------------------------------------------------------------------------


def test_an_empty_store_has_no_policy(store: Store) -> None:
    assert store.latest_policy() is None
    assert store.get_policy(1) is None


def test_policy_versions_increase_from_one(store: Store) -> None:
    assert [store.add_policy(f"text {i}", f"digest {i}") for i in range(3)] == [1, 2, 3]


def test_get_policy_returns_each_version_as_stored(store: Store) -> None:
    store.add_policy("first", "d1")
    store.add_policy("second", "d2")
    assert store.get_policy(1) == StoredPolicy(1, "first", "d1")
    assert store.get_policy(2) == StoredPolicy(2, "second", "d2")


def test_latest_policy_is_the_highest_version(store: Store) -> None:
    store.add_policy("first", "d1")
    store.add_policy("second", "d2")
    assert store.latest_policy() == StoredPolicy(2, "second", "d2")


@pytest.mark.parametrize("version", [0, -1, 3, 1000])
def test_get_policy_of_a_version_never_added_is_none(store: Store, version: int) -> None:
    store.add_policy("first", "d1")
    store.add_policy("second", "d2")
    assert store.get_policy(version) is None


# ---- VM state -----------------------------------------------------------------------------------


def test_vm_state_is_none_until_committed(store: Store) -> None:
    assert store.load_vm_state(VM_A, "ffa") is None


def test_vm_state_put_and_get(store: Store) -> None:
    commit(store, vm_state={(VM_A, "ffa"): '{"rx": 1}', (VM_A, "psci"): "[]"})
    assert store.load_vm_state(VM_A, "ffa") == '{"rx": 1}'
    assert store.load_vm_state(VM_A, "psci") == "[]"
    assert store.load_vm_state(VM_B, "ffa") is None


def test_vm_state_put_replaces(store: Store) -> None:
    commit(store, vm_state={(VM_A, "ffa"): "1"})
    commit(store, vm_state={(VM_A, "ffa"): "2"})
    assert store.load_vm_state(VM_A, "ffa") == "2"


def test_vm_state_none_deletes(store: Store) -> None:
    commit(store, vm_state={(VM_A, "ffa"): "1", (VM_A, "psci"): "2"})
    commit(store, vm_state={(VM_A, "ffa"): None})
    assert store.load_vm_state(VM_A, "ffa") is None
    assert store.load_vm_state(VM_A, "psci") == "2"


def test_deleting_absent_vm_state_is_harmless(store: Store) -> None:
    commit(store, vm_state={(VM_A, "ffa"): None})
    assert store.load_vm_state(VM_A, "ffa") is None


def test_vm_state_keeps_text_exactly(store: Store) -> None:
    doc = '{"name": "gr\\u00fc\\u00df", "raw": "€ ✓ \\n", "n": 18446744073709551615}'
    commit(store, vm_state={(VM_A, "ffa"): doc})
    assert store.load_vm_state(VM_A, "ffa") == doc


# ---- shared state -------------------------------------------------------------------------------


def test_shared_state_put_get_and_delete(store: Store) -> None:
    assert store.load_shared_state("ffa") is None
    commit(store, shared_state={"ffa": '{"next_handle": 7}', "optee": "{}"})
    assert store.load_shared_state("ffa") == '{"next_handle": 7}'
    commit(store, shared_state={"ffa": None})
    assert store.load_shared_state("ffa") is None
    assert store.load_shared_state("optee") == "{}"


def test_shared_state_is_apart_from_vm_state(store: Store) -> None:
    commit(store, shared_state={"ffa": "shared"}, vm_state={(VM_A, "ffa"): "mine"})
    assert store.load_shared_state("ffa") == "shared"
    assert store.load_vm_state(VM_A, "ffa") == "mine"


# ---- last results -------------------------------------------------------------------------------


def test_last_results_are_per_vm_and_vcpu(store: Store) -> None:
    commit(store, last_results={(VM_A, 0): (5, b"r0"), (VM_A, 1): (9, b"r1"),
                                (VM_B, 0): (2, b"b0")})
    assert store.load_last_results(VM_A) == {0: (5, b"r0"), 1: (9, b"r1")}
    assert store.load_last_results(VM_B) == {0: (2, b"b0")}
    assert store.load_last_results(VM_C) == {}


def test_a_vcpus_last_result_replaces_the_previous_one(store: Store) -> None:
    # A vCPU has at most one call in flight, so one record per vCPU is enough.
    commit(store, last_results={(VM_A, 0): (5, b"old")})
    commit(store, last_results={(VM_A, 0): (6, b"new")})
    assert store.load_last_results(VM_A) == {0: (6, b"new")}


def test_last_result_blobs_keep_every_byte(store: Store) -> None:
    blob = bytes(range(256)) * 4
    commit(store, last_results={(VM_A, 3): ((1 << 63) - 1, blob)})
    assert store.load_last_results(VM_A) == {3: ((1 << 63) - 1, blob)}


# ---- forget_vm ----------------------------------------------------------------------------------


def test_forget_vm_drops_only_that_vms_rows(store: Store) -> None:
    commit(
        store,
        vm_state={(VM_A, "ffa"): "a", (VM_A, "psci"): "a2", (VM_B, "ffa"): "b", (VM_C, "ffa"): "c"},
        shared_state={"ffa": "shared"},
        last_results={(VM_A, 0): (1, b"a"), (VM_B, 0): (1, b"b"), (VM_C, 1): (1, b"c")},
    )
    store.add_policy("p", "d")
    store.forget_vm(VM_A)
    assert store.load_vm_state(VM_A, "ffa") is None
    assert store.load_vm_state(VM_A, "psci") is None
    assert store.load_last_results(VM_A) == {}
    assert store.load_vm_state(VM_B, "ffa") == "b"
    assert store.load_vm_state(VM_C, "ffa") == "c"
    assert store.load_last_results(VM_B) == {0: (1, b"b")}
    assert store.load_last_results(VM_C) == {1: (1, b"c")}
    assert store.load_shared_state("ffa") == "shared"
    assert store.latest_policy() == StoredPolicy(1, "p", "d")


def test_forget_vm_of_an_unknown_vm_is_harmless(store: Store) -> None:
    commit(store, vm_state={(VM_A, "ffa"): "a"})
    store.forget_vm(VM_C)
    assert store.load_vm_state(VM_A, "ffa") == "a"


def test_a_forgotten_vm_can_start_again(store: Store) -> None:
    commit(store, vm_state={(VM_A, "ffa"): "old"}, last_results={(VM_A, 0): (9, b"x")})
    store.forget_vm(VM_A)
    commit(store, vm_state={(VM_A, "ffa"): "new"}, last_results={(VM_A, 0): (1, b"y")})
    assert store.load_vm_state(VM_A, "ffa") == "new"
    assert store.load_last_results(VM_A) == {0: (1, b"y")}


# ---- batches are all or nothing -----------------------------------------------------------------


def test_an_empty_batch_is_falsy_and_commits_nothing(store: Store) -> None:
    assert not StoreBatch()
    assert StoreBatch(shared_state={"h": None})
    store.commit(StoreBatch())
    assert store.load_last_results(VM_A) == {}


@pytest.mark.parametrize("bad", [
    {"vm_state": {(VM_A, "zz-last"): {"not": "a str"}}},
    {"shared_state": {"zz-last": ["not", "a", "str"]}},
    {"last_results": {(VM_A, 99): ({"not": "an int"}, b"blob")}},
], ids=["vm_state", "shared_state", "last_results"])
def test_a_failing_commit_rolls_back_the_whole_batch(
    store: Store, request: pytest.FixtureRequest, bad: dict[str, dict[Any, Any]],
) -> None:
    commit(store, vm_state={(VM_A, "ffa"): "before"}, shared_state={"ffa": "before"},
           last_results={(VM_A, 0): (1, b"before")})
    batch = StoreBatch(
        vm_state={(VM_A, "ffa"): "after", (VM_A, "psci"): "new"},
        shared_state={"ffa": None, "optee": "new"},
        last_results={(VM_A, 0): (2, b"after"), (VM_A, 1): (1, b"new")},
    )
    for part, entries in bad.items():
        getattr(batch, part).update(entries)
    with pytest.raises(Exception):  # noqa: B017 - the backend's own error type
        store.commit(batch)
    assert store.load_vm_state(VM_A, "ffa") == "before"
    assert store.load_vm_state(VM_A, "psci") is None
    assert store.load_shared_state("ffa") == "before"
    assert store.load_shared_state("optee") is None
    assert store.load_last_results(VM_A) == {0: (1, b"before")}


def test_the_store_works_after_a_failed_commit(
    store: Store, request: pytest.FixtureRequest,
) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the backend's own error type
        store.commit(StoreBatch(vm_state={(VM_A, "ffa"): {"not": "a str"}}))  # type: ignore[dict-item]
    commit(store, vm_state={(VM_A, "ffa"): "ok"})
    assert store.load_vm_state(VM_A, "ffa") == "ok"


# ---- SqliteStore durability ---------------------------------------------------------------------


def test_sqlite_store_reopened_sees_everything_committed(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path)
    first.add_policy("v1", "d1")
    first.add_policy("v2", "d2")
    first.commit(StoreBatch(
        vm_state={(VM_A, "ffa"): "a", (VM_B, "ffa"): "b"},
        shared_state={"ffa": "shared"},
        last_results={(VM_A, 0): (7, b"\x00\x01"), (VM_A, 1): (8, b"\x02")},
    ))
    first.commit(StoreBatch(vm_state={(VM_B, "ffa"): None}))
    first.close()

    second = SqliteStore(tmp_path)
    try:
        assert second.latest_policy() == StoredPolicy(2, "v2", "d2")
        assert second.get_policy(1) == StoredPolicy(1, "v1", "d1")
        assert second.load_vm_state(VM_A, "ffa") == "a"
        assert second.load_vm_state(VM_B, "ffa") is None
        assert second.load_shared_state("ffa") == "shared"
        assert second.load_last_results(VM_A) == {0: (7, b"\x00\x01"), 1: (8, b"\x02")}
        assert second.add_policy("v3", "d3") == 3  # versions keep increasing across restarts
    finally:
        second.close()


def test_sqlite_store_creates_its_state_dir(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "a" / "b")
    try:
        assert s.path == tmp_path / "a" / "b" / "hyperbroker.sqlite3"
        assert s.path.exists()
    finally:
        s.close()


def test_sqlite_store_reopened_after_a_failed_commit_has_none_of_it(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path)
    first.commit(StoreBatch(vm_state={(VM_A, "ffa"): "kept"}))
    with pytest.raises(Exception):  # noqa: B017 - sqlite3's binding error
        first.commit(StoreBatch(vm_state={(VM_A, "ffa"): "lost", (VM_A, "x"): 1.5j}))  # type: ignore[dict-item]
    first.close()
    second = SqliteStore(tmp_path)
    try:
        assert second.load_vm_state(VM_A, "ffa") == "kept"
        assert second.load_vm_state(VM_A, "x") is None
    finally:
        second.close()


def test_two_sqlite_stores_on_one_dir_see_each_others_commits(tmp_path: Path) -> None:
    # Several broker workers on one machine may share the file (SqliteStore docstring).
    a, b = SqliteStore(tmp_path), SqliteStore(tmp_path)
    try:
        a.commit(StoreBatch(vm_state={(VM_A, "ffa"): "from a"}))
        assert b.load_vm_state(VM_A, "ffa") == "from a"
        assert b.add_policy("p", "d") == 1
        assert a.latest_policy() == StoredPolicy(1, "p", "d")
    finally:
        a.close()
        b.close()


def _open_and_add(state_dir: str) -> int:
    store = SqliteStore(state_dir)
    version = store.add_policy("same text", "same digest")
    store.close()
    return version


def test_workers_opening_one_store_at_once_all_succeed_and_agree(tmp_path: Path) -> None:
    """`serve --workers N` opens one SQLite file from N processes at the same moment."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        versions = pool.map(_open_and_add, [str(tmp_path)] * 12)
    assert versions == [1] * 12
