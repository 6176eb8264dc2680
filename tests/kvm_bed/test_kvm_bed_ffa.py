"""FF-A memory sharing from a real arm64 guest through real KVM, the agent and the broker's ffa
handler (issue 4, "On the real-KVM bed"). Guest program: vmm/arm64/guests/ffa_share.c.

One boot, one plan step: the guest negotiates FF-A v1.2, gets its endpoint ID, maps RX/TX, reads
both partition descriptors out of RX, has the echo partition return x4..x17 of a DIRECT_REQ2,
shares one page of known bytes (xorshift32 from SEED) with the SHA-256 partition, asks for the
digest with DIRECT_REQ_64 and DIRECT_REQ2, and reclaims. While the share is live it waits
(hb_wait) and the harness, as a second VM registered with the same agent under the same profile
(hyperbroker.testing.vmm over the agent's SEQPACKET socket), tries to reclaim and to hash the
first VM's handle. Encodings as Linux's include/linux/arm_ffa.h and Hafnium's inc/vmapi/hf/ffa.h
define them (Arm DEN0077A, FF-A).

Why the second VM is the harness's and not a second L2 guest: the reference VMM runs its plan's
VMs one after another and destroys each at the end of its step, and the ffa handler reclaims a
destroyed VM's shares (issue 4 item 3); a later L2 VM would only find a dead handle. The harness
VM reaches the broker through the same agent and handler, and the first VM's share is live.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.handlers.ffa.config import ECHO_UUID, SHA256_UUID
from hyperbroker.handlers.ffa.discovery import uuid_to_pair
from hyperbroker.handlers.ffa.partitions import digest_words
from hyperbroker.testing.vmm import GuestRam, VmmClient
from hyperbroker_tools import kvm_bed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GUEST = "ffa_share"
PROFILE = "ffa"
ECHO_ID, SHA256_ID = 0x8001, 0x8002
# The ffa handler with the echo and SHA-256 partitions named explicitly (docs/ffa.md
# "Configuration"); the deadline leaves room for the guest-memory reads of a share and a hash
# on a busy TCG machine (each MEM_READ is a round trip to the VMM in L1).
POLICY = f"""\
handlers:
  ffa:
    plugin: ffa
    config:
      partitions:
        - {{name: echo, kind: echo, id: {ECHO_ID:#x}, uuid: {ECHO_UUID}}}
        - {{name: sha256, kind: sha256, id: {SHA256_ID:#x}, uuid: {SHA256_UUID}}}
profiles:
  {PROFILE}:
    rules:
      - {{name: ffa, abi: ffa, action: forward, handler: ffa, fallback: not_supported,
         deadline_ms: 2000}}
"""

SEED = 0x5EED_1234
PAGE = 4096
RANGE_OFFSET, RANGE_LENGTH = 0x123, 0x456  # guests/ffa_share.c: the DIRECT_REQ2 range

SMCCC_VERSION = 0x8000_0000
SMCCC_VERSION_1_1 = 0x1_0001
SMCCC_VERSION_1_2 = 0x1_0002
FFA_ERROR = 0x8400_0060
FFA_SUCCESS_32 = 0x8400_0061
FFA_VERSION = 0x8400_0063
FFA_RX_RELEASE = 0x8400_0065
FFA_RXTX_MAP_64 = 0xC400_0066
FFA_RXTX_UNMAP = 0x8400_0067
FFA_PARTITION_INFO_GET = 0x8400_0068
FFA_ID_GET = 0x8400_0069
FFA_MSG_SEND_DIRECT_REQ_64 = 0xC400_006F
FFA_MSG_SEND_DIRECT_RESP_64 = 0xC400_0070
FFA_MEM_SHARE_64 = 0xC400_0073
FFA_MEM_RECLAIM = 0x8400_0077
FFA_MSG_SEND_DIRECT_REQ2 = 0xC400_008D
FFA_MSG_SEND_DIRECT_RESP2 = 0xC400_008E
VERSION_1_2 = 0x1_0002
INVALID_PARAMETERS_W2 = 0xFFFF_FFFE  # FFA_ERROR: -2 zero-extended in w2
BUSY_W2 = 0xFFFF_FFFC  # -4
STATUS_INVALID_PARAMETERS = (1 << 64) - 2  # the SHA-256 partition's x3 status, sign-extended
HANDLE_HYPERVISOR_BIT = 1 << 63  # Hafnium FFA_MEMORY_HANDLE_ALLOCATOR_BIT, Xen FFA_HANDLE_HYP_FLAG
# FFA_PARTITION_INFO_GET properties the handler reports to a v1.2 caller: DIRECT_REQ receive,
# AArch64, REQ2 receive.
PROPERTIES_V1_2 = (1 << 0) | (1 << 8) | (1 << 9)

SECOND_VM = "ffa-second-vm"
SECOND_VM_RAM = 0x4000_0000
HANDLE_TOKEN = re.compile(r"^ffa-share-handle:(0x[0-9a-f]+)$")
GUEST_CHECKS = {
    "version", "id", "map", "info", "sha256_partition_found", "echo_partition_found",
    "info.busy", "rx_release", "echo2", "share", "hash", "hash2.range", "hash.after", "reclaim",
    "hash.reclaimed", "reclaim.again", "unmap",
}


def known_page(seed: int) -> bytes:
    """guests/ffa_share.c fill_page: xorshift32 from `seed`, each state little-endian."""
    x, out = seed or 1, bytearray()
    for _ in range(PAGE // 4):
        x ^= (x << 13) & 0xFFFF_FFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFF_FFFF
        out += x.to_bytes(4, "little")
    return bytes(out)


@dataclasses.dataclass
class SecondVm:
    """What the harness's VM got when it used the first VM's handle."""

    handle: int
    version: tuple[int, ...] = ()
    id_get: tuple[int, ...] = ()
    reclaim: tuple[int, ...] = ()
    hash: tuple[int, ...] = ()
    destroy_status: int | None = None
    error: str | None = None


@dataclasses.dataclass
class FfaRun:
    result: kvm_bed.BootResult
    second: SecondVm | None
    metrics: list[kvm_bed.MetricSample]

    def regs(self, label: str) -> dict[int, int]:
        """x4.. of a call_wide call (its "regs" line)."""
        prefix = f"HB g[{GUEST}] regs label={label} "
        [line] = [x for x in self.result.lines if x.startswith(prefix)]
        return {int(k): int(v, 0) for k, v in re.findall(r"x(\d+)=(0x[0-9a-f]+)", line)}

    def metric(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.metrics
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def _second_vm(socket: Path, handle: int) -> SecondVm:
    """A second VM on the same agent and profile tries the first VM's live handle."""
    seen = SecondVm(handle)
    client = await VmmClient.connect(str(socket), "seqpacket")
    ram = GuestRam(SECOND_VM_RAM, 1 << 20)
    try:
        reg = await client.register(SECOND_VM, 1, PROFILE, ram)
        seen.version = (await client.call(reg.vm_id, 0, FFA_VERSION, [VERSION_1_2])).x
        seen.id_get = (await client.call(reg.vm_id, 0, FFA_ID_GET)).x
        own = seen.id_get[2] & 0xFFFF
        seen.reclaim = (await client.call(
            reg.vm_id, 0, FFA_MEM_RECLAIM, [handle & 0xFFFF_FFFF, handle >> 32, 0])).x
        seen.hash = (await client.call(
            reg.vm_id, 0, FFA_MSG_SEND_DIRECT_REQ_64, [own << 16 | SHA256_ID, 0, handle, 0, 0])).x
        seen.destroy_status = await client.destroy(reg.vm_id)
    finally:
        client.close()
        ram.close()
    return seen


@pytest.fixture(scope="module")
def ffa_run(bed: kvm_bed.Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FfaRun]:
    work = tmp_path_factory.mktemp("kvm-bed-ffa")
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    second: list[SecondVm] = []
    with kvm_bed.Services(policy, work) as services:

        def on_wait(token: str) -> None:
            m = HANDLE_TOKEN.match(token)
            if m is None:
                return
            handle = int(m.group(1), 16)
            assert services.agent is not None
            agent_socket = services.agent.socket
            try:
                second.append(asyncio.run(_second_vm(agent_socket, handle)))
            except Exception as e:  # reported by the second VM's test, with the console
                second.append(SecondVm(handle, error=f"{type(e).__name__}: {e}"))

        try:
            result = kvm_bed.boot(bed, [kvm_bed.run_step(GUEST, profile=PROFILE, args=[SEED])],
                                  agent_socket=services.stream_socket, on_wait=on_wait,
                                  timeout=60)
        except kvm_bed.BedError as e:
            pytest.fail(f"{e}\n{services.logs()}")
        yield FfaRun(result, second[0] if second else None, services.broker_metrics())


def test_the_guest_negotiates_v1_2_and_gets_its_endpoint_id(ffa_run: FfaRun) -> None:
    result = ffa_run.result
    # KVM keeps SMCCC_VERSION (architecture range) and says 1.1 (a later KVM may say 1.2); the
    # guest does not insist on 1.2 and uses x0..x17 anyway (measured on the bed's kernel).
    assert result.call(GUEST, "smccc_version").x[0] in (SMCCC_VERSION_1_1, SMCCC_VERSION_1_2)
    assert result.call(GUEST, "version").x[0] == VERSION_1_2  # a version, not FFA_SUCCESS
    got = result.call(GUEST, "id")
    assert got.x[0] == FFA_SUCCESS_32 and 1 <= got.x[2] <= 0x7FFF  # never 0, the hypervisor's
    assert result.call(GUEST, "map").x[0] == FFA_SUCCESS_32  # FFA_RXTX_MAP_64


def test_both_partition_descriptors_are_read_out_of_rx(ffa_run: FfaRun) -> None:
    result = ffa_run.result
    assert result.call(GUEST, "info").x == (FFA_SUCCESS_32, 0, 2, 24)  # count, size
    lines = [x for x in result.lines if x.startswith(f"HB g[{GUEST}] partition ")]
    seen = [{k: int(v, 0) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", line)}
            for line in lines]
    expected = [(0, ECHO_ID, ECHO_UUID, 0), (1, SHA256_ID, SHA256_UUID, 1)]
    assert len(seen) == len(expected), lines
    for got, (index, pid, puuid, is_sha) in zip(seen, expected, strict=True):
        lo, hi = uuid_to_pair(uuid.UUID(str(puuid)))
        assert got == {"index": index, "id": pid, "contexts": 1, "properties": PROPERTIES_V1_2,
                       "uuid_lo": lo, "uuid_hi": hi, "sha256": is_sha}, lines
    # RX stays the guest's until FFA_RX_RELEASE: a second fill is BUSY.
    assert result.call(GUEST, "info.busy").x == (FFA_ERROR, 0, BUSY_W2, 0)
    assert result.call(GUEST, "rx_release").x[0] == FFA_SUCCESS_32


def echo_word(i: int) -> int:
    """guests/ffa_share.c echo_word: x(i) of the echo request."""
    return 0xEC00_0000_0000_0000 | i << 32 | (0x0E0E_0000 + i)


def test_x4_to_x17_travel_both_ways_through_a_direct_req2_to_echo(ffa_run: FfaRun) -> None:
    """SMCCC 1.2 registers through KVM, the VMM, the agent and the broker (DIRECT_REQ2)."""
    own = ffa_run.result.call(GUEST, "id").x[2]
    resp = ffa_run.result.call(GUEST, "echo2")
    assert resp.x == (FFA_MSG_SEND_DIRECT_RESP2, ECHO_ID << 16 | own, 0, 0)  # x2/x3 MBZ
    assert ffa_run.regs("echo2") == {i: echo_word(i) for i in range(4, 18)}


def _handle(ffa_run: FfaRun) -> int:
    share = ffa_run.result.call(GUEST, "share")
    return (share.x[3] & 0xFFFF_FFFF) << 32 | (share.x[2] & 0xFFFF_FFFF)


def test_the_page_is_shared_under_a_hypervisor_handle(ffa_run: FfaRun) -> None:
    share = ffa_run.result.call(GUEST, "share")
    assert share.x[0] == FFA_SUCCESS_32 and share.x[1] == 0  # FFA_MEM_SHARE: handle in w2/w3
    handle = _handle(ffa_run)
    own = ffa_run.result.call(GUEST, "id").x[2]
    # Bit 63: allocated by the hypervisor; the endpoint ID above the per-VM counter.
    assert handle & HANDLE_HYPERVISOR_BIT
    assert (handle >> 32) & 0x7FFF == own and handle & 0xFFFF_FFFF != 0


def test_the_hashing_partition_answers_the_digest_of_the_known_bytes(ffa_run: FfaRun) -> None:
    result, own = ffa_run.result, ffa_run.result.call(GUEST, "id").x[2]
    page = known_page(SEED)
    target = SHA256_ID << 16 | own  # responder << 16 | requester (w1 of a direct message)
    for label in ("hash", "hash.after"):
        resp = result.call(GUEST, label)
        assert resp.x == (FFA_MSG_SEND_DIRECT_RESP_64, target, 0, 0), label  # x3 = status 0
        regs = ffa_run.regs(label)
        assert tuple(regs[i] for i in range(4, 8)) == digest_words(page), label
        assert regs[8] == 0, label  # v1.2 caller: x8..x17 zero
    # DIRECT_REQ2 routed by UUID: status in x4, the digest of the range in x5..x8.
    resp2 = result.call(GUEST, "hash2.range")
    assert resp2.x == (FFA_MSG_SEND_DIRECT_RESP2, target, 0, 0)
    regs = ffa_run.regs("hash2.range")
    assert regs[4] == 0
    assert tuple(regs[i] for i in range(5, 9)) == digest_words(
        page[RANGE_OFFSET : RANGE_OFFSET + RANGE_LENGTH])
    assert digest_words(page) == tuple(
        int.from_bytes(hashlib.sha256(page).digest()[i : i + 8], "little") for i in range(0, 32, 8))


def test_a_second_vm_can_neither_reclaim_nor_hash_the_first_vms_handle(ffa_run: FfaRun) -> None:
    second = ffa_run.second
    assert second is not None, f"the guest never waited\n{ffa_run.result.console()}"
    assert second.error is None, f"{second.error}\n{ffa_run.result.console()}"
    assert second.handle == _handle(ffa_run)  # the live handle the guest printed
    assert second.version[0] == VERSION_1_2
    assert second.id_get[0] == FFA_SUCCESS_32
    assert second.id_get[2] != ffa_run.result.call(GUEST, "id").x[2]  # fleet-unique IDs
    # Not a handle this VM owns: INVALID_PARAMETERS, as Xen answers (xen/arch/arm/tee/ffa_shm.c).
    assert second.reclaim[:4] == (FFA_ERROR, 0, INVALID_PARAMETERS_W2, 0)
    # The partition sees no grant from this VM under that handle: status, no digest.
    assert second.hash[0] == FFA_MSG_SEND_DIRECT_RESP_64
    assert second.hash[3:8] == (STATUS_INVALID_PARAMETERS, 0, 0, 0, 0)
    assert second.destroy_status == 0
    # ...and the first VM's share was untouched: it still hashed afterwards (guest check).
    assert ffa_run.result.call(GUEST, "hash.after").x[3] == 0


def test_reclaim_ends_the_share_and_a_second_reclaim_is_invalid_parameters(
    ffa_run: FfaRun,
) -> None:
    result = ffa_run.result
    assert result.call(GUEST, "reclaim").x == (FFA_SUCCESS_32, 0, 0, 0)
    dead = result.call(GUEST, "hash.reclaimed")  # the partition can no longer reach the page
    assert dead.x[0] == FFA_MSG_SEND_DIRECT_RESP_64 and dead.x[3] == STATUS_INVALID_PARAMETERS
    assert ffa_run.regs("hash.reclaimed")[4] == 0  # no digest
    assert result.call(GUEST, "reclaim.again").x == (FFA_ERROR, 0, INVALID_PARAMETERS_W2, 0)
    assert result.call(GUEST, "unmap").x[0] == FFA_SUCCESS_32


def test_the_guest_checked_every_step_and_every_ffa_call_reached_the_broker(
    ffa_run: FfaRun,
) -> None:
    result = ffa_run.result
    checks = dict(re.findall(rf"^HB g\[{GUEST}\] check name=(\S+) ok=(\d)$",
                             "\n".join(result.lines), re.M))
    assert checks == dict.fromkeys(GUEST_CHECKS, "1"), result.console()
    run = result.run(GUEST)
    assert run.ok and run.status == 0 and run.link_failures == 0, result.console()
    assert run.fids == {  # SMCCC_VERSION stayed in KVM: no exit for it
        FFA_VERSION: 1, FFA_ID_GET: 1, FFA_RXTX_MAP_64: 1, FFA_PARTITION_INFO_GET: 2,
        FFA_RX_RELEASE: 1, FFA_MEM_SHARE_64: 1, FFA_MSG_SEND_DIRECT_REQ_64: 3,
        FFA_MSG_SEND_DIRECT_REQ2: 2, FFA_MEM_RECLAIM: 2, FFA_RXTX_UNMAP: 1,
    }
    assert SMCCC_VERSION not in run.fids
    # The handler went to guest memory through the VMM: both ends of RX and TX at map time; the
    # descriptor out of TX and both ends of the shared page at share time; the page once per
    # hash the first VM asked for while the share was live (the second VM's reached nothing);
    # one write, the descriptors into RX.
    assert (run.mem_reads, run.mem_writes, run.mem_refused) == (4 + 3 + 3, 1, 0)
    # The handler's own counts (handlers/ffa/metrics.py): one share, one reclaim by the guest,
    # three hashes of the first VM and one of the second, errors by code.
    assert ffa_run.metric("hyperbroker_ffa_shares_total", kind="share") == 1
    assert ffa_run.metric("hyperbroker_ffa_pages_shared_total", kind="share") == 1
    assert ffa_run.metric("hyperbroker_ffa_reclaims_total", reason="guest") == 1
    assert ffa_run.metric("hyperbroker_ffa_reclaims_total", reason="vm_destroyed") == 0
    assert ffa_run.metric("hyperbroker_ffa_direct_messages_total", partition="sha256",
                          kind="direct_req_64", result="ok") == 4
    assert ffa_run.metric("hyperbroker_ffa_direct_messages_total", partition="sha256",
                          kind="direct_req2", result="ok") == 1
    assert ffa_run.metric("hyperbroker_ffa_direct_messages_total", partition="echo",
                          kind="direct_req2", result="ok") == 1
    assert ffa_run.metric("hyperbroker_ffa_errors_total", function="FFA_MEM_RECLAIM",
                          code="INVALID_PARAMETERS") == 2
    assert ffa_run.metric("hyperbroker_ffa_errors_total", function="FFA_PARTITION_INFO_GET",
                          code="BUSY") == 1
