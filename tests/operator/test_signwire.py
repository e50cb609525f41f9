"""The operator ↔ signing-worker messages (``signwire``): pure round trips, no processes.

Every message crosses the socket pair as one JSON line, so each test encodes, decodes and
rebuilds: what a worker holds must be what the operator sent (the CA it signs with, the
identity it signs for), and ``same_grant`` must tell a changed grant from a new CRL.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from kubemtls_operator import errors, pki, signfront, signwire, signworkers
from testkit import utcnow


def _published(ca: pki.CA, revoked_serial: int = 0x1234) -> signfront.Published:
    now = utcnow()
    entry = pki.RevokedEntry(serial=revoked_serial, reason="keyCompromise", revoked_at=now)
    crl = pki.build_crl(ca, [entry], now=now, number=7)
    return signfront.Published.of(ca, pki.trust_bundle([ca.anchor]), pki.crl_pem(crl))


@pytest.fixture(scope="module")
def root() -> pki.CA:
    return pki.bootstrap_ca(now=utcnow(), common_name="signwire root")


@pytest.fixture(scope="module")
def rsa_intermediate(root: pki.CA) -> pki.CA:
    """An RSA intermediate under ``root``: a CA with a chain and another key type."""
    return pki.issue_intermediate_ca(
        root,
        now=utcnow(),
        common_name="signwire RSA intermediate",
        lifetime=datetime.timedelta(days=30),
        key_type="rsa-2048",
    )


def _wire(msg: dict[str, Any]) -> dict[str, Any]:
    """``msg`` as the other end reads it: one line, decoded."""
    line = signwire.encode(msg)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # PEM newlines are escaped: the reader splits on lines
    return signwire.decode(line)


def _answer(grant_fields: dict[str, Any]) -> dict[str, Any]:
    """A grant as the worker reads it from the operator's answer to ``auth``."""
    ok: dict[str, Any] = _wire({"t": "r", "id": 1, "ok": grant_fields})["ok"]
    return ok


def _key_der(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize("which", ["ecdsa-root", "rsa-intermediate"])
def test_a_ca_message_gives_the_worker_the_same_ca(
    which: str, root: pki.CA, rsa_intermediate: pki.CA
) -> None:
    ca = root if which == "ecdsa-root" else rsa_intermediate
    pub = _published(ca)
    msg = _wire(signwire.ca_message(42, pub))
    assert (msg["t"], msg["gen"]) == ("ca", 42)
    got = signwire.published_of(msg)
    assert got.signing.cert == ca.cert
    assert got.signing.chain == ca.chain
    assert _key_der(got.signing.key) == _key_der(ca.key)
    want = rsa.RSAPrivateKey if ca is rsa_intermediate else ec.EllipticCurvePrivateKey
    assert isinstance(got.signing.key, want)
    assert (got.bundle, got.crl, got.intermediates, got.issuer) == (
        pub.bundle,
        pub.crl,
        pub.intermediates,
        pub.issuer,
    )
    # The intermediate's answers carry it after the leaf; a root's carry nothing more.
    if ca is rsa_intermediate:
        assert x509.load_pem_x509_certificates(got.intermediates.encode()) == [ca.cert]
    else:
        assert got.intermediates == ""
    # What the worker signs with the decoded CA chains to the anchor.
    key = ec.generate_private_key(ec.SECP256R1())
    ident = pki.LeafIdentity("spiffe://cluster.local/ns/default/sa/app", "web-0", "default")
    leaf = pki.issue_leaf(
        got.signing, key.public_key(), ident, now=utcnow(), lifetime=datetime.timedelta(hours=1)
    )
    leaf.verify_directly_issued_by(ca.cert)
    assert leaf.issuer == ca.cert.subject


def test_a_ca_message_with_a_key_that_is_not_ec_or_rsa_is_rejected(root: pki.CA) -> None:
    msg = _wire(signwire.ca_message(1, _published(root)))
    other = ed25519.Ed25519PrivateKey.generate()
    msg["key"] = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(ValueError, match="not an EC or RSA key"):
        signwire.published_of(msg)


def _grant(pub: signfront.Published, **identity: Any) -> signfront.Grant:
    fields: dict[str, Any] = {
        "spiffe_id": "spiffe://cluster.local/ns/billing/sa/api",
        "common_name": "api-0",
        "organizational_unit": "billing",
        "dns_names": ("api.billing.svc", "fhir.ehr.example.org"),
        "ip_addresses": ("10.1.2.3", "fd00::1"),
    }
    fields.update(identity)
    return signfront.Grant(
        pod="billing/api-0",
        namespace="billing",
        identity=pki.LeafIdentity(**fields),
        lifetime=datetime.timedelta(hours=1, seconds=0.5),
        published=pub,
        ticket=object(),  # the operator's own handle: never sent
    )


def test_a_grant_round_trips_with_the_token_as_its_ticket(rsa_intermediate: pki.CA) -> None:
    pub = _published(rsa_intermediate)
    grant = _grant(pub)
    fields = _answer(signwire.grant_fields(grant, 3))
    assert fields["gen"] == 3
    assert fields["ca"] == f"{rsa_intermediate.cert.serial_number:x}"
    got = signwire.to_grant(fields, pub, "the-token")
    assert (got.pod, got.namespace, got.identity, got.lifetime) == (
        grant.pod,
        grant.namespace,
        grant.identity,
        grant.lifetime,
    )
    assert got.published is pub
    assert got.ticket == ("the-token", fields)
    # What the worker sends back with "rec" is what the operator computes for the same grant.
    assert signwire.same_grant(signwire.grant_fields(got, 3), fields)


def test_same_grant_ignores_the_generation_but_nothing_that_shapes_the_leaf(
    root: pki.CA, rsa_intermediate: pki.CA
) -> None:
    pub = _published(root)
    base = signwire.grant_fields(_grant(pub), 1)
    # A new CRL is a new generation of the same signing CA: the leaf is still what is allowed.
    new_crl = _published(root, revoked_serial=0x99)
    assert signwire.same_grant(base, _answer(signwire.grant_fields(_grant(new_crl), 2)))
    changed = {
        "identity": signwire.grant_fields(_grant(pub, common_name="api-1"), 1),
        "spiffe": signwire.grant_fields(
            _grant(pub, spiffe_id="spiffe://cluster.local/ns/billing/sa/other"), 1
        ),
        "dns": signwire.grant_fields(_grant(pub, dns_names=("api.billing.svc",)), 1),
        "ip": signwire.grant_fields(_grant(pub, ip_addresses=()), 1),
        "lifetime": signwire.grant_fields(
            dataclasses.replace(_grant(pub), lifetime=datetime.timedelta(hours=2)), 1
        ),
        "ca": signwire.grant_fields(_grant(_published(rsa_intermediate)), 1),
        "pod": signwire.grant_fields(dataclasses.replace(_grant(pub), pod="billing/api-1"), 1),
    }
    for what, other in changed.items():
        assert not signwire.same_grant(base, other), what
        assert not signwire.same_grant(other, base), what


def test_issued_round_trips_to_the_microsecond() -> None:
    nb = datetime.datetime(2026, 11, 26, 7, 59, 1, tzinfo=datetime.UTC)
    issued = signfront.Issued(
        serial="7f3a9c0e55aa01",
        issuer="CN=kubemtls bootstrap root CA",
        fingerprint="ab" * 32,
        not_before=nb,
        not_after=nb + datetime.timedelta(hours=24),
        renewal_time=nb + datetime.timedelta(hours=15, microseconds=987_654),
    )
    msg = _wire({"t": "rec", "id": 5, "token": "t", **signwire.issued_fields(issued)})
    assert signwire.to_issued(msg) == issued


@pytest.mark.parametrize(
    "line",
    [b"[1, 2]", b'"ca"', b"null", b"{}", b'{"t": 1}', b'{"id": 1}', b"{not json", b""],
)
def test_decode_rejects_what_is_not_a_message(line: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (orjson's own message, or ours)
        signwire.decode(line + b"\n")


@pytest.mark.parametrize("pod", ["default/web-0", ""])
def test_a_refusal_crosses_the_wire_unchanged(pod: str) -> None:
    e = errors.SigningRefused(403, "PodUIDMismatch", "the token names pod UID x, but y", pod)
    reply = _wire({"t": "r", "id": 9, "err": signwire.err(e)})
    got = signwire.refused_of(reply["err"])
    assert isinstance(got, signfront.Refused)
    assert (got.status, got.reason, got.message, got.pod) == (e.status, e.reason, e.message, pod)
    assert str(got) == e.message


def test_the_operator_numbers_what_a_ca_says_not_the_object(root: pki.CA) -> None:
    """The CA manager loads a new Authority on every check: the same CA, bundle and CRL keep
    their generation (workers keep their cached grants); a new CRL or CA gets a new one."""
    pool = signworkers.Pool(None, None, None)  # type: ignore[arg-type]  # generation() needs none
    first = _published(root)
    gen = pool.generation(first)
    again = signfront.Published.of(root, first.bundle.encode(), first.crl.encode())
    assert again is not first  # another object, the same content
    assert pool.generation(again) == gen
    assert pool.generation(first) == gen
    new_crl = _published(root, revoked_serial=0x77)
    assert pool.generation(new_crl) == gen + 1
    other = pki.bootstrap_ca(now=utcnow(), common_name="signwire other root")
    assert pool.generation(signfront.Published.of(other, b"", b"")) == gen + 2
