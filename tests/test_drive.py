"""hyperbroker.runtime.drive: coroutines stepped without a task until they suspend."""

from __future__ import annotations

import asyncio

import pytest

from hyperbroker.runtime.drive import run_eagerly


async def test_a_coroutine_that_never_awaits_finishes_without_a_task() -> None:
    got: list[object] = []

    async def answer() -> int:
        return 42

    task = run_eagerly(answer(), lambda r, e: got.append((r, e)))
    assert task is None
    assert got == [(42, None)]


async def test_an_exception_before_the_first_await_is_handed_to_done() -> None:
    got: list[object] = []

    async def boom() -> int:
        raise ValueError("bad")

    assert run_eagerly(boom(), lambda r, e: got.append(e)) is None
    assert isinstance(got[0], ValueError)


async def test_a_suspended_coroutine_continues_in_a_task_and_sees_future_results() -> None:
    got: list[object] = []
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> int:
        first = await fut
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return first + 1

    task = run_eagerly(waits(), lambda r, e: got.append((r, e)))
    assert task is not None and got == []
    fut.set_result(9)
    await task
    assert got == [(10, None)]


async def test_a_failed_future_raises_inside_the_coroutine() -> None:
    got: list[object] = []
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> str:
        try:
            await fut
        except KeyError:
            return "caught"
        return "not caught"

    task = run_eagerly(waits(), lambda r, e: got.append(r))
    fut.set_exception(KeyError("x"))
    assert task is not None
    await task
    assert got == ["caught"]


async def test_cancelling_the_task_cancels_the_awaited_future_and_reports_it() -> None:
    got: list[object] = []
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> int:
        return await fut

    task = run_eagerly(waits(), lambda r, e: got.append(e))
    assert task is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fut.cancelled()
    assert isinstance(got[0], asyncio.CancelledError)
