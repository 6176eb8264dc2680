"""Property tests: the range arithmetic the policy engine stands on, and "one table, two sources".

hyperbroker.smccc's FunctionRange.overlaps/covers, merge_ranges and subtract_ranges are checked
as the spec (sets of IDs), exhaustively on a small ID space and structurally on the 32-bit one.
Then the policy engine and the kernel model (broker.kernel_filter) must agree: a set of records
is accepted by the policy exactly when KVM would install every one of them
(arch/arm64/kvm/hypercalls.c).
"""

from __future__ import annotations

import errno
import itertools

import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hyperbroker.broker.kernel_filter import KernelFilterModel
from hyperbroker.broker.policy import PolicyInvalid, load_policy
from hyperbroker.kvm import FilterAction, SmcccFilter, errno_name
from hyperbroker.smccc import RESERVED_ARCH_RANGES, FunctionRange, merge_ranges, subtract_ranges

SMALL = 64  # the small ID space [0, SMALL) where ranges can be compared as Python sets

small_ranges = st.builds(
    lambda base, count: FunctionRange(base, min(count, SMALL - base)),
    st.integers(0, SMALL - 1), st.integers(1, 16),
)
u32_ranges = st.integers(0, 0xFFFF_FFFF).flatmap(
    lambda base: st.builds(FunctionRange, st.just(base), st.integers(1, (1 << 32) - base))
)


def ids(r: FunctionRange) -> set[int]:
    return set(range(r.base, r.end))


def union(ranges: list[FunctionRange]) -> set[int]:
    return set().union(*(ids(r) for r in ranges))


def assert_sorted_disjoint_non_adjacent(ranges: list[FunctionRange]) -> None:
    assert all(r.count > 0 for r in ranges)
    for a, b in itertools.pairwise(ranges):
        assert a.end < b.base  # strictly: adjacent ranges would have been merged


@given(small_ranges, small_ranges)
def test_overlaps_is_set_intersection(a: FunctionRange, b: FunctionRange) -> None:
    assert a.overlaps(b) == bool(ids(a) & ids(b)) == b.overlaps(a)


@given(small_ranges, small_ranges)
def test_covers_is_set_inclusion(a: FunctionRange, b: FunctionRange) -> None:
    assert a.covers(b) == (ids(b) <= ids(a))


@given(st.lists(small_ranges, max_size=10))
def test_merge_ranges_preserves_the_union_exactly(ranges: list[FunctionRange]) -> None:
    merged = merge_ranges(ranges)
    assert union(merged) == union(ranges)
    assert_sorted_disjoint_non_adjacent(merged)


@given(st.lists(u32_ranges, max_size=10))
def test_merge_ranges_on_the_u32_space(ranges: list[FunctionRange]) -> None:
    merged = merge_ranges(ranges)
    assert_sorted_disjoint_non_adjacent(merged)
    # Every input lies inside one output, and every output starts and ends where an input does.
    for r in ranges:
        assert sum(m.covers(r) for m in merged) == 1
    for m in merged:
        assert any(r.base == m.base for r in ranges) and any(r.end == m.end for r in ranges)
    assert merge_ranges(merged) == merged


@given(small_ranges, st.lists(small_ranges, max_size=8))
def test_subtract_ranges_is_set_difference_in_order(
    whole: FunctionRange, parts: list[FunctionRange],
) -> None:
    pieces = list(subtract_ranges(whole, parts))
    assert union(pieces) == ids(whole) - union(parts)
    assert_sorted_disjoint_non_adjacent(pieces)


@given(u32_ranges, st.lists(u32_ranges, max_size=8))
def test_subtract_ranges_on_the_u32_space(whole: FunctionRange, parts: list[FunctionRange]) -> None:
    pieces = list(subtract_ranges(whole, parts))
    assert_sorted_disjoint_non_adjacent(pieces)
    for piece in pieces:
        assert whole.covers(piece) and not any(piece.overlaps(p) for p in parts)
    # What is left plus what the parts take of `whole` is `whole`, with nothing counted twice.
    taken = [FunctionRange(max(whole.base, p.base), min(whole.end, p.end) - max(whole.base, p.base))
             for p in merge_ranges(parts) if p.overlaps(whole)]
    assert sum(r.count for r in pieces) + sum(r.count for r in taken) == whole.count


# --- the policy accepts exactly what the kernel model accepts ---------------------------------

_edges = [0, 0x7FFF_FFF8, 0x8000_0000, 0x8001_0000, 0xBFFF_FFF8, 0xC000_0000, 0xC001_0000,
          0x8400_0050, 0xFFFF_FFF0]
_bases = st.one_of(
    st.integers(0, 0xFFFF_FFFF),
    st.builds(lambda e, d: min(max(e + d, 0), 0xFFFF_FFFF), st.sampled_from(_edges),
              st.integers(-12, 12)),
)
# Mostly small counts, so that many generated sets are valid and the accepting side is exercised.
_counts = st.one_of(*[st.integers(1, 24)] * 4, st.just(0), st.integers(0, 0xFFFF_FFFF))
_raw_ranges = st.lists(st.tuples(_bases, _counts), max_size=6)


def _policy_errnos(rules: list[dict[str, object]]) -> set[str] | None:
    text = yaml.safe_dump({"profiles": {"default": {"rules": rules}}})
    try:
        load_policy(text, {})
    except PolicyInvalid as refused:
        return {e.errno_name for e in refused.errors}
    return None


def _model_errnos(raw: list[tuple[int, int]]) -> set[str]:
    model = KernelFilterModel()
    answers = {model.set_filter(SmcccFilter(b, n, FilterAction.DENY)) for b, n in raw}
    return {errno_name(e) for e in answers if e}


@settings(deadline=None)  # each example parses YAML; the shared CI box may be slow
@given(_raw_ranges)
def test_one_deny_rule_per_record_is_accepted_exactly_when_the_kernel_takes_them_all(
    raw: list[tuple[int, int]],
) -> None:
    rules: list[dict[str, object]] = [
        {"name": f"r{i}", "ranges": [{"base": b, "count": n}], "action": "deny"}
        for i, (b, n) in enumerate(raw)
    ]
    policy = _policy_errnos(rules)
    model = _model_errnos(raw)
    event("accepted" if policy is None else "refused")
    assert (policy is None) == (not model)
    if policy is not None:
        # Each errno KVM answers is one the policy names (the policy finds every clash, KVM only
        # the ones against what it already holds).
        assert model <= policy


@settings(deadline=None)  # each example parses YAML; the shared CI box may be slow
@given(_raw_ranges)
def test_one_rule_holding_every_range_agrees_with_the_kernel_too(
    raw: list[tuple[int, int]],
) -> None:
    rules: list[dict[str, object]] = [
        {"name": "all", "ranges": [{"base": b, "count": n} for b, n in raw], "action": "deny"}
    ] if raw else []
    policy = _policy_errnos(rules)
    assert (policy is None) == (not _model_errnos(raw))


@settings(deadline=None)  # each example parses YAML; the shared CI box may be slow
@given(_raw_ranges)
def test_an_accepted_policy_compiles_to_records_the_model_installs(
    raw: list[tuple[int, int]],
) -> None:
    rules = [{"name": f"r{i}", "ranges": [{"base": b, "count": n}], "action": "deny"}
             for i, (b, n) in enumerate(raw)]
    try:
        policy = load_policy(yaml.safe_dump({"profiles": {"default": {"rules": rules}}}), {})
    except PolicyInvalid:
        return
    model = KernelFilterModel()
    for record, _ in policy.profiles["default"].kernel_filter:
        assert model.set_filter(record) == 0
    for r in RESERVED_ARCH_RANGES:
        assert model.set_filter(SmcccFilter(r.base, 1, FilterAction.DENY)) == errno.EEXIST
