"""The FF-A handler's configuration: limits, the SPMC ID and the partition set, validated.

The policy's `config:` mapping for the ffa handler is checked here, key by key; anything wrong
raises HandlerConfigError naming the key. Partitions are of a kind: `echo` and `sha256`
are built in; a handler class may add kinds (the installed plugin adds `remote`, a FfaPartition
gRPC service, in handlers.ffa.remote). Without a `partitions` key the handler serves one echo
and one SHA-256 partition, because a Linux guest's FF-A driver fails its probe when no partition
is reported (Linux drivers/firmware/arm_ffa/driver.c, ffa_setup_partitions: no partition, no
FF-A devices). No I/O happens here besides the checks a kind makes of files it names.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hyperbroker.handlers.api import HandlerConfigError
from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.memshare import Limits
from hyperbroker.handlers.ffa.partitions import (
    EchoPartition,
    Partition,
    PartitionInfo,
    PartitionSet,
    Sha256Partition,
)

# uuid5(NAMESPACE_URL, "urn:hyperbroker:ffa:<kind>"): fixed, so guests can match on them.
ECHO_UUID = uuid.UUID("aa9ba0ec-0243-587a-b991-4243e1bc11d5")
SHA256_UUID = uuid.UUID("819ee275-b60a-5424-b301-1338cdd20473")
DEFAULT_PARTITIONS: tuple[Mapping[str, Any], ...] = (
    {"name": "echo", "kind": "echo", "id": 0x8001, "uuid": str(ECHO_UUID)},
    {"name": "sha256", "kind": "sha256", "id": 0x8002, "uuid": str(SHA256_UUID)},
)

KEYS = (
    "partitions",
    "max_rxtx_pages",
    "max_pages_per_share",
    "max_shares_per_vm",
    "max_descriptor_bytes",
    "spmc_id",
)
# Defaults beat both reference mediators: Xen maps one RX/TX page and shares at most 256
# pages, 32 shares per guest; a 64 KiB-page Linux guest needs 16 pages of RX/TX.
DEFAULTS = {
    "max_rxtx_pages": 16,
    "max_pages_per_share": 4096,
    "max_shares_per_vm": 256,
    "max_descriptor_bytes": 64 * 1024,
    "spmc_id": abi.DEFAULT_SPMC_ID,
}
COMMON_KEYS = frozenset({"name", "kind", "id", "uuid", "exec_contexts", "properties"})


@dataclass(frozen=True, slots=True)
class PartitionKind:
    """How to build one kind of partition from its policy entry: the keys it adds to
    COMMON_KEYS, those of them it requires, and a builder that raises HandlerConfigError."""

    keys: frozenset[str]
    required: tuple[str, ...]
    build: Callable[[PartitionInfo, Mapping[str, Any], str], Partition]


BUILTIN_KINDS: Mapping[str, PartitionKind] = {
    "echo": PartitionKind(frozenset(), (), lambda info, spec, where: EchoPartition(info)),
    "sha256": PartitionKind(frozenset(), (), lambda info, spec, where: Sha256Partition(info)),
}


@dataclass(frozen=True, slots=True)
class FfaConfig:
    limits: Limits
    max_rxtx_pages: int
    spmc_id: int
    partitions: PartitionSet


def config_int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise HandlerConfigError(f"{key}: {value!r} is not an integer")
    try:
        n = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise HandlerConfigError(f"{key}: {value!r} is not an integer") from None
    if not lo <= n <= hi:
        raise HandlerConfigError(f"{key}: {n:#x} is outside [{lo:#x}, {hi:#x}]")
    return n


def _partition(spec: Any, where: str, spmc_id: int,
               kinds: Mapping[str, PartitionKind]) -> Partition:
    if not isinstance(spec, Mapping):
        raise HandlerConfigError(f"{where}: a partition is a mapping")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise HandlerConfigError(f"{where}.kind: {kind!r} is not one of {sorted(kinds)}")
    unknown = set(spec) - COMMON_KEYS - kinds[kind].keys
    if unknown:
        raise HandlerConfigError(f"{where}: unknown key(s) {sorted(unknown)} for kind {kind}")
    for needed in ("id", "uuid", *kinds[kind].required):
        if needed not in spec:
            raise HandlerConfigError(f"{where}.{needed}: required")
    pid = config_int(spec["id"], f"{where}.id", abi.ENDPOINT_SECURE_BIT, abi.SPMD_ID - 1)
    if pid == spmc_id:
        raise HandlerConfigError(f"{where}.id: {pid:#x} is the SPMC's ID")
    try:
        puuid = uuid.UUID(str(spec["uuid"]))
    except ValueError:
        raise HandlerConfigError(f"{where}.uuid: {spec['uuid']!r} is not a UUID") from None
    if puuid.int == 0:
        raise HandlerConfigError(f"{where}.uuid: the nil UUID means 'every partition'")
    name = str(spec.get("name", f"{kind}-{pid:#06x}"))
    info = PartitionInfo(
        name=name,
        partition_id=pid,
        uuid=puuid,
        exec_contexts=config_int(spec.get("exec_contexts", 1), f"{where}.exec_contexts", 1,
                                 0xFFFF),
    )
    if "properties" in spec:
        info = PartitionInfo(name, pid, puuid, info.exec_contexts,
                             config_int(spec["properties"], f"{where}.properties", 0, 0x7FF))
    return kinds[kind].build(info, spec, where)


def parse(config: Mapping[str, Any],
          kinds: Mapping[str, PartitionKind] = BUILTIN_KINDS) -> FfaConfig:
    """The validated configuration; HandlerConfigError names the first bad key."""
    values = {**DEFAULTS, **config}
    spmc_id = config_int(values["spmc_id"], "spmc_id", abi.ENDPOINT_SECURE_BIT, abi.SPMD_ID - 1)
    specs = config.get("partitions", DEFAULT_PARTITIONS)
    if not isinstance(specs, Sequence) or isinstance(specs, str | bytes) or not specs:
        raise HandlerConfigError(
            "partitions: a non-empty list (a Linux guest's FF-A probe fails without one)"
        )
    built = [_partition(s, f"partitions[{i}]", spmc_id, kinds) for i, s in enumerate(specs)]
    seen: dict[int, str] = {}
    names: set[str] = set()
    for i, p in enumerate(built):
        if p.info.partition_id in seen:
            raise HandlerConfigError(
                f"partitions[{i}].id: {p.info.partition_id:#x} is also {seen[p.info.partition_id]}"
            )
        if p.info.name in names:
            raise HandlerConfigError(f"partitions[{i}].name: {p.info.name!r} is used twice")
        seen[p.info.partition_id] = p.info.name
        names.add(p.info.name)
    return FfaConfig(
        limits=Limits(
            max_pages_per_share=config_int(values["max_pages_per_share"], "max_pages_per_share",
                                     1, 1 << 32),
            max_shares_per_vm=config_int(values["max_shares_per_vm"], "max_shares_per_vm",
                                         1, 1 << 20),
            max_descriptor_bytes=config_int(values["max_descriptor_bytes"], "max_descriptor_bytes",
                                      64, 1 << 24),
        ),
        max_rxtx_pages=config_int(values["max_rxtx_pages"], "max_rxtx_pages", 1, 0xFFFF),
        spmc_id=spmc_id,
        partitions=PartitionSet(built),
    )
