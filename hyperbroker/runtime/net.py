"""Network addresses as the command line and the configuration write them, and binding them."""

from __future__ import annotations

import re
from typing import Any


class CannotListen(Exception):
    """An address this process was told to serve on cannot be bound. Restarting will not help
    while the address stays as configured, so the command line reports it as a configuration
    error (docs/operations.md, "Exit codes")."""

    def __init__(self, what: str, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({what}): {reason}")
        self.what = what
        self.address = address


def split_hostport(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (every address) -> (host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


HOST_ID_MAX = 128
_HOST_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def host_id_problem(host: str) -> str | None:
    """Why `host` cannot be a host id, or None. A host id is what a certificate's DNS SAN or
    SPIFFE path names: letters, digits, '.', '-', '_', starting and ending with a letter or
    digit, at most HOST_ID_MAX characters; never a '/' (so it cannot reach into a SPIFFE path)."""
    if not host:
        return "a host id must not be empty"
    if len(host) > HOST_ID_MAX:
        return f"a host id has at most {HOST_ID_MAX} characters, not {len(host)}"
    if not _HOST_ID.fullmatch(host):
        return (f"host id {host[:HOST_ID_MAX]!r} may hold only letters, digits, '.', '-' and "
                "'_', and must start and end with a letter or digit")
    return None


def add_grpc_port(server: Any, address: str, what: str, credentials: Any = None) -> int:
    """Bind a grpc.aio server to `address`; the port, or CannotListen. grpc reports a failed
    bind as port 0 or (newer releases) RuntimeError, never with the errno."""
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:
        port = 0
    if port == 0:
        raise CannotListen(what, address, "the port is in use by another process, or the host "
                                          "is not an address of this machine")
    return int(port)
