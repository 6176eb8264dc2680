"""The wire: the VMM <-> agent codec (`vmm`, the only code that packs or unpacks `hb_*` records)
and the generated protobuf of the agent <-> broker, Admin, TEE and partition services (`v1`)."""
