"""broker.kernel_filter: the model of kvm_smccc_set_filter() answers as KVM does.

Every case of the kernel selftest tools/testing/selftests/kvm/arm64/smccc_filter.c
(tools/testing/selftests/kvm/arm64/smccc_filter.c, rows 1-8), plus what the selftest leaves out but
the code and the real-KVM bed show (tests/kvm_bed/conftest.py FILTER_TABLE)."""

from __future__ import annotations

import errno

from hypothesis import given
from hypothesis import strategies as st

from hyperbroker.broker.kernel_filter import KernelFilterModel
from hyperbroker.kvm import FilterAction, SmcccFilter, errno_name
from hyperbroker.smccc import RESERVED_ARCH_RANGES

PSCI_VERSION = 0x8400_0000  # PSCI_0_2_FN_PSCI_VERSION
PSCI_CPU_ON_64 = 0xC400_0003  # PSCI_0_2_FN64_CPU_ON
ARCH_WORKAROUND_1 = 0x8000_8000
SMC64_ARCH_BASE = 0xC000_0000  # ARM_SMCCC_CALL_VAL(FAST, SMC_64, 0, 0)


def deny(base: int, nr: int = 1, pad: bytes = bytes(15)) -> SmcccFilter:
    return SmcccFilter(base, nr, FilterAction.DENY, pad)


# --- the selftest's eight cases -------------------------------------------------------


def test_selftest_1_pad_must_be_zero() -> None:
    model = KernelFilterModel()
    assert model.set_filter(deny(PSCI_VERSION, pad=b"\xff" + bytes(14))) == errno.EINVAL


def test_selftest_2_zero_nr_functions_is_invalid() -> None:
    assert KernelFilterModel().set_filter(deny(PSCI_CPU_ON_64, nr=0)) == errno.EINVAL


def test_selftest_3_overflowing_range_is_invalid() -> None:
    assert KernelFilterModel().set_filter(deny(0xFFFF_FFFF, nr=0xFFFF_FFFF)) == errno.EINVAL


def test_selftest_4_reserved_action_is_invalid() -> None:
    record = SmcccFilter(PSCI_CPU_ON_64, 1, 0xFF)  # action = -1 as a __u8
    assert KernelFilterModel().set_filter(record) == errno.EINVAL


def test_selftest_4_first_action_past_the_enum_is_invalid() -> None:
    record = SmcccFilter(PSCI_CPU_ON_64, 1, 3)  # NR_SMCCC_FILTER_ACTIONS
    assert KernelFilterModel().set_filter(record) == errno.EINVAL


def test_selftest_5a_smc32_arch_range_is_reserved_on_a_fresh_vm() -> None:
    assert KernelFilterModel().set_filter(deny(ARCH_WORKAROUND_1)) == errno.EEXIST


def test_selftest_5b_smc64_arch_range_is_reserved_on_a_fresh_vm() -> None:
    assert KernelFilterModel().set_filter(deny(SMC64_ARCH_BASE)) == errno.EEXIST


def test_selftest_6_the_same_range_twice_is_eexist() -> None:
    model = KernelFilterModel()
    assert model.set_filter(deny(PSCI_CPU_ON_64)) == 0
    assert model.set_filter(deny(PSCI_CPU_ON_64)) == errno.EEXIST


def test_selftest_7_a_denied_function_is_denied_though_the_kernel_implements_it() -> None:
    model = KernelFilterModel()
    assert model.set_filter(deny(PSCI_VERSION)) == 0
    assert model.action_for(PSCI_VERSION) is FilterAction.DENY


def test_selftest_8_a_forwarded_function_exits_to_userspace() -> None:
    model = KernelFilterModel()
    assert model.set_filter(SmcccFilter(PSCI_VERSION, 1, FilterAction.FWD_TO_USER)) == 0
    assert model.action_for(PSCI_VERSION) is FilterAction.FWD_TO_USER


# --- beyond the selftest (lab table) ---------------------------------------------


def test_a_filter_written_after_a_vcpu_ran_is_ebusy() -> None:
    model = KernelFilterModel()
    assert model.set_filter(deny(PSCI_VERSION)) == 0
    model.mark_ran()
    assert model.set_filter(deny(PSCI_CPU_ON_64)) == errno.EBUSY


def test_ebusy_comes_after_the_einval_checks() -> None:
    # Pad and range/action checks (step 2, 3) precede the has-run check (step 4).
    model = KernelFilterModel()
    model.mark_ran()
    assert model.set_filter(deny(PSCI_VERSION, nr=0)) == errno.EINVAL
    assert model.set_filter(deny(ARCH_WORKAROUND_1)) == errno.EBUSY


def test_base_zero_nr_zero_is_the_whole_space_and_eexist() -> None:
    # u32 end = 0 + 0 - 1 = 0xFFFFFFFF is not below start: the whole space, which hits reserved.
    assert KernelFilterModel().set_filter(deny(0, nr=0)) == errno.EEXIST


def test_a_partial_overlap_and_a_sub_range_are_eexist() -> None:
    model = KernelFilterModel()
    assert model.set_filter(SmcccFilter(0x8400_0060, 0xA0, FilterAction.FWD_TO_USER)) == 0
    assert model.set_filter(deny(0x8400_0050, 0x20)) == errno.EEXIST
    assert model.set_filter(deny(0x8400_0070)) == errno.EEXIST
    assert model.set_filter(deny(0x8400_00FF, 2)) == errno.EEXIST


def test_adjacent_ranges_are_both_accepted() -> None:
    model = KernelFilterModel()
    assert model.set_filter(deny(0x8400_0050, 0x10)) == 0
    assert model.set_filter(deny(0x8400_0060, 0x10)) == 0
    assert model.set_filter(deny(0x8400_0040, 0x10)) == 0


def test_ranges_touching_the_reserved_edges_are_eexist_and_beside_them_are_accepted() -> None:
    model = KernelFilterModel()
    for reserved in RESERVED_ARCH_RANGES:
        assert model.set_filter(deny(reserved.base - 1, 2)) == errno.EEXIST
        assert model.set_filter(deny(reserved.last, 2)) == errno.EEXIST
        assert model.set_filter(deny(reserved.base - 1)) == 0
        assert model.set_filter(deny(reserved.end)) == 0


def test_a_range_ending_at_the_last_id_is_valid() -> None:
    assert KernelFilterModel().set_filter(deny(0xFFFF_FF00, 0x100)) == 0


def test_reserved_ranges_stay_after_a_failed_first_insert() -> None:
    # Step 5 inserts them before step 6 fails; the tree is no longer empty.
    model = KernelFilterModel()
    assert model.set_filter(deny(ARCH_WORKAROUND_1)) == errno.EEXIST
    assert [(e.first, e.last, e.reserved) for e in model.entries] == [
        (0x8000_0000, 0x8000_FFFF, True),
        (0xC000_0000, 0xC000_FFFF, True),
    ]


def test_an_einval_record_does_not_insert_the_reserved_ranges() -> None:
    model = KernelFilterModel()
    assert model.set_filter(deny(PSCI_VERSION, nr=0)) == errno.EINVAL
    assert model.entries == ()


def test_lookup_without_any_filter_or_on_a_miss_is_handle() -> None:
    model = KernelFilterModel()
    assert model.action_for(PSCI_VERSION) is FilterAction.HANDLE
    assert model.set_filter(deny(PSCI_CPU_ON_64)) == 0
    assert model.action_for(PSCI_VERSION) is FilterAction.HANDLE
    assert model.action_for(0x8000_0000) is FilterAction.HANDLE  # reserved entries are HANDLE


def test_errno_names() -> None:
    assert [errno_name(e) for e in (0, errno.EINVAL, errno.EEXIST, errno.EBUSY)] == [
        "OK", "EINVAL", "EEXIST", "EBUSY",
    ]


# --- property: the model against a brute-force reading of kvm_smccc_set_filter() -------------

_u32 = st.integers(0, 0xFFFF_FFFF)
_near = st.sampled_from([0, 0x8000_0000, 0x8001_0000, 0xC000_0000, 0xC001_0000, 0xFFFF_FFF0])
_bases = st.one_of(_u32, st.builds(lambda a, d: (a + d) & 0xFFFF_FFFF, _near, st.integers(-8, 8)))
_records = st.builds(
    SmcccFilter,
    _bases,
    st.one_of(st.integers(0, 12), _u32),
    st.sampled_from([0, 1, 2, 3, 0xFF]),
    st.sampled_from([bytes(15), b"\x01" + bytes(14)]),
)


@given(st.lists(_records, max_size=12))
def test_the_model_inserts_exactly_the_valid_records_that_overlap_nothing(
    records: list[SmcccFilter],
) -> None:
    model = KernelFilterModel()
    taken: list[tuple[int, int]] = []
    for record in records:
        first = record.base
        last = (first + record.nr_functions - 1) & 0xFFFF_FFFF
        if any(record.pad) or last < first or record.action >= 3:
            expected = errno.EINVAL
        else:
            if not taken:
                taken = [(r.base, r.last) for r in RESERVED_ARCH_RANGES]
            clash = any(first <= t_last and t_first <= last for t_first, t_last in taken)
            expected = errno.EEXIST if clash else 0
            if not clash:
                taken.append((first, last))
        assert model.set_filter(record) == expected
    spans = [(e.first, e.last) for e in model.entries]
    assert spans == sorted(taken)
