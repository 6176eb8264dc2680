"""Well-known trusted-application UUIDs: OP-TEE's device-enumeration PTA and the shipped TAs.

Importable without the TEE service, so the proxy can name sessions per TA in its metrics (a
bounded label set) and tests can address the TAs. Nothing here does I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

# OP-TEE lib/libutee/include/pta_device.h PTA_DEVICE_UUID; Linux drivers/tee/optee/device.c opens it
# at probe (Linux's drivers/tee/optee/smc_abi.c optee_probemeasured on this project's arm64 KVM bed
# (docs/kvm-bed.md) 4).
DEVICE_ENUM_PTA = uuid.UUID("7011a688-ddde-4053-a5a9-7b3c4ddf13b8")
# hyperbroker's own TAs: uuid5(NAMESPACE_URL, "https://hyperbroker/trusted-apps/<name>").
SECURE_STORAGE_TA = uuid.UUID("eb1f6e59-f921-5548-9c50-5a3d0ab5827e")
KEYED_MAC_TA = uuid.UUID("37a391a3-7492-5548-9b05-902ae6f5b32c")

WELL_KNOWN: Mapping[uuid.UUID, str] = {
    DEVICE_ENUM_PTA: "device-enum",
    SECURE_STORAGE_TA: "secure-storage",
    KEYED_MAC_TA: "keyed-mac",
}
