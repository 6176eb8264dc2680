from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TeeParamType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEE_PARAM_NONE: _ClassVar[TeeParamType]
    TEE_PARAM_VALUE_INPUT: _ClassVar[TeeParamType]
    TEE_PARAM_VALUE_OUTPUT: _ClassVar[TeeParamType]
    TEE_PARAM_VALUE_INOUT: _ClassVar[TeeParamType]
    TEE_PARAM_MEMREF_INPUT: _ClassVar[TeeParamType]
    TEE_PARAM_MEMREF_OUTPUT: _ClassVar[TeeParamType]
    TEE_PARAM_MEMREF_INOUT: _ClassVar[TeeParamType]

class TeeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEE_STATUS_OK: _ClassVar[TeeStatus]
    TEE_STATUS_VM_UNKNOWN: _ClassVar[TeeStatus]
    TEE_STATUS_SESSION_LOST: _ClassVar[TeeStatus]
TEE_PARAM_NONE: TeeParamType
TEE_PARAM_VALUE_INPUT: TeeParamType
TEE_PARAM_VALUE_OUTPUT: TeeParamType
TEE_PARAM_VALUE_INOUT: TeeParamType
TEE_PARAM_MEMREF_INPUT: TeeParamType
TEE_PARAM_MEMREF_OUTPUT: TeeParamType
TEE_PARAM_MEMREF_INOUT: TeeParamType
TEE_STATUS_OK: TeeStatus
TEE_STATUS_VM_UNKNOWN: TeeStatus
TEE_STATUS_SESSION_LOST: TeeStatus

class TeeVm(_message.Message):
    __slots__ = ("host", "name", "incarnation")
    HOST_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    host: str
    name: str
    incarnation: str
    def __init__(self, host: _Optional[str] = ..., name: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class TeeParam(_message.Message):
    __slots__ = ("type", "a", "b", "data", "size", "null_memref")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NULL_MEMREF_FIELD_NUMBER: _ClassVar[int]
    type: TeeParamType
    a: int
    b: int
    data: bytes
    size: int
    null_memref: bool
    def __init__(self, type: _Optional[_Union[TeeParamType, str]] = ..., a: _Optional[int] = ..., b: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., null_memref: _Optional[bool] = ...) -> None: ...

class TeeVmCreatedRequest(_message.Message):
    __slots__ = ("vm", "max_sessions")
    VM_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    vm: TeeVm
    max_sessions: int
    def __init__(self, vm: _Optional[_Union[TeeVm, _Mapping]] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class TeeVmCreatedReply(_message.Message):
    __slots__ = ("epoch", "max_sessions")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    max_sessions: int
    def __init__(self, epoch: _Optional[int] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class TeeVmDestroyedRequest(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: TeeVm
    def __init__(self, vm: _Optional[_Union[TeeVm, _Mapping]] = ...) -> None: ...

class TeeVmDestroyedReply(_message.Message):
    __slots__ = ("sessions_closed",)
    SESSIONS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    sessions_closed: int
    def __init__(self, sessions_closed: _Optional[int] = ...) -> None: ...

class TeeOpenSessionRequest(_message.Message):
    __slots__ = ("vm", "ta_uuid", "login", "client_uuid", "cancel_id", "params")
    VM_FIELD_NUMBER: _ClassVar[int]
    TA_UUID_FIELD_NUMBER: _ClassVar[int]
    LOGIN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_UUID_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    vm: TeeVm
    ta_uuid: bytes
    login: int
    client_uuid: bytes
    cancel_id: int
    params: _containers.RepeatedCompositeFieldContainer[TeeParam]
    def __init__(self, vm: _Optional[_Union[TeeVm, _Mapping]] = ..., ta_uuid: _Optional[bytes] = ..., login: _Optional[int] = ..., client_uuid: _Optional[bytes] = ..., cancel_id: _Optional[int] = ..., params: _Optional[_Iterable[_Union[TeeParam, _Mapping]]] = ...) -> None: ...

class TeeInvokeCommandRequest(_message.Message):
    __slots__ = ("vm", "session", "epoch", "func", "cancel_id", "params")
    VM_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FUNC_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    vm: TeeVm
    session: int
    epoch: int
    func: int
    cancel_id: int
    params: _containers.RepeatedCompositeFieldContainer[TeeParam]
    def __init__(self, vm: _Optional[_Union[TeeVm, _Mapping]] = ..., session: _Optional[int] = ..., epoch: _Optional[int] = ..., func: _Optional[int] = ..., cancel_id: _Optional[int] = ..., params: _Optional[_Iterable[_Union[TeeParam, _Mapping]]] = ...) -> None: ...

class TeeCloseSessionRequest(_message.Message):
    __slots__ = ("vm", "session", "epoch")
    VM_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    vm: TeeVm
    session: int
    epoch: int
    def __init__(self, vm: _Optional[_Union[TeeVm, _Mapping]] = ..., session: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class TeeCancelRequest(_message.Message):
    __slots__ = ("vm", "session", "epoch", "cancel_id")
    VM_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ID_FIELD_NUMBER: _ClassVar[int]
    vm: TeeVm
    session: int
    epoch: int
    cancel_id: int
    def __init__(self, vm: _Optional[_Union[TeeVm, _Mapping]] = ..., session: _Optional[int] = ..., epoch: _Optional[int] = ..., cancel_id: _Optional[int] = ...) -> None: ...

class TeeReply(_message.Message):
    __slots__ = ("status", "ret", "origin", "session", "epoch", "params")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RET_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    status: TeeStatus
    ret: int
    origin: int
    session: int
    epoch: int
    params: _containers.RepeatedCompositeFieldContainer[TeeParam]
    def __init__(self, status: _Optional[_Union[TeeStatus, str]] = ..., ret: _Optional[int] = ..., origin: _Optional[int] = ..., session: _Optional[int] = ..., epoch: _Optional[int] = ..., params: _Optional[_Iterable[_Union[TeeParam, _Mapping]]] = ...) -> None: ...

class TeeDescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeeTrustedApp(_message.Message):
    __slots__ = ("uuid", "name", "device_enum")
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ENUM_FIELD_NUMBER: _ClassVar[int]
    uuid: bytes
    name: str
    device_enum: bool
    def __init__(self, uuid: _Optional[bytes] = ..., name: _Optional[str] = ..., device_enum: _Optional[bool] = ...) -> None: ...

class TeeDescribeReply(_message.Message):
    __slots__ = ("epoch", "max_sessions_per_vm", "apps")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_VM_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    max_sessions_per_vm: int
    apps: _containers.RepeatedCompositeFieldContainer[TeeTrustedApp]
    def __init__(self, epoch: _Optional[int] = ..., max_sessions_per_vm: _Optional[int] = ..., apps: _Optional[_Iterable[_Union[TeeTrustedApp, _Mapping]]] = ...) -> None: ...
