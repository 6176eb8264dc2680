"""hyperbroker.fastmetrics exposes what prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from hyperbroker.runtime.metrics import FastCounter, FastHistogram

BUCKETS = (10e-6, 25e-6, 100e-6, 1e-3, 1.0)
# On, between and beyond the bounds, and negative: each must land where Histogram puts it.
VALUES = [0.0, 5e-6, 10e-6, 10.000001e-6, 25e-6, 99e-6, 100e-6, 2e-3, 1.0, 1.5, 1e9, -1.0]


def test_histogram_exposition_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("x_seconds", "doc", ["a"], buckets=BUCKETS, registry=ours)
    ref = Histogram("x_seconds", "doc", ["a"], buckets=BUCKETS, registry=theirs)
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
    labelled = FastCounter("frames_total", "doc", ["direction"], registry=reg)
    solo = FastCounter("bits_total", "doc", registry=reg)
    labelled.labels("in").inc()
    labelled.labels("in").inc(2)
    solo.inc(192)
    assert reg.get_sample_value("frames_total", {"direction": "in"}) == 3
    assert reg.get_sample_value("bits_total") == 192
    text = generate_latest(reg).decode()
    assert "# TYPE frames_total counter" in text and "# TYPE bits_total counter" in text
    # Same names as prometheus_client's Counter gives.
    theirs = CollectorRegistry()
    Counter("frames_total", "doc", ["direction"], registry=theirs).labels("in").inc(3)
    assert theirs.get_sample_value("frames_total", {"direction": "in"}) == 3


def test_a_name_is_registered_once_and_label_arity_is_checked() -> None:
    reg = CollectorRegistry()
    h = FastHistogram("y_seconds", "doc", ["a", "b"], buckets=BUCKETS, registry=reg)
    with pytest.raises(ValueError, match="Duplicated"):
        FastHistogram("y_seconds", "doc", buckets=BUCKETS, registry=reg)
    with pytest.raises(ValueError, match="takes labels"):
        h.labels("only-one")
    with pytest.raises(ValueError, match="finite bucket"):
        FastHistogram("z_seconds", "doc", buckets=(float("inf"),), registry=reg)
