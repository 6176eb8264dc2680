"""TLS credentials for every gRPC server and channel hyperbroker opens, from PEM files.

One builder for all of them: the broker and the agent (mTLS on the stream and Admin), the TEE
service and the OP-TEE proxy's channel to it, FF-A remote partitions. A server always has its
certificate and key; it requires client certificates when it has a CA. A channel always
verifies the server against its CA (or the system roots when none is given) and presents a
client certificate when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """The TLS files named are incomplete or unreadable; the message names which and why."""


def read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise TlsConfigError(f"{what}: cannot read {path}: {err.strerror}") from None


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path | None = None  # this end's certificate chain
    key: Path | None = None  # and its private key: both or neither
    ca: Path | None = None  # the CA that signs the peer

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, ca: str | None, *,
                  need_all: bool = True) -> TlsFiles | None:
        """From command-line values; None when none is given. `need_all`: mTLS needs all three
        (the stream, Admin, the TEE service); a client of a server-authenticated service may
        give only the CA."""
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if need_all and len(given) != 3:
            raise TlsConfigError("mTLS needs all three of --tls-cert, --tls-key and --tls-ca")
        if bool(cert) != bool(key):
            raise TlsConfigError("a TLS certificate needs its key, and a key its certificate")
        return cls(Path(cert) if cert else None, Path(key) if key else None,
                   Path(ca) if ca else None)

    def check(self, prefix: str = "") -> None:
        """Every named file is readable: fail at configuration time, not at the first call.
        Errors name the file by its configuration key, `{prefix}tls_cert` and so on."""
        for path, what in ((self.cert, "cert"), (self.key, "key"), (self.ca, "ca")):
            if path is not None:
                read_pem(path, f"{prefix}tls_{what}")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Clients must present a certificate signed by `ca` when there is one."""
        if self.cert is None or self.key is None:
            raise TlsConfigError("a TLS server needs its certificate and key")
        return grpc.ssl_server_credentials(
            [(read_pem(self.key, "key"), read_pem(self.cert, "cert"))],
            root_certificates=read_pem(self.ca, "ca") if self.ca else None,
            require_client_auth=self.ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "ca") if self.ca else None,
            private_key=read_pem(self.key, "key") if self.key else None,
            certificate_chain=read_pem(self.cert, "cert") if self.cert else None,
        )
