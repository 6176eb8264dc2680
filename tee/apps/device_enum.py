"""OP-TEE's device-enumeration pseudo-TA, which the Linux driver opens at probe.

Linux drivers/tee/optee/device.c opens a session to PTA_DEVICE_UUID, invokes PTA_CMD_GET_DEVICES
first with a NULL memref to learn the size, then with a buffer, and registers one TEE bus device per
UUID returned (Linux's drivers/tee/optee/smc_abi.c optee_probe). A failed invoke fails the driver's
probe, so this PTA must answer exactly as OP-TEE's core/pta/device.c does: parameter types
(MEMREF_OUTPUT, NONE, NONE, NONE), SHORT_BUFFER with the needed size when the buffer is too small.
It lists the TAs of this service flagged `device_enum`; it keeps no state."""

from __future__ import annotations

from hyperbroker.tee.gp import ParamType, TeeResult, param_types
from hyperbroker.tee.ta import Operation, TrustedApp
from hyperbroker.tee.uuids import DEVICE_ENUM_PTA

# OP-TEE lib/libutee/include/pta_device.h.
PTA_CMD_GET_DEVICES = 0x0  # TAs usable without tee-supplicant
PTA_CMD_GET_DEVICES_SUPP = 0x1  # TAs that need tee-supplicant: none here
PTA_CMD_GET_DEVICES_RPMB = 0x2  # TAs that need an RPMB device: none here
UUID_BYTES = 16

EXPECTED_TYPES = param_types(ParamType.MEMREF_OUTPUT)


class DeviceEnumPta(TrustedApp):
    uuid = DEVICE_ENUM_PTA
    name = "device-enum"

    async def invoke(self, session: object, cmd: int, op: Operation) -> int:
        if cmd == PTA_CMD_GET_DEVICES:
            listed = [ta.uuid.bytes for ta in self.env.catalogue if ta.device_enum]
        elif cmd in (PTA_CMD_GET_DEVICES_SUPP, PTA_CMD_GET_DEVICES_RPMB):
            listed = []
        else:
            return TeeResult.NOT_IMPLEMENTED
        if op.types != EXPECTED_TYPES:
            return TeeResult.BAD_PARAMETERS
        out = op.params[0]
        # device.c: "if (!params[0].memref.buffer && (params[0].memref.size > 0))".
        if out.null and out.capacity > 0:
            return TeeResult.BAD_PARAMETERS
        if not out.set_output(b"".join(sorted(listed))):
            return TeeResult.SHORT_BUFFER
        return TeeResult.SUCCESS
