"""Handlers undo a committed call whose result the guest never saw (issue 11, item 3).

The agent answers a call with its rule's fallback when the broker's result is late; when that
result had changed handler state, the agent reports it (AgentFrame.divergent) and the broker
hands the call to `Handler.undo`, so the guest's retry succeeds. Measured before: PSCI CPU_ON
left the target ON_PENDING and the retry got ALREADY_ON; memshare kept the share and the retry
got -3; FF-A kept the share and the retry was DENIED.
"""

from __future__ import annotations

from hyperbroker.calls import Call, Result
from hyperbroker.handlers.api import Handler, VmInfo
from hyperbroker.handlers.ffa import FfaHandler
from hyperbroker.handlers.ffa import abi as ffa_abi
from hyperbroker.handlers.memshare import MemshareHandler
from hyperbroker.handlers.memshare import abi as ms_abi
from hyperbroker.handlers.psci import PsciHandler
from hyperbroker.handlers.psci import abi as psci_abi
from hyperbroker.smccc import NR_ARGS, to_s64
from hyperbroker.testing.context import FakeContext
from hyperbroker.testing.ffa import BUFFER_ADDRESS, FfaGuest, error_of, handle_of

VM = VmInfo(host="host-u", name="vm-undo", nr_vcpus=2, profile="default", policy_version=1)
GRANULE = 0x4000_2000
ALREADY_ON = -4
SHA_PARTITION = 0x8002  # the built-in SHA-256 partition's endpoint ID


def call_of(fid: int, *args: int, vcpu: int = 0) -> Call:
    x = (fid, *args) + (0,) * (NR_ARGS - 1 - len(args))
    return Call(vcpu=vcpu, seq=1, function_id=fid, x=x)


async def run(h: Handler, ctx: FakeContext, call: Call) -> Result:
    return await h.handle(call, ctx)


async def test_psci_an_undone_cpu_on_leaves_the_target_off_for_the_retry() -> None:
    h, ctx = PsciHandler({}), FakeContext(VM)
    cpu_on = call_of(psci_abi.CPU_ON64, 1, 0x4020_0000, 7)
    first = await run(h, ctx, cpu_on)
    assert to_s64(first.x[0]) == 0 and first.actions  # the VMM would start vCPU 1
    await h.undo(cpu_on, first, ctx)  # ... but the guest got the fallback instead
    assert (await run(h, ctx, call_of(psci_abi.AFFINITY_INFO64, 1, 0))).x[0] == 1  # OFF
    retry = await run(h, ctx, cpu_on)
    assert to_s64(retry.x[0]) == 0 and retry.actions


async def test_psci_undo_leaves_a_target_that_runs_alone() -> None:
    h, ctx = PsciHandler({}), FakeContext(VM)
    cpu_on = call_of(psci_abi.CPU_ON64, 1, 0x4020_0000, 7)
    first = await run(h, ctx, cpu_on)
    await run(h, ctx, call_of(psci_abi.PSCI_VERSION, vcpu=1))  # vCPU 1 runs: it was started
    await h.undo(cpu_on, first, ctx)
    assert to_s64((await run(h, ctx, cpu_on)).x[0]) == ALREADY_ON  # it really is on


async def test_memshare_an_undone_share_can_be_retried_and_an_undone_unshare_is_shared() -> None:
    h, ctx = MemshareHandler({}), FakeContext(VM)
    share = call_of(ms_abi.MEM_SHARE, GRANULE)
    first = await run(h, ctx, share)
    assert to_s64(first.x[0]) == 0
    await h.undo(share, first, ctx)
    assert h.admin_view(ctx)["shared_granules"] == 0
    assert to_s64((await run(h, ctx, share)).x[0]) == 0  # the retry succeeds
    unshare = call_of(ms_abi.MEM_UNSHARE, GRANULE)
    done = await run(h, ctx, unshare)
    assert to_s64(done.x[0]) == 0
    await h.undo(unshare, done, ctx)
    assert h.admin_view(ctx)["shared_granules"] == 1  # still shared, as the guest believes


async def test_a_refused_call_is_not_undone() -> None:
    h, ctx = MemshareHandler({}), FakeContext(VM)
    share = call_of(ms_abi.MEM_SHARE, GRANULE)
    await run(h, ctx, share)
    refused = await run(h, ctx, share)  # already shared: -3, nothing changed
    await h.undo(share, refused, ctx)
    assert h.admin_view(ctx)["shared_granules"] == 1


async def test_ffa_an_undone_share_is_reclaimed_so_the_retry_is_not_denied() -> None:
    guest = FfaGuest(FfaHandler({}))
    await guest.setup(ffa_abi.VERSION_1_2)
    first = await guest.share((SHA_PARTITION,), ((BUFFER_ADDRESS, 1),))
    assert first.x[0] == ffa_abi.FFA_SUCCESS_32
    again = await guest.share((SHA_PARTITION,), ((BUFFER_ADDRESS, 1),))
    assert error_of(again) is ffa_abi.FfaError.DENIED  # the page is shared already
    share_call = Call(vcpu=0, seq=guest.seq - 1, function_id=ffa_abi.FFA_MEM_SHARE_64,
                      x=(ffa_abi.FFA_MEM_SHARE_64,) + (0,) * (NR_ARGS - 1))
    await guest.handler.undo(share_call, first, guest.ctx)
    retry = await guest.share((SHA_PARTITION,), ((BUFFER_ADDRESS, 1),))
    assert retry.x[0] == ffa_abi.FFA_SUCCESS_32
    assert handle_of(retry) != handle_of(first)  # handles are never given out twice
