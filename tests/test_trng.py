"""SMCCC TRNG (Arm DEN0098) through handlers.trng: the pure ABI and the handler's registers.

IDs, codes, limits and KVM's UUID: Arm DEN0098, arch/arm64/kvm/trng.c (include/linux/arm-smccc.h,
arch/arm64/kvm/trng.c). Results follow SMCCC 1.1: x0..x3 written, negative codes sign-extended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import HandlerConfigError
from hyperbroker.handlers.trng import TrngHandler, abi
from hyperbroker.handlers.trng import abi as trng_abi
from hyperbroker.smccc import NR_ARGS
from hyperbroker.testing.context import FakeContext

# ARM_SMCCC_TRNG_VERSION, _FEATURES, _GET_UUID, _RND32, _RND64.
VERSION = 0x8400_0050
FEATURES = 0x8400_0051
GET_UUID = 0x8400_0052
RND32 = 0x8400_0053
RND64 = 0xC400_0053
TRNG_FUNCTIONS = [VERSION, FEATURES, GET_UUID, RND32, RND64]
NOT_SUPPORTED = 0xFFFF_FFFF_FFFF_FFFF  # -1 in x0
INVALID_PARAMETERS = 0xFFFF_FFFF_FFFF_FFFE  # -2 in x0

# UUID_INIT(0x0d21e000, 0x4384, 0x11eb, 0x80, 0x70, 0x52, 0x44, 0x55, 0x4e, 0x5a, 0x4c) is the
# byte string 0d 21 e0 00 | 43 84 11 eb | 80 70 52 44 | 55 4e 5a 4c; SMCCC returns byte 4r+0 in
# bits 7:0 of register r, so each group of four reads backwards:
KVM_TRNG_UUID_REGS = (0x00E0_210D, 0xEB11_8443, 0x4452_7080, 0x4C5A_4E55)

u64 = st.integers(0, (1 << 64) - 1)


def make(config: dict[str, Any] | None = None,
         random_bits: Callable[[int], int] | None = None) -> TrngHandler:
    h = TrngHandler(config or {})
    if random_bits is not None:
        h.random_bits = random_bits
    return h


async def call(h: TrngHandler, fid: int, x1: int = 0, *rest: int) -> Result:
    x = (fid, x1, *rest) + (0,) * (NR_ARGS - 2 - len(rest))
    return await h.handle(Call(vcpu=0, seq=1, function_id=fid, x=x), FakeContext())


def joined(r: Result, word_bits: int) -> int:
    """x1..x3 read as one number, x3 lowest (DEN0098 §2.4/§2.5)."""
    return (r.x[1] << (2 * word_bits)) | (r.x[2] << word_bits) | r.x[3]


def assert_invalid_parameters(r: Result) -> None:
    assert r.x[:4] == (INVALID_PARAMETERS, 0, 0, 0)
    assert r.mask == 0xF
    assert r.outcome is Outcome.GUEST_ERROR


# ---- VERSION, FEATURES, GET_UUID ----------------------------------------------------------------


async def test_version_is_1_0() -> None:
    r = await call(make(), VERSION)
    assert r.x[:4] == (0x10000, 0, 0, 0)  # KVM: version 1.0
    assert (r.mask, r.outcome) == (0xF, Outcome.OK)


@pytest.mark.parametrize("fid", TRNG_FUNCTIONS, ids=hex)
async def test_features_is_zero_for_each_trng_function(fid: int) -> None:
    r = await call(make(), FEATURES, fid)
    assert r.x[:4] == (0, 0, 0, 0)
    assert r.outcome is Outcome.OK


@pytest.mark.parametrize("fid", [0x8400_0054, 0xC400_0050, 0x8400_0000, 0, 0xFFFF_FFFF], ids=hex)
async def test_features_is_not_supported_for_anything_else(fid: int) -> None:
    r = await call(make(), FEATURES, fid)
    assert r.x[:4] == (NOT_SUPPORTED, 0, 0, 0)


@given(st.integers(1, 0xFFFF_FFFF), st.sampled_from(TRNG_FUNCTIONS))
async def test_features_reads_only_w1_for_the_queried_id(high: int, fid: int) -> None:
    assert (await call(make(), FEATURES, (high << 32) | fid)).x[0] == 0


@given(st.integers(0, 0xFFFF_FFFF).filter(lambda f: f not in TRNG_FUNCTIONS))
def test_features_of_any_other_id_is_not_supported(fid: int) -> None:
    assert abi.features(fid) is abi.TrngError.NOT_SUPPORTED


async def test_get_uuid_is_kvms_trng_uuid_in_the_smccc_register_convention() -> None:
    r = await call(make(), GET_UUID)
    assert r.x[:4] == KVM_TRNG_UUID_REGS
    assert r.x[0] == 0x00E0210D
    assert r.outcome is Outcome.OK


async def test_get_uuid_answers_the_configured_uuid() -> None:
    r = await call(make({"uuid": "00112233-4455-6677-8899-aabbccddeeff"}), GET_UUID)
    assert r.x[:4] == (0x3322_1100, 0x7766_5544, 0xBBAA_9988, 0xFFEE_DDCC)


# ---- RND32 / RND64 ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 96), st.integers(0, (1 << 256) - 1))
async def test_rnd32_returns_exactly_n_bits_right_aligned_in_x1_to_x3(n: int, noise: int) -> None:
    asked: list[int] = []

    def source(bits: int) -> int:
        asked.append(bits)
        return noise  # deliberately wider than asked: the handler must keep only N bits

    r = await call(make(random_bits=source), RND32, n)
    assert asked == [n]
    assert r.x[0] == 0 and r.outcome is Outcome.OK and r.mask == 0xF
    assert all(word < 1 << 32 for word in r.x[1:4])  # w1..w3: the upper halves are zero
    assert joined(r, 32) == noise & ((1 << n) - 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 192), st.integers(0, (1 << 256) - 1))
async def test_rnd64_returns_exactly_n_bits_right_aligned_in_x1_to_x3(n: int, noise: int) -> None:
    r = await call(make(random_bits=lambda bits: noise), RND64, n)
    assert r.x[0] == 0 and r.outcome is Outcome.OK
    assert all(word < 1 << 64 for word in r.x[1:4])
    assert joined(r, 64) == noise & ((1 << n) - 1)


@pytest.mark.parametrize(("fid", "n", "regs"), [
    (RND32, 1, (0, 0, 0, 1)),
    (RND32, 32, (0, 0, 0, 0xFFFF_FFFF)),
    (RND32, 33, (0, 0, 1, 0xFFFF_FFFF)),
    (RND32, 96, (0, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)),
    (RND64, 64, (0, 0, 0, (1 << 64) - 1)),
    (RND64, 65, (0, 0, 1, (1 << 64) - 1)),
    (RND64, 192, (0, (1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1)),
], ids=lambda v: hex(v) if isinstance(v, int) and v > 0xFFFF else str(v))
async def test_all_ones_entropy_fills_the_lowest_n_bits_only(
    fid: int, n: int, regs: tuple[int, ...],
) -> None:
    r = await call(make(random_bits=lambda bits: (1 << 300) - 1), fid, n)
    assert r.x[:4] == regs


@pytest.mark.parametrize(("fid", "n"), [
    (RND32, 0), (RND64, 0), (RND32, 97), (RND64, 193), (RND32, 0xFFFF_FFFF), (RND64, 1 << 63),
], ids=["rnd32-0", "rnd64-0", "rnd32-97", "rnd64-193", "rnd32-max", "rnd64-huge"])
async def test_n_out_of_range_is_invalid_parameters(fid: int, n: int) -> None:
    assert_invalid_parameters(await call(make(random_bits=lambda bits: 1), fid, n))


async def test_rnd32_ignores_the_upper_half_of_x1() -> None:
    # RND32 takes N in w1: 0xFFFFFFFF_00000008 asks for 8 bits.
    r = await call(make(random_bits=lambda bits: 0xFFF), RND32, 0xFFFF_FFFF_0000_0008)
    assert r.x[:4] == (0, 0, 0, 0xFF)


async def test_rnd32_with_only_high_bits_in_x1_asks_for_zero_bits() -> None:
    # w1 = 0: INVALID_PARAMETERS, however large x1 is.
    assert_invalid_parameters(await call(make(), RND32, 0x0000_0060_0000_0000))


async def test_rnd64_reads_all_of_x1() -> None:
    assert_invalid_parameters(await call(make(), RND64, (1 << 32) | 8))


async def test_an_error_asks_the_source_for_nothing() -> None:
    asked: list[int] = []
    await call(make(random_bits=lambda bits: asked.append(bits) or 0), RND64, 193)
    assert asked == []


async def test_os_entropy_is_fresh_on_every_call() -> None:
    h = make()
    a = await call(h, RND64, 192)
    b = await call(h, RND64, 192)
    assert a.x[0] == b.x[0] == 0
    assert a.x[1:4] != b.x[1:4]  # 2**-192 chance of a false failure


async def test_os_entropy_respects_n() -> None:
    h = make()
    for n in (1, 7, 33, 96):
        r = await call(h, RND32, n)
        assert joined(r, 32) < 1 << n


# ---- the rest of the range ----------------------------------------------------------------------


OTHER_TRNG_IDS = [
    fid for r in trng_abi.RANGES for fid in range(r.base, r.end) if fid not in TRNG_FUNCTIONS
]


@pytest.mark.parametrize("fid", OTHER_TRNG_IDS, ids=hex)
async def test_other_ids_of_the_trng_range_are_not_supported(fid: int) -> None:
    r = await call(make(), fid, 64)
    assert r.x[:4] == (NOT_SUPPORTED, 0, 0, 0)
    assert r.mask == 0xF


def test_handler_owns_exactly_the_trng_abi_range() -> None:
    # 0x50..0x5F fast, SMC32 and SMC64 (crosvm smccc_trng.rs).
    assert [(r.base, r.end) for r in make().ranges] == [
        (0x8400_0050, 0x8400_0060), (0xC400_0050, 0xC400_0060),
    ]


def test_function_names_cover_the_five_functions() -> None:
    h = make()
    assert [h.function_name(f) for f in TRNG_FUNCTIONS] == [
        "TRNG_VERSION", "TRNG_FEATURES", "TRNG_GET_UUID", "TRNG_RND32", "TRNG_RND64",
    ]
    assert h.function_name(0x8400_0054) is None


# ---- static answers and configuration -----------------------------------------------------------


def test_static_answers_are_version_and_get_uuid_only() -> None:
    answers = make().static_answers()
    assert set(answers) == {VERSION, GET_UUID}
    assert answers[VERSION].x[:4] == (0x10000, 0, 0, 0)
    assert answers[GET_UUID].x[:4] == KVM_TRNG_UUID_REGS


async def test_static_answers_equal_what_handle_answers() -> None:
    h = make({"uuid": "12345678-9abc-def0-1234-56789abcdef0"})
    for fid, answer in h.static_answers().items():
        assert await call(h, fid) == answer


@pytest.mark.parametrize("bad", ["not-a-uuid", "", 42, "0d21e000-4384-11eb-8070"])
def test_a_bad_uuid_is_a_config_error(bad: object) -> None:
    with pytest.raises(HandlerConfigError, match="uuid"):
        TrngHandler({"uuid": bad})


def test_a_uuid_whose_w0_reads_as_not_supported_is_a_config_error() -> None:
    # w0 = 0xFFFFFFFF is indistinguishable from NOT_SUPPORTED (DEN0098 §2.3).
    with pytest.raises(HandlerConfigError, match="uuid"):
        TrngHandler({"uuid": "ffffffff-0000-0000-0000-000000000000"})


def test_an_unknown_config_key_is_a_config_error() -> None:
    with pytest.raises(HandlerConfigError, match="seed"):
        TrngHandler({"seed": 1})


# ---- the pure ABI -------------------------------------------------------------------------------


def test_abi_ids_and_codes_are_the_references() -> None:
    ids = (abi.VERSION, abi.FEATURES, abi.GET_UUID, abi.RND32, abi.RND64)
    assert ids == (VERSION, FEATURES, GET_UUID, RND32, RND64)
    assert [int(e) for e in abi.TrngError] == [-1, -2, -3]
    assert abi.MAX_BITS == {RND32: 96, RND64: 192}
    assert abi.version() == 0x10000


def test_abi_get_uuid_of_kvms_uuid() -> None:
    assert abi.get_uuid(abi.KVM_TRNG_UUID) == KVM_TRNG_UUID_REGS


@given(st.sampled_from([RND32, RND64]), u64, st.integers(0, (1 << 200) - 1))
def test_abi_rnd_words_rebuild_the_n_bits(fid: int, x1: int, noise: int) -> None:
    out = abi.rnd(fid, x1, lambda bits: noise)
    n = x1 & 0xFFFF_FFFF if fid == RND32 else x1
    if not 0 < n <= abi.MAX_BITS[fid]:
        assert out is abi.TrngError.INVALID_PARAMETERS
        return
    assert isinstance(out, abi.Entropy)
    w = abi.WORD_BITS[fid]
    assert out.bits == n
    assert (out.words[0] << 2 * w) | (out.words[1] << w) | out.words[2] == noise & ((1 << n) - 1)
