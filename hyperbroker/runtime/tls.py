"""TLS credentials for every gRPC server and channel hyperbroker opens, from PEM files.

One builder for all of them: the broker and the agent (mTLS on the stream and Admin), the TEE
service and the OP-TEE proxy's channel to it, FF-A remote partitions. A server always has its
certificate and key; it requires client certificates when it has a CA. A channel always
verifies the server against its CA (or the system roots when none is given) and presents a
client certificate when it has one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("hyperbroker.tls")


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


def _stamp(paths: tuple[Path | None, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when a file is rewritten or replaced (a Kubernetes Secret swaps a symlink)."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat() if path is not None else None
        except OSError:
            st = None
        out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None)
    return tuple(out)


def check_key_matches(cert_pem: bytes, key_pem: bytes, where: str) -> None:
    """The key is the private half of the chain's first certificate (not a half-written pair)."""
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, IndexError) as err:
        raise TlsConfigError(f"{where}: not a PEM certificate and key: {err}") from None
    pub = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*pub) != key.public_key().public_bytes(*pub):
        raise TlsConfigError(f"{where}: the key does not belong to the certificate")


class ReloadingServerCredentials:
    """A TLS server whose certificate, key and client CAs are read again when their files change
    (or after `reload()`, on SIGHUP): gRPC asks before each new handshake, connections already
    up keep the credentials they were made with, so no stream drops. A pair that does not
    match (a rotation half-written) is logged and the previous one kept until the files change
    again. `client_cas` are the bundles client certificates may chain to (the agents' CA and,
    when there is one, the admin CA)."""

    def __init__(self, files: TlsFiles, client_cas: tuple[Path, ...] = ()) -> None:
        if files.cert is None or files.key is None:
            raise TlsConfigError("a TLS server needs its certificate and key")
        self.files = files
        self.client_cas = tuple(p for p in ((files.ca,) if files.ca else ()) + client_cas)
        self._paths = (files.cert, files.key, *self.client_cas)
        self._force = False
        self._failed: tuple[tuple[int, int, int] | None, ...] | None = None
        self._loaded = _stamp(self._paths)
        self.reloads = 0
        self._initial = self._configuration()  # raises TlsConfigError at start, not later

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        assert self.files.cert is not None and self.files.key is not None
        cert = read_pem(self.files.cert, "tls_cert")
        key = read_pem(self.files.key, "tls_key")
        check_key_matches(cert, key, str(self.files.cert))
        roots = b"".join(read_pem(p, "tls_ca") for p in self.client_cas) or None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=bool(self.client_cas))

    def reload(self) -> None:
        """Read the files again before the next handshake even if they look unchanged."""
        self._force = True
        log.info("TLS: certificates will be read again at the next handshake")

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake: None keeps the configuration in use.
        try:
            stamp = _stamp(self._paths)
            if not self._force and (stamp == self._loaded or stamp == self._failed):
                return None
            self._force = False
            try:
                config = self._configuration()
            except TlsConfigError as err:
                self._failed = stamp
                log.error("TLS: keeping the previous certificate: %s", err)
                return None
            self._loaded, self._failed = stamp, None
            self.reloads += 1
            log.warning("TLS: new handshakes use %s (reload %d)", self.files.cert, self.reloads)
            return config
        except Exception:  # never into gRPC's core: it would fail the handshake
            log.exception("TLS: reloading the certificates failed")
            return None


def tls_stamp(files: TlsFiles) -> tuple[tuple[int, int, int] | None, ...]:
    """Changes whenever one of the files does: a client rebuilds its channel on it."""
    return _stamp((files.cert, files.key, files.ca))
