"""The harness (the proxy and the reference TEE in-process) and its guest, per test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperbroker.testing.optee import (
    Guest,
    Harness,
)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
def g(h: Harness) -> Guest:
    return h.guest()
