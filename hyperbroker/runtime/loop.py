"""One event loop per process, on uvloop: every serving or measuring command runs through here."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run `coro` to completion on uvloop (grpc.aio works on it and it is faster)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.run(coro)
    return int(uvloop.run(coro))
