"""The TRNG handler: folds handlers.trng.abi answers and errors into registers.

Stateless: every call is answered from the OS entropy source (getrandom via os.urandom), so it
never touches the store and its static calls (VERSION, GET_UUID) may be served by the agent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import (
    HANDLER_METRICS,
    Abi,
    CallContext,
    Handler,
    HandlerConfigError,
)
from hyperbroker.handlers.trng import abi
from hyperbroker.runtime.metrics import Counter

# Prometheus names units by their base unit, and that of data is the byte
# (https://prometheus.io/docs/practices/naming/#base-units): N bits count as N/8 bytes.
BYTES_SERVED = Counter("hyperbroker_trng_bytes_total",
                       "Random data handed to guests, in bytes (bits served / 8)",
                       registry=HANDLER_METRICS)


def _os_random_bits(n: int) -> int:
    return int.from_bytes(os.urandom((n + 7) // 8), "little")


class TrngHandler(Handler):
    plugin = "trng"
    abi = Abi("trng", abi.RANGES, abi.FUNCTION_NAMES)
    eager = True  # never awaits

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return ("uuid",)

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        raw = self.config.get("uuid", str(abi.KVM_TRNG_UUID))
        try:
            self.uuid = uuid.UUID(str(raw))
        except ValueError:
            raise HandlerConfigError(f"uuid: {raw!r} is not a UUID") from None
        if abi.get_uuid(self.uuid)[0] == 0xFFFF_FFFF:
            # w0 = 0xFFFFFFFF would read as NOT_SUPPORTED (DEN0098 §2.3).
            raise HandlerConfigError(f"uuid: {raw} starts with 0xFFFFFFFF, reserved")
        self.random_bits = _os_random_bits

    def served_functions(self) -> frozenset[int]:
        """The IDs of this handler's ranges answered with anything but NOT_SUPPORTED."""
        return abi.SERVED

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        """Discovery function ID -> the function IDs it tells the guest are served."""
        return {abi.FEATURES: abi.SERVED}

    def static_answers(self) -> Mapping[int, Result]:
        return {
            abi.VERSION: Result.regs(abi.version()),
            abi.GET_UUID: Result.regs(*abi.get_uuid(self.uuid)),
        }

    def answer(self, call: Call) -> Result:
        fid = call.function_id
        if fid == abi.VERSION:
            return Result.regs(abi.version())
        if fid == abi.FEATURES:
            return _fold(abi.features(call.arg(1)))
        if fid == abi.GET_UUID:
            return Result.regs(*abi.get_uuid(self.uuid))
        if fid in (abi.RND32, abi.RND64):
            out = abi.rnd(fid, call.arg(1), self.random_bits)
            if isinstance(out, abi.Entropy):
                BYTES_SERVED.inc(out.bits / 8)
                return Result.regs(0, *out.words)
            return _fold(out)
        return _fold(abi.TrngError.NOT_SUPPORTED)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return self.answer(call)


def _fold(value: int | abi.TrngError) -> Result:
    """An answer in x0, or an error with x1..x3 zero (DEN0098 §2: registers MBZ on error)."""
    if isinstance(value, abi.TrngError):
        return Result.regs(int(value), outcome=Outcome.GUEST_ERROR)
    return Result.regs(value)
