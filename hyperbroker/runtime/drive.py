"""Run a coroutine without a task until it first suspends.

Most hypercalls are answered without awaiting anything (a version, a feature bit, fresh
entropy). Creating and scheduling an asyncio Task for each costs more than the answer itself,
so the dispatcher steps an eager handler's coroutine by hand: if it finishes in that first step,
no task ever exists; if it suspends, the rest runs in a task that resumes it exactly as
asyncio.Task would (awaiting the same future, propagating cancellation into the coroutine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

Done = Callable[[T | None, BaseException | None], None]


def run_eagerly(coro: Coroutine[Any, Any, T], done: Done[T]) -> asyncio.Task[T] | None:
    """Step `coro` once; call `done(result, None)` or `done(None, exc)` when it ends.

    Returns the task that continues it when it suspended, else None.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        done(stop.value, None)
        return None
    except BaseException as exc:
        done(None, exc)
        return None
    current = [yielded]
    task = asyncio.ensure_future(_resume(coro, current))

    def _finished(t: asyncio.Task[T]) -> None:
        if t.cancelled():
            # Cancelled, possibly before it ever ran: release what the coroutine awaits and
            # close it, so its finally blocks run.
            if asyncio.isfuture(current[0]):
                current[0].cancel()
            coro.close()
            done(None, asyncio.CancelledError())
        elif (exc := t.exception()) is not None:
            done(None, exc)
        else:
            done(t.result(), None)

    task.add_done_callback(_finished)
    return task


async def _resume(coro: Coroutine[Any, Any, T], current: list[Any]) -> T:
    loop = asyncio.get_running_loop()
    while True:
        yielded = current[0]
        if yielded is None:  # a bare yield, as asyncio.sleep(0) does
            await asyncio.sleep(0)
        elif asyncio.isfuture(yielded):
            # The coroutine awaits this future and will read its result when resumed.
            yielded._asyncio_future_blocking = False
            waiter = loop.create_future()

            def _wake(_: object, waiter: asyncio.Future[None] = waiter) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            yielded.add_done_callback(_wake)
            try:
                await waiter
            except asyncio.CancelledError:
                yielded.cancel()  # as Task.cancel does: the coroutine sees CancelledError
                if not yielded.done():
                    await asyncio.sleep(0)
        else:
            coro.close()
            raise RuntimeError(f"handler coroutine yielded {yielded!r}, not a future")
        try:
            current[0] = coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
