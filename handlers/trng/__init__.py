"""SMCCC TRNG (Arm DEN0098): true random numbers for guests, from the host's entropy source."""

from hyperbroker.handlers.trng.handler import TrngHandler

__all__ = ["TrngHandler"]
