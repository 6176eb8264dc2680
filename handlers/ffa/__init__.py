"""Arm FF-A (DEN0077) v1.0-v1.2 for guests: discovery, RX/TX, direct messages, memory sharing."""

from hyperbroker.handlers.ffa.handler import FfaHandler

__all__ = ["FfaHandler"]
