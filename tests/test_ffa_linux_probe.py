"""The Linux arm_ffa driver's probe, replayed call by call (Linux's probe,
drivers/firmware/arm_ffa/driver.c).

`linux_probe` makes the calls of drivers/firmware/arm_ffa/driver.c `ffa_init` in order and takes
the same decisions from each answer; a step the driver treats as fatal fails the replay. Step 1
(`ffa_transport_init`: SMCCC >= 1.2 and a conduit) is answered by KVM's SMCCC_VERSION, not by
this handler, so the replay starts at step 2.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

from hyperbroker.handlers.ffa import FfaHandler, abi
from hyperbroker.handlers.ffa.config import ECHO_UUID, SHA256_UUID
from hyperbroker.smccc import to_s32
from hyperbroker.testing.ffa import RX_ADDRESS, TX_ADDRESS, FfaGuest

NIL = (0, 0, 0, 0)


class ProbeFailed(AssertionError):
    pass


@dataclass
class Probe:
    version: int = 0
    vm_id: int = 0
    mem_ops_native: bool = False
    req2: bool = False
    notifications: bool = False
    partitions: list[tuple[int, uuid.UUID, int]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)


async def linux_probe(g: FfaGuest, driver_version: int = abi.VERSION_1_2,
                      page_size: int = 4096) -> Probe:
    p = Probe()

    async def call(fid: int, *args: int) -> tuple[int, ...]:
        p.calls.append(abi.function_name(fid))
        return (await g.call(fid, *args)).x

    async def features(fid: int) -> tuple[int, ...] | None:
        x = await call(abi.FFA_FEATURES, fid)
        return None if x[0] == abi.FFA_ERROR else x

    # Step 2: FFA_VERSION.
    x = await call(abi.FFA_VERSION, driver_version)
    if to_s32(x[0]) == -1:
        raise ProbeFailed("FFA_VERSION: -EOPNOTSUPP")
    fw = x[0] & abi.W_MASK
    if abi.version_major(fw) > 1 or fw < abi.VERSION_1_0:
        raise ProbeFailed(f"FFA_VERSION: incompatible {fw:#x}")
    p.version = min(fw, driver_version)
    g.version = p.version
    # Step 3: FFA_ID_GET.
    x = await call(abi.FFA_ID_GET)
    if x[0] == abi.FFA_ERROR:
        raise ProbeFailed("failed to obtain VM id")
    p.vm_id = g.endpoint_id = x[2] & 0xFFFF
    # Step 4: FFA_FEATURES(FN64_RXTX_MAP): minimum buffer size, never fatal.
    x = await features(abi.FFA_RXTX_MAP_64)
    min_size = {0: 4096, 1: 65536, 2: 16384}.get(x[2] & 0x3, 4096) if x else 4096
    bufsz = max(page_size, min_size)
    # Step 5: FFA_FN64_RXTX_MAP.
    x = await call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, RX_ADDRESS, bufsz // 4096)
    if x[0] == abi.FFA_ERROR:
        raise ProbeFailed("failed to register FFA RxTx buffers")
    # Step 6: ffa_drvinfo_flags_init.
    p.mem_ops_native = bool(await features(abi.FFA_MEM_LEND_64)
                            or await features(abi.FFA_MEM_SHARE_64))
    p.req2 = bool(await features(abi.FFA_MSG_SEND_DIRECT_REQ2)
                  or await features(abi.FFA_MSG_SEND_DIRECT_RESP2))
    # Step 7: ffa_notifications_setup.
    bitmap = await features(abi.FFA_NOTIFICATION_BITMAP_CREATE)
    if bitmap:
        await call(abi.FFA_NOTIFICATION_BITMAP_CREATE, p.vm_id, 2)
    sri = await call(abi.FFA_FEATURES, 2)
    npi = await call(abi.FFA_FEATURES, 1)
    p.notifications = sri[0] != abi.FFA_ERROR or npi[0] != abi.FFA_ERROR
    # Step 8: ffa_setup_partitions.
    if p.version > abi.VERSION_1_0 and await features(abi.FFA_PARTITION_INFO_GET_REGS):
        start, last = 0, None
        while last is None or start <= last:
            x = await call(abi.FFA_PARTITION_INFO_GET_REGS, 0, 0, start)
            if x[0] == abi.FFA_ERROR:
                raise ProbeFailed("PARTITION_INFO_GET_REGS failed")
            last, current = x[2] & 0xFFFF, x[2] >> 16 & 0xFFFF
            for i in range(current - start + 1):
                reg0, lo, hi = x[3 + 3 * i : 6 + 3 * i]
                raw = lo.to_bytes(8, "little") + hi.to_bytes(8, "little")
                p.partitions.append((reg0 & 0xFFFF, uuid.UUID(bytes=raw), reg0 >> 32))
            start = current + 1
    else:
        count_flag = 1 if p.version > abi.VERSION_1_0 else 0
        x = await call(abi.FFA_PARTITION_INFO_GET, *NIL, count_flag)
        if x[0] == abi.FFA_ERROR:
            raise ProbeFailed("PARTITION_INFO_GET count failed")
        if not count_flag:
            await call(abi.FFA_RX_RELEASE)
        x = await call(abi.FFA_PARTITION_INFO_GET, *NIL, 0)
        if x[0] == abi.FFA_ERROR:
            raise ProbeFailed("PARTITION_INFO_GET failed")
        count = x[2]
        size = 8 if p.version == abi.VERSION_1_0 else x[3]
        raw = g.peek(RX_ADDRESS, count * size)
        await call(abi.FFA_RX_RELEASE)
        for i in range(count):
            pid, _, props = struct.unpack_from("<HHI", raw, i * size)
            puuid = uuid.UUID(bytes=raw[i * size + 8 : i * size + 24]) if size >= 24 else None
            p.partitions.append((pid, puuid or uuid.UUID(int=0), props))
    if len(p.partitions) <= 0:
        raise ProbeFailed("No partitions found")
    return p


CONFIGURED = [(0x8001, ECHO_UUID), (0x8002, SHA256_UUID)]


async def test_linux_v1_2_probe_completes_and_registers_the_partitions() -> None:
    g = FfaGuest(FfaHandler({}))
    p = await linux_probe(g)
    assert p.version == abi.VERSION_1_2 and 0 < p.vm_id < 0x8000
    assert p.mem_ops_native and p.req2 and not p.notifications
    assert "FFA_PARTITION_INFO_GET_REGS" in p.calls
    assert [(pid, u) for pid, u, _ in p.partitions] == CONFIGURED
    assert all(props & abi.PROP_AARCH64 for _, _, props in p.partitions)  # SMC64 messages


async def test_linux_v1_1_probe_reads_descriptors_from_rx() -> None:
    g = FfaGuest(FfaHandler({}))
    p = await linux_probe(g, abi.VERSION_1_1)
    assert p.version == abi.VERSION_1_1 and not p.req2
    assert p.calls.count("FFA_PARTITION_INFO_GET") == 2 and p.calls[-1] == "FFA_RX_RELEASE"
    assert [(pid, u) for pid, u, _ in p.partitions] == CONFIGURED


async def test_linux_v1_0_probe_uses_full_calls_and_releases_rx() -> None:
    g = FfaGuest(FfaHandler({}))
    p = await linux_probe(g, abi.VERSION_1_0)
    assert [pid for pid, _, _ in p.partitions] == [0x8001, 0x8002]
    assert p.calls.count("FFA_RX_RELEASE") == 2


async def test_linux_probe_with_64k_pages_maps_16_page_buffers() -> None:
    # Xen maps exactly one page and pKVM one kernel page: a 64 KiB-page guest needs 16.
    g = FfaGuest(FfaHandler({}))
    p = await linux_probe(g, page_size=65536)
    assert len(p.partitions) == 2


async def test_after_probe_the_driver_can_message_and_rerun_the_probe_steps() -> None:
    g = FfaGuest(FfaHandler({}))
    p = await linux_probe(g)
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, abi.pack_target(p.vm_id, 0x8001), 0, 9)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP_64 and r.x[3] == 9
    # Module unload: FFA_RXTX_UNMAP; a reload maps again and sees the same ID.
    assert (await g.call(abi.FFA_RXTX_UNMAP)).x[0] == abi.FFA_SUCCESS_32
    again = await linux_probe(g)
    assert again.vm_id == p.vm_id
