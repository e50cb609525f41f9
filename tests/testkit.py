"""Helpers shared by the tests (importable as ``testkit``: tests/ is on pythonpath).

No key is ever committed: every CA and leaf is generated at test time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import pathlib
import socket
import ssl
from collections.abc import Callable

from cryptography import x509
from kubemtls_operator import pki
from kubemtls_sidecar import certs

REPO = pathlib.Path(__file__).resolve().parent.parent
CRD_FILE = REPO / "charts" / "kubemtls" / "crds" / "mtlscerts.yaml"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A leaf with its key, and the PEM files written for it."""

    cert: x509.Certificate
    key: pki.PrivateKey
    chain_pem: bytes
    key_pem: bytes

    def write(self, directory: pathlib.Path) -> pathlib.Path:
        """Write ``tls.crt`` / ``tls.key`` into ``directory`` (the sidecar's --cert-dir)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tls.crt").write_bytes(self.chain_pem)
        (directory / "tls.key").write_bytes(self.key_pem)
        (directory / "tls.key").chmod(0o600)
        return directory


@dataclasses.dataclass
class TestPKI:
    """A root CA (``ca``) and helpers to mint leaves for tests."""

    ca: pki.CA
    trust_domain: str = "cluster.local"

    def leaf(
        self,
        namespace: str = "default",
        service_account: str = "default",
        *,
        name: str = "pod",
        dns_names: tuple[str, ...] = ("localhost",),
        ip_addresses: tuple[str, ...] = ("127.0.0.1",),
        key_type: str = "ecdsa-p256",
        lifetime: datetime.timedelta = datetime.timedelta(hours=24),
        now: datetime.datetime | None = None,
        issuer: pki.CA | None = None,
        server_auth: bool = True,
        client_auth: bool = True,
    ) -> Leaf:
        issuer = issuer or self.ca
        key = pki.generate_key(key_type)
        identity = pki.LeafIdentity(
            spiffe_id=certs.spiffe_id(self.trust_domain, namespace, service_account),
            common_name=name,
            organizational_unit=namespace,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )
        cert = pki.issue_leaf(
            issuer,
            key.public_key(),
            identity,
            now=now or utcnow(),
            lifetime=lifetime,
            server_auth=server_auth,
            client_auth=client_auth,
        )
        return Leaf(cert, key, pki.chain_pem(cert, issuer), pki.key_pem(key))

    def trust_dir(
        self, directory: pathlib.Path, *, revoked: tuple[x509.Certificate, ...] = ()
    ) -> pathlib.Path:
        """Write ``ca.crt`` and a fresh ``crl.pem`` (the sidecar's --trust-dir)."""
        directory.mkdir(parents=True, exist_ok=True)
        now = utcnow()
        entries = [pki.RevokedEntry(c.serial_number, "keyCompromise", now) for c in revoked]
        crl = pki.build_crl(self.ca, entries, now=now, number=1 + len(entries))
        (directory / "ca.crt").write_bytes(pki.trust_bundle([self.ca.anchor]))
        (directory / "crl.pem").write_bytes(pki.crl_pem(crl))
        return directory


EventuallyPredicate = Callable[[], object]


async def eventually(
    pred: EventuallyPredicate, timeout: float = 10.0, step: float = 0.05
) -> object:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds.

    ``pred`` may be a coroutine function: its result is awaited each time.
    """
    import asyncio
    import inspect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {pred}")
        await asyncio.sleep(step)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free 127.0.0.1 port, never one this process handed out before.

    Binding to port 0 and closing can give the same port twice in a row; a test that asks
    for two ports (an admin port and a listen port, say) must get two different ones.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclasses.dataclass
class MemoryTLS:
    """A client and a server ``SSLObject`` joined by memory BIOs: a TLS exchange, no socket."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    c_in: ssl.MemoryBIO
    c_out: ssl.MemoryBIO
    s_in: ssl.MemoryBIO
    s_out: ssl.MemoryBIO

    def handshake(self, rounds: int = 4) -> None:
        """Step both sides and carry their bytes across until the handshake is done."""
        for _ in range(rounds):
            for obj in (self.client, self.server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
            self.s_in.write(self.c_out.read())
            self.c_in.write(self.s_out.read())


def memory_tls(
    client: ssl.SSLContext, server: ssl.SSLContext, server_hostname: str | None = None
) -> MemoryTLS:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    return MemoryTLS(
        client.wrap_bio(c_in, c_out, server_hostname=server_hostname),
        server.wrap_bio(s_in, s_out, server_side=True),
        c_in,
        c_out,
        s_in,
        s_out,
    )
