"""Test handlers and helpers for the policy tests: documents, loading, collecting errors.

Validation mirrors KVM's SMCCC filter (Documentation/virt/kvm/devices/vm.rst,
KVM_ARM_VM_SMCCC_FILTER, and kvm_smccc_set_filter() in arch/arm64/kvm/hypercalls.c): the errno
each refusal carries is what KVM_SET_DEVICE_ATTR would answer for the same record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import yaml

from hyperbroker.broker.policy import (
    Policy,
    PolicyError,
    PolicyInvalid,
    load_policy,
)
from hyperbroker.calls import NOT_SUPPORTED, Call, MemoryWrite, Outcome, Result, VmmAction
from hyperbroker.calls import ActionKind as VmmActionKind
from hyperbroker.handlers.api import Abi, CallContext, Handler, HandlerConfigError
from hyperbroker.handlers.ffa.handler import FfaHandler
from hyperbroker.handlers.psci import abi as psci_abi
from hyperbroker.handlers.trng import abi as trng_abi
from hyperbroker.smccc import FunctionRange

TRNG_VERSION = 0x8400_0050
TRNG_GET_UUID = 0x8400_0052
TRNG_RND32 = 0x8400_0053
TRNG_RND64 = 0xC400_0053
PSCI_VERSION = 0x8400_0000
PSCI_CPU_ON_64 = 0xC400_0003
KVM_PTP = 0x8600_0001


class FakeTrng(Handler):
    """Owns the TRNG ABI (DEN0098), names its functions, has static answers and a named fallback."""

    plugin = "trng"
    abi = Abi("trng", trng_abi.RANGES, trng_abi.FUNCTION_NAMES)

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return ("uuid",)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED

    def function_name(self, fid: int) -> str | None:
        return {TRNG_VERSION: "trng.version", TRNG_RND64: "trng.rnd64"}.get(fid)

    def static_answers(self) -> Mapping[int, Result]:
        return {
            TRNG_VERSION: Result.regs(0x1_0000),
            # Guest-memory writes cannot travel in a static answer: left to the broker.
            TRNG_GET_UUID: Result((0, 0, 0, 0), memory_writes=(MemoryWrite(0x1000, b"x"),)),
            0x8400_0070: Result.regs(1),  # not in the TRNG ABI: never compiled
        }

    def named_fallbacks(self) -> Mapping[str, Result]:
        return {
            "no_entropy": Result.regs(-3, outcome=Outcome.GUEST_ERROR),
            "power_off": Result.regs(0, actions=(VmmAction(VmmActionKind.SYSTEM_OFF),)),
        }


class PsciVersionOnly(Handler):
    """Owns the single function PSCI_VERSION, as the kernel selftest's deny and forward cases do."""

    plugin = "psci-version"
    abi = Abi("psci", psci_abi.RANGES, psci_abi.FUNCTION_NAMES)

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return (FunctionRange(PSCI_VERSION, 1),)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return Result.regs(0x1_0000)


class Picky(Handler):
    plugin = "picky"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__({})
        if config.get("level") != 3:
            raise HandlerConfigError(f"level: {config.get('level')!r} is not 3")

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return (FunctionRange(0xC600_0040, 2),)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED


class Crashes(Handler):
    plugin = "crashes"

    def __init__(self, config: Mapping[str, Any]) -> None:
        raise RuntimeError("no device")

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return ()

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED


PLUGINS: Mapping[str, type[Handler]] = {
    "trng": FakeTrng,
    "psci-version": PsciVersionOnly,
    "picky": Picky,
    "crashes": Crashes,
    "ffa": FfaHandler,  # only its ABI is used: the catalog reads it from the class
}

FORWARD_TRNG: dict[str, Any] = {
    "name": "trng", "abi": "trng", "action": "forward", "handler": "trng",
}


def document(rules: list[Any], handlers: Mapping[str, Any] | None = None,
             **profile: Any) -> dict[str, Any]:
    return {
        "handlers": {"trng": {}} if handlers is None else handlers,
        "profiles": {"default": {"rules": rules, **profile}},
    }


def load(rules: list[Any], handlers: Mapping[str, Any] | None = None, **profile: Any) -> Policy:
    return load_policy(yaml.safe_dump(document(rules, handlers, **profile)), PLUGINS)


def errors_of(text_or_rules: str | list[Any], handlers: Mapping[str, Any] | None = None,
              **profile: Any) -> list[PolicyError]:
    text = (text_or_rules if isinstance(text_or_rules, str)
            else yaml.safe_dump(document(text_or_rules, handlers, **profile)))
    with pytest.raises(PolicyInvalid) as refused:
        load_policy(text, PLUGINS)
    return refused.value.errors


def only_error(text_or_rules: str | list[Any], handlers: Mapping[str, Any] | None = None,
               **profile: Any) -> PolicyError:
    errors = errors_of(text_or_rules, handlers, **profile)
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


def deny(name: str, **selectors: Any) -> dict[str, Any]:
    return {"name": name, "action": "deny", **selectors}
