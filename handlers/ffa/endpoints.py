"""Fleet-unique FF-A endpoint IDs for VMs, from the broker's ID pools (ctx.ids).

ID 0 is the hypervisor's and bit 15 marks secure endpoints (a convention of
DEN0077A v1.2 §6.1, see abi.py), so a VM gets an ID in 1..0x7FFF; it must be unique across every
VM of the fleet (memory handles embed it, partitions key on it) and stable for the VM's life:
it is allocated on the VM's first FF-A call after FFA_VERSION and released when the VM is
destroyed. The pool hands IDs out round robin, so a freed ID is reused as late as possible.
"""

from __future__ import annotations

POOL = "ffa.endpoint"
FIRST_VM_ID = 1
LAST_VM_ID = 0x7FFF
