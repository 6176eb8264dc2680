"""The FF-A handler's configuration: limits, the SPMC ID and the partition set, validated.

The policy's `config:` mapping for the ffa handler is checked here, key by key; anything wrong
raises HandlerConfigError naming the key. Partitions are `echo`, `sha256` (built in) or
`remote` (a FfaPartition gRPC service). Without a `partitions` key the handler serves one echo
and one SHA-256 partition, because a Linux guest's FF-A driver fails its probe when no partition
is reported (reference/ffa.md §7 step 8). No I/O happens here besides reading TLS files named
in the configuration; channels open on first use.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

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
from hyperbroker.handlers.ffa.remote import RemotePartition

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
# Defaults beat both reference mediators (§6): Xen maps one RX/TX page and shares at most 256
# pages, 32 shares per guest; a 64 KiB-page Linux guest needs 16 pages of RX/TX.
DEFAULTS = {
    "max_rxtx_pages": 16,
    "max_pages_per_share": 4096,
    "max_shares_per_vm": 256,
    "max_descriptor_bytes": 64 * 1024,
    "spmc_id": abi.DEFAULT_SPMC_ID,
}
PARTITION_KEYS = {
    "echo": {"name", "kind", "id", "uuid", "exec_contexts", "properties"},
    "sha256": {"name", "kind", "id", "uuid", "exec_contexts", "properties"},
    "remote": {"name", "kind", "id", "uuid", "exec_contexts", "properties", "target",
               "timeout_ms", "tls_ca", "tls_cert", "tls_key"},
}


@dataclass(frozen=True, slots=True)
class FfaConfig:
    limits: Limits
    max_rxtx_pages: int
    spmc_id: int
    partitions: PartitionSet


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise HandlerConfigError(f"{key}: {value!r} is not an integer")
    try:
        n = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise HandlerConfigError(f"{key}: {value!r} is not an integer") from None
    if not lo <= n <= hi:
        raise HandlerConfigError(f"{key}: {n:#x} is outside [{lo:#x}, {hi:#x}]")
    return n


def _read(path: Any, key: str) -> bytes:
    try:
        return Path(str(path)).read_bytes()
    except OSError as err:
        raise HandlerConfigError(f"{key}: cannot read {path}: {err.strerror}") from None


def _partition(spec: Any, where: str, spmc_id: int) -> Partition:
    if not isinstance(spec, Mapping):
        raise HandlerConfigError(f"{where}: a partition is a mapping")
    kind = spec.get("kind")
    if kind not in PARTITION_KEYS:
        raise HandlerConfigError(f"{where}.kind: {kind!r} is not one of {sorted(PARTITION_KEYS)}")
    unknown = set(spec) - PARTITION_KEYS[kind]
    if unknown:
        raise HandlerConfigError(f"{where}: unknown key(s) {sorted(unknown)} for kind {kind}")
    for needed in ("id", "uuid") + (("target",) if kind == "remote" else ()):
        if needed not in spec:
            raise HandlerConfigError(f"{where}.{needed}: required")
    pid = _int(spec["id"], f"{where}.id", abi.ENDPOINT_SECURE_BIT, abi.SPMD_ID - 1)
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
        exec_contexts=_int(spec.get("exec_contexts", 1), f"{where}.exec_contexts", 1, 0xFFFF),
    )
    if "properties" in spec:
        info = PartitionInfo(name, pid, puuid, info.exec_contexts,
                             _int(spec["properties"], f"{where}.properties", 0, 0x7FF))
    if kind == "echo":
        return EchoPartition(info)
    if kind == "sha256":
        return Sha256Partition(info)
    credentials = None
    if any(k in spec for k in ("tls_ca", "tls_cert", "tls_key")):
        if ("tls_cert" in spec) != ("tls_key" in spec):
            raise HandlerConfigError(f"{where}.tls_cert/tls_key: give both or neither")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(spec["tls_ca"], f"{where}.tls_ca") if "tls_ca" in spec
            else None,
            private_key=_read(spec["tls_key"], f"{where}.tls_key") if "tls_key" in spec else None,
            certificate_chain=_read(spec["tls_cert"], f"{where}.tls_cert")
            if "tls_cert" in spec else None,
        )
    target = spec["target"]
    if not isinstance(target, str) or not target:
        raise HandlerConfigError(f"{where}.target: {target!r} is not host:port")
    timeout_ms = _int(spec.get("timeout_ms", 1000), f"{where}.timeout_ms", 1, 60_000)
    return RemotePartition(info, target, timeout_s=timeout_ms / 1000, credentials=credentials)


def parse(config: Mapping[str, Any]) -> FfaConfig:
    """The validated configuration; HandlerConfigError names the first bad key."""
    values = {**DEFAULTS, **config}
    spmc_id = _int(values["spmc_id"], "spmc_id", abi.ENDPOINT_SECURE_BIT, abi.SPMD_ID - 1)
    specs = config.get("partitions", DEFAULT_PARTITIONS)
    if not isinstance(specs, Sequence) or isinstance(specs, str | bytes) or not specs:
        raise HandlerConfigError(
            "partitions: a non-empty list (a Linux guest's FF-A probe fails without one)"
        )
    built = [_partition(s, f"partitions[{i}]", spmc_id) for i, s in enumerate(specs)]
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
            max_pages_per_share=_int(values["max_pages_per_share"], "max_pages_per_share",
                                     1, 1 << 32),
            max_shares_per_vm=_int(values["max_shares_per_vm"], "max_shares_per_vm", 1, 1 << 20),
            max_descriptor_bytes=_int(values["max_descriptor_bytes"], "max_descriptor_bytes",
                                      64, 1 << 24),
        ),
        max_rxtx_pages=_int(values["max_rxtx_pages"], "max_rxtx_pages", 1, 0xFFFF),
        spmc_id=spmc_id,
        partitions=PartitionSet(built),
    )
