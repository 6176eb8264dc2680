"""The TRNG ABI as pure functions: registers in, typed answer or typed error out.

DEN0098 (Arm True Random Number Generator Firmware Interface 1.0), with IDs and codes as Linux and
KVM spell them (include/linux/arm-smccc.h, arch/arm64/kvm/trng.c; Arm DEN0098,
arch/arm64/kvm/trng.c). Entropy comes from a callable so tests can pin it; nothing here does I/O."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hyperbroker.smccc import FunctionRange, uuid_to_regs

VERSION = 0x8400_0050
FEATURES = 0x8400_0051
GET_UUID = 0x8400_0052
RND32 = 0x8400_0053
RND64 = 0xC400_0053

# DEN0098 §2: the TRNG functions are 0x50..0x5F of the standard secure service, SMC32 and SMC64
# (crosvm's devices/src/smccc_trng.rs owns exactly these); the ABI is this range, whole.
RANGES = (FunctionRange(0x8400_0050, 0x10), FunctionRange(0xC400_0050, 0x10))

FUNCTION_NAMES: Mapping[int, str] = {
    VERSION: "TRNG_VERSION",
    FEATURES: "TRNG_FEATURES",
    GET_UUID: "TRNG_GET_UUID",
    RND32: "TRNG_RND32",
    RND64: "TRNG_RND64",
}

# Every function of DEN0098 1.0 is implemented: TRNG_FEATURES answers 0 for exactly these.
SERVED = frozenset(FUNCTION_NAMES)

VERSION_1_0 = 1 << 16  # DEN0098 §2.1: bits [30:16] major, [15:0] minor
MAX_BITS = {RND32: 96, RND64: 192}  # three result registers of 32 or 64 bits
WORD_BITS = {RND32: 32, RND64: 64}

# The UUID KVM reports (arch/arm64/kvm/trng.c arm_smc_trng_uuid); operators may configure another.
KVM_TRNG_UUID = uuid.UUID("0d21e000-4384-11eb-8070-5244554e5a4c")


class TrngError(enum.IntEnum):
    """DEN0098 §2 return codes (negative, sign-extended in x0)."""

    NOT_SUPPORTED = -1
    INVALID_PARAMETERS = -2
    NO_ENTROPY = -3


@dataclass(frozen=True, slots=True)
class Entropy:
    """N random bits laid out in three registers, most significant word first (x1, x2, x3)."""

    bits: int
    words: tuple[int, int, int]


def version() -> int:
    return VERSION_1_0


def features(queried_fid: int) -> int | TrngError:
    """TRNG_FEATURES: 0 for an implemented function, NOT_SUPPORTED otherwise (DEN0098 §2.2)."""
    return 0 if (queried_fid & 0xFFFF_FFFF) in SERVED else TrngError.NOT_SUPPORTED


def get_uuid(trng_uuid: uuid.UUID) -> tuple[int, int, int, int]:
    """TRNG_GET_UUID: the UUID in w0..w3, byte 0 in bits 7:0 of w0 (DEN0098 §2.3)."""
    return uuid_to_regs(trng_uuid.bytes)


def rnd(fid: int, x1: int, random_bits: Callable[[int], int]) -> Entropy | TrngError:
    """TRNG_RND32 / TRNG_RND64 (DEN0098 §2.4, §2.5).

    N is w1 for RND32 and x1 for RND64. 0 < N <= 96 (RND32) or 192 (RND64), otherwise
    INVALID_PARAMETERS. (KVM accepts N = 0 and answers with no bits; the spec does not.)
    The N bits are right-aligned across the three registers: x3 holds bits [W-1:0], x2 the next
    W, x1 the top; every bit above N is zero.
    """
    n = x1 & 0xFFFF_FFFF if fid == RND32 else x1
    if not 0 < n <= MAX_BITS[fid]:
        return TrngError.INVALID_PARAMETERS
    value = random_bits(n) & ((1 << n) - 1)
    w = WORD_BITS[fid]
    mask = (1 << w) - 1
    return Entropy(n, ((value >> (2 * w)) & mask, (value >> w) & mask, value & mask))
