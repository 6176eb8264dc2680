"""The one metrics convention of every hyperbroker process: Counter, Gauge, Histogram, buckets.

Every family is defined through this module (the broker's, the agent's, each handler's, the TEE
service's) and `serve()` starts a process's /metrics endpoint; nothing else imports
prometheus_client. A family belongs to one `MetricSet`, the families of one part of the product,
and is registered nowhere else: there is no process-wide default registry. A process exports the
sets of the parts it runs, in a registry built for it by `serve()`, so a module imported for
another reason (a shared helper, a test) never adds its part's families to this process's
/metrics. The families are lock-free: an update is one or two additions on plain
Python numbers (a histogram adds one bisect), and they become Prometheus metric families only
when a scrape collects them, through a collector on the registry. prometheus_client's own
Counter.inc and Histogram.observe take a mutex per update and scan the buckets in Python
(0.7 and 1.3 us each on the project's 2-core machine, several per call, docs/performance.md).

Updates come from the event-loop thread; a scrape reads from the HTTP server's thread under the
GIL, so it may see an observation's bucket before its sum, the same looseness prometheus_client
itself has across a histogram's buckets. Label values are bounded by their callers (function
names from a handler's own table, outcome names, ...); `labels()` is a dict lookup, so hot paths
bind children once and keep them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
    utils,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from hyperbroker.runtime.net import CannotListen, split_hostport

# Seconds, from the few microseconds of an in-broker handler to the seconds of a TEE call or a
# fallback deadline: the one bucket set of every latency histogram, so panels can add them.
LATENCY_BUCKETS: tuple[float, ...] = (
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# Items per batch (calls per frame): powers of two up to the largest batch a frame carries.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

C = TypeVar("C")

# How prometheus_client spells a bucket bound ("1e-05", "0.001", "1.0"); untyped upstream.
go_float = cast(Callable[[float], str], utils.floatToGoString)


class MetricSet:
    """The families one part of the product defines (the broker, the agent, the handlers, the
    TEE service): a collector a process registry takes whole."""

    def __init__(self, part: str) -> None:
        self.part = part
        self._families: dict[str, _Family[Any]] = {}

    def register(self, family: _Family[Any]) -> None:
        if family.name in self._families:
            raise ValueError(f"Duplicated metric family {family.name} in the {self.part} set")
        self._families[family.name] = family

    def describe(self) -> list[Metric]:
        return [m for f in list(self._families.values()) for m in f.describe()]

    def collect(self) -> Iterator[Metric]:
        for family in list(self._families.values()):
            yield from family.collect()


def process_registry(*sets: MetricSet) -> CollectorRegistry:
    """What one process exports: `sets`, plus the process_* and python_* families of
    prometheus_client's own collectors. Two sets defining one name is an error here."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, *sets):
        registry.register(collector)
    return registry


def serve(listen: str, *sets: MetricSet) -> int:
    """Serve /metrics with `sets` (process_registry) on `listen` (HOST:PORT, port 0 for any) in
    a thread; the port bound."""
    registry = process_registry(*sets)
    addr, port = split_hostport(listen)
    try:
        httpd, _ = start_http_server(port, addr, registry=registry)
    except OSError as e:
        raise CannotListen("metrics", listen, e.strerror or str(e)) from e
    return int(httpd.server_port)


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild:
    __slots__ = ("function", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from `function` at each scrape instead."""
        self.function = function

    def read(self) -> float:
        return float(self.function()) if self.function is not None else self.value


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= v.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family(Generic[C]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | MetricSet, new_child: Callable[[], C]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._new_child = new_child
        self._children: dict[tuple[str, ...], C] = {}
        if not self.labelnames:
            self._solo = self.labels()
        registry.register(self)

    def labels(self, *values: str) -> C:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def initialise(self, *value_sets: Iterable[str]) -> None:
        """Create a child for every combination of known label values, so dashboards see 0
        instead of no series before the first event."""
        if len(value_sets) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        combos: list[tuple[str, ...]] = [()]
        for values in value_sets:
            combos = [(*c, v) for c in combos for v in values]
        for combo in combos:
            self.labels(*combo)

    def remove(self, *values: str) -> None:
        """Forget one child (a VM that is gone); absent ones are ignored."""
        self._children.pop(values, None)

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class Counter(_Family[CounterChild]):
    """A counter; the exposition ends its name in `_total` whether or not `name` does."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | MetricSet) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry,
                         CounterChild)

    def inc(self, amount: float = 1.0) -> None:
        self._solo.value += amount

    @property
    def value(self) -> float:
        return self._solo.value

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class Gauge(_Family[GaugeChild]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | MetricSet) -> None:
        super().__init__(name, documentation, labelnames, registry, GaugeChild)

    def set(self, value: float) -> None:
        self._solo.set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._solo.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._solo.value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        self._solo.set_function(function)

    @property
    def value(self) -> float:
        return self._solo.read()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.read())
        yield family


class Histogram(_Family[HistogramChild]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float] = LATENCY_BUCKETS,
                 registry: CollectorRegistry | MetricSet) -> None:
        bounds = sorted(float(b) for b in buckets if b != float("inf"))
        if not bounds:
            raise ValueError(f"{name} needs at least one finite bucket")
        self._bounds = bounds
        self._le = [go_float(b) for b in bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry,
                         lambda: HistogramChild(bounds))

    def observe(self, value: float) -> None:
        self._solo.observe(value)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for le, n in zip(self._le, counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, total)
        yield family
