"""The log limiter (hyperbroker.runtime.loglimit): token buckets per peer, a bounded table, one
summary per window. Driven with an explicit clock; no sleeping."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperbroker.runtime.loglimit import OVERFLOW, Limiter, LogBudget, PeerLog, Summary


def test_a_quiet_peer_gets_its_burst_then_nothing() -> None:
    b = LogBudget(burst=3, rate_per_s=1.0, summary_s=10.0)
    assert [b.admit("p", 0.0) for _ in range(5)] == [True, True, True, False, False]


def test_the_bucket_refills_at_its_rate() -> None:
    b = LogBudget(burst=2, rate_per_s=0.5, summary_s=10.0)
    assert b.admit("p", 0.0) and b.admit("p", 0.0) and not b.admit("p", 0.0)
    assert not b.admit("p", 1.0)  # half a token
    assert b.admit("p", 2.0)  # a whole one
    assert b.admit("p", 100.0) and b.admit("p", 100.0) and not b.admit("p", 100.0)  # capped


def test_peers_have_buckets_of_their_own() -> None:
    b = LogBudget(burst=1, rate_per_s=0.0, summary_s=10.0)
    assert b.admit("a", 0.0) and not b.admit("a", 0.0)
    assert b.admit("b", 0.0)


def test_the_summary_counts_what_was_held_back_once_its_window_ends() -> None:
    b = LogBudget(burst=1, rate_per_s=0.0, summary_s=10.0)
    b.admit("p", 0.0)
    for t in range(1, 8):
        assert not b.admit("p", float(t))
    assert b.next_due() == 11.0  # the first held-back line opened the window
    assert b.due(10.9) == []
    assert b.due(11.0) == [Summary("p", 7, 10.0)]
    assert b.due(100.0) == [] and b.next_due() is None
    assert not b.admit("p", 101.0)  # still out of tokens: a new window
    assert b.due(111.0) == [Summary("p", 1, 10.0)]


def test_summaries_come_in_the_order_their_windows_end() -> None:
    b = LogBudget(burst=1, rate_per_s=0.0, summary_s=5.0)
    for peer, t in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        b.admit(peer, t)
        b.admit(peer, t)
    assert [s.peer for s in b.due(6.5)] == ["a", "b"]
    assert [s.peer for s in b.pending()] == ["c"]


def test_the_table_never_grows_past_its_bound() -> None:
    b = LogBudget(burst=2, rate_per_s=0.0, summary_s=5.0, max_peers=16)
    for i in range(10_000):
        b.admit(f"ipv4:10.0.{i // 256}.{i % 256}", float(i))
    assert len(b) <= 16


def test_a_quiet_peer_is_forgotten_to_make_room() -> None:
    b = LogBudget(burst=2, rate_per_s=1.0, summary_s=5.0, max_peers=2)
    b.admit("a", 0.0)
    b.admit("b", 0.0)
    assert b.admit("c", 10.0)  # "a" has refilled: its bucket is as good as new
    assert len(b) == 2


def test_when_no_peer_is_quiet_newcomers_share_one_bucket() -> None:
    b = LogBudget(burst=1, rate_per_s=0.0, summary_s=5.0, max_peers=2)
    b.admit("a", 0.0)
    b.admit("b", 0.0)
    assert b.admit("c", 0.0)  # the overflow bucket's one token
    assert not b.admit("d", 0.0) and not b.admit("e", 0.0)
    assert b.due(5.0) == [Summary(OVERFLOW, 2, 5.0)]
    assert len(b) == 2


@pytest.mark.parametrize("bad", [dict(burst=0), dict(rate_per_s=-1), dict(summary_s=0),
                                 dict(max_peers=0)])
def test_nonsense_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LogBudget(**bad)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0.0, 3.0)), max_size=400))
def test_every_line_is_written_or_summarised_and_writes_stay_within_the_rate(
        events: list[tuple[int, float]]) -> None:
    burst, rate = 3, 0.5
    b = LogBudget(burst=burst, rate_per_s=rate, summary_s=4.0, max_peers=4)
    now = 0.0
    written: dict[str, int] = {}
    held = 0
    for peer_no, dt in events:
        now += dt
        for s in b.due(now):
            held += s.held
        if b.admit(f"p{peer_no}", now):
            written[f"p{peer_no}"] = written.get(f"p{peer_no}", 0) + 1
    held += sum(s.held for s in b.pending())
    assert sum(written.values()) + held == len(events)
    # Each name's own bucket (a forgotten one was full, as good as new), and the overflow
    # bucket, write at most a burst plus what the rate refilled.
    assert sum(written.values()) <= (6 + 1) * (burst + rate * now)
    assert len(b) <= 4


def test_the_strict_rate_bound_for_one_peer() -> None:
    b = LogBudget(burst=10, rate_per_s=0.2, summary_s=30.0)
    written = sum(b.admit("flood", t / 1000) for t in range(60_000))  # 1000 lines/s, 60 s
    assert written <= 10 + 0.2 * 60 + 1


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_peer_log_names_the_peer_and_summarises(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = PeerLog(logging.getLogger("hyperbroker.test.peers"),
                  Limiter(LogBudget(burst=2, rate_per_s=0.0, summary_s=10.0), clock))
    with caplog.at_level(logging.INFO, "hyperbroker.test.peers"):
        for i in range(500):
            log.warning("ipv4:10.1.2.3", "bad frame %d", i)
        clock.t = 11.0
        log.warning("vmm pid 7", "another peer's first line")  # writes what is due first
    assert [r.getMessage() for r in caplog.records] == [
        "ipv4:10.1.2.3: bad frame 0", "ipv4:10.1.2.3: bad frame 1",
        "ipv4:10.1.2.3: suppressed 498 similar messages in the last 10 s",
        "vmm pid 7: another peer's first line"]


def test_a_disabled_level_costs_no_token(caplog: pytest.LogCaptureFixture) -> None:
    log = PeerLog(logging.getLogger("hyperbroker.test.levels"),
                  Limiter(LogBudget(burst=1, rate_per_s=0.0), FakeClock()))
    with caplog.at_level(logging.WARNING, "hyperbroker.test.levels"):
        assert not log.info("p", "not at this level")
        assert log.warning("p", "written")


def test_flush_writes_what_is_pending(caplog: pytest.LogCaptureFixture) -> None:
    limiter = Limiter(LogBudget(burst=1, rate_per_s=0.0, summary_s=60.0), FakeClock())
    log = PeerLog(logging.getLogger("hyperbroker.test.flush"), limiter)
    with caplog.at_level(logging.INFO, "hyperbroker.test.flush"):
        for _ in range(4):
            log.error("host h", "x")
        limiter.flush()
    assert caplog.messages == ["host h: x", "host h: suppressed 3 similar messages in the last "
                                            "60 s"]


async def test_on_an_event_loop_the_summary_comes_by_itself() -> None:
    lines: list[str] = []
    summarised = asyncio.Event()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if "suppressed" in record.getMessage():
                summarised.set()

    logger = logging.getLogger("hyperbroker.test.timer")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    log = PeerLog(logger, Limiter(LogBudget(burst=1, rate_per_s=0.0, summary_s=0.05)))
    for _ in range(3):
        log.warning("p", "flood")
    await asyncio.wait_for(summarised.wait(), 30)  # no further line: the loop's timer wrote it
    assert lines == ["p: flood", "p: suppressed 2 similar messages in the last 0.05 s"]
