from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FilterAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILTER_ACTION_HANDLE: _ClassVar[FilterAction]
    FILTER_ACTION_DENY: _ClassVar[FilterAction]
    FILTER_ACTION_FWD_TO_USER: _ClassVar[FilterAction]
FILTER_ACTION_HANDLE: FilterAction
FILTER_ACTION_DENY: FilterAction
FILTER_ACTION_FWD_TO_USER: FilterAction

class AgentFrame(_message.Message):
    __slots__ = ("hello", "vms_registered", "vms_destroyed", "calls", "memory_replies", "filter_reports", "keepalive", "vms_reset", "divergent")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    VMS_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    VMS_DESTROYED_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REPLIES_FIELD_NUMBER: _ClassVar[int]
    FILTER_REPORTS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    VMS_RESET_FIELD_NUMBER: _ClassVar[int]
    DIVERGENT_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    vms_registered: _containers.RepeatedCompositeFieldContainer[VmRegistered]
    vms_destroyed: _containers.RepeatedCompositeFieldContainer[VmDestroyed]
    calls: bytes
    memory_replies: _containers.RepeatedCompositeFieldContainer[MemoryReply]
    filter_reports: _containers.RepeatedCompositeFieldContainer[FilterReport]
    keepalive: Keepalive
    vms_reset: _containers.RepeatedCompositeFieldContainer[VmReset]
    divergent: _containers.RepeatedCompositeFieldContainer[CallRef]
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., vms_registered: _Optional[_Iterable[_Union[VmRegistered, _Mapping]]] = ..., vms_destroyed: _Optional[_Iterable[_Union[VmDestroyed, _Mapping]]] = ..., calls: _Optional[bytes] = ..., memory_replies: _Optional[_Iterable[_Union[MemoryReply, _Mapping]]] = ..., filter_reports: _Optional[_Iterable[_Union[FilterReport, _Mapping]]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ..., vms_reset: _Optional[_Iterable[_Union[VmReset, _Mapping]]] = ..., divergent: _Optional[_Iterable[_Union[CallRef, _Mapping]]] = ...) -> None: ...

class CallRef(_message.Message):
    __slots__ = ("vm_id", "vcpu", "seq")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu: int
    seq: int
    def __init__(self, vm_id: _Optional[int] = ..., vcpu: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class VmReset(_message.Message):
    __slots__ = ("vm_id", "request_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    request_id: int
    def __init__(self, vm_id: _Optional[int] = ..., request_id: _Optional[int] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("host", "agent_version", "protocol", "policy_version", "resumed", "live_vms", "reconcile")
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    LIVE_VMS_FIELD_NUMBER: _ClassVar[int]
    RECONCILE_FIELD_NUMBER: _ClassVar[int]
    host: str
    agent_version: str
    protocol: int
    policy_version: int
    resumed: bool
    live_vms: _containers.RepeatedCompositeFieldContainer[VmRef]
    reconcile: bool
    def __init__(self, host: _Optional[str] = ..., agent_version: _Optional[str] = ..., protocol: _Optional[int] = ..., policy_version: _Optional[int] = ..., resumed: _Optional[bool] = ..., live_vms: _Optional[_Iterable[_Union[VmRef, _Mapping]]] = ..., reconcile: _Optional[bool] = ...) -> None: ...

class VmRef(_message.Message):
    __slots__ = ("vm_id", "incarnation")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    incarnation: str
    def __init__(self, vm_id: _Optional[int] = ..., incarnation: _Optional[str] = ...) -> None: ...

class MemoryRegion(_message.Message):
    __slots__ = ("gpa", "size", "readonly")
    GPA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    gpa: int
    size: int
    readonly: bool
    def __init__(self, gpa: _Optional[int] = ..., size: _Optional[int] = ..., readonly: _Optional[bool] = ...) -> None: ...

class VmRegistered(_message.Message):
    __slots__ = ("vm_id", "name", "profile", "policy_version", "nr_vcpus", "regions", "policy_digest", "incarnation")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NR_VCPUS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    name: str
    profile: str
    policy_version: int
    nr_vcpus: int
    regions: _containers.RepeatedCompositeFieldContainer[MemoryRegion]
    policy_digest: str
    incarnation: str
    def __init__(self, vm_id: _Optional[int] = ..., name: _Optional[str] = ..., profile: _Optional[str] = ..., policy_version: _Optional[int] = ..., nr_vcpus: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[MemoryRegion, _Mapping]]] = ..., policy_digest: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class VmDestroyed(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class FilterReport(_message.Message):
    __slots__ = ("vm_id", "errnos")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    ERRNOS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    errnos: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, vm_id: _Optional[int] = ..., errnos: _Optional[_Iterable[int]] = ...) -> None: ...

class MemoryReply(_message.Message):
    __slots__ = ("request_id", "data", "error", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    data: bytes
    error: int
    message: str
    def __init__(self, request_id: _Optional[int] = ..., data: _Optional[bytes] = ..., error: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ("sent_ns", "echo_ns")
    SENT_NS_FIELD_NUMBER: _ClassVar[int]
    ECHO_NS_FIELD_NUMBER: _ClassVar[int]
    sent_ns: int
    echo_ns: int
    def __init__(self, sent_ns: _Optional[int] = ..., echo_ns: _Optional[int] = ...) -> None: ...

class MemoryWrite(_message.Message):
    __slots__ = ("gpa", "data")
    GPA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    gpa: int
    data: bytes
    def __init__(self, gpa: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ResultWrites(_message.Message):
    __slots__ = ("vm_id", "vcpu", "seq", "writes")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu: int
    seq: int
    writes: _containers.RepeatedCompositeFieldContainer[MemoryWrite]
    def __init__(self, vm_id: _Optional[int] = ..., vcpu: _Optional[int] = ..., seq: _Optional[int] = ..., writes: _Optional[_Iterable[_Union[MemoryWrite, _Mapping]]] = ...) -> None: ...

class MemoryRequest(_message.Message):
    __slots__ = ("request_id", "vm_id", "gpa", "length")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    vm_id: int
    gpa: int
    length: int
    def __init__(self, request_id: _Optional[int] = ..., vm_id: _Optional[int] = ..., gpa: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FilterRecord(_message.Message):
    __slots__ = ("base", "nr_functions", "action", "rule")
    BASE_FIELD_NUMBER: _ClassVar[int]
    NR_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    base: int
    nr_functions: int
    action: FilterAction
    rule: str
    def __init__(self, base: _Optional[int] = ..., nr_functions: _Optional[int] = ..., action: _Optional[_Union[FilterAction, str]] = ..., rule: _Optional[str] = ...) -> None: ...

class AgentRule(_message.Message):
    __slots__ = ("base", "nr_functions", "deadline_us", "fallback", "fallback_mask", "rule")
    BASE_FIELD_NUMBER: _ClassVar[int]
    NR_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_US_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MASK_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    base: int
    nr_functions: int
    deadline_us: int
    fallback: _containers.RepeatedScalarFieldContainer[int]
    fallback_mask: int
    rule: str
    def __init__(self, base: _Optional[int] = ..., nr_functions: _Optional[int] = ..., deadline_us: _Optional[int] = ..., fallback: _Optional[_Iterable[int]] = ..., fallback_mask: _Optional[int] = ..., rule: _Optional[str] = ...) -> None: ...

class StaticAnswer(_message.Message):
    __slots__ = ("function_id", "x", "mask")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    function_id: int
    x: _containers.RepeatedScalarFieldContainer[int]
    mask: int
    def __init__(self, function_id: _Optional[int] = ..., x: _Optional[_Iterable[int]] = ..., mask: _Optional[int] = ...) -> None: ...

class CompiledProfile(_message.Message):
    __slots__ = ("name", "kernel_filter", "rules", "static_answers", "default_deadline_us")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FILTER_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    STATIC_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DEADLINE_US_FIELD_NUMBER: _ClassVar[int]
    name: str
    kernel_filter: _containers.RepeatedCompositeFieldContainer[FilterRecord]
    rules: _containers.RepeatedCompositeFieldContainer[AgentRule]
    static_answers: _containers.RepeatedCompositeFieldContainer[StaticAnswer]
    default_deadline_us: int
    def __init__(self, name: _Optional[str] = ..., kernel_filter: _Optional[_Iterable[_Union[FilterRecord, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[AgentRule, _Mapping]]] = ..., static_answers: _Optional[_Iterable[_Union[StaticAnswer, _Mapping]]] = ..., default_deadline_us: _Optional[int] = ...) -> None: ...

class CompiledPolicy(_message.Message):
    __slots__ = ("version", "digest", "profiles")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    version: int
    digest: str
    profiles: _containers.RepeatedCompositeFieldContainer[CompiledProfile]
    def __init__(self, version: _Optional[int] = ..., digest: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[CompiledProfile, _Mapping]]] = ...) -> None: ...

class VmRejected(_message.Message):
    __slots__ = ("vm_id", "reason")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    reason: str
    def __init__(self, vm_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class BrokerWelcome(_message.Message):
    __slots__ = ("broker_id", "protocol", "policy", "max_batch")
    BROKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    broker_id: str
    protocol: int
    policy: CompiledPolicy
    max_batch: int
    def __init__(self, broker_id: _Optional[str] = ..., protocol: _Optional[int] = ..., policy: _Optional[_Union[CompiledPolicy, _Mapping]] = ..., max_batch: _Optional[int] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class BrokerFrame(_message.Message):
    __slots__ = ("welcome", "results", "memory_requests", "policy", "vms_rejected", "keepalive", "drain", "memory_writes", "resets_done")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VMS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WRITES_FIELD_NUMBER: _ClassVar[int]
    RESETS_DONE_FIELD_NUMBER: _ClassVar[int]
    welcome: BrokerWelcome
    results: bytes
    memory_requests: _containers.RepeatedCompositeFieldContainer[MemoryRequest]
    policy: CompiledPolicy
    vms_rejected: _containers.RepeatedCompositeFieldContainer[VmRejected]
    keepalive: Keepalive
    drain: Drain
    memory_writes: _containers.RepeatedCompositeFieldContainer[ResultWrites]
    resets_done: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, welcome: _Optional[_Union[BrokerWelcome, _Mapping]] = ..., results: _Optional[bytes] = ..., memory_requests: _Optional[_Iterable[_Union[MemoryRequest, _Mapping]]] = ..., policy: _Optional[_Union[CompiledPolicy, _Mapping]] = ..., vms_rejected: _Optional[_Iterable[_Union[VmRejected, _Mapping]]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., memory_writes: _Optional[_Iterable[_Union[ResultWrites, _Mapping]]] = ..., resets_done: _Optional[_Iterable[int]] = ...) -> None: ...
