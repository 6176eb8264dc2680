"""KVM arm64 uapi (hyperbroker.kvm) and the SMCCC vocabulary (hyperbroker.smccc).

Every expected value here is quoted from /work/Documentation/virt/kvm/devices/vm.rst and
arch/arm64/kvm/hypercalls.c (section in the comment) or computed from the macros it quotes, never
from the module under test."""

from __future__ import annotations

import errno
import itertools
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperbroker import kvm, smccc
from hyperbroker.broker.policy.abis import AbiCatalog
from hyperbroker.handlers.api import discover_plugins
from hyperbroker.kvm import FilterAction, SmcccFilter, filter_errno
from hyperbroker.smccc import FunctionRange

CATALOG = AbiCatalog.from_plugins(discover_plugins())
NAMED = CATALOG.ranges
NAMES = CATALOG.names

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFF_FFFF)

# ---- struct kvm_smccc_filter -------------------------------------------------------------


def test_smccc_filter_is_24_bytes() -> None:
    assert kvm.SMCCC_FILTER.size == 24
    assert len(SmcccFilter(0, 1, 1).pack()) == 24


def test_smccc_filter_packs_base_nr_action_pad_at_0_4_8_9() -> None:
    raw = SmcccFilter(0x8400_0050, 0x10, FilterAction.FWD_TO_USER, bytes(range(1, 16))).pack()
    assert raw[0:4] == (0x8400_0050).to_bytes(4, "little")
    assert raw[4:8] == (0x10).to_bytes(4, "little")
    assert raw[8] == 2
    assert raw[9:24] == bytes(range(1, 16))


def test_smccc_filter_pad_defaults_to_fifteen_zero_bytes() -> None:
    assert SmcccFilter(0, 1, 1).pad == bytes(15)


@given(u32, u32, u8, st.binary(min_size=15, max_size=15))
def test_smccc_filter_round_trips(base: int, nr: int, action: int, pad: bytes) -> None:
    record = SmcccFilter(base, nr, action, pad)
    assert SmcccFilter.unpack(record.pack()) == record


def test_filter_actions_are_kvms_enum() -> None:
    # Enum kvm_smccc_filter_action; NR_SMCCC_FILTER_ACTIONS = 3 (kernel-only).
    assert (FilterAction.HANDLE, FilterAction.DENY, FilterAction.FWD_TO_USER) == (0, 1, 2)
    assert kvm.NR_SMCCC_FILTER_ACTIONS == 3


def test_smccc_ctrl_group_and_filter_attr_are_zero() -> None:
    assert (kvm.KVM_ARM_VM_SMCCC_CTRL, kvm.KVM_ARM_VM_SMCCC_FILTER) == (0, 0)


def test_hypercall_exit_reason_and_flags() -> None:
    # KVM_HYPERCALL_EXIT_SMC (1U << 0), _16BIT (1U << 1); KVM_EXIT_HYPERCALL = 3.
    assert (kvm.KVM_EXIT_HYPERCALL, kvm.KVM_HYPERCALL_EXIT_SMC, kvm.KVM_HYPERCALL_EXIT_16BIT) == (
        3, 1, 2,
    )


# ---- filter_errno: kvm_smccc_set_filter()'s checks, in the kernel's order ----------------


def test_valid_record_has_no_errno() -> None:
    assert filter_errno(SmcccFilter(0x8400_0050, 0x10, FilterAction.FWD_TO_USER)) == 0


def test_non_zero_pad_is_einval() -> None:
    # Case 1: base=PSCI_VERSION, nr=1, DENY, pad[0]=0xFF.
    pad = b"\xff" + bytes(14)
    assert filter_errno(SmcccFilter(0x8400_0000, 1, FilterAction.DENY, pad)) == errno.EINVAL


@pytest.mark.parametrize("index", range(15))
def test_any_non_zero_pad_byte_is_einval(index: int) -> None:
    pad = bytes(index) + b"\x01" + bytes(14 - index)
    assert filter_errno(SmcccFilter(0x8400_0000, 1, FilterAction.DENY, pad)) == errno.EINVAL


def test_pad_is_checked_before_the_range() -> None:
    # Step 2 comes before step 3; both are EINVAL, so a record failing both is still EINVAL.
    record = SmcccFilter(0xFFFF_FFFF, 0xFFFF_FFFF, 0xFF, b"\x01" * 15)
    assert filter_errno(record) == errno.EINVAL


def test_zero_nr_functions_is_einval() -> None:
    # Case 2: base=0xC4000003, nr=0 -> end = start - 1 < start.
    assert filter_errno(SmcccFilter(0xC400_0003, 0, FilterAction.DENY)) == errno.EINVAL


def test_zero_nr_functions_at_base_zero_passes_this_check() -> None:
    # Edge case: base=0, nr=0 gives end=0xFFFFFFFF, not < start; the kernel then fails it
    # with EEXIST against the reserved ranges, which is beyond what filter_errno models.
    assert filter_errno(SmcccFilter(0, 0, FilterAction.DENY)) == 0


def test_wrapping_range_is_einval() -> None:
    # Case 3: base=~0, nr=~0.
    assert filter_errno(SmcccFilter(0xFFFF_FFFF, 0xFFFF_FFFF, FilterAction.DENY)) == errno.EINVAL


def test_range_ending_exactly_at_the_top_is_valid() -> None:
    assert filter_errno(SmcccFilter(0xFFFF_FFF0, 0x10, FilterAction.DENY)) == 0
    assert filter_errno(SmcccFilter(0xFFFF_FFF0, 0x11, FilterAction.DENY)) == errno.EINVAL


@pytest.mark.parametrize("action", [3, 4, 0x7F, 0xFF])
def test_reserved_action_is_einval(action: int) -> None:
    # Case 4: action=-1 as u8 (0xFF); anything >= NR_SMCCC_FILTER_ACTIONS.
    assert filter_errno(SmcccFilter(0xC400_0003, 1, action)) == errno.EINVAL


@pytest.mark.parametrize("action", list(FilterAction))
def test_every_defined_action_is_accepted(action: FilterAction) -> None:
    assert filter_errno(SmcccFilter(0xC400_0003, 1, action)) == 0


@given(u32, u32, u8)
def test_filter_errno_is_the_kernels_u32_arithmetic(base: int, nr: int, action: int) -> None:
    end = (base + nr - 1) % (1 << 32)
    expected = errno.EINVAL if end < base or action >= 3 else 0
    assert filter_errno(SmcccFilter(base, nr, action)) == expected


# ---- register IDs for KVM_GET/SET_ONE_REG (api.rst table) ---------------------------------


def test_core_reg_ids_match_the_api_rst_table() -> None:
    assert kvm.core_reg_x(0) == 0x6030_0000_0010_0000
    assert kvm.core_reg_x(1) == 0x6030_0000_0010_0002
    assert kvm.core_reg_x(17) == 0x6030_0000_0010_0022
    assert kvm.core_reg_x(30) == 0x6030_0000_0010_003C


def test_core_reg_x_is_base_plus_two_n() -> None:
    assert [kvm.core_reg_x(n) for n in range(31)] == [
        0x6030_0000_0010_0000 + 2 * n for n in range(31)
    ]


def test_pc_register_id() -> None:
    assert kvm.KVM_REG_PC == 0x6030_0000_0010_0040


@pytest.mark.parametrize("n", [-1, 31, 32])
def test_core_reg_x_refuses_registers_outside_x0_x30(n: int) -> None:
    with pytest.raises(ValueError):
        kvm.core_reg_x(n)


# ---- SMCCC function IDs (the Hyper-V TLFS as Linux's arch/arm64/hyperv/ and
# include/hyperv/hvgdk_mini.h use it) -----------------------------------------------


def test_call_value_builds_the_reference_ids() -> None:
    # ARM_SMCCC_CALL_VAL(type, cc, owner, fn), include/linux/arm-smccc.h.
    assert smccc.call_value(True, False, smccc.OWNER_STANDARD, 0) == 0x8400_0000  # PSCI_VERSION
    assert smccc.call_value(True, True, smccc.OWNER_STANDARD, 3) == 0xC400_0003  # CPU_ON 64
    assert smccc.call_value(True, False, smccc.OWNER_STANDARD, 0x50) == 0x8400_0050  # TRNG
    assert smccc.call_value(True, True, smccc.OWNER_STANDARD, 0x53) == 0xC400_0053  # RND64
    assert smccc.call_value(True, False, smccc.OWNER_VENDOR_HYP, 0xFF01) == 0x8600_FF01
    assert smccc.call_value(True, True, smccc.OWNER_STANDARD_HYP, 0x20) == 0xC500_0020  # PV time
    assert smccc.call_value(False, True, smccc.OWNER_VENDOR_HYP, 1) == 0x4600_0001  # HV_FUNC_ID
    assert smccc.call_value(True, False, 50, 0) == 0xB200_0000  # OP-TEE fast, owner 50
    assert smccc.call_value(True, False, 63, 0xFF01) == 0xBF00_FF01  # OP-TEE CALLS_UID


def test_call_value_masks_owner_and_number() -> None:
    assert smccc.call_value(False, False, 0x40 | 6, 0x1_0001) == 0x0600_0001


# (fid, fast, smc64, owner, number)
DECODED_IDS = [
    (0x8400_0000, True, False, 4, 0x00),  # PSCI_VERSION
    (0xC400_0003, True, True, 4, 0x03),  # PSCI CPU_ON SMC64
    (0x8400_0050, True, False, 4, 0x50),  # TRNG_VERSION
    (0xC400_0053, True, True, 4, 0x53),  # TRNG_RND64
    (0x8400_0063, True, False, 4, 0x63),  # FFA_VERSION
    (0xC400_0060, True, True, 4, 0x60),  # first FF-A SMC64 ID
    (0x4600_0001, False, True, 6, 0x01),  # Hyper-V HV_FUNC_ID: yielding, SMC64, vendor hyp
    (0xB200_0000, True, False, 50, 0x00),  # OP-TEE: Trusted OS owner 50
    (0xBF00_FF01, True, False, 63, 0xFF01),  # OP-TEE CALLS_UID: owner 63, Call UID 0xff01
    (0x8600_FF01, True, False, 6, 0xFF01),  # VENDOR_HYP_CALL_UID
    (0xC600_0040, True, True, 6, 0x40),  # DISCOVER_IMPL_VER
]


@pytest.mark.parametrize(("fid", "fast", "smc64", "owner", "number"), DECODED_IDS,
                         ids=[f"{d[0]:#010x}" for d in DECODED_IDS])
def test_function_id_fields(fid: int, fast: bool, smc64: bool, owner: int, number: int) -> None:
    assert smccc.is_fast(fid) is fast
    assert smccc.is_smc64(fid) is smc64
    assert smccc.owner(fid) == owner
    assert smccc.number(fid) == number
    assert smccc.call_value(fast, smc64, owner, number) == fid


@given(st.booleans(), st.booleans(), st.integers(0, 63), st.integers(0, 0xFFFF))
def test_call_value_and_field_accessors_are_inverse(
    fast: bool, smc64: bool, owner: int, number: int,
) -> None:
    fid = smccc.call_value(fast, smc64, owner, number)
    assert fid & smccc.MBZ_MASK == 0
    assert (smccc.is_fast(fid), smccc.is_smc64(fid), smccc.owner(fid), smccc.number(fid)) == (
        fast, smc64, owner, number,
    )


def test_return_codes_are_sign_extended_to_64_bits() -> None:
    # SMCCC_RET_*; a denied call leaves x0 = -1 (0xFFFF_FFFF_FFFF_FFFF),
    # arch/arm64/kvm/hypercalls.c.
    assert smccc.NOT_SUPPORTED_U64 == 0xFFFF_FFFF_FFFF_FFFF
    assert smccc.to_u64(smccc.RET_INVALID_PARAMETER) == 0xFFFF_FFFF_FFFF_FFFD
    assert smccc.to_s64(0xFFFF_FFFF_FFFF_FFFE) == smccc.RET_NOT_REQUIRED == -2
    assert smccc.to_s32(0xFFFF_FFFF) == -1


# ---- UUIDs in the SMCCC register convention (include/linux/arm-smccc.h,
# ARM_SMCCC_VENDOR_HYP_UID_HYPERV_REG_*) ------------------------


def test_uuid_to_regs_on_kvms_vendor_hyp_uid() -> None:
    kvm_uid = uuid.UUID("28b46fb6-2ec5-11e9-a9ca-4b564d003a74")
    assert smccc.uuid_to_regs(kvm_uid.bytes) == (0xB66FB428, 0xE911C52E, 0x564BCAA9, 0x743A004D)


def test_uuid_to_regs_on_hyper_v_uid() -> None:
    # UUID_INIT(0x58ba324d, 0x6447, 0x24cd, 0x75, 0x6c, 0xef, 0x8e, 0x24, 0x70, 0x59, 0x16).
    hyperv = uuid.UUID("58ba324d-6447-24cd-756c-ef8e24705916")
    assert smccc.uuid_to_regs(hyperv.bytes) == (0x4D32BA58, 0xCD244764, 0x8EEF6C75, 0x16597024)


@given(st.binary(min_size=16, max_size=16))
def test_uuid_to_regs_puts_byte_4r_in_bits_7_0_of_register_r(raw: bytes) -> None:
    regs = smccc.uuid_to_regs(raw)
    assert all(0 <= r <= 0xFFFF_FFFF for r in regs)
    assert bytes(b for r in regs for b in r.to_bytes(4, "little")) == raw  # smccc_res_to_uuid


@pytest.mark.parametrize("n", [0, 15, 17])
def test_uuid_to_regs_refuses_anything_but_16_bytes(n: int) -> None:
    with pytest.raises(ValueError):
        smccc.uuid_to_regs(bytes(n))


# ---- parse_function, default_function_name ------------------------------------------------------


@pytest.mark.parametrize(("text", "fid"), [
    ("PSCI_VERSION", 0x8400_0000),
    ("psci_cpu_on", 0x8400_0003),  # the SMC32 ID, as psci.h's PSCI_0_2_FN_CPU_ON
    ("psci_cpu_on64", 0xC400_0003),
    ("  TRNG_RND64 ", 0xC400_0053),
    ("HV_FUNC_ID", 0x4600_0001),
    ("smccc_arch_features", 0x8000_0001),
    ("0x84000050", 0x8400_0050),
    ("0XBF00FF01", 0xBF00_FF01),
    ("2214592512", 0x8400_0000),
    ("0", 0),
    ("0xffffffff", 0xFFFF_FFFF),
])
def test_parse_function_accepts_known_names_and_integer_literals(text: str, fid: int) -> None:
    assert smccc.parse_function(text, NAMES) == fid


def test_parse_function_alone_knows_only_the_arm_architecture_names() -> None:
    # Handler ABIs name their own functions: without them only SMCCC's own names resolve.
    assert smccc.parse_function("SMCCC_VERSION") == 0x8000_0000
    with pytest.raises(ValueError, match="unknown function"):
        smccc.parse_function("PSCI_VERSION")


@pytest.mark.parametrize("text", ["", "PSCI_FROB", "0x1_0000_0000", "-1", "0x", "84000000h"])
def test_parse_function_refuses_unknown_names_and_ids_beyond_32_bits(text: str) -> None:
    with pytest.raises(ValueError):
        smccc.parse_function(text)


def test_known_functions_agree_with_the_reference_ids() -> None:
    # The names the installed handlers declare, with SMCCC's own (arm-smccc.h, psci.h, DEN0098).
    known = {name: fid for fid, name in NAMES.items()}
    assert known["SMCCC_VERSION"] == 0x8000_0000
    assert known["SMCCC_ARCH_WORKAROUND_1"] == 0x8000_8000
    assert known["PSCI_CPU_ON64"] == 0xC400_0003
    assert known["PSCI_SYSTEM_RESET"] == 0x8400_0009
    assert known["TRNG_GET_UUID"] == 0x8400_0052
    assert known["VENDOR_HYP_CALL_UID"] == 0x8600_FF01
    assert known["OPTEE_CALLS_UID"] == 0xBF00_FF01
    assert all(0 <= fid <= 0xFFFF_FFFF for fid in known.values())
    assert smccc.parse_function("psci_cpu_on64", NAMES) == 0xC400_0003


# Every label default_function_name can give: one per (kind, width, owner) over the 64 owners.
EVERY_DEFAULT_NAME = {
    smccc.default_function_name(smccc.call_value(fast, smc64, own, 0))
    for fast, smc64, own in itertools.product((False, True), (False, True), range(64))
}


def test_default_function_names_are_fewer_than_64() -> None:
    assert len(EVERY_DEFAULT_NAME) < 64


@settings(max_examples=1000, deadline=None)
@given(u32)
def test_default_function_name_is_bounded(fid: int) -> None:
    # A metrics label: owner class, kind and width only; never the number or the MBZ bits.
    assert smccc.default_function_name(fid) in EVERY_DEFAULT_NAME


def test_default_function_name_says_owner_kind_and_width() -> None:
    assert smccc.default_function_name(0x8400_0050) == "std-fast32"
    assert smccc.default_function_name(0x4600_0001) == "vendor-hyp-yield64"
    assert smccc.default_function_name(0xB200_0000) == "trusted-os-fast32"
    assert smccc.default_function_name(0xB000_0000) == "trusted-app-fast32"
    assert smccc.default_function_name(0xC200_0001) == "sip-fast64"


@pytest.mark.parametrize("own", [7, 20, 47])
def test_default_function_name_does_not_call_reserved_owners_trusted_os(own: int) -> None:
    name = smccc.default_function_name(smccc.call_value(True, False, own, 1))
    assert not name.startswith("trusted-os")


# ---- the named ABIs: SMCCC service owners and what the installed handlers declare ------------


def all_named_ranges() -> list[tuple[str, FunctionRange]]:
    # vendor-hyp holds Hyper-V's and KVM's vendor services: one owner, one ABI name.
    return [(abi, r) for abi, ranges in NAMED.items() for r in ranges]


@pytest.mark.parametrize(("abi", "r"), all_named_ranges(), ids=lambda v: str(v))
def test_named_abi_range_is_valid(abi: str, r: FunctionRange) -> None:
    assert r.is_valid()
    # A filter record for it passes kvm_smccc_set_filter's own checks.
    assert filter_errno(SmcccFilter(r.base, r.count, FilterAction.FWD_TO_USER)) == 0


def test_named_abi_ranges_are_disjoint_across_and_within_abis() -> None:
    for (a, ra), (b, rb) in itertools.combinations(all_named_ranges(), 2):
        assert not ra.overlaps(rb), f"{a} {ra} overlaps {b} {rb}"


def test_named_abi_ranges_never_touch_the_reserved_arch_ranges() -> None:
    for abi, r in all_named_ranges():
        for reserved in smccc.RESERVED_ARCH_RANGES:
            assert not r.overlaps(reserved), f"{abi} {r} touches {reserved}"


def test_reserved_arch_ranges_are_kvms() -> None:
    # 0x8000_0000..0x8000_FFFF and 0xC000_0000..0xC000_FFFF, inclusive.
    assert [(r.base, r.last) for r in smccc.RESERVED_ARCH_RANGES] == [
        (0x8000_0000, 0x8000_FFFF), (0xC000_0000, 0xC000_FFFF),
    ]


def test_named_abis_cover_the_reference_ids() -> None:
    expect = {
        "psci": [0x8400_0000, 0x8400_0015, 0xC400_0015, 0xC400_001F],  # SYSTEM_OFF2
        "trng": [0x8400_0050, 0x8400_0053, 0xC400_0053],
        "ffa": [0x8400_0063, 0xC400_0060, 0x8400_00FF],
        "optee": [0xB200_0000, 0x3200_0001, 0xBF00_FF01],
        "vendor-hyp": [0x8600_FF01, 0xC600_0002, 0x4600_0001, 0x0600_0000],  # HV
        "std-hyp": [0xC500_0020, 0xC500_0021],  # PV time
    }
    for abi, fids in expect.items():
        for fid in fids:
            assert any(fid in r for r in NAMED[abi]), f"{fid:#010x} not in {abi}"


def test_named_abi_ranges_keep_their_owner() -> None:
    # A named ABI never straddles two owners or the fast/yielding and SMC32/SMC64 boundaries.
    for abi, r in all_named_ranges():
        first, last = r.base, r.last
        assert smccc.owner(first) == smccc.owner(last), abi
        assert smccc.is_fast(first) == smccc.is_fast(last), abi
        assert smccc.is_smc64(first) == smccc.is_smc64(last), abi
