"""The chain we present: the configured certificates, never our own trust anchor appended.

OpenSSL's auto-chain used to append the root from our trust bundle to every Certificate
message (a chain build on our side, one more certificate to decode on the peer's, every
handshake). ``sslknobs.omit_trust_anchor`` turns it off only when the bundle holds nothing
but self-signed anchors; an intermediate in the bundle keeps OpenSSL's behaviour.
"""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import ssl

import testkit
from dataplane import Files, free_port, leaf_args, running_sidecar
from kubemtls_operator import pki
from kubemtls_sidecar import sslknobs


def _certificates_in(msg: bytes) -> int:
    """How many certificates a TLS 1.3 Certificate handshake message carries."""
    body = msg[4:]
    entries = body[1 + body[0] + 3 :]  # request context, then the list length
    count = 0
    while entries:
        n = int.from_bytes(entries[:3], "big")
        ext = int.from_bytes(entries[3 + n : 5 + n], "big")
        entries = entries[5 + n + ext :]
        count += 1
    return count


def _context(
    purpose: int, leaf: testkit.Leaf, trust_pem: bytes, tmp: pathlib.Path
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    d = leaf.write(tmp / f"leaf-{purpose}")
    ctx.load_cert_chain(d / "tls.crt", d / "tls.key")
    ctx.load_verify_locations(cadata=trust_pem.decode())
    return ctx


def _sent_chain_lengths(server: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, int]:
    """Handshake in memory; how many certificates each side's Certificate message held."""
    seen: dict[str, int] = {}

    def on_message(
        conn: object, direction: str, version: int, content_type: int, msg_type: int, data: bytes
    ) -> None:
        if content_type == 22 and msg_type == 11 and direction == "write":
            seen["server" if conn is s else "client"] = _certificates_in(data)

    base = ssl.SSLContext.__mro__[1]
    for ctx in (server, client):
        base._msg_callback.__set__(ctx, on_message)
    tls = testkit.memory_tls(client, server, server_hostname="localhost")
    s = tls.server
    tls.handshake()
    assert tls.client.version() == "TLSv1.3"
    return seen


def test_anchor_only_bundle_sends_the_leaf_alone(test_pki: testkit.TestPKI, tmp_path):
    trust = pki.trust_bundle([test_pki.ca.anchor])
    server = _context(ssl.PROTOCOL_TLS_SERVER, test_pki.leaf("app", "server"), trust, tmp_path)
    client = _context(ssl.PROTOCOL_TLS_CLIENT, test_pki.leaf("app", "client"), trust, tmp_path)
    assert _sent_chain_lengths(server, client) == {"server": 2, "client": 2}  # OpenSSL's default
    assert sslknobs.omit_trust_anchor(server)
    assert sslknobs.omit_trust_anchor(client)
    assert _sent_chain_lengths(server, client) == {"server": 1, "client": 1}


def test_intermediate_in_bundle_keeps_openssl_chain_building(tmp_path):
    root = pki.bootstrap_ca(now=testkit.utcnow(), common_name="root")
    inter = pki.issue_intermediate_ca(
        root, now=testkit.utcnow(), common_name="inter", lifetime=datetime.timedelta(days=30)
    )
    ipki = testkit.TestPKI(ca=inter)
    leaf = ipki.leaf("app", "server")
    leaf = testkit.Leaf(leaf.cert, leaf.key, pki.cert_pem(leaf.cert), leaf.key_pem)  # leaf only
    trust = pki.trust_bundle([root.cert, inter.cert])
    server = _context(ssl.PROTOCOL_TLS_SERVER, leaf, trust, tmp_path)
    client = _context(ssl.PROTOCOL_TLS_CLIENT, leaf, trust, tmp_path)
    assert not sslknobs.omit_trust_anchor(server)
    assert _sent_chain_lengths(server, client)["server"] == 3  # leaf, intermediate, root


async def test_sidecar_presents_only_its_leaf_to_openssl(
    sidecar_args, echo_port, files: Files, tmp_path
):
    port = free_port()
    async with running_sidecar(sidecar_args(extra=["--inbound", f"{port}:127.0.0.1:{echo_port}"])):
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-showcerts", "-CAfile", str(files.trust_dir / "ca.crt"),
            *leaf_args(files.pki.leaf("billing", "api"), tmp_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(b""), 10)
    text = out.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in text, text
    assert text.count("-----BEGIN CERTIFICATE-----") == 1, text
