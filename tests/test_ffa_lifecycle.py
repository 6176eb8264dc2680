"""Isolation between VMs, destroy-time cleanup and state that survives a broker restart.

Issue 4 item 3: a VM can never see, release, reclaim or message through another VM's buffers or
handles; a destroyed VM's shares are reclaimed and its buffers unmapped; everything lives in the
store (ctx.state, the ID pools of ctx.ids), so a handler rebuilt from the stored JSON carries on.
"""

from __future__ import annotations

import asyncio

import pytest

from hyperbroker.handlers.ffa import FfaHandler, abi, endpoints
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.config import ECHO_UUID, SHA256_UUID
from hyperbroker.handlers.ffa.partitions import (
    DirectMessage,
    EchoPartition,
    PartitionInfo,
    PartitionSet,
    Reply,
    SharedMemory,
)
from hyperbroker.handlers.ffa.state import VmState
from hyperbroker.testing.context import FakeContext, FakeGuestMemory, MemoryPools, MemoryState
from hyperbroker.testing.ffa import (
    BUFFER_ADDRESS,
    TX_ADDRESS,
    FfaGuest,
    error_of,
    handle_of,
    make_context,
)
from hyperbroker.testing.metrics import HANDLERS as REGISTRY

SHA = 0x8002
ECHO_INFO = PartitionInfo("echo", 0x8001, ECHO_UUID)
SHA_INFO = PartitionInfo("sha256", SHA, SHA256_UUID)


async def two_vms() -> tuple[FfaGuest, FfaGuest]:
    handler, pools = FfaHandler({}), MemoryPools()
    a = FfaGuest(handler, make_context("vm-a", pools=pools))
    b = FfaGuest(handler, make_context("vm-b", pools=pools))
    await a.setup()
    await b.setup()
    return a, b


async def sha_status(g: FfaGuest, handle: int) -> int:
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, abi.pack_target(g.endpoint_id, SHA), 0,
                     handle, 0, 16)
    return r.x[3]


# ---- isolation -------------------------------------------------------------------------------
async def test_second_vm_reclaiming_the_first_vms_handle_is_invalid() -> None:
    # Xen: INVALID_PARAMETERS if the guest does not own the handle.
    a, b = await two_vms()
    handle = handle_of(await a.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    r = await b.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS
    assert await sha_status(a, handle) == 0  # still shared for its owner


async def test_a_partition_cannot_reach_another_vms_share_through_a_second_vm() -> None:
    a, b = await two_vms()
    handle = handle_of(await a.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    assert await sha_status(b, handle) == FfaError.INVALID_PARAMETERS & (1 << 64) - 1


async def test_second_vm_cannot_continue_the_first_vms_fragmented_transaction() -> None:
    a, b = await two_vms()
    data = a.descriptor((SHA,), ((BUFFER_ADDRESS, 1), (BUFFER_ADDRESS + 0x2000, 1)))
    a.poke(TX_ADDRESS, data[:-16])
    r = await a.call(abi.FFA_MEM_SHARE_64, len(data), len(data) - 16, 0, 0)
    b.poke(TX_ADDRESS, data[-16:])
    stolen = await b.call(abi.FFA_MEM_FRAG_TX, r.x[1], r.x[2], 16, 0)
    assert error_of(stolen) is FfaError.INVALID_PARAMETERS


async def test_second_vm_cannot_release_the_first_vms_rx() -> None:
    a, b = await two_vms()
    await a.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)  # a now holds its RX
    r = await b.call(abi.FFA_RX_RELEASE, a.endpoint_id)
    assert error_of(r) is FfaError.INVALID_PARAMETERS
    assert error_of(await a.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)) is FfaError.BUSY


async def test_second_vm_cannot_unmap_the_first_vms_buffers() -> None:
    a, b = await two_vms()
    r = await b.call(abi.FFA_RXTX_UNMAP, a.endpoint_id << 16)
    assert error_of(r) is FfaError.INVALID_PARAMETERS
    assert error_of(await a.call(abi.FFA_RXTX_MAP_64, TX_ADDRESS, TX_ADDRESS + 0x4000, 1)) \
        is FfaError.DENIED  # a's buffers are still mapped


async def test_second_vm_cannot_message_in_the_first_vms_name() -> None:
    a, b = await two_vms()
    r = await b.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, abi.pack_target(a.endpoint_id, 0x8001), 0)
    assert error_of(r) is FfaError.INVALID_PARAMETERS


async def test_two_vms_may_share_the_same_guest_addresses() -> None:
    # Guest addresses are per VM: the same IPA in two VMs is two different pages.
    a, b = await two_vms()
    assert (await a.share((SHA,), ((BUFFER_ADDRESS, 1),))).x[0] == abi.FFA_SUCCESS_32
    assert (await b.share((SHA,), ((BUFFER_ADDRESS, 1),))).x[0] == abi.FFA_SUCCESS_32


# ---- destroy-time cleanup --------------------------------------------------------------------
class RecordingPartition(EchoPartition):
    def __init__(self, info: PartitionInfo) -> None:
        super().__init__(info)
        self.destroyed: list[tuple[str, int]] = []
        self.reclaimed: list[int] = []

    async def direct_request(self, msg: DirectMessage, memory: SharedMemory) -> Reply:
        return (len(memory.grants), 0, 0, 0, 0)

    async def reclaim(self, vm: str, sender: int, handle: int) -> FfaError | None:
        self.reclaimed.append(handle)
        return None

    async def vm_destroyed(self, vm: str, endpoint_id: int) -> None:
        self.destroyed.append((vm, endpoint_id))


@pytest.fixture
def recording() -> tuple[FfaHandler, RecordingPartition]:
    handler = FfaHandler({})
    partition = RecordingPartition(SHA_INFO)
    handler.partitions = PartitionSet([EchoPartition(ECHO_INFO), partition])
    return handler, partition


async def test_destroy_reclaims_shares_unmaps_buffers_and_frees_the_id(
    recording: tuple[FfaHandler, RecordingPartition],
) -> None:
    handler, partition = recording
    g = FfaGuest(handler)
    await g.setup()
    for i in range(3):
        await g.share((SHA,), ((BUFFER_ADDRESS + i * 0x1000, 1),))
    labels = {"reason": "vm_destroyed"}
    before = REGISTRY.get_sample_value("hyperbroker_ffa_reclaims_total", labels) or 0
    await handler.vm_destroyed(g.ctx)
    assert g.ctx.state.get() is None  # shares, buffers, pending fragments: all gone
    assert await g.ctx.ids.owner(endpoints.POOL, g.endpoint_id) is None
    assert partition.destroyed == [(g.ctx.vm.key, g.endpoint_id)]
    assert REGISTRY.get_sample_value("hyperbroker_ffa_reclaims_total", labels) == before + 3


async def test_destroy_leaves_other_vms_alone(
    recording: tuple[FfaHandler, RecordingPartition],
) -> None:
    handler, _ = recording
    pools = MemoryPools()
    a = FfaGuest(handler, make_context("vm-a", pools=pools))
    b = FfaGuest(handler, make_context("vm-b", pools=pools))
    await a.setup()
    await b.setup()
    await b.share((SHA,), ((BUFFER_ADDRESS, 1),))
    await handler.vm_destroyed(a.ctx)
    r = await b.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, abi.pack_target(b.endpoint_id, SHA), 0)
    assert r.x[3] == 1  # b still has its one grant
    assert await pools.store.id_owner(endpoints.POOL, b.endpoint_id) == b.ctx.vm.key


async def test_a_vm_of_the_same_name_starts_afresh_after_destroy() -> None:
    handler = FfaHandler({})
    g = FfaGuest(handler)
    await g.setup()
    await handler.vm_destroyed(g.ctx)
    assert error_of(await g.call(abi.FFA_ID_GET)) is FfaError.NOT_SUPPORTED  # no version yet
    await g.setup()  # maps the same buffers again: nothing was left mapped


async def test_guest_reclaim_tells_the_borrower(
    recording: tuple[FfaHandler, RecordingPartition],
) -> None:
    handler, partition = recording
    g = FfaGuest(handler)
    await g.setup()
    handle = handle_of(await g.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    await g.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    assert partition.reclaimed == [handle]


async def test_a_borrower_still_using_the_pages_makes_reclaim_denied() -> None:
    class Busy(RecordingPartition):
        async def reclaim(self, vm: str, sender: int, handle: int) -> FfaError | None:
            return FfaError.DENIED

    handler = FfaHandler({})
    busy = Busy(SHA_INFO)
    handler.partitions = PartitionSet([busy])
    g = FfaGuest(handler)
    await g.setup()
    handle = handle_of(await g.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    r = await g.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    assert error_of(r) is FfaError.DENIED  # Xen's teardown treats DENIED as retry later


# ---- restart ---------------------------------------------------------------------------------
def restarted(g: FfaGuest) -> FfaGuest:
    """A new handler and context built only from what the store holds (and guest RAM)."""
    ctx = FakeContext(g.ctx.vm, memory=g.ctx.memory, pools=g.ctx.pools)
    ctx.state = MemoryState(g.ctx.state.get())
    return FfaGuest(FfaHandler(dict(g.handler.config)), ctx, seq=g.seq, version=g.version,
                    endpoint_id=g.endpoint_id)


async def test_state_survives_a_restart() -> None:
    g = FfaGuest(FfaHandler({}))
    await g.setup(abi.VERSION_1_1)
    g.poke(BUFFER_ADDRESS, b"kept across restarts")
    handle = handle_of(await g.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    await g.call(abi.FFA_PARTITION_INFO_GET, 0, 0, 0, 0, 0)  # RX now held by the guest
    data = g.descriptor((SHA,), ((BUFFER_ADDRESS + 0x4000, 1), (BUFFER_ADDRESS + 0x8000, 1)))
    g.poke(TX_ADDRESS, data[:-16])
    frag = await g.call(abi.FFA_MEM_SHARE_64, len(data), len(data) - 16, 0, 0)

    after = restarted(g)
    assert (await after.call(abi.FFA_ID_GET)).x[2] == g.endpoint_id
    assert (await after.call(abi.FFA_VERSION, abi.VERSION_1_2)).x[0] != abi.VERSION_1_2  # frozen
    assert (await after.call(abi.FFA_RX_RELEASE)).x[0] == abi.FFA_SUCCESS_32
    after.poke(TX_ADDRESS, data[-16:])
    done = await after.call(abi.FFA_MEM_FRAG_TX, frag.x[1], frag.x[2], 16, 0)
    assert done.x[0] == abi.FFA_SUCCESS_32
    assert await sha_status(after, handle) == 0
    r = await after.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    assert r.x[0] == abi.FFA_SUCCESS_32


async def test_endpoint_ids_stay_unique_after_a_restart() -> None:
    pools = MemoryPools()
    a = FfaGuest(FfaHandler({}), make_context("vm-a", pools=pools))
    await a.setup()
    fresh = FfaHandler({})  # the broker restarted: only the store remains
    b = FfaGuest(fresh, make_context("vm-b", pools=pools))
    await b.setup()
    assert b.endpoint_id != a.endpoint_id


async def test_unchanged_state_is_not_written() -> None:
    g = FfaGuest(FfaHandler({}))
    await g.setup()
    puts = g.ctx.state.puts
    await g.call(abi.FFA_ID_GET)
    await g.call(abi.FFA_FEATURES, abi.FFA_MEM_SHARE_64)
    assert g.ctx.state.puts == puts


async def test_concurrent_calls_of_one_vm_do_not_lose_updates() -> None:
    # Two vCPUs share at once; guest-memory reads yield to the loop as the agent's do.
    class SlowMemory(FakeGuestMemory):
        async def read(self, gpa: int, length: int) -> bytes:
            await asyncio.sleep(0)
            return await super().read(gpa, length)

    ctx = make_context()
    ctx.memory = SlowMemory(regions=ctx.memory.regions)
    g = FfaGuest(FfaHandler({}), ctx)
    await g.setup()
    d1 = g.descriptor((SHA,), ((BUFFER_ADDRESS, 1),))
    d2 = g.descriptor((SHA,), ((BUFFER_ADDRESS + 0x1000, 1),))
    g.poke(TX_ADDRESS, d1)  # both descriptors are the same length; the TX content is d1 ...
    first = g.call(abi.FFA_MEM_SHARE_64, len(d1), len(d1), 0, 0)
    g2 = FfaGuest(g.handler, ctx, vcpu=1, version=g.version, endpoint_id=g.endpoint_id)
    second = g2.call(abi.FFA_MEM_SHARE_64, len(d2), len(d2), 0, 0)
    r1, r2 = await asyncio.gather(first, second)
    # ... so the second share names the same page and must see the first: DENIED, not lost.
    assert r1.x[0] == abi.FFA_SUCCESS_32
    assert error_of(r2) is FfaError.DENIED
    assert len(VmState.from_json(ctx.state.get()).shares) == 1


async def test_a_reset_forgets_the_boot_but_keeps_the_endpoint_id() -> None:
    """After SYSTEM_RESET the guest negotiates again and maps again; its ID does not change."""
    from hyperbroker.calls import Call
    from hyperbroker.handlers.ffa import FfaHandler
    from hyperbroker.testing.context import FakeContext, FakeGuestMemory

    handler = FfaHandler({})
    ctx = FakeContext(memory=FakeGuestMemory({0x4000_0000: bytearray(0x10_0000)}))

    async def call(fid: int, *args: int) -> tuple[int, ...]:
        r = await handler.handle(Call(0, 1, fid, (fid, *args) + (0,) * (17 - len(args))), ctx)
        ctx.memory.commit()
        return r.x

    assert (await call(0x8400_0063, 0x10002))[0] == 0x10002
    before = (await call(0x8400_0069))[2]
    assert (await call(0xC400_0066, 0x4000_0000, 0x4000_1000, 1))[0] == 0x8400_0061
    await handler.vm_reset(ctx)
    assert (await call(0x8400_0063, 0x10001))[0] == 0x10002  # negotiable again
    assert (await call(0x8400_0069))[2] == before
    assert (await call(0xC400_0066, 0x4000_0000, 0x4000_1000, 1))[0] == 0x8400_0061  # unmapped
