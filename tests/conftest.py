"""Fixtures shared by every test directory: the real servers tests run against."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.testing.procs import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix or DB number."""
    if shutil.which("redis-server") is None:
        pytest.skip("SKIPPING: redis-server is not installed and scripts/system_deps.sh could "
                    "not install it (needs root and apt-get): the Redis store is NOT tested")
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()
