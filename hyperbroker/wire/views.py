"""A handler's Admin view on the wire: a JSON-like value as a google.protobuf.Struct and back.

Struct numbers are doubles, which hold integers exactly only up to 2^53: a larger integer (a
timestamp in nanoseconds, a 64-bit register) goes as its decimal string, as proto3's JSON
mapping writes int64, so nothing is silently rounded; an integral number comes back as an int.
A view that is not a mapping is sent as {"value": view}.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

EXACT = 1 << 53  # doubles represent every integer of magnitude up to this


def _exact(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if -EXACT <= value <= EXACT else str(value)
    if isinstance(value, dict):
        return {str(k): _exact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_exact(v) for v in value]
    raise TypeError(f"a handler view holds {type(value).__name__}, which is not JSON")


def to_struct(view: Any) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(_exact(view if isinstance(view, dict) else {"value": view}))
    return out


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def from_struct(view: struct_pb2.Struct) -> dict[str, Any]:
    return dict(_integral(json_format.MessageToDict(view)))
