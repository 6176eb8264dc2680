"""Userspace PSCI 1.3 (Arm DEN0022): vCPU power and system power through VMM actions."""

from hyperbroker.handlers.psci.handler import PsciHandler

__all__ = ["PsciHandler"]
