from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FfaMessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FFA_MESSAGE_KIND_UNSPECIFIED: _ClassVar[FfaMessageKind]
    FFA_MESSAGE_KIND_DIRECT_REQ_32: _ClassVar[FfaMessageKind]
    FFA_MESSAGE_KIND_DIRECT_REQ_64: _ClassVar[FfaMessageKind]
    FFA_MESSAGE_KIND_DIRECT_REQ2: _ClassVar[FfaMessageKind]
FFA_MESSAGE_KIND_UNSPECIFIED: FfaMessageKind
FFA_MESSAGE_KIND_DIRECT_REQ_32: FfaMessageKind
FFA_MESSAGE_KIND_DIRECT_REQ_64: FfaMessageKind
FFA_MESSAGE_KIND_DIRECT_REQ2: FfaMessageKind

class FfaShareGrant(_message.Message):
    __slots__ = ("handle", "size", "writable", "lent")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    LENT_FIELD_NUMBER: _ClassVar[int]
    handle: int
    size: int
    writable: bool
    lent: bool
    def __init__(self, handle: _Optional[int] = ..., size: _Optional[int] = ..., writable: _Optional[bool] = ..., lent: _Optional[bool] = ...) -> None: ...

class FfaDirectRequest(_message.Message):
    __slots__ = ("vm", "sender_id", "receiver_id", "kind", "service_uuid", "payload", "grants")
    VM_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    vm: str
    sender_id: int
    receiver_id: int
    kind: FfaMessageKind
    service_uuid: bytes
    payload: _containers.RepeatedScalarFieldContainer[int]
    grants: _containers.RepeatedCompositeFieldContainer[FfaShareGrant]
    def __init__(self, vm: _Optional[str] = ..., sender_id: _Optional[int] = ..., receiver_id: _Optional[int] = ..., kind: _Optional[_Union[FfaMessageKind, str]] = ..., service_uuid: _Optional[bytes] = ..., payload: _Optional[_Iterable[int]] = ..., grants: _Optional[_Iterable[_Union[FfaShareGrant, _Mapping]]] = ...) -> None: ...

class FfaMemoryAccess(_message.Message):
    __slots__ = ("request_id", "handle", "offset", "length", "write_data")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    WRITE_DATA_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    handle: int
    offset: int
    length: int
    write_data: bytes
    def __init__(self, request_id: _Optional[int] = ..., handle: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., write_data: _Optional[bytes] = ...) -> None: ...

class FfaMemoryResult(_message.Message):
    __slots__ = ("request_id", "data", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    data: bytes
    error: int
    def __init__(self, request_id: _Optional[int] = ..., data: _Optional[bytes] = ..., error: _Optional[int] = ...) -> None: ...

class FfaDirectResponse(_message.Message):
    __slots__ = ("payload", "error")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    payload: _containers.RepeatedScalarFieldContainer[int]
    error: int
    def __init__(self, payload: _Optional[_Iterable[int]] = ..., error: _Optional[int] = ...) -> None: ...

class FfaPartitionInbound(_message.Message):
    __slots__ = ("request", "memory")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    request: FfaDirectRequest
    memory: FfaMemoryResult
    def __init__(self, request: _Optional[_Union[FfaDirectRequest, _Mapping]] = ..., memory: _Optional[_Union[FfaMemoryResult, _Mapping]] = ...) -> None: ...

class FfaPartitionOutbound(_message.Message):
    __slots__ = ("access", "response")
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    access: FfaMemoryAccess
    response: FfaDirectResponse
    def __init__(self, access: _Optional[_Union[FfaMemoryAccess, _Mapping]] = ..., response: _Optional[_Union[FfaDirectResponse, _Mapping]] = ...) -> None: ...

class FfaReclaimRequest(_message.Message):
    __slots__ = ("vm", "sender_id", "receiver_id", "handle")
    VM_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    vm: str
    sender_id: int
    receiver_id: int
    handle: int
    def __init__(self, vm: _Optional[str] = ..., sender_id: _Optional[int] = ..., receiver_id: _Optional[int] = ..., handle: _Optional[int] = ...) -> None: ...

class FfaReclaimReply(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: int
    def __init__(self, error: _Optional[int] = ...) -> None: ...

class FfaVmDestroyedRequest(_message.Message):
    __slots__ = ("vm", "endpoint_id", "receiver_id")
    VM_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    vm: str
    endpoint_id: int
    receiver_id: int
    def __init__(self, vm: _Optional[str] = ..., endpoint_id: _Optional[int] = ..., receiver_id: _Optional[int] = ...) -> None: ...

class FfaVmDestroyedReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
