"""Prometheus counters and histograms for the per-call path: no lock, no label lookup per update.

prometheus_client's Counter.inc and Histogram.observe take a mutex per update and scan the
buckets in Python: 0.7 and 1.3 us each on this project's machine, several per call. Here an
update is one bisect and two additions on plain Python numbers, and the numbers become metric
families only when Prometheus scrapes (a custom collector on the same registry).

Updates come from the event-loop thread alone; a scrape reads from the HTTP server's thread
under the GIL, so it may see an observation's bucket before its sum — the same looseness
prometheus_client itself has across a histogram's buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, cast

from prometheus_client import REGISTRY, CollectorRegistry, utils
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

C = TypeVar("C")

# How prometheus_client spells a bucket bound ("1e-05", "0.001", "1.0"); untyped upstream.
go_float = cast(Callable[[float], str], utils.floatToGoString)


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


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
                 registry: CollectorRegistry | None, new_child: Callable[[], C]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._new_child = new_child
        self._children: dict[tuple[str, ...], C] = {}
        (registry if registry is not None else REGISTRY).register(self)

    def labels(self, *values: str) -> C:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class FastCounter(_Family[CounterChild]):
    """A counter; the exposition ends its name in `_total` whether or not `name` does."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(name, documentation, labelnames, registry, CounterChild)
        if not self.labelnames:
            self._solo = self.labels()

    def inc(self, amount: float = 1.0) -> None:
        self._solo.value += amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class FastHistogram(_Family[HistogramChild]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry | None = None) -> None:
        bounds = sorted(float(b) for b in buckets if b != float("inf"))
        if not bounds:
            raise ValueError(f"{name} needs at least one finite bucket")
        self._bounds = bounds
        self._le = [go_float(b) for b in bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry,
                         lambda: HistogramChild(bounds))
        if not self.labelnames:
            self._solo = self.labels()

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
