"""Fleet-unique FF-A endpoint IDs for VMs, allocated in the handler's shared state document.

ID 0 is the hypervisor's and bit 15 marks secure endpoints, so a VM gets an ID in
1..0x7FFF; it must be unique across every VM the broker serves (handles embed it, partitions
key on it) and stable for the VM's life. The shared document maps IDs to VM keys and back; IDs
are handed out round-robin from `next` so a freed ID is reused as late as possible. Pure
functions over the JSON document; the adapter loads and stores it through ctx.shared.
"""

from __future__ import annotations

from typing import Any

FIRST_VM_ID = 1
LAST_VM_ID = 0x7FFF
SCHEMA = 1


def _load(doc: Any) -> dict[str, Any]:
    if doc is None:
        return {"schema": SCHEMA, "next": FIRST_VM_ID, "by_id": {}, "by_vm": {}}
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"FF-A shared document has an unknown schema: {doc!r:.200}")
    return {
        "schema": SCHEMA,
        "next": int(doc["next"]),
        "by_id": dict(doc["by_id"]),
        "by_vm": dict(doc["by_vm"]),
    }


def allocate(doc: Any, vm_key: str) -> tuple[dict[str, Any], int | None]:
    """The VM's ID (its existing one if it has one) and the new document; None when all
    32767 IDs are taken."""
    d = _load(doc)
    if vm_key in d["by_vm"]:
        return d, int(d["by_vm"][vm_key])
    span = LAST_VM_ID - FIRST_VM_ID + 1
    start = d["next"]
    for step in range(span):
        candidate = FIRST_VM_ID + (start - FIRST_VM_ID + step) % span
        if str(candidate) not in d["by_id"]:
            d["by_id"][str(candidate)] = vm_key
            d["by_vm"][vm_key] = candidate
            d["next"] = FIRST_VM_ID + (candidate - FIRST_VM_ID + 1) % span
            return d, candidate
    return d, None


def release(doc: Any, vm_key: str) -> dict[str, Any]:
    """The document without the VM's ID."""
    d = _load(doc)
    found = d["by_vm"].pop(vm_key, None)
    if found is not None:
        d["by_id"].pop(str(found), None)
    return d


def owner(doc: Any, endpoint_id: int) -> str | None:
    found = _load(doc)["by_id"].get(str(endpoint_id))
    return None if found is None else str(found)
