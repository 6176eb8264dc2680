"""Any registers for any FF-A function ID: an FF-A answer, never an exception (handlers.api).

Guest registers are guest-supplied input as much as descriptors are. Sequences of random calls (each
ID of the FF-A ranges, biased to the served ones, with random x1..x17) run against one VM; every
answer must be one of the forms the FFA_ERROR convention, include/linux/arm_ffa.h; FF-A memory
sharing define, and the state must still load from the store afterwards."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperbroker.handlers.ffa import FfaHandler, abi
from hyperbroker.handlers.ffa.state import VmState
from hyperbroker.handlers.ffa.version import SERVED_SINCE
from hyperbroker.testing.ffa import RX_ADDRESS, TX_ADDRESS, FfaGuest

U64 = st.integers(0, (1 << 64) - 1)
SMALL = st.sampled_from([0, 1, 16, 48, 4096, TX_ADDRESS, RX_ADDRESS, abi.pack_target(1, 0x8001),
                         abi.pack_target(1, 0x8002), 1 << 63 | 1 << 32 | 1, 1 << 31])
FIDS = st.one_of(
    st.sampled_from(sorted(SERVED_SINCE)),
    st.integers(0x60, 0xFF).map(lambda n: 0x8400_0000 | n),
    st.integers(0x60, 0xFF).map(lambda n: 0xC400_0000 | n),
)
CALLS = st.lists(st.tuples(FIDS, st.lists(st.one_of(SMALL, U64), max_size=17)), max_size=12)
ANSWERS = {abi.FFA_ERROR, abi.FFA_SUCCESS_32, abi.FFA_SUCCESS_64, abi.FFA_MEM_FRAG_RX,
           abi.FFA_MSG_SEND_DIRECT_RESP_32, abi.FFA_MSG_SEND_DIRECT_RESP_64,
           abi.FFA_MSG_SEND_DIRECT_RESP2, abi.OUR_VERSION, (1 << 64) - 1}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([abi.VERSION_1_0, abi.VERSION_1_1, abi.VERSION_1_2]), CALLS)
async def test_random_calls_get_ffa_answers(version: int, calls: list[tuple[int, list[int]]]
                                            ) -> None:
    g = FfaGuest(FfaHandler({}))
    await g.setup(version)
    for fid, args in calls:
        r = await g.call(fid, *args)
        assert r.x[0] in ANSWERS, (hex(fid), r)
        assert len(r.x) in (abi.NARROW_WIDTH, abi.WIDE_WIDTH)
    VmState.from_json(g.ctx.state.get())
