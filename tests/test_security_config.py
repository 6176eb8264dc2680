"""The parts of the admin boundary and host identity that need no process: host ids, the SPIFFE
template, the tokens file, and the configurations the broker refuses to start with."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperbroker.broker.security import (
    AdminAuthorizer,
    AdminConfig,
    HostIdentity,
    Role,
    load_tokens,
)
from hyperbroker.runtime.net import HOST_ID_MAX, host_id_problem
from hyperbroker.runtime.tls import TlsConfigError, check_key_matches
from hyperbroker.testing.certs import CertAuthority


@pytest.mark.parametrize("host", ["host-a", "kvm-host-17", "node1.example.org", "a", "x_y",
                                  "h" * HOST_ID_MAX])
def test_good_host_ids(host: str) -> None:
    assert host_id_problem(host) is None


@pytest.mark.parametrize("host", ["", "host/host-c", "example.org/host/host-c", "-a", "a-",
                                  "a b", "ä", "h" * (HOST_ID_MAX + 1), "a:b", "{host}"])
def test_bad_host_ids(host: str) -> None:
    assert host_id_problem(host)


def test_a_host_is_proved_by_one_form_only() -> None:
    dns = HostIdentity()
    assert dns.proves("host-c", {"host-c"}, set())
    assert not dns.proves("host-c", set(), {"spiffe://example.org/host/host-c"})
    assert not dns.proves("host-c", {"host-c.example.org"}, set())
    spiffe = HostIdentity("spiffe://example.org/host/{host}")
    assert spiffe.proves("host-c", set(), {"spiffe://example.org/host/host-c"})
    assert not spiffe.proves("host-c", {"host-c"}, set())
    assert not spiffe.proves("host-c", set(), {"spiffe://other.org/host/host-c"})
    assert spiffe.expected("host-c") == "URI SAN spiffe://example.org/host/host-c"


@pytest.mark.parametrize("template", ["https://example.org/{host}", "spiffe://example.org/host",
                                      "spiffe://x/{host}/{host}", "spiffe://x/{host}/{other}"])
def test_a_bad_spiffe_template_is_refused(template: str) -> None:
    with pytest.raises(ValueError, match="--spiffe-template"):
        HostIdentity(template)


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n\nwrite ci 0123456789abcdef\nread dash fedcba9876543210xx\n")
    tokens = load_tokens(path)
    assert sorted(tokens.values()) == [("ci", Role.WRITE), ("dash", Role.READ)]
    assert not any(b"0123456789abcdef" in k for k in tokens)  # only digests are kept
    for bad in ("admin ci 0123456789abcdef", "write ci short", "write 0123456789abcdef"):
        path.write_text(bad + "\n")
        with pytest.raises(TlsConfigError, match=r"tokens:1: want"):
            load_tokens(path)


def test_configurations_the_broker_refuses(tmp_path: Path) -> None:
    ca = CertAuthority()
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    with pytest.raises(TlsConfigError, match="not the agents' --tls-ca"):
        AdminAuthorizer(AdminConfig(ca=tmp_path / "ca.crt"), tls=True, agent_ca=tmp_path / "ca.crt")
    with pytest.raises(TlsConfigError, match="needs the broker's own TLS"):
        AdminAuthorizer(AdminConfig(ca=tmp_path / "ca.crt"), tls=False, agent_ca=None)
    with pytest.raises(TlsConfigError, match="without TLS"):
        AdminAuthorizer(AdminConfig(insecure=True), tls=True, agent_ca=tmp_path / "ca.crt")
    with pytest.raises(TlsConfigError, match="name certificates of --admin-ca"):
        AdminAuthorizer(AdminConfig(writers=("ops",)), tls=True, agent_ca=tmp_path / "ca.crt")


def test_a_key_of_another_certificate_is_refused() -> None:
    ca = CertAuthority()
    cert, key, _ = ca.issue(dns=("a",))
    _, other_key, _ = ca.issue(dns=("b",))
    check_key_matches(cert, key, "x")
    with pytest.raises(TlsConfigError, match="does not belong"):
        check_key_matches(cert, other_key, "x")
    with pytest.raises(TlsConfigError, match="not a PEM"):
        check_key_matches(b"junk", key, "x")
