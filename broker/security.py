"""Who may do what: the host an agent certificate proves, and the Admin API's roles and audit.

Agent stream: a host's certificate names it in exactly one configured form, a DNS SAN equal to
the host id (the default) or a URI SAN equal to the SPIFFE template with the host filled in
(`spiffe://TRUST-DOMAIN/host/{host}`). Nothing else (no CN, no suffix of a longer name) counts.

Admin API: a separate authorisation. An identity is a client certificate issued directly by the
admin CA (--admin-ca) that carries a name listed by --admin-write or --admin-read, or a bearer
token from the tokens file (--admin-tokens). Agent certificates are never admin credentials.
Without TLS an anonymous caller may read, and may write only when the broker was started with
--insecure-admin. Every refused call and every policy apply is one audit record (a JSON log
line on the `hyperbroker.audit` logger) and counted in hyperbroker_broker_admin_audit_total;
refused calls are written within the caller address's log budget (runtime.loglimit), so a
flood of them is counted in full but written as a few records and a summary line.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from hyperbroker.broker import metrics
from hyperbroker.broker.peers import peer_of
from hyperbroker.runtime import loglimit
from hyperbroker.runtime.tls import TlsConfigError, read_pem
from hyperbroker.wire.v1 import admin_pb2

audit_log = logging.getLogger("hyperbroker.audit")

ADMIN_PREFIX = f"/{admin_pb2.DESCRIPTOR.services_by_name['Admin'].full_name}/"
# Every other Admin method (ApplyPolicy, and any added later) needs the write role.
READ_METHODS = frozenset({"ValidatePolicy", "GetPolicy", "ListHosts", "ListVms", "GetStats",
                          "GetVmHandlerView"})
# Every record the audit can count, exported as 0 before the first: a refusal of any Admin
# method, and the two ends of a policy apply.
for _method in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name:
    metrics.ADMIN_AUDIT.labels(_method, "refused")
for _decision in ("applied", "invalid"):
    metrics.ADMIN_AUDIT.labels("ApplyPolicy", _decision)


def peer_sans(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[set[str], set[str]]:
    """The DNS and the URI SANs of the peer's TLS certificate (empty without TLS)."""
    auth = context.auth_context()
    return ({v.decode(errors="replace") for v in auth.get("peer_dns", [])},
            {v.decode(errors="replace") for v in auth.get("peer_uri", [])})


@dataclass(frozen=True)
class HostIdentity:
    """The one form a certificate names its host in."""

    spiffe_template: str | None = None  # e.g. spiffe://example.org/host/{host}; None: DNS SAN

    def __post_init__(self) -> None:
        t = self.spiffe_template
        if t is not None and (not t.startswith("spiffe://") or t.count("{host}") != 1
                              or "{" in t.replace("{host}", "")):
            raise ValueError(f"--spiffe-template {t!r} must be spiffe://TRUST-DOMAIN/... with "
                             "{host} exactly once")

    def expected(self, host: str) -> str:
        if self.spiffe_template is None:
            return f"DNS SAN {host}"
        return f"URI SAN {self.spiffe_template.replace('{host}', host)}"

    def proves(self, host: str, dns: set[str], uris: set[str]) -> bool:
        if self.spiffe_template is None:
            return host in dns
        return self.spiffe_template.replace("{host}", host) in uris


class Role(enum.IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2


@dataclass(frozen=True)
class AdminConfig:
    ca: Path | None = None  # the admin CA: it signs admin client certificates, never agents'
    writers: tuple[str, ...] = ()  # SAN names (DNS or URI) of admin certificates that may write
    readers: tuple[str, ...] = ()  # ... that may only read
    tokens: Path | None = None  # lines "read|write NAME TOKEN"
    insecure: bool = False  # without TLS, let anyone who reaches the port write


def load_tokens(path: Path) -> dict[bytes, tuple[str, Role]]:
    """sha256(token) -> (name, role) from a tokens file; TlsConfigError names a bad line."""
    out: dict[bytes, tuple[str, Role]] = {}
    text = read_pem(path, "admin_tokens").decode(errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 3 or words[0] not in ("read", "write") or len(words[2]) < 16:
            raise TlsConfigError(f"{path}:{n}: want 'read|write NAME TOKEN' with a token of at "
                                 "least 16 characters")
        role = Role.WRITE if words[0] == "write" else Role.READ
        out[hashlib.sha256(words[2].encode()).digest()] = (words[1], role)
    return out


@dataclass(frozen=True)
class Caller:
    who: str  # "cert:NAME", "token:NAME", "anonymous", or what was presented
    role: Role
    why: str = ""  # for a caller without the role: the reason


class AdminAuthorizer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every Admin method: the caller's role first, an audit record where one is due."""

    def __init__(self, config: AdminConfig, *, tls: bool, agent_ca: Path | None) -> None:
        self.config = config
        self.tls = tls
        self.tokens = load_tokens(config.tokens) if config.tokens else {}
        self.admin_ca: x509.Certificate | None = None
        if config.ca is not None:
            if not tls:
                raise TlsConfigError("--admin-ca needs the broker's own TLS (--tls-cert ...)")
            pem = read_pem(config.ca, "admin_ca")
            if agent_ca is not None and read_pem(agent_ca, "tls_ca").strip() == pem.strip():
                raise TlsConfigError("--admin-ca must be a CA of its own, not the agents' "
                                     "--tls-ca: an agent certificate is no admin credential")
            try:
                self.admin_ca = x509.load_pem_x509_certificate(pem)
            except ValueError as err:
                raise TlsConfigError(f"admin_ca: {config.ca}: {err}") from None
        if config.insecure and tls:
            raise TlsConfigError("--insecure-admin is for a broker without TLS")
        if (config.writers or config.readers) and config.ca is None:
            raise TlsConfigError("--admin-write/--admin-read name certificates of --admin-ca")

    def describe(self) -> str:
        """One line for the start-up banner: what the Admin API accepts."""
        if self.tls:
            ways = []
            if self.admin_ca is not None:
                ways.append(f"admin-CA certificates ({len(self.config.writers)} writer and "
                            f"{len(self.config.readers)} reader names)")
            if self.tokens:
                ways.append(f"{len(self.tokens)} bearer tokens")
            return "admin: " + (" or ".join(ways) or "no admin identity configured: every "
                                "Admin call is refused")
        if self.config.insecure:
            return ("admin: WARNING --insecure-admin: no TLS, anyone who reaches this port may "
                    "change the policy")
        return ("admin: no TLS: policy writes are refused (--insecure-admin allows them)"
                + ("; reads need a bearer token" if self.tokens else "; anyone may read"))

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token:
                    return Caller("malformed authorization header", Role.NONE,
                                  "authorization must be 'Bearer TOKEN'")
        if token:
            digest = hashlib.sha256(token.encode()).digest()
            for known, (name, role) in self.tokens.items():
                if hmac.compare_digest(known, digest):
                    return Caller(f"token:{name}", role)
            return Caller("unknown token", Role.NONE, "the bearer token is not known")
        pem = context.auth_context().get("x509_pem_cert")
        if pem:
            return self._certificate(pem[0], context)
        if self.tls:  # the handshake requires a certificate: not reached, but fail closed
            return Caller("anonymous", Role.NONE, "no client certificate")
        if self.config.insecure:
            return Caller("anonymous", Role.WRITE)
        if self.tokens:
            return Caller("anonymous", Role.NONE, "a bearer token is required")
        return Caller("anonymous", Role.READ, "without TLS, writes need --insecure-admin")

    def _certificate(self, pem: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        dns, uris = peer_sans(context)
        names = sorted(dns | uris)
        shown = f"cert:{','.join(names) or 'no SAN'}"
        cert = x509.load_pem_x509_certificate(pem)
        if self.admin_ca is None:
            return Caller(shown, Role.NONE, "no admin CA is configured: client certificates "
                                            "are agent certificates, never admin credentials")
        try:
            cert.verify_directly_issued_by(self.admin_ca)
        except (ValueError, TypeError, InvalidSignature):
            return Caller(shown, Role.NONE, "not issued by the admin CA (an agent certificate "
                                            "is no admin credential)")
        if any(n in self.config.writers for n in names):
            return Caller(shown, Role.WRITE)
        if any(n in self.config.readers for n in names):
            return Caller(shown, Role.READ, "a read-only admin identity")
        return Caller(shown, Role.NONE, "an admin-CA certificate with no configured admin name")

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_path: str = handler_call_details.method
        if handler is None or not method_path.startswith(ADMIN_PREFIX):
            return handler
        method = method_path[len(ADMIN_PREFIX):]
        need = Role.READ if method in READ_METHODS else Role.WRITE
        inner = handler.unary_unary
        assert inner is not None, f"{method_path}: the Admin API is unary"

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            caller = self.identify(context)
            text = getattr(request, "yaml", None)
            if caller.role < need:
                why = caller.why or f"needs the {need.name.lower()} role"
                self.audit("refused", method, caller, context, text=text, reason=why)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"Admin.{method} refused for {caller.who}: {why}")
            reply = await inner(request, context)
            if method == "ApplyPolicy":
                self.audit("applied" if reply.ok else "invalid", method, caller, context,
                           text=text, version=reply.version if reply.ok else None)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def audit(self, decision: str, method: str, caller: Caller,
              context: grpc.aio.ServicerContext[Any, Any], *, text: str | None = None,
              reason: str = "", version: int | None = None) -> None:
        record: dict[str, Any] = {"audit": "admin", "decision": decision, "method": method,
                                  "who": caller.who, "peer": context.peer()}
        if reason:
            record["reason"] = reason
        if text is not None:  # the same digest `policy check` prints and the store keeps
            record["policy_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        if version is not None:
            record["version"] = version
        metrics.ADMIN_AUDIT.labels(method, decision).inc()
        if decision == "refused" and not loglimit.SHARED.admit(audit_log,
                                                               peer_of(context.peer())):
            return  # counted above; the caller's summary line says how many were not written
        audit_log.log(logging.INFO if decision == "applied" else logging.WARNING, "%s",
                      json.dumps(record, sort_keys=True))
