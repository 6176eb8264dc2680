"""mTLS credentials for the agent <-> broker link and the admin API, from PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if len(given) != 3:
            raise ValueError("mTLS needs all three of --tls-cert, --tls-key and --tls-ca")
        assert cert and key and ca
        return cls(Path(cert), Path(key), Path(ca))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Clients must present a certificate signed by `ca`."""
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )
