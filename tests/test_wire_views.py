"""A handler's Admin view on the wire (hyperbroker.wire.views): structured, and exact."""

from __future__ import annotations

import pytest

from hyperbroker.wire import views
from hyperbroker.wire.v1 import admin_pb2


def round_trip(view: object) -> dict[str, object]:
    wire = admin_pb2.VmHandlerView(view=views.to_struct(view)).SerializeToString()
    return views.from_struct(admin_pb2.VmHandlerView.FromString(wire).view)


def test_a_view_comes_back_as_it_went() -> None:
    view = {"granule": 4096, "shared": [[0x4000_0000, 0x4000_5000]], "mmio_guard": True,
            "ratio": 0.5, "message": None, "crashes": [{"params": ["0xb"]}]}
    assert round_trip(view) == view


def test_an_integer_a_double_cannot_hold_goes_as_its_decimal_string() -> None:
    at_ns = 1_764_880_000_123_456_789
    out = round_trip({"at_unix_ns": at_ns, "edge": 1 << 53, "negative": -(1 << 60)})
    assert out == {"at_unix_ns": str(at_ns), "edge": 1 << 53, "negative": str(-(1 << 60))}


def test_a_view_that_is_not_a_mapping_is_wrapped() -> None:
    assert round_trip([1, 2]) == {"value": [1, 2]}


def test_a_value_that_is_not_json_is_refused() -> None:
    with pytest.raises(TypeError, match="set"):
        views.to_struct({"x": {1, 2}})
