"""Latency on the real bed: guest-observed round trips of forwarded calls (median of 1000)
next to the in-L1 round trip of a call the VMM answers itself (issue 3 item 4). The figures go
to .cache/kvm-bed/latency.{json,md}; docs/performance.md carries a recorded run.
"""

from __future__ import annotations

import sys

import pytest

from hyperbroker_tools import kvm_bed

from .conftest import MainRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_latency_of_forwarded_calls_next_to_the_vmm_answering_itself(
    main_run: MainRun,
) -> None:
    fig = kvm_bed.latency_figures(main_run.result)
    print("\n" + kvm_bed.latency_markdown(fig, main_run.artifacts.kernel), file=sys.stderr)
    for samples in (fig.broker, fig.agent_static, fig.local, fig.link):
        assert samples.n >= 1000
        assert 0 < samples.min_ns <= samples.median_ns <= samples.p90_ns <= samples.max_ns
    # Leaving L1 costs a link round trip on top of the exit itself.
    assert fig.local.median_ns < fig.agent_static.median_ns
    assert fig.local.median_ns < fig.broker.median_ns
    assert (kvm_bed.cache_dir() / "latency.md").exists()
    for guest in ("latency",):
        assert all(r.ok and r.link_failures == 0 for r in main_run.result.runs
                   if r.guest == guest)
