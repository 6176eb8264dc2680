from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmHandlerViewRequest(_message.Message):
    __slots__ = ("host", "vm", "handler")
    HOST_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    host: str
    vm: str
    handler: str
    def __init__(self, host: _Optional[str] = ..., vm: _Optional[str] = ..., handler: _Optional[str] = ...) -> None: ...

class VmHandlerView(_message.Message):
    __slots__ = ("view", "policy_version")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    view: _struct_pb2.Struct
    policy_version: int
    def __init__(self, view: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class PolicyText(_message.Message):
    __slots__ = ("yaml", "version")
    YAML_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    version: int
    def __init__(self, yaml: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PolicyError(_message.Message):
    __slots__ = ("message", "errno_name", "rules")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERRNO_NAME_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    message: str
    errno_name: str
    rules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, message: _Optional[str] = ..., errno_name: _Optional[str] = ..., rules: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicyReport(_message.Message):
    __slots__ = ("ok", "errors", "version", "compiled_json")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPILED_JSON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    errors: _containers.RepeatedCompositeFieldContainer[PolicyError]
    version: int
    compiled_json: str
    def __init__(self, ok: _Optional[bool] = ..., errors: _Optional[_Iterable[_Union[PolicyError, _Mapping]]] = ..., version: _Optional[int] = ..., compiled_json: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ListHostsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("host", "connected", "vms", "calls", "peer", "connected_since_unix_ns")
    HOST_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    host: str
    connected: bool
    vms: int
    calls: int
    peer: str
    connected_since_unix_ns: int
    def __init__(self, host: _Optional[str] = ..., connected: _Optional[bool] = ..., vms: _Optional[int] = ..., calls: _Optional[int] = ..., peer: _Optional[str] = ..., connected_since_unix_ns: _Optional[int] = ...) -> None: ...

class ListHostsResponse(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[HostInfo]
    def __init__(self, hosts: _Optional[_Iterable[_Union[HostInfo, _Mapping]]] = ...) -> None: ...

class ListVmsRequest(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: str
    def __init__(self, host: _Optional[str] = ...) -> None: ...

class VcpuInfo(_message.Message):
    __slots__ = ("vcpu", "last_seq", "calls", "in_flight")
    VCPU_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    vcpu: int
    last_seq: int
    calls: int
    in_flight: bool
    def __init__(self, vcpu: _Optional[int] = ..., last_seq: _Optional[int] = ..., calls: _Optional[int] = ..., in_flight: _Optional[bool] = ...) -> None: ...

class VmInfo(_message.Message):
    __slots__ = ("host", "name", "vm_id", "profile", "policy_version", "nr_vcpus", "calls", "vcpus", "connected")
    HOST_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NR_VCPUS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    host: str
    name: str
    vm_id: int
    profile: str
    policy_version: int
    nr_vcpus: int
    calls: int
    vcpus: _containers.RepeatedCompositeFieldContainer[VcpuInfo]
    connected: bool
    def __init__(self, host: _Optional[str] = ..., name: _Optional[str] = ..., vm_id: _Optional[int] = ..., profile: _Optional[str] = ..., policy_version: _Optional[int] = ..., nr_vcpus: _Optional[int] = ..., calls: _Optional[int] = ..., vcpus: _Optional[_Iterable[_Union[VcpuInfo, _Mapping]]] = ..., connected: _Optional[bool] = ...) -> None: ...

class ListVmsResponse(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmInfo]
    def __init__(self, vms: _Optional[_Iterable[_Union[VmInfo, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FunctionStats(_message.Message):
    __slots__ = ("handler", "function", "outcome", "calls", "p50_us", "p99_us")
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    P50_US_FIELD_NUMBER: _ClassVar[int]
    P99_US_FIELD_NUMBER: _ClassVar[int]
    handler: str
    function: str
    outcome: str
    calls: int
    p50_us: float
    p99_us: float
    def __init__(self, handler: _Optional[str] = ..., function: _Optional[str] = ..., outcome: _Optional[str] = ..., calls: _Optional[int] = ..., p50_us: _Optional[float] = ..., p99_us: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("calls", "results", "duplicates", "handler_errors", "agents", "vms", "functions", "policy_version")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    HANDLER_ERRORS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    calls: int
    results: int
    duplicates: int
    handler_errors: int
    agents: int
    vms: int
    functions: _containers.RepeatedCompositeFieldContainer[FunctionStats]
    policy_version: int
    def __init__(self, calls: _Optional[int] = ..., results: _Optional[int] = ..., duplicates: _Optional[int] = ..., handler_errors: _Optional[int] = ..., agents: _Optional[int] = ..., vms: _Optional[int] = ..., functions: _Optional[_Iterable[_Union[FunctionStats, _Mapping]]] = ..., policy_version: _Optional[int] = ...) -> None: ...
