"""The trusted applications shipped with the reference TEE service, and plugin discovery."""

from __future__ import annotations

from importlib.metadata import entry_points

from hyperbroker.tee.apps.device_enum import DeviceEnumPta
from hyperbroker.tee.apps.mac import KeyedMacTa
from hyperbroker.tee.apps.storage import SecureStorageTa
from hyperbroker.tee.ta import ENTRY_POINT_GROUP, TrustedApp

# The device-enumeration PTA is part of the service itself: the Linux driver's probe needs it.
BUILTIN: tuple[type[TrustedApp], ...] = (DeviceEnumPta, SecureStorageTa, KeyedMacTa)


def discover_trusted_apps() -> list[type[TrustedApp]]:
    """The shipped TAs plus every class installed under `hyperbroker.trusted_apps`.

    Two different classes claiming one UUID is a deployment error and raises ValueError.
    """
    found: dict[object, type[TrustedApp]] = {app.uuid: app for app in BUILTIN}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, TrustedApp)):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a TrustedApp subclass")
        other = found.get(cls.uuid)
        if other is not None and other is not cls:
            raise ValueError(f"entry point {ep.name}: UUID {cls.uuid} is already served by "
                             f"{other.__module__}.{other.__qualname__}")
        found[cls.uuid] = cls
    return list(found.values())


__all__ = ["BUILTIN", "DeviceEnumPta", "KeyedMacTa", "SecureStorageTa", "discover_trusted_apps"]
