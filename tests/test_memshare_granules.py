"""GranuleSet, the range-compressed record of shared granules, checked against a plain set."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hyperbroker.handlers.memshare.granules import GranuleSet

G = 4096

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 63)), max_size=80)


def invariant(s: GranuleSet) -> None:
    for (a, b), (c, d) in zip(s.ranges, s.ranges[1:], strict=False):
        assert a < b < c < d  # sorted, disjoint, never touching (else they would be merged)


@given(ops)
def test_granule_set_behaves_like_a_set_of_granules(steps: list[tuple[bool, int]]) -> None:
    model: set[int] = set()
    s = GranuleSet()
    for add, n in steps:
        if add and n not in model:
            s = s.add(n * G, (n + 1) * G)
            model.add(n)
        elif not add and n in model:
            s = s.remove(n * G, (n + 1) * G)
            model.discard(n)
        invariant(s)
        assert s.size == len(model) * G
        assert {n for n in range(64) if n * G in s} == model
        assert {n for n in range(64) if s.intersects(n * G, (n + 1) * G)} == model


@given(ops)
def test_granule_set_json_round_trips(steps: list[tuple[bool, int]]) -> None:
    s = GranuleSet()
    for add, n in steps:
        if add and n * G not in s:
            s = s.add(n * G, (n + 1) * G)
    assert GranuleSet.from_json(s.to_json()) == s


def test_a_contiguous_run_is_one_range() -> None:
    s = GranuleSet()
    for n in range(1000):
        s = s.add(n * G, (n + 1) * G)
    assert s.ranges == ((0, 1000 * G),)
