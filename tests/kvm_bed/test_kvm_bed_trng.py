"""TRNG from a real arm64 guest through real KVM, the agent and the broker (issue 3 item 4).

Values per Arm DEN0098 and include/linux/arm-smccc.h; the guest program is
vmm/arm64/guests/trng.c.
"""

from __future__ import annotations

import uuid

import pytest

from hyperbroker.smccc import U64_MASK, uuid_to_regs

from .conftest import EXPECTED_FAILED_STEPS, MainRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NOT_SUPPORTED = -1 & U64_MASK
INVALID_PARAMETERS = -2 & U64_MASK
KVM_TRNG_UUID = uuid.UUID("0d21e000-4384-11eb-8070-5244554e5a4c")  # arch/arm64/kvm/trng.c


def test_the_l1_kernel_has_kvm_with_the_smccc_filter(main_run: MainRun) -> None:
    assert main_run.result.kvm.get("smccc_filter") == "1", main_run.result.console()
    assert main_run.result.done == {"failures": str(EXPECTED_FAILED_STEPS), "kvm": "1"}, (
        main_run.result.console())
    assert not main_run.result.problems


def test_trng_version_is_1_0(main_run: MainRun) -> None:
    assert main_run.result.call("trng", "version").x[0] == 0x1_0000  # DEN0098 §2.1


def test_trng_features_knows_rnd64_and_refuses_the_unknown(main_run: MainRun) -> None:
    assert main_run.result.call("trng", "features.rnd64").x[0] == 0
    assert main_run.result.call("trng", "features.unknown").x[0] == NOT_SUPPORTED


def test_trng_get_uuid_is_returned_in_the_smccc_register_layout(main_run: MainRun) -> None:
    assert main_run.result.call("trng", "uuid").x == uuid_to_regs(KVM_TRNG_UUID.bytes)


def test_trng_rnd64_returns_fresh_entropy(main_run: MainRun) -> None:
    a = main_run.result.call("trng", "rnd64.a")
    b = main_run.result.call("trng", "rnd64.b")
    assert a.x[0] == b.x[0] == 0
    assert a.x[1:] != b.x[1:]
    assert all(a.x[1:]) and all(b.x[1:])  # 192 bits: a zero word is a 2**-64 event
    sixty_four = main_run.result.call("trng", "rnd64.64bits")
    # TRNG_RND64 returns the bits in x3 upwards: above the 64 asked for, x1 and x2 are zero.
    assert sixty_four.x[0] == 0 and sixty_four.x[1] == sixty_four.x[2] == 0
    rnd32 = main_run.result.call("trng", "rnd32")
    assert rnd32.x[0] == 0 and max(rnd32.x[1:]) <= 0xFFFF_FFFF


def test_trng_rnd64_with_an_invalid_bit_count_returns_invalid_parameters(
    main_run: MainRun,
) -> None:
    for label in ("rnd64.too_many_bits", "rnd64.zero_bits"):
        call = main_run.result.call("trng", label)
        assert call.x == (INVALID_PARAMETERS, 0, 0, 0), label


def test_trng_over_the_smc_conduit_is_forwarded_and_answered(main_run: MainRun) -> None:
    call = main_run.result.call("trng", "rnd64.smc")
    assert call.conduit == "smc"
    assert call.x[0] == 0 and call.x[1] == 0 and call.x[2] != 0 and call.x[3] != 0  # 128 bits


def test_every_trng_call_left_the_kernel_and_reached_the_broker(main_run: MainRun) -> None:
    run = main_run.result.run("trng")
    assert run.ok and run.link_failures == 0
    assert run.fids == {0x8400_0050: 1, 0x8400_0051: 2, 0x8400_0052: 1, 0xC400_0053: 6,
                        0x8400_0053: 1}
    served = {s.labels["function"] for s in main_run.broker_metrics
              if s.name.endswith("_count") and s.labels.get("handler") == "trng" and s.value}
    assert {"TRNG_FEATURES", "TRNG_RND64", "TRNG_RND32"} <= served
