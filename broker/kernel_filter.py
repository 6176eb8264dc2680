"""A model of KVM's per-VM SMCCC filter: what kvm_smccc_set_filter() answers, record by record.

It mirrors arch/arm64/kvm/hypercalls.c (Linux 6.4+; Documentation/virt/kvm/devices/vm.rst)
check for check and in the same order, so that the policy engine can
prove its compiled records are ones KVM accepts, and so that the real-KVM test bed can run the same
records against both and compare (tests/kvm_bed/conftest.py FILTER_TABLE). It knows the uapi record
and errno values, and nothing of policies, handlers or VMMs."""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass

from hyperbroker.kvm import FilterAction, SmcccFilter, filter_errno
from hyperbroker.smccc import RESERVED_ARCH_RANGES

U32_MASK = 0xFFFF_FFFF

@dataclass(frozen=True, slots=True)
class FilterEntry:
    """One maple-tree entry: the inclusive span [first, last] and its action."""

    first: int
    last: int
    action: FilterAction
    reserved: bool = False


class KernelFilterModel:
    """One VM's SMCCC filter, as the maple tree kvm->arch.smccc_filter holds it."""

    def __init__(self) -> None:
        self._entries: list[FilterEntry] = []  # sorted by first, pairwise disjoint
        self._firsts: list[int] = []
        self._has_run = False

    @property
    def entries(self) -> tuple[FilterEntry, ...]:
        return tuple(self._entries)

    def mark_ran(self) -> None:
        """A vCPU of the VM has run (kvm_vm_has_ran_once): the filter is frozen from now on."""
        self._has_run = True

    def set_filter(self, record: SmcccFilter) -> int:
        """KVM_SET_DEVICE_ATTR(SMCCC_CTRL, SMCCC_FILTER) on the VM fd: 0 or a positive errno.

        Order of kvm_smccc_set_filter() (arch/arm64/kvm/hypercalls.c): pad, then empty / wrapping
        range or unknown action (both EINVAL, hyperbroker.kvm.filter_errno); then EBUSY once a
        vCPU has run; then, if the tree is still empty, the reserved Arm-architecture ranges go in
        (and stay, even if this record then fails); then EEXIST on any overlap, else insert.
        """
        err = filter_errno(record)
        if err:
            return err
        if self._has_run:
            return errno.EBUSY
        if not self._entries:
            for reserved in RESERVED_ARCH_RANGES:
                self._insert(
                    FilterEntry(reserved.base, reserved.last, FilterAction.HANDLE, reserved=True)
                )
        # u32 arithmetic as in the kernel: base=0, nr=0 becomes the whole space [0, 0xFFFFFFFF].
        first = record.base & U32_MASK
        last = (first + record.nr_functions - 1) & U32_MASK
        if self._overlapping(first, last) is not None:
            return errno.EEXIST
        self._insert(FilterEntry(first, last, FilterAction(record.action)))
        return 0

    def action_for(self, fid: int) -> FilterAction:
        """kvm_smccc_filter_get_action(): the entry holding `fid`, HANDLE on a miss or no filter."""
        entry = self._overlapping(fid & U32_MASK, fid & U32_MASK)
        return FilterAction.HANDLE if entry is None else entry.action

    def _overlapping(self, first: int, last: int) -> FilterEntry | None:
        # Entries are disjoint and sorted, so only the one starting at or before `last` can reach
        # back into [first, last].
        i = bisect.bisect_right(self._firsts, last) - 1
        if i >= 0 and self._entries[i].last >= first:
            return self._entries[i]
        return None

    def _insert(self, entry: FilterEntry) -> None:
        i = bisect.bisect_left(self._firsts, entry.first)
        self._entries.insert(i, entry)
        self._firsts.insert(i, entry.first)
