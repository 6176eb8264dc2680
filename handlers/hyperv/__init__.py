"""Hyper-V persona for arm64 guests: Hyper-V's vendor-hyp UID and HV_FUNC_ID hypercalls."""

from hyperbroker.handlers.hyperv.handler import HypervHandler

__all__ = ["HypervHandler"]
