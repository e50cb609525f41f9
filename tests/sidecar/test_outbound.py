"""Outbound: plaintext in on 127.0.0.1, mutual TLS out, refused upstreams close the app's side."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import pathlib
import ssl
from collections.abc import AsyncIterator

import pytest
import testkit
from dataplane import Files, free_port, log_fields, raw_leaf, running_sidecar
from kubemtls_sidecar import certs
from testkit import Leaf, eventually

FAILED = "upstream TLS handshake failed; closing the app's connection"


@contextlib.asynccontextmanager
async def upstream_server(
    leaf: Leaf, client_ca: pathlib.Path, tmp: pathlib.Path
) -> AsyncIterator[tuple[int, list[dict]]]:
    """A TLS echo server that requires a client certificate; yields (port, peers seen)."""
    d = leaf.write(tmp / f"upstream-{leaf.cert.serial_number}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    ctx.load_verify_locations(str(client_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    peers: list[dict] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peers.append(w.get_extra_info("peercert"))
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield int(server.sockets[0].getsockname()[1]), peers
    finally:
        server.close()


async def roundtrip(port: int, payload: bytes = b"hello upstream\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    try:
        data = b""
        async with asyncio.timeout(5):
            while len(data) < len(payload):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
        return data
    finally:
        writer.close()


async def test_upstream_sees_our_identity(sidecar_args, files: Files, tmp_path):
    up = files.pki.leaf("ehr", "fhir", dns_names=("localhost",))
    async with upstream_server(up, files.trust_dir / "ca.crt", tmp_path) as (up_port, peers):
        local = free_port()
        extra = ["--outbound", f"{local}=localhost:{up_port}"]
        async with running_sidecar(sidecar_args(extra=extra)) as r:
            assert await roundtrip(local) == b"hello upstream\n"
            m = r.sidecar.metrics.exposition().decode()
    assert ("URI", "spiffe://cluster.local/ns/app/sa/server") in peers[0]["subjectAltName"]
    assert 'kubemtls_sidecar_connections_total{direction="outbound",result="ok"} 1.0' in m


def _expired(p: testkit.TestPKI) -> Leaf:
    now = datetime.datetime.now(datetime.UTC)
    return raw_leaf(
        p.ca,
        not_before=now - datetime.timedelta(days=3),
        not_after=now - datetime.timedelta(days=1),
    )


@pytest.mark.parametrize(
    ("case", "alert"),
    [
        ("wrong-hostname", "bad_certificate"),
        ("unknown-ca", "unknown_ca"),
        ("expired", "certificate_expired"),
    ],
)
async def test_refused_upstream_closes_the_app_connection(
    sidecar_args, files: Files, other_pki: testkit.TestPKI, tmp_path, caplog, case, alert
):
    if case == "wrong-hostname":
        up = files.pki.leaf("ehr", "fhir", dns_names=("fhir.other.example",), ip_addresses=())
    elif case == "unknown-ca":
        up = other_pki.leaf("ehr", "fhir")
    else:
        up = _expired(files.pki)
    async with upstream_server(up, files.trust_dir / "ca.crt", tmp_path) as (up_port, peers):
        local = free_port()
        extra = ["--outbound", f"{local}=localhost:{up_port}"]
        async with running_sidecar(sidecar_args(extra=extra)):
            assert await roundtrip(local) == b""  # closed, nothing in plaintext
            lines = log_fields(caplog, FAILED)
    assert len(lines) == 1
    assert lines[0]["alert"] == alert
    assert lines[0]["alert_sent_by"] == "us"
    assert lines[0]["upstream"] == f"localhost:{up_port}"
    assert lines[0]["peer_identity"] == certs.facts(up.cert).spiffe_id  # who it claimed to be
    assert peers == [] or all(p for p in peers)  # no application data reached it


async def test_upstream_refusing_our_certificate_is_logged_with_its_alert(
    sidecar_args, files: Files, other_pki: testkit.TestPKI, tmp_path, caplog
):
    """openssl s_server (asyncio's own TLS server sends no alert: CPython issue 98078)."""
    d = files.pki.leaf("ehr", "fhir").write(tmp_path / "s_server")
    other_trust = other_pki.trust_dir(tmp_path / "other-trust")
    up_port = free_port()
    server = await asyncio.create_subprocess_exec(
        "openssl", "s_server", "-accept", f"127.0.0.1:{up_port}", "-cert", str(d / "tls.crt"),
        "-key", str(d / "tls.key"), "-CAfile", str(other_trust / "ca.crt"), "-Verify", "1",
        "-verify_return_error", "-quiet",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await eventually(lambda: _listening(up_port))
        local = free_port()
        async with running_sidecar(
            sidecar_args(extra=["--outbound", f"{local}=localhost:{up_port}"])
        ):
            assert await roundtrip(local) == b""
    finally:
        server.kill()
        await server.wait()
    line = log_fields(caplog, FAILED)[0]
    assert line["alert"] == "unknown_ca"
    assert line["alert_sent_by"] == "peer"


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_upstream_ca_replaces_mesh_trust_for_outbound(
    sidecar_args, files: Files, other_pki: testkit.TestPKI, tmp_path
):
    """An EHR with its own CA: trusted through --upstream-ca, where the mesh CRL never applies."""
    up = other_pki.leaf("ehr", "fhir")
    other_trust = other_pki.trust_dir(tmp_path / "ehr-trust")
    async with upstream_server(up, files.trust_dir / "ca.crt", tmp_path) as (up_port, peers):
        local = free_port()
        extra = [
            "--outbound",
            f"{local}=localhost:{up_port}",
            "--upstream-ca",
            str(other_trust / "ca.crt"),
        ]
        async with running_sidecar(sidecar_args(extra=extra)):
            assert await roundtrip(local) == b"hello upstream\n"
    assert len(peers) == 1
