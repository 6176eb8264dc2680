"""The fair queue (hyperbroker.runtime.fairqueue), driven with explicit times: no clock, no loop."""

from __future__ import annotations

import pytest

from hyperbroker.runtime.fairqueue import Admit, FairQueue

MS = 1_000_000
FAR = 10**15


def test_a_vm_with_tokens_and_no_backlog_runs_at_once() -> None:
    q: FairQueue[str, int] = FairQueue(rate=100, burst=2)
    assert q.offer("b", 1, 0, FAR) is Admit.RUN
    assert q.offer("b", 2, 0, FAR) is Admit.RUN
    assert q.offer("b", 3, 0, FAR) is Admit.QUEUED
    assert q.queued == 1


def test_a_vm_over_its_rate_is_released_in_order_at_its_rate() -> None:
    q: FairQueue[str, int] = FairQueue(rate=100, burst=1)  # one call every 10 ms
    assert q.offer("a", 0, 0, FAR) is Admit.RUN
    for i in range(1, 4):
        assert q.offer("a", i, 0, FAR) is Admit.QUEUED
    assert q.poll(5 * MS) == ([], [])
    assert q.next_event_ns(5 * MS) == 10 * MS + 1
    assert q.poll(10 * MS + 1) == ([1], [])
    assert q.poll(30 * MS + 2) == ([2], [])  # the bucket holds one token at most
    assert q.poll(40 * MS + 3) == ([3], [])
    assert q.queued == 0 and q.next_event_ns(50 * MS) is None


def test_a_flooding_vm_never_takes_a_neighbours_turn() -> None:
    q: FairQueue[str, str] = FairQueue(rate=100, burst=1, max_queued=1000)
    q.offer("a", "a0", 0, FAR)
    for i in range(1, 500):
        q.offer("a", f"a{i}", 0, FAR)
    # B calls every 10 ms, at its rate: each runs at once, whatever A has queued.
    for t in range(1, 20):
        assert q.offer("b", f"b{t}", t * 10 * MS + 1, FAR) is Admit.RUN
        released, _ = q.poll(t * 10 * MS + 1)
        assert released == [f"a{t}"]  # and A gets exactly its own rate


def test_round_robin_between_backlogged_vms() -> None:
    q: FairQueue[str, str] = FairQueue(rate=1000, burst=1, quantum=1, max_queued=100)
    for vm in "abc":
        q.offer(vm, f"{vm}0", 0, FAR)  # spends the token
        for i in range(1, 4):
            q.offer(vm, f"{vm}{i}", 0, FAR)
    order = []
    t = 0
    while q.queued:
        t += MS + 1
        order += q.poll(t)[0]
    assert order == ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "b3", "c3"]


def test_quantum_bounds_a_vm_per_round() -> None:
    q: FairQueue[str, str] = FairQueue(rate=1000, burst=5, quantum=2, max_queued=100)
    for vm in "ab":
        for i in range(10):
            q.offer(vm, f"{vm}{i}", 0, FAR)
    released, _ = q.poll(5 * MS)  # 5 tokens back each
    assert released == ["a5", "a6", "b5", "b6"]  # 2 a round each


def test_queued_calls_fall_back_at_their_deadline_and_spend_no_token() -> None:
    q: FairQueue[str, int] = FairQueue(rate=10, burst=1)  # one call every 100 ms
    q.offer("a", 0, 0, FAR)
    q.offer("a", 1, 0, 20 * MS)
    q.offer("a", 2, 0, 50 * MS)
    q.offer("a", 3, 0, FAR)
    assert q.next_event_ns(0) == 20 * MS
    assert q.poll(20 * MS) == ([], [1])
    assert q.poll(50 * MS) == ([], [2])
    assert q.poll(100 * MS + 1) == ([3], [])
    assert q.queued == 0


def test_no_starvation_every_backlogged_vm_is_served() -> None:
    q: FairQueue[int, tuple[int, int]] = FairQueue(rate=50, burst=1, max_queued=8)
    for vm in range(20):
        q.offer(vm, (vm, 0), 0, FAR)
        for i in range(1, 8):
            q.offer(vm, (vm, i), 0, FAR)
    served: dict[int, int] = {}
    t = 0
    while q.queued:
        t += 20 * MS + 1
        for vm, _ in q.poll(t)[0]:
            served[vm] = served.get(vm, 0) + 1
    assert served == {vm: 7 for vm in range(20)}
    assert t <= 8 * (20 * MS + 1)  # each VM at its own rate, none waiting on the others


def test_memory_per_vm_is_bounded() -> None:
    q: FairQueue[str, int] = FairQueue(rate=1, burst=1, max_queued=4)
    q.offer("a", 0, 0, FAR)
    assert [q.offer("a", i, 0, FAR) for i in range(1, 8)] == [Admit.QUEUED] * 4 + [
        Admit.REFUSED] * 3
    assert len(q.flows["a"].queue) == 4
    assert q.offer("b", 0, 0, FAR) is Admit.RUN  # a full neighbour costs B nothing


def test_forget_drops_a_vms_backlog() -> None:
    q: FairQueue[str, int] = FairQueue(rate=1, burst=1)
    q.offer("a", 0, 0, FAR)
    q.offer("a", 1, 0, FAR)
    q.offer("a", 2, 0, FAR)
    assert q.forget("a") == [1, 2]
    assert q.queued == 0 and q.poll(10**12) == ([], [])
    assert q.forget("a") == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        FairQueue(rate=0)
    with pytest.raises(ValueError, match="quantum"):
        FairQueue(rate=1, quantum=0)
