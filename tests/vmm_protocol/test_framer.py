"""The SOCK_STREAM framer (wire.vmm.StreamFramer): frames out of a byte stream, however split.
"""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperbroker.wire import vmm as proto

from .support import a_call, any_message, frame, refused, u32

# ---- StreamFramer -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(any_message, u32), min_size=0, max_size=6),
    st.lists(st.integers(0, 4000), max_size=12),
)
def test_any_chunking_of_valid_frames_yields_exactly_those_frames(
    msgs: list[tuple[proto.Message, int]], cuts: list[int],
) -> None:
    frames = [proto.encode(m, tag) for m, tag in msgs]
    stream = b"".join(frames)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    framer = proto.StreamFramer()
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        got += framer.feed(stream[a:b])
    assert got == frames
    assert framer.pending == 0
    assert [proto.decode(f).message for f in got] == [m for m, _ in msgs]


def test_framer_holds_a_partial_frame_until_it_is_complete() -> None:
    data = proto.encode(a_call(), 1)
    framer = proto.StreamFramer()
    assert framer.feed(data[:10]) == []
    assert framer.pending == 10
    assert framer.feed(data[10:-1]) == []
    assert framer.pending == len(data) - 1
    assert framer.feed(data[-1:]) == [data]
    assert framer.pending == 0


def test_framer_refuses_a_bad_magic() -> None:
    framer = proto.StreamFramer()
    with pytest.raises(proto.ProtocolError) as info:
        framer.feed(frame(proto.MsgType.PING, b"", magic=0x1234_5678))
    assert info.value.code == errno.EPROTO


def test_framer_refuses_a_bad_magic_only_once_a_whole_header_has_arrived() -> None:
    bad = frame(proto.MsgType.PING, b"", magic=0xDEAD_BEEF)
    framer = proto.StreamFramer()
    assert framer.feed(bad[: proto.HEADER.size - 1]) == []
    with pytest.raises(proto.ProtocolError) as info:
        framer.feed(bad[proto.HEADER.size - 1 :])
    assert info.value.code == errno.EPROTO


def test_framer_refuses_a_length_over_max_payload() -> None:
    framer = proto.StreamFramer()
    with pytest.raises(proto.ProtocolError) as info:
        framer.feed(frame(proto.MsgType.MEM_WRITE, b"", 6, length=proto.MAX_PAYLOAD + 1))
    assert (info.value.code, info.value.tag) == (errno.EMSGSIZE, 6)


def test_framer_refuses_a_bad_header_that_follows_good_frames() -> None:
    framer = proto.StreamFramer()
    good = proto.encode(proto.Ping(), 1)
    with pytest.raises(proto.ProtocolError) as info:
        framer.feed(good + good + b"garbage-garbage-garbage")
    assert info.value.code == errno.EPROTO


def test_framer_cuts_a_frame_of_another_version_and_decode_refuses_it() -> None:
    # The length field is still trustworthy, so the stream stays framed; decode() answers
    # EPROTONOSUPPORT with the tag so the VMM learns which request was refused.
    other = frame(proto.MsgType.PING, b"", 9, version=2)
    framer = proto.StreamFramer()
    assert framer.feed(other + proto.encode(proto.Pong())) == [other, proto.encode(proto.Pong())]
    assert (refused(other).code, refused(other).tag) == (errno.EPROTONOSUPPORT, 9)
