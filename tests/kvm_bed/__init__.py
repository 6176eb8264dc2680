"""Checks on the real arm64 KVM test bed (issue 3)."""
