"""OP-TEE proxy: the OP-TEE SMC ABI for guests, in front of a TEE service over gRPC."""

from hyperbroker.handlers.optee.handler import OpteeHandler

__all__ = ["OpteeHandler"]
