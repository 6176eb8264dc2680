"""hyperbroker.runtime.busypoll: the loop keeps polling for the window after a kick, then sleeps."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from hyperbroker.runtime.busypoll import BusyPoll


async def until_asleep(poll: BusyPoll) -> None:
    deadline = time.monotonic() + 10  # generous: a busy machine stretches every sleep
    while time.monotonic() < deadline:
        if not poll.active:
            return
        await asyncio.sleep(0.005)  # the loop would sleep here; polling keeps it turning
    raise AssertionError("still polling after 10 s")


async def test_a_kick_keeps_the_loop_polling_for_the_window_then_stops() -> None:
    poll = BusyPoll(asyncio.get_running_loop(), 20_000)  # 20 ms
    assert poll.enabled and not poll.active
    t0 = time.monotonic()
    poll.kick()
    assert poll.active
    await until_asleep(poll)
    elapsed = time.monotonic() - t0
    assert 0.02 <= elapsed < 10  # the 20 ms window, then asleep (not polling forever)
    assert poll.spins > 10  # many loop iterations, not one timer
    spins = poll.spins
    await asyncio.sleep(0.03)
    assert poll.spins == spins  # asleep again: nothing runs without a kick


async def test_each_kick_extends_the_window() -> None:
    poll = BusyPoll(asyncio.get_running_loop(), 30_000)
    t0 = time.monotonic()
    poll.kick()
    for _ in range(4):
        await asyncio.sleep(0.02)
        assert poll.active
        poll.kick()
    await until_asleep(poll)
    assert time.monotonic() - t0 >= 0.08 + 0.03


async def test_polling_loop_still_serves_sockets() -> None:
    loop = asyncio.get_running_loop()
    poll = BusyPoll(loop, 50_000)
    a, b = socket.socketpair()
    a.setblocking(False)
    got: asyncio.Future[bytes] = loop.create_future()
    loop.add_reader(a.fileno(), lambda: got.done() or got.set_result(a.recv(16)))
    try:
        poll.kick()
        await asyncio.sleep(0.005)
        b.send(b"ping")
        assert await asyncio.wait_for(got, 10) == b"ping"
    finally:
        loop.remove_reader(a.fileno())
        a.close()
        b.close()


async def test_zero_window_is_off_and_negative_is_refused() -> None:
    loop = asyncio.get_running_loop()
    poll = BusyPoll(loop, 0)
    poll.kick()
    assert not poll.enabled and not poll.active
    await asyncio.sleep(0.01)
    assert poll.spins == 0
    with pytest.raises(ValueError, match=">= 0"):
        BusyPoll(loop, -1)
