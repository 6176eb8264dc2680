"""Network addresses as the command line and the configuration write them."""

from __future__ import annotations

import re


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
