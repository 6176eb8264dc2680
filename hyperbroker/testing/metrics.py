"""The handlers' families as the broker's /metrics serves them, for tests that run a handler in
their own process and read its counters (`HANDLERS.get_sample_value(name, labels)`)."""

from __future__ import annotations

from hyperbroker.handlers.api import HANDLER_METRICS
from hyperbroker.runtime.metrics import process_registry

HANDLERS = process_registry(HANDLER_METRICS)
