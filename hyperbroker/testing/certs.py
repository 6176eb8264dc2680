"""Certificates for tests: a CA that issues leaf certificates with DNS and URI (SPIFFE) SANs.

trustme cannot put a URI in a SAN, and the exact-identity tests need SPIFFE IDs.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class CertAuthority:
    name: str = "hyperbroker test CA"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(
        ec.SECP256R1()))
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, key_cert_sign=True, crl_sign=True,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *, dns: tuple[str, ...] = (), uris: tuple[str, ...] = (),
              cn: str = "hyperbroker test") -> tuple[bytes, bytes, int]:
        """A leaf certificate (PEM), its key (PEM) and its serial number."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(serial)
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial

    def write(self, directory: Path, name: str, *, dns: tuple[str, ...] = (),
              uris: tuple[str, ...] = (), cn: str = "hyperbroker test",
              ca_file: Path | None = None) -> list[str]:
        """Write NAME.crt, NAME.key (and the CA, to `ca_file` or DIR/ca.crt); return the
        --tls-cert/--tls-key/--tls-ca arguments that name them."""
        cert, key, _ = self.issue(dns=dns, uris=uris, cn=cn)
        directory.mkdir(parents=True, exist_ok=True)
        crt, kf = directory / f"{name}.crt", directory / f"{name}.key"
        ca = ca_file or directory / "ca.crt"
        crt.write_bytes(cert)
        kf.write_bytes(key)
        if not ca.exists():
            ca.write_bytes(self.pem)
        return ["--tls-cert", str(crt), "--tls-key", str(kf), "--tls-ca", str(ca)]
