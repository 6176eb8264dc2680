"""GlobalPlatform TEE vocabulary shared by the TEE service and the OP-TEE proxy.

TEE result codes, error origins, parameter types and login methods, with the values OP-TEE and the
GlobalPlatform TEE Client API give them (OPTEE_MSG_CMD_* and logins, optee_msg.h;
lib/libutee/include/tee_api_defines.h; OP-TEE lib/libutee/include/tee_api_defines.h, optee_client
tee_client_api.h). Plain constants only: this module does no I/O and knows neither gRPC nor guest
memory, so both sides of the TEE-backend protocol can import it.
"""

from __future__ import annotations

import enum


class TeeResult(enum.IntEnum):
    """TEEC_* / TEE_* result codes (lib/libutee/include/tee_api_defines.h), as unsigned 32-bit
    values."""

    SUCCESS = 0x0000_0000
    CORRUPT_OBJECT = 0xF010_0001  # GP TEE Internal Core API §7.2; tee_api_defines.h
    STORAGE_NOT_AVAILABLE = 0xF010_0003
    GENERIC = 0xFFFF_0000
    ACCESS_DENIED = 0xFFFF_0001
    CANCEL = 0xFFFF_0002
    ACCESS_CONFLICT = 0xFFFF_0003
    EXCESS_DATA = 0xFFFF_0004
    BAD_FORMAT = 0xFFFF_0005
    BAD_PARAMETERS = 0xFFFF_0006
    BAD_STATE = 0xFFFF_0007
    ITEM_NOT_FOUND = 0xFFFF_0008
    NOT_IMPLEMENTED = 0xFFFF_0009
    NOT_SUPPORTED = 0xFFFF_000A
    NO_DATA = 0xFFFF_000B
    OUT_OF_MEMORY = 0xFFFF_000C
    BUSY = 0xFFFF_000D
    COMMUNICATION = 0xFFFF_000E
    SECURITY = 0xFFFF_000F
    SHORT_BUFFER = 0xFFFF_0010
    EXTERNAL_CANCEL = 0xFFFF_0011
    OVERFLOW = 0xFFFF_300F
    TARGET_DEAD = 0xFFFF_3024
    STORAGE_NO_SPACE = 0xFFFF_3041
    MAC_INVALID = 0xFFFF_3071
    SIGNATURE_INVALID = 0xFFFF_3072
    TIME_NOT_SET = 0xFFFF_5000
    TIME_NEEDS_RESET = 0xFFFF_5001


class Origin(enum.IntEnum):
    """TEEC_ORIGIN_* (lib/libutee/include/tee_api_defines.h): which layer produced a result code."""

    API = 1
    COMMS = 2
    TEE = 3
    TRUSTED_APP = 4


class ParamType(enum.IntEnum):
    """TEE_PARAM_TYPE_* as a trusted application sees its four parameters (GP Internal Core API).

    The OP-TEE message attribute types map onto these: VALUE_x directly, TMEM_x / RMEM_x to
    MEMREF_x (OP-TEE core/tee/entry_std.c copy_in_params).
    """

    NONE = 0
    VALUE_INPUT = 1
    VALUE_OUTPUT = 2
    VALUE_INOUT = 3
    MEMREF_INPUT = 5
    MEMREF_OUTPUT = 6
    MEMREF_INOUT = 7

    @property
    def is_value(self) -> bool:
        return self in (ParamType.VALUE_INPUT, ParamType.VALUE_OUTPUT, ParamType.VALUE_INOUT)

    @property
    def is_memref(self) -> bool:
        return self in (ParamType.MEMREF_INPUT, ParamType.MEMREF_OUTPUT, ParamType.MEMREF_INOUT)

    @property
    def is_input(self) -> bool:
        """Carries data into the TA (INPUT and INOUT)."""
        return self in (ParamType.VALUE_INPUT, ParamType.VALUE_INOUT, ParamType.MEMREF_INPUT,
                        ParamType.MEMREF_INOUT)

    @property
    def is_output(self) -> bool:
        """Carries data back to the client (OUTPUT and INOUT)."""
        return self in (ParamType.VALUE_OUTPUT, ParamType.VALUE_INOUT, ParamType.MEMREF_OUTPUT,
                        ParamType.MEMREF_INOUT)


NUM_PARAMS = 4  # TEE_NUM_PARAMS: a TA entry point always receives four parameters


class Login(enum.IntEnum):
    """TEE_LOGIN_* client identities (OPTEE_MSG_CMD_* and logins, optee_msg.h; tee_api_defines.h).
    """

    PUBLIC = 0
    USER = 1
    GROUP = 2
    APPLICATION = 4
    APPLICATION_USER = 5
    APPLICATION_GROUP = 6
    REE_KERNEL = 0x8000_0000
    TRUSTED_APP = 0xF000_0000


# The logins a normal-world client may present in OPEN_SESSION (OP-TEE entry_std.c
# get_open_session_meta); any other value is TEE_ERROR_BAD_PARAMETERS.
NORMAL_WORLD_LOGINS = frozenset({
    Login.PUBLIC, Login.USER, Login.GROUP, Login.APPLICATION, Login.APPLICATION_USER,
    Login.APPLICATION_GROUP, Login.REE_KERNEL,
})
# Logins whose client UUID is zero rather than taken from the message.
ANONYMOUS_LOGINS = frozenset({Login.PUBLIC, Login.REE_KERNEL})


def param_types(*types: ParamType) -> tuple[ParamType, ...]:
    """TEE_PARAM_TYPES(t0, t1, t2, t3): the four types, NONE-padded, for comparisons in TAs."""
    if len(types) > NUM_PARAMS:
        raise ValueError(f"at most {NUM_PARAMS} parameter types")
    return tuple(types) + (ParamType.NONE,) * (NUM_PARAMS - len(types))


def result_name(code: int) -> str:
    """A bounded name for a result code: its TeeResult name, or 'other'."""
    try:
        return TeeResult(code).name
    except ValueError:
        return "other"


def origin_name(origin: int) -> str:
    try:
        return Origin(origin).name
    except ValueError:
        return "other"
