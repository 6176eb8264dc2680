"""Memory-share tracking for pKVM guests (HYP_MEMINFO, MEM_SHARE, MEM_UNSHARE, MMIO_GUARD)
behind KVM's vendor-hyp UID and a truthful KVM_FEATURES bitmap."""

from hyperbroker.handlers.memshare.handler import MemshareHandler

__all__ = ["MemshareHandler"]
