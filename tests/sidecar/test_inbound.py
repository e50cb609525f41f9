"""Inbound mTLS: who gets through, and the alert (seen by openssl s_client) for who does not."""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import ssl

import pytest
import testkit
from cryptography.hazmat.primitives.asymmetric import rsa
from dataplane import (
    Files,
    blocking_exchange,
    client_context,
    free_port,
    leaf_args,
    log_fields,
    raw_leaf,
    running_sidecar,
    s_client,
)
from testkit import eventually

REFUSED = "TLS handshake refused"


@pytest.fixture
async def inbound(sidecar_args, echo_port, files: Files):
    """A sidecar with one inbound port in front of the echo app."""
    port = free_port()
    async with running_sidecar(
        sidecar_args(extra=["--inbound", f"{port}:127.0.0.1:{echo_port}"])
    ) as r:
        yield port, r


async def test_valid_client_passes_end_to_end_with_half_close(inbound, files: Files, tmp_path):
    port, r = inbound
    leaf = files.pki.leaf("billing", "api", name="client")
    ctx = client_context(leaf, files.trust_dir, tmp_path)
    payload = bytes(range(256)) * 4096  # 1 MiB
    # half-close: the client ends its direction first, the echo still answers in full
    echoed, served = await asyncio.to_thread(blocking_exchange, ctx, port, payload)
    assert echoed == payload
    assert ("URI", "spiffe://cluster.local/ns/app/sa/server") in served["subjectAltName"]
    m = r.sidecar.metrics.exposition().decode()
    assert 'kubemtls_sidecar_connections_total{direction="inbound",result="ok"} 1.0' in m


async def test_tls12_client_gets_aead_forward_secret_cipher(inbound, files: Files, tmp_path):
    port, _ = inbound
    ctx = client_context(files.pki.leaf(), files.trust_dir, tmp_path)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    name, version, _ = writer.get_extra_info("cipher")
    assert version == "TLSv1.2"
    assert name.startswith("ECDHE-")
    assert "GCM" in name or "CHACHA20" in name
    writer.close()


def _expired(pki_: testkit.TestPKI, now: datetime.datetime):
    return raw_leaf(
        pki_.ca,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )


def _not_yet_valid(pki_: testkit.TestPKI, now: datetime.datetime):
    return raw_leaf(
        pki_.ca,
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=2),
    )


def _rsa1024(pki_: testkit.TestPKI, now: datetime.datetime):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - must be refused
    return raw_leaf(
        pki_.ca,
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(days=1),
        key=key,
    )


def _self_signed(pki_: testkit.TestPKI, now: datetime.datetime):
    return raw_leaf(
        None,
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(days=1),
    )


# (case, how to mint the client leaf, TLS version flag, s_client's words, our alert name)
CASES = [
    ("no-cert-tls13", None, "-tls1_3", "alert certificate required", "certificate_required"),
    ("no-cert-tls12", None, "-tls1_2", "alert handshake failure", "handshake_failure"),
    ("unknown-ca-tls13", "other", "-tls1_3", "alert unknown ca", "unknown_ca"),
    ("unknown-ca-tls12", "other", "-tls1_2", "alert unknown ca", "unknown_ca"),
    ("expired-tls13", _expired, "-tls1_3", "alert certificate expired", "certificate_expired"),
    ("expired-tls12", _expired, "-tls1_2", "alert certificate expired", "certificate_expired"),
    ("not-yet-valid", _not_yet_valid, "-tls1_3", "alert bad certificate", "bad_certificate"),
    (
        "server-auth-only-tls13",
        "serveronly",
        "-tls1_3",
        "alert unsupported certificate",
        "unsupported_certificate",
    ),
    (
        "server-auth-only-tls12",
        "serveronly",
        "-tls1_2",
        "alert unsupported certificate",
        "unsupported_certificate",
    ),
    ("self-signed", _self_signed, "-tls1_3", "alert unknown ca", "unknown_ca"),
    ("rsa-1024", _rsa1024, "-tls1_3 -cipher DEFAULT@SECLEVEL=0", "alert", None),
]


@pytest.mark.parametrize(
    ("case", "mint", "version", "words", "alert"), CASES, ids=[c[0] for c in CASES]
)
async def test_refused_client_gets_the_alert_and_one_log_line(
    inbound,
    files: Files,
    other_pki: testkit.TestPKI,
    tmp_path: pathlib.Path,
    caplog,
    now,
    case,
    mint,
    version,
    words,
    alert,
):
    port, r = inbound
    args: list[str] = []
    if mint == "other":
        args = leaf_args(other_pki.leaf(), tmp_path)
    elif mint == "serveronly":
        args = leaf_args(files.pki.leaf(client_auth=False), tmp_path)
    elif mint is not None:
        args = leaf_args(mint(files.pki, now), tmp_path)
    out = await s_client(port, *version.split(), "-CAfile", str(files.trust_dir / "ca.crt"), *args)
    assert words in out, out
    assert "ping" not in out.splitlines()
    lines = await eventually(lambda: log_fields(caplog, REFUSED))
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["direction"] == "inbound"
    assert str(line["peer"]).startswith("127.0.0.1:")
    assert line["reason"]
    if mint == "other":  # the identity it presented, though refused
        assert line["peer_identity"] == "spiffe://cluster.local/ns/default/sa/default"
    if mint is None:
        assert "peer_identity" not in line
    if alert is not None:
        assert line["alert"] == alert
        assert line["alert_sent_by"] == "us"
        assert f"alert {alert.replace('_', ' ')}" in out
    else:  # RSA-1024: refused at OpenSSL's security level, whichever alert it picks
        assert line["alert"] in ("bad_certificate", "handshake_failure", "insufficient_security")
    m = r.sidecar.metrics.exposition().decode()
    assert 'kubemtls_sidecar_handshake_failures_total{alert="' in m


async def test_revoked_client_gets_certificate_revoked(
    sidecar_args, echo_port, files: Files, tmp_path, caplog
):
    revoked = files.pki.leaf("billing", "stolen")
    files.pki.trust_dir(files.trust_dir, revoked=(revoked.cert,))
    port = free_port()
    async with running_sidecar(sidecar_args(extra=["--inbound", f"{port}:127.0.0.1:{echo_port}"])):
        for version in ("-tls1_3", "-tls1_2"):
            out = await s_client(
                port,
                *version.split(),
                "-CAfile",
                str(files.trust_dir / "ca.crt"),
                *leaf_args(revoked, tmp_path),
            )
            assert "alert certificate revoked" in out, out
        ok = await s_client(
            port,
            "-CAfile",
            str(files.trust_dir / "ca.crt"),
            *leaf_args(files.pki.leaf("billing", "fine"), tmp_path),
            until="ping",
        )
        assert "ping" in ok
    assert [f["alert"] for f in log_fields(caplog, REFUSED)] == ["certificate_revoked"] * 2


async def test_old_protocols_are_refused_with_protocol_version(
    inbound, files: Files, tmp_path, caplog
):
    port, _ = inbound
    for flag in ("-tls1_1", "-tls1"):
        out = await s_client(
            port, flag, "-cipher", "DEFAULT@SECLEVEL=0", *leaf_args(files.pki.leaf(), tmp_path)
        )
        assert "alert protocol version" in out, out
    alerts = [f["alert"] for f in log_fields(caplog, REFUSED)]
    assert alerts == ["protocol_version", "protocol_version"]


async def test_peer_outside_allowed_peer_is_closed_and_logged_access_denied(
    sidecar_args, echo_port, files: Files, tmp_path, caplog
):
    port = free_port()
    extra = [
        "--inbound",
        f"{port}:127.0.0.1:{echo_port}",
        "--allowed-peer",
        "spiffe://cluster.local/ns/ehr/sa/*",
    ]
    async with running_sidecar(sidecar_args(extra=extra)) as r:
        ca = str(files.trust_dir / "ca.crt")
        good = await s_client(
            port, "-CAfile", ca, *leaf_args(files.pki.leaf("ehr", "fhir"), tmp_path), until="ping"
        )
        assert "ping" in good
        bad = await s_client(
            port, "-CAfile", ca, *leaf_args(files.pki.leaf("billing", "api"), tmp_path)
        )
        assert "ping" not in bad.splitlines()
        denied = log_fields(caplog, "peer refused after the handshake")
        assert len(denied) == 1
        assert denied[0]["alert"] == "access_denied"
        assert denied[0]["peer_identity"] == "spiffe://cluster.local/ns/billing/sa/api"
        m = r.sidecar.metrics.exposition().decode()
        assert 'kubemtls_sidecar_authorization_denied_total{direction="inbound"} 1.0' in m


async def test_intermediate_only_trust_bundle_verifies_peers(sidecar_args, echo_port, tmp_path):
    from kubemtls_operator import pki
    from testkit import utcnow

    root = pki.bootstrap_ca(now=utcnow(), common_name="root")
    inter = pki.issue_intermediate_ca(
        root, now=utcnow(), common_name="intermediate", lifetime=datetime.timedelta(days=30)
    )
    ipki = testkit.TestPKI(ca=inter)
    cert_dir = ipki.leaf("app", "server").write(tmp_path / "ic")
    trust = tmp_path / "itrust"
    trust.mkdir()
    (trust / "ca.crt").write_bytes(pki.cert_pem(inter.cert))  # no root in the bundle
    (trust / "crl.pem").write_bytes(pki.crl_pem(pki.build_crl(inter, [], now=utcnow(), number=1)))
    port = free_port()
    args = [
        "--cert-dir",
        str(cert_dir),
        "--trust-dir",
        str(trust),
        "--admin-port",
        str(free_port()),
        "--admin-address",
        "127.0.0.1",
        "--listen-address",
        "127.0.0.1",
        "--inbound",
        f"{port}:127.0.0.1:{echo_port}",
    ]
    async with running_sidecar(args):
        out = await s_client(
            port,
            "-CAfile",
            str(trust / "ca.crt"),
            "-partial_chain",
            *leaf_args(ipki.leaf("ehr", "x"), tmp_path),
            until="ping",
        )
        assert "ping" in out, out
