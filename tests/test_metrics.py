"""hyperbroker.runtime.metrics exposes what prometheus_client's own Counter, Gauge and Histogram
would, without their lock per update."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as ClientCounter
from prometheus_client import Gauge as ClientGauge
from prometheus_client import Histogram as ClientHistogram

from hyperbroker.runtime.metrics import Counter, Gauge, Histogram

BUCKETS = (10e-6, 25e-6, 100e-6, 1e-3, 1.0)
# On, between and beyond the bounds, and negative: each must land where Histogram puts it.
VALUES = [0.0, 5e-6, 10e-6, 10.000001e-6, 25e-6, 99e-6, 100e-6, 2e-3, 1.0, 1.5, 1e9, -1.0]


def test_histogram_exposition_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = Histogram("x_seconds", "doc", ["a"], buckets=BUCKETS, registry=ours)
    ref = ClientHistogram("x_seconds", "doc", ["a"], buckets=BUCKETS, registry=theirs)
    for i, v in enumerate(VALUES):
        fast.labels(str(i % 2)).observe(v)
        ref.labels(str(i % 2)).observe(v)
    for labels in ({"a": "0"}, {"a": "1"}):
        for le in ["1e-05", "2.5e-05", "0.0001", "0.001", "1.0", "+Inf"]:
            assert ours.get_sample_value("x_seconds_bucket", {**labels, "le": le}) == \
                theirs.get_sample_value("x_seconds_bucket", {**labels, "le": le}), (labels, le)
        for suffix in ("_count", "_sum"):
            assert ours.get_sample_value("x_seconds" + suffix, labels) == pytest.approx(
                theirs.get_sample_value("x_seconds" + suffix, labels))
    text = generate_latest(ours).decode()
    assert "# TYPE x_seconds histogram" in text
    assert 'x_seconds_bucket{a="0",le="+Inf"} 6.0' in text


def test_counter_exposition_and_unlabelled_use() -> None:
    reg = CollectorRegistry()
    labelled = Counter("frames_total", "doc", ["direction"], registry=reg)
    solo = Counter("bits_total", "doc", registry=reg)
    labelled.labels("in").inc()
    labelled.labels("in").inc(2)
    solo.inc(192)
    assert reg.get_sample_value("frames_total", {"direction": "in"}) == 3
    assert reg.get_sample_value("bits_total") == 192
    text = generate_latest(reg).decode()
    assert "# TYPE frames_total counter" in text and "# TYPE bits_total counter" in text
    # Same names as prometheus_client's Counter gives.
    theirs = CollectorRegistry()
    ClientCounter("frames_total", "doc", ["direction"], registry=theirs).labels("in").inc(3)
    assert theirs.get_sample_value("frames_total", {"direction": "in"}) == 3


def test_a_name_is_registered_once_and_label_arity_is_checked() -> None:
    reg = CollectorRegistry()
    h = Histogram("y_seconds", "doc", ["a", "b"], buckets=BUCKETS, registry=reg)
    with pytest.raises(ValueError, match="Duplicated"):
        Histogram("y_seconds", "doc", buckets=BUCKETS, registry=reg)
    with pytest.raises(ValueError, match="takes labels"):
        h.labels("only-one")
    with pytest.raises(ValueError, match="finite bucket"):
        Histogram("z_seconds", "doc", buckets=(float("inf"),), registry=reg)


def test_gauge_exposition_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = Gauge("vms", "doc", ["host"], registry=ours)
    ref = ClientGauge("vms", "doc", ["host"], registry=theirs)
    for g in (fast, ref):
        g.labels("a").set(3)
        g.labels("a").inc(2)
        g.labels("b").dec()
    for host in ("a", "b"):
        assert ours.get_sample_value("vms", {"host": host}) == \
            theirs.get_sample_value("vms", {"host": host})
    solo = Gauge("in_flight", "doc", registry=ours)
    solo.set_function(lambda: 7)
    assert ours.get_sample_value("in_flight") == 7


def test_initialised_children_are_exported_as_zero_and_removed_ones_are_gone() -> None:
    reg = CollectorRegistry()
    c = Counter("fallbacks_total", "doc", ["reason"], registry=reg)
    c.initialise(["deadline", "disconnected"])
    assert reg.get_sample_value("fallbacks_total", {"reason": "deadline"}) == 0
    assert reg.get_sample_value("fallbacks_total", {"reason": "disconnected"}) == 0
    g = Gauge("shared_bytes", "doc", ["host", "vm"], registry=reg)
    g.labels("h", "v").set(4096)
    g.remove("h", "v")
    g.remove("h", "never-set")  # absent: nothing to do
    assert reg.get_sample_value("shared_bytes", {"host": "h", "vm": "v"}) is None


def test_a_family_is_exported_only_by_the_registries_that_take_its_set() -> None:
    from hyperbroker.runtime.metrics import MetricSet, process_registry

    ours, theirs = MetricSet("ours"), MetricSet("theirs")
    Counter("ours_total", "doc", registry=ours).inc()
    Gauge("theirs", "doc", registry=theirs).set(1)
    with pytest.raises(ValueError, match="Duplicated metric family ours in the ours set"):
        Counter("ours_total", "doc", registry=ours)
    text = generate_latest(process_registry(ours)).decode()
    assert "ours_total 1.0" in text and "theirs" not in text
    assert "process_cpu_seconds_total" in text  # prometheus_client's own, in every process
    clash = MetricSet("clash")
    Counter("ours_total", "doc", registry=clash)
    with pytest.raises(ValueError, match="Duplicated"):
        process_registry(ours, clash)
