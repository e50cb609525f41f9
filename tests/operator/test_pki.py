"""The PKI core (issue 2): chains, CRLs, handshakes, refusals, leaf properties, renewal.

Where a property can be checked by something other than our code it is: ``openssl
verify`` and ``openssl crl`` read what we issue, and Python's ``ssl`` completes a real
mutual TLS handshake over 127.0.0.1 with two of our leaves. Every CA and key is minted
here; RSA keys once per session (they are the slow part).
"""

from __future__ import annotations

import datetime
import pathlib
import random
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import testkit
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubemtls_operator import authority, crl, pki
from kubemtls_sidecar import certs, errors
from testkit import utcnow

E = TypeVar("E", bound=x509.ExtensionType)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)


# --- fixtures and helpers ---------------------------------------------------------------
@pytest.fixture(scope="session")
def intermediate(test_pki: testkit.TestPKI) -> pki.CA:
    """An intermediate CA under the session root (as an enterprise PKI would issue one)."""
    return pki.issue_intermediate_ca(
        test_pki.ca, now=utcnow(), common_name="kubemtls test intermediate", lifetime=365 * DAY
    )


@pytest.fixture(scope="session")
def rsa_keys() -> dict[int, rsa.RSAPrivateKey]:
    """RSA-2048 and RSA-3072 keys, generated once: never generate RSA keys in a loop."""
    return {
        bits: rsa.generate_private_key(public_exponent=65537, key_size=bits)
        for bits in (2048, 3072)
    }


def identity(ns: str = "ehr", sa: str = "fhir-client", **kw: object) -> pki.LeafIdentity:
    defaults: dict[str, object] = {
        "spiffe_id": certs.spiffe_id("cluster.local", ns, sa),
        "common_name": "fhir-client-7d9f",
        "organizational_unit": ns,
        "dns_names": ("localhost",),
        "ip_addresses": ("127.0.0.1",),
    }
    defaults.update(kw)
    return pki.LeafIdentity(**defaults)  # type: ignore[arg-type]


def make_csr(
    key: object,
    *,
    cn: str = "admin",
    sans: tuple[x509.GeneralName, ...] = (),
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def leaf_for(
    ca: pki.CA, key: pki.PrivateKey | None = None, **kw: object
) -> tuple[x509.Certificate, pki.PrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    args: dict[str, object] = {"now": utcnow(), "lifetime": 24 * HOUR}
    args.update(kw)
    ident = args.pop("identity", None) or identity()
    cert = pki.issue_leaf(ca, key.public_key(), ident, **args)  # type: ignore[arg-type]
    return cert, key


def openssl(*args: str | pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


def raises_with(exc: type[Exception], *fragments: str) -> Callable[[Callable[[], object]], str]:
    """Run ``fn``, check it raises exactly ``exc`` and that the message says each fragment."""

    def check(fn: Callable[[], object]) -> str:
        with pytest.raises(exc) as info:
            fn()
        assert type(info.value) is exc, f"{type(info.value).__name__} is not {exc.__name__}"
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message, (fragment, message)
        return message

    return check


# --- chains verify with openssl ---------------------------------------------------------
@pytest.mark.parametrize("issuer", ["root", "intermediate"])
@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_chain_verifies_with_openssl_verify(
    tmp_path: pathlib.Path,
    test_pki: testkit.TestPKI,
    intermediate: pki.CA,
    rsa_keys: dict[int, rsa.RSAPrivateKey],
    issuer: str,
    key_type: str,
) -> None:
    ca = test_pki.ca if issuer == "root" else intermediate
    key = rsa_keys[2048] if key_type == "rsa-2048" else None
    leaf, _ = leaf_for(ca, key)
    (tmp_path / "anchor.pem").write_bytes(pki.trust_bundle([ca.anchor]))
    (tmp_path / "chain.pem").write_bytes(pki.chain_pem(leaf, ca))
    (tmp_path / "leaf.pem").write_bytes(pki.cert_pem(leaf))
    untrusted = pki.cert_pem(*ca.intermediates) or pki.cert_pem(ca.anchor)
    (tmp_path / "untrusted.pem").write_bytes(untrusted)
    for purpose in ("sslclient", "sslserver"):
        out = openssl(
            "verify", "-x509_strict", "-purpose", purpose,
            "-CAfile", tmp_path / "anchor.pem",
            "-untrusted", tmp_path / "untrusted.pem",
            tmp_path / "leaf.pem",
        )  # fmt: skip
        assert out.returncode == 0, out
        assert out.stdout.strip().endswith(": OK"), out
    # The chain we hand out is leaf first, then exactly the intermediates.
    assert certs.load_pem_certificates(pki.chain_pem(leaf, ca)) == [leaf, *ca.intermediates]


def test_openssl_refuses_a_leaf_from_another_ca(
    tmp_path: pathlib.Path, test_pki: testkit.TestPKI, other_pki: testkit.TestPKI
) -> None:
    leaf, _ = leaf_for(other_pki.ca)
    (tmp_path / "anchor.pem").write_bytes(pki.cert_pem(test_pki.ca.anchor))
    (tmp_path / "leaf.pem").write_bytes(pki.cert_pem(leaf))
    out = openssl("verify", "-CAfile", tmp_path / "anchor.pem", tmp_path / "leaf.pem")
    assert out.returncode != 0
    assert "unable to get local issuer certificate" in out.stdout + out.stderr


# --- CRLs parse with openssl ------------------------------------------------------------
OPENSSL_REASONS = {
    "keyCompromise": "Key Compromise",
    "cACompromise": "CA Compromise",
    "affiliationChanged": "Affiliation Changed",
    "superseded": "Superseded",
    "cessationOfOperation": "Cessation Of Operation",
    "certificateHold": "Certificate Hold",
    "privilegeWithdrawn": "Privilege Withdrawn",
    "aACompromise": "AA Compromise",
}


@pytest.mark.parametrize("issuer", ["root", "intermediate"])
def test_crl_lists_serials_and_reasons_for_openssl(
    tmp_path: pathlib.Path, test_pki: testkit.TestPKI, intermediate: pki.CA, issuer: str
) -> None:
    ca = test_pki.ca if issuer == "root" else intermediate
    now = utcnow().replace(microsecond=0)
    entries = [
        pki.RevokedEntry(authority.serial_number(), reason, now - HOUR)
        for reason in [*OPENSSL_REASONS, "unspecified"]
    ]
    signed = pki.build_crl(ca, entries, now=now, number=42)
    (tmp_path / "crl.pem").write_bytes(pki.crl_pem(signed))
    (tmp_path / "issuers.pem").write_bytes(pki.cert_pem(ca.cert, *ca.chain))
    out = openssl("crl", "-in", tmp_path / "crl.pem", "-noout", "-text")
    assert out.returncode == 0, out
    text = out.stdout
    assert re.search(r"X509v3 CRL Number:\s*\n\s*42\b", text), text
    assert "X509v3 Authority Key Identifier" in text
    # Each revoked entry: "Serial Number: HEX", its date, then (maybe) its reason.
    blocks = re.split(r"\n\s*Serial Number: ", text.split("Revoked Certificates:")[1])[1:]
    listed = {int(b.split()[0], 16): b for b in blocks}
    assert set(listed) == {e.serial for e in entries}
    for e in entries:
        block = listed[e.serial].split("Signature Algorithm")[0]
        if e.reason == "unspecified":  # RFC 5280 §5.3.1: no reasonCode for unspecified
            assert "CRL Reason Code" not in block, block
        else:
            assert re.search(r"CRL Reason Code:\s*\n\s*" + OPENSSL_REASONS[e.reason], block), block
    next_update = now + crl.DEFAULT_NEXT_UPDATE
    assert signed.next_update_utc == next_update
    assert signed.last_update_utc == now
    verify = openssl(
        "crl", "-in", tmp_path / "crl.pem", "-noout", "-CAfile", tmp_path / "issuers.pem"
    )
    assert verify.returncode == 0, verify
    assert "verify OK" in verify.stdout + verify.stderr, verify


def test_openssl_verify_with_our_crl_refuses_the_revoked_leaf(
    tmp_path: pathlib.Path, test_pki: testkit.TestPKI
) -> None:
    revoked, _ = leaf_for(test_pki.ca)
    kept, _ = leaf_for(test_pki.ca)
    now = utcnow()
    signed = pki.build_crl(
        test_pki.ca,
        [pki.RevokedEntry(revoked.serial_number, "keyCompromise", now)],
        now=now,
        number=1,
    )
    (tmp_path / "anchor.pem").write_bytes(pki.cert_pem(test_pki.ca.anchor))
    (tmp_path / "crl.pem").write_bytes(pki.crl_pem(signed))
    for cert, name in ((revoked, "revoked.pem"), (kept, "kept.pem")):
        (tmp_path / name).write_bytes(pki.cert_pem(cert))
    args = (
        "verify",
        "-crl_check",
        "-CAfile",
        tmp_path / "anchor.pem",
        "-CRLfile",
        tmp_path / "crl.pem",
    )
    bad = openssl(*args, tmp_path / "revoked.pem")
    assert bad.returncode != 0, bad
    assert "certificate revoked" in bad.stdout + bad.stderr, bad
    good = openssl(*args, tmp_path / "kept.pem")
    assert good.returncode == 0, good


def test_crl_refuses_an_unknown_reason_and_bad_numbers(test_pki: testkit.TestPKI) -> None:
    now = utcnow()
    bad = [pki.RevokedEntry(5, "stolen", now)]
    raises_with(ValueError, "'stolen'", "keyCompromise")(
        lambda: pki.build_crl(test_pki.ca, bad, now=now, number=1)
    )
    with pytest.raises(ValueError, match="non-negative"):
        pki.build_crl(test_pki.ca, [], now=now, number=-1)
    with pytest.raises(ValueError, match="future"):
        pki.build_crl(test_pki.ca, [], now=now, number=1, next_update=datetime.timedelta(0))


def test_an_empty_crl_is_valid(test_pki: testkit.TestPKI) -> None:
    signed = pki.build_crl(test_pki.ca, [], now=utcnow(), number=0)
    assert len(signed) == 0
    assert signed.is_signature_valid(test_pki.ca.cert.public_key())  # type: ignore[arg-type]


# --- a real mutual TLS handshake --------------------------------------------------------
def _uris(peercert: dict[str, object]) -> list[str]:
    sans = peercert.get("subjectAltName", ())
    return [v for k, v in sans if k == "URI"]  # type: ignore[attr-defined]


def test_two_leaves_complete_mutual_tls_and_see_each_others_spiffe_id(
    tmp_path: pathlib.Path, test_pki: testkit.TestPKI, intermediate: pki.CA
) -> None:
    # The server's leaf comes from the intermediate (its chain carries it), the client's
    # from the root: both chain to the one anchor each side trusts.
    server_id = identity("ehr", "fhir-server", common_name="fhir-server-0")
    client_id = identity("billing", "claims", common_name="claims-5c4b", dns_names=())
    server_cert, server_key = leaf_for(intermediate, identity=server_id)
    client_cert, client_key = leaf_for(test_pki.ca, identity=client_id)
    files = {}
    for name, cert, key, ca in (
        ("server", server_cert, server_key, intermediate),
        ("client", client_cert, client_key, test_pki.ca),
    ):
        files[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        files[name][0].write_bytes(pki.chain_pem(cert, ca))
        files[name][1].write_bytes(pki.key_pem(key))
    anchor = pki.trust_bundle([test_pki.ca.anchor]).decode()

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(*files["server"])
    server_ctx.load_verify_locations(cadata=anchor)
    client_ctx = ssl.create_default_context(cadata=anchor)
    client_ctx.load_cert_chain(*files["client"])

    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen["server_saw"] = tls.getpeercert()
                    tls.sendall(tls.recv(5).upper())
            except Exception as e:  # surfaced by the assertions below
                seen["server_error"] = e

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"hello")
            assert tls.recv(5) == b"HELLO"
            seen["client_saw"] = tls.getpeercert()
        thread.join(10)
    assert "server_error" not in seen, seen
    assert _uris(seen["server_saw"]) == [client_id.spiffe_id]  # type: ignore[arg-type]
    assert _uris(seen["client_saw"]) == [server_id.spiffe_id]  # type: ignore[arg-type]


# --- CA inputs: each mistake has its own error type and a readable message --------------
def test_load_ca_round_trips_a_root_and_an_intermediate_with_chain(
    test_pki: testkit.TestPKI, intermediate: pki.CA
) -> None:
    now = utcnow()
    root = pki.load_ca(pki.cert_pem(test_pki.ca.cert), pki.key_pem(test_pki.ca.key), now=now)
    assert root.cert == test_pki.ca.cert
    assert root.is_root
    assert root.anchor == root.cert
    assert root.intermediates == ()
    pem = pki.cert_pem(intermediate.cert, *intermediate.chain)
    sub = pki.load_ca(pem, pki.key_pem(intermediate.key), now=now)
    assert not sub.is_root
    assert sub.anchor == test_pki.ca.cert
    assert sub.intermediates == (intermediate.cert,)
    assert "PRIVATE" not in repr(sub)
    assert "subject=" in repr(sub)


def test_ca_errors_are_distinct_types_under_one_base() -> None:
    kinds = [pki.CAInvalid, pki.CAKeyEncrypted, pki.CAKeyMismatch, pki.NotACA, pki.CAExpired,
             pki.CANotYetValid]  # fmt: skip
    assert len(set(kinds)) == len(kinds)
    for kind in kinds:
        assert issubclass(kind, pki.CAInvalid)
        assert issubclass(kind, pki.PKIError)
        assert issubclass(kind, errors.KubemtlsError)
    for csr_kind in (pki.CSRInvalid, pki.CSRBadSignature, pki.CSRWeakKey):
        assert issubclass(csr_kind, pki.CSRInvalid)
        assert not issubclass(csr_kind, pki.CAInvalid)


def test_load_ca_refuses_a_key_that_is_not_the_certificates(
    test_pki: testkit.TestPKI, other_pki: testkit.TestPKI
) -> None:
    raises_with(pki.CAKeyMismatch, "does not match", "tls.crt")(
        lambda: pki.load_ca(
            pki.cert_pem(test_pki.ca.cert), pki.key_pem(other_pki.ca.key), now=utcnow()
        )
    )


def test_load_ca_refuses_an_encrypted_key(test_pki: testkit.TestPKI) -> None:
    encrypted = test_pki.ca.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    raises_with(pki.CAKeyEncrypted, "encrypted", "unencrypted")(
        lambda: pki.load_ca(pki.cert_pem(test_pki.ca.cert), encrypted, now=utcnow())
    )


def test_load_ca_refuses_a_leaf(test_pki: testkit.TestPKI) -> None:
    leaf, key = leaf_for(test_pki.ca)
    raises_with(pki.NotACA, "is not a CA", "CA:TRUE")(
        lambda: pki.load_ca(pki.cert_pem(leaf), pki.key_pem(key), now=utcnow())
    )


def test_load_ca_refuses_a_ca_that_may_not_sign_certificates() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signs CRLs only")])
    now = utcnow()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(7)
        .not_valid_before(now - HOUR).not_valid_after(now + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            authority.key_usage(digital_signature=True, key_encipherment=False, ca=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    raises_with(pki.NotACA, "keyCertSign")(
        lambda: pki.load_ca(pki.cert_pem(cert), pki.key_pem(key), now=now)
    )


def test_load_ca_refuses_an_expired_ca() -> None:
    now = utcnow()
    old = pki.bootstrap_ca(now=now - 2 * DAY, lifetime=DAY, common_name="old root")
    message = raises_with(pki.CAExpired, "expired at", "old root")(
        lambda: pki.load_ca(pki.cert_pem(old.cert), pki.key_pem(old.key), now=now)
    )
    assert old.cert.not_valid_after_utc.isoformat() in message


def test_load_ca_refuses_a_ca_that_is_not_valid_yet() -> None:
    now = utcnow()
    future = pki.bootstrap_ca(now=now + DAY, common_name="future root")
    raises_with(pki.CANotYetValid, "not valid before", "future root")(
        lambda: pki.load_ca(pki.cert_pem(future.cert), pki.key_pem(future.key), now=now)
    )


def test_load_ca_refuses_an_expired_root_above_a_valid_intermediate() -> None:
    now = utcnow()
    root = pki.bootstrap_ca(now=now - 2 * DAY, lifetime=DAY, common_name="short root")
    sub_key = ec.generate_private_key(ec.SECP256R1())
    # Outlives its root: our issue_intermediate_ca clamps this, other PKIs may not.
    sub = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "long sub")]))
        .issuer_name(root.cert.subject)
        .public_key(sub_key.public_key())
        .serial_number(authority.serial_number())
        .not_valid_before(now - 2 * DAY)
        .not_valid_after(now + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    raises_with(pki.CAExpired, "short root", "expired at")(
        lambda: pki.load_ca(pki.cert_pem(sub, root.cert), pki.key_pem(sub_key), now=now)
    )


@pytest.mark.parametrize(
    ("cert_pem", "key_pem", "fragment"),
    [
        (b"not a certificate", None, "not a PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n", None,
         "not a PEM certificate"),
        (None, b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n",
         "not a PEM private key"),
        (None, b"", "not a PEM private key"),
    ],
)  # fmt: skip
def test_load_ca_refuses_garbage_pem(
    test_pki: testkit.TestPKI, cert_pem: bytes | None, key_pem: bytes | None, fragment: str
) -> None:
    cert_data = cert_pem if cert_pem is not None else pki.cert_pem(test_pki.ca.cert)
    key_data = key_pem if key_pem is not None else pki.key_pem(test_pki.ca.key)
    raises_with(pki.CAInvalid, fragment)(lambda: pki.load_ca(cert_data, key_data, now=utcnow()))


def test_load_ca_refuses_a_chain_that_does_not_link(
    intermediate: pki.CA, other_pki: testkit.TestPKI
) -> None:
    pem = pki.cert_pem(intermediate.cert, other_pki.ca.cert)
    raises_with(pki.CAInvalid, "chain", "broken")(
        lambda: pki.load_ca(pem, pki.key_pem(intermediate.key), now=utcnow())
    )


def test_load_ca_refuses_a_key_type_it_cannot_sign_with() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed root")])
    now = utcnow()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(9)
        .not_valid_before(now - HOUR).not_valid_after(now + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )  # fmt: skip
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raises_with(pki.CAInvalid, "EC or RSA")(lambda: pki.load_ca(pki.cert_pem(cert), pem, now=now))


# --- CSRs -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048", "rsa3072"])
def test_load_csr_accepts_the_keys_we_sign_for(
    rsa_keys: dict[int, rsa.RSAPrivateKey], kind: str
) -> None:
    makers: dict[str, Callable[[], pki.PrivateKey]] = {
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "rsa2048": lambda: rsa_keys[2048],
        "rsa3072": lambda: rsa_keys[3072],
    }
    key = makers[kind]()
    pem = make_csr(key, algorithm=hashes.SHA256())
    csr = pki.load_csr(pem)
    assert csr.public_key() == key.public_key()
    assert pki.load_csr(pem.decode()).public_key() == csr.public_key()  # str works too


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"MIIBkTCB+wIBADBSMQswCQYDVQQGEwJVUzE=",
     b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"],
)  # fmt: skip
def test_load_csr_refuses_what_is_not_pem(data: bytes) -> None:
    raises_with(pki.CSRInvalid, "not PEM", "BEGIN CERTIFICATE REQUEST")(lambda: pki.load_csr(data))


def test_load_csr_refuses_a_pem_block_that_is_not_a_csr() -> None:
    data = b"-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n"
    raises_with(pki.CSRInvalid, "cannot be parsed")(lambda: pki.load_csr(data))


def test_load_csr_refuses_a_tampered_csr() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = make_csr(key, cn="aaaaaaaa", algorithm=hashes.SHA256())
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    assert der.count(b"aaaaaaaa") == 1
    tampered = x509.load_der_x509_csr(der.replace(b"aaaaaaaa", b"aaaaaaab"))
    raises_with(pki.CSRBadSignature, "does not verify")(
        lambda: pki.load_csr(tampered.public_bytes(serialization.Encoding.PEM))
    )


def _weak_keys() -> dict[str, Callable[[], tuple[object, hashes.HashAlgorithm | None]]]:
    return {
        "rsa1024": lambda: (rsa.generate_private_key(65537, 1024), hashes.SHA256()),  # noqa: S505
        "dsa": lambda: (dsa.generate_private_key(1024), hashes.SHA256()),  # noqa: S505
        "ed25519": lambda: (ed25519.Ed25519PrivateKey.generate(), None),
        "p521": lambda: (ec.generate_private_key(ec.SECP521R1()), hashes.SHA256()),
        "secp256k1": lambda: (ec.generate_private_key(ec.SECP256K1()), hashes.SHA256()),
    }


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("rsa1024", ("RSA-1024 is too weak", "RSA-2048")),
        ("dsa", ("DSA", "not allowed", "P-256")),
        ("ed25519", ("Ed25519", "not allowed", "P-256")),
        ("p521", ("secp521r1", "not allowed", "P-256")),
        ("secp256k1", ("secp256k1", "not allowed", "P-256")),
    ],
)
def test_load_csr_refuses_weak_or_foreign_keys_with_a_reason(
    kind: str, fragments: tuple[str, ...]
) -> None:
    key, algorithm = _weak_keys()[kind]()
    pem = make_csr(key, algorithm=algorithm)
    raises_with(pki.CSRWeakKey, *fragments)(lambda: pki.load_csr(pem))
    # issue_leaf applies the same policy to a bare public key.
    with pytest.raises(pki.CSRWeakKey):
        pki.issue_leaf(
            pki.bootstrap_ca(now=utcnow()), key.public_key(), identity(),  # type: ignore[attr-defined]
            now=utcnow(), lifetime=HOUR,
        )  # fmt: skip


# --- leaf properties --------------------------------------------------------------------
def test_leaf_ignores_the_csrs_subject_and_sans(test_pki: testkit.TestPKI) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    evil = (
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
        x509.DNSName("kubernetes.default.svc"),
    )
    csr = pki.load_csr(make_csr(key, cn="system:admin", sans=evil, algorithm=hashes.SHA256()))
    ident = identity("ehr", "fhir-client", dns_names=("api.ehr.svc",), ip_addresses=())
    leaf = pki.issue_leaf(test_pki.ca, csr, ident, now=utcnow(), lifetime=HOUR)
    f = certs.facts(leaf)
    assert f.subject == "CN=fhir-client-7d9f,OU=ehr,O=kubemtls"
    assert f.uris == ("spiffe://cluster.local/ns/ehr/sa/fhir-client",)
    assert f.dns_names == ("api.ehr.svc",)
    assert f.ip_addresses == ()
    assert leaf.public_key() == key.public_key()


@pytest.mark.parametrize("key_kind", ["ec", "rsa"])
def test_leaf_extensions(
    test_pki: testkit.TestPKI,
    intermediate: pki.CA,
    rsa_keys: dict[int, rsa.RSAPrivateKey],
    key_kind: str,
) -> None:
    key = rsa_keys[2048] if key_kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
    for ca in (test_pki.ca, intermediate):
        leaf, _ = leaf_for(ca, key)
        bc = ext(leaf, x509.BasicConstraints)
        assert bc.critical
        assert not bc.value.ca
        eku = ext(leaf, x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        ku_ext = ext(leaf, x509.KeyUsage)
        ku = ku_ext.value
        assert ku_ext.critical
        assert ku.digital_signature
        assert ku.key_encipherment is (key_kind == "rsa")
        assert not ku.key_cert_sign
        assert not ku.crl_sign
        ski = ext(leaf, x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        aki = ext(leaf, x509.AuthorityKeyIdentifier).value
        issuer_ski = ext(ca.cert, x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == issuer_ski.digest
        assert leaf.issuer == ca.cert.subject
        leaf.verify_directly_issued_by(ca.cert)


def test_leaf_usages_can_be_narrowed(test_pki: testkit.TestPKI) -> None:
    server_only, _ = leaf_for(test_pki.ca, client_auth=False)
    client_only, _ = leaf_for(test_pki.ca, server_auth=False)
    assert (certs.facts(server_only).server_auth, certs.facts(server_only).client_auth) == (
        True,
        False,
    )
    assert (certs.facts(client_only).server_auth, certs.facts(client_only).client_auth) == (
        False,
        True,
    )
    with pytest.raises(ValueError, match="serverAuth, clientAuth or both"):
        leaf_for(test_pki.ca, server_auth=False, client_auth=False)


def test_serials_are_positive_unpredictable_and_at_most_20_octets(
    test_pki: testkit.TestPKI,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    serials = [leaf_for(test_pki.ca, key)[0].serial_number for _ in range(200)]
    serials += [authority.serial_number() for _ in range(2000)]
    assert len(set(serials)) == len(serials)
    assert all(2**64 <= s < 2**159 for s in serials)  # positive, ≤ 20 octets in DER
    # ≥ 64 bits of entropy: every bit position below 158 takes both values across the sample.
    for bit in range(159):
        ones = sum((s >> bit) & 1 for s in serials)
        assert 0 < ones < len(serials) or bit == 64, bit


def test_not_before_is_backdated_and_not_after_clamped_to_the_ca(test_pki: testkit.TestPKI) -> None:
    now = utcnow().replace(microsecond=0)
    leaf, _ = leaf_for(test_pki.ca, now=now, lifetime=24 * HOUR)
    assert leaf.not_valid_before_utc == now - pki.CLOCK_SKEW == now - datetime.timedelta(minutes=5)
    assert leaf.not_valid_after_utc == now + 24 * HOUR
    short = pki.bootstrap_ca(now=now, lifetime=HOUR, common_name="short-lived root")
    clamped, _ = leaf_for(short, now=now, lifetime=24 * HOUR)
    assert clamped.not_valid_after_utc == short.cert.not_valid_after_utc == now + HOUR
    # Never before the CA itself became valid either.
    early, _ = leaf_for(short, now=now - datetime.timedelta(minutes=1))
    assert early.not_valid_before_utc == short.cert.not_valid_before_utc
    sub = pki.issue_intermediate_ca(short, now=now, common_name="sub", lifetime=365 * DAY)
    assert sub.cert.not_valid_after_utc == short.cert.not_valid_after_utc


def test_an_expired_ca_issues_nothing_and_lifetimes_must_be_positive() -> None:
    now = utcnow()
    old = pki.bootstrap_ca(now=now - 2 * DAY, lifetime=DAY)
    raises_with(pki.CAExpired, "cannot issue")(lambda: leaf_for(old, now=now))
    with pytest.raises(ValueError, match="positive"):
        leaf_for(old, now=now - 2 * DAY, lifetime=datetime.timedelta(0))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"spiffe_id": "spiffe://cluster.local/ns/Ehr/sa/x"}, "not a valid"),
        ({"spiffe_id": "https://cluster.local/ns/ehr/sa/x"}, "not a kubemtls SPIFFE ID"),
        ({"dns_names": ("*.ehr.svc",)}, "not a valid DNS name"),
        ({"dns_names": ("under_score.svc",)}, "not a valid DNS name"),
        ({"dns_names": ("a" * 64 + ".svc",)}, "not a valid DNS name"),
        ({"dns_names": ("trailing.dot.",)}, "not a valid DNS name"),
        ({"ip_addresses": ("300.1.1.1",)}, "not an IP address"),
        ({"spiffe_id": "", "dns_names": (), "ip_addresses": ()}, "at least one SAN"),
    ],
)
def test_bad_identities_are_refused(
    test_pki: testkit.TestPKI, changes: dict[str, object], fragment: str
) -> None:
    raises_with(errors.IdentityError, fragment)(
        lambda: leaf_for(test_pki.ca, identity=identity(**changes))  # type: ignore[arg-type]
    )


def test_names_are_normalised_and_long_pod_names_fit(test_pki: testkit.TestPKI) -> None:
    pod = "p" * 253
    leaf, _ = leaf_for(test_pki.ca, identity=identity(common_name=pod, dns_names=("API.EHR.svc",)))
    f = certs.facts(leaf)
    assert f.dns_names == ("api.ehr.svc",)
    assert f.common_name == "p" * 64  # ub-common-name


def test_serving_cert_is_server_only_with_its_names(test_pki: testkit.TestPKI) -> None:
    now = utcnow()
    cert, key = pki.issue_serving_cert(
        test_pki.ca, dns_names=["kubemtls.kubemtls.svc"], ip_addresses=["10.0.0.1"], now=now
    )
    f = certs.facts(cert)
    assert (f.server_auth, f.client_auth, f.spiffe_id) == (True, False, None)
    assert f.dns_names == ("kubemtls.kubemtls.svc",)
    assert f.ip_addresses == ("10.0.0.1",)
    assert f.common_name == "kubemtls.kubemtls.svc"
    assert cert.public_key() == key.public_key()
    with pytest.raises(errors.IdentityError):
        pki.issue_serving_cert(test_pki.ca, dns_names=[], now=now)


def test_generate_key_kinds() -> None:
    assert isinstance(pki.generate_key(), ec.EllipticCurvePrivateKey)
    assert pki.generate_key("ecdsa-p384").curve.name == "secp384r1"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="ecdsa-p256"):
        pki.generate_key("dsa-1024")


# --- renewal ----------------------------------------------------------------------------
def test_renewal_defaults_to_two_thirds_of_the_lifetime() -> None:
    nb = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert pki.renewal_time(nb, nb + 24 * HOUR, jitter=0) == nb + 16 * HOUR
    assert pki.renewal_time(nb, nb + 30 * DAY, jitter=0) == nb + 20 * DAY


def test_renewal_jitter_only_moves_earlier_and_spreads() -> None:
    nb = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    na = nb + 24 * HOUR
    rng = random.Random(7)
    times = [pki.renewal_time(nb, na, rng=rng) for _ in range(500)]
    latest = nb + 16 * HOUR
    earliest = nb + (na - nb) * (2 / 3 - 0.05)
    assert all(earliest <= t <= latest for t in times)
    assert max(times) - min(times) > HOUR  # a fleet issued together spreads out
    # Without an rng it still stays in bounds.
    assert earliest <= pki.renewal_time(nb, na) <= latest


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"fraction": 0.0}, "between 0 and 1"),
        ({"fraction": 1.0}, "between 0 and 1"),
        ({"fraction": -0.5}, "between 0 and 1"),
        ({"jitter": -0.1}, "jitter"),
        ({"fraction": 0.5, "jitter": 0.5}, "jitter"),
        ({"not_after_offset": datetime.timedelta(0)}, "not after"),
        ({"not_after_offset": -HOUR}, "not after"),
    ],
)
def test_renewal_bounds(kwargs: dict[str, object], fragment: str) -> None:
    nb = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    offset = kwargs.pop("not_after_offset", DAY)
    with pytest.raises(ValueError, match=fragment):
        pki.renewal_time(nb, nb + offset, **kwargs)  # type: ignore[arg-type,operator]


# --- trust bundles ----------------------------------------------------------------------
def test_trust_bundle_dedups_in_first_seen_order(
    test_pki: testkit.TestPKI, other_pki: testkit.TestPKI, intermediate: pki.CA
) -> None:
    a, b, c = test_pki.ca.cert, other_pki.ca.cert, intermediate.cert
    bundle = pki.trust_bundle([a, b, a, c, b, a])
    assert certs.load_pem_certificates(bundle) == [a, b, c]
    assert pki.trust_bundle([c, a, b]) != bundle  # order is the caller's, kept stable
    assert pki.trust_bundle([a, b, c]) == bundle  # deterministic bytes: a stable ETag
    assert pki.trust_bundle([]) == b""


# --- any valid Kubernetes identity makes a valid certificate (property) -----------------
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
namespaces = st.from_regex(_LABEL, fullmatch=True)
service_accounts = st.one_of(
    st.lists(st.from_regex(_LABEL, fullmatch=True), min_size=1, max_size=6)
    .map(".".join)
    .filter(lambda s: len(s) <= 253),
    st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", fullmatch=True).filter(
        lambda s: ".." not in s and ".-" not in s and "-." not in s
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ns=namespaces, sa=service_accounts)
def test_any_valid_namespace_and_service_account_make_a_valid_leaf(
    test_pki: testkit.TestPKI, ns: str, sa: str
) -> None:
    assert len(ns) <= 63
    assert len(sa) <= 253
    uri = certs.spiffe_id("cluster.local", ns, sa)
    assert certs.parse_spiffe_id(uri) == ("cluster.local", ns, sa)
    leaf = pki.issue_leaf(
        test_pki.ca, _PROPERTY_KEY.public_key(), identity(ns, sa), now=utcnow(), lifetime=HOUR
    )
    reread = x509.load_der_x509_certificate(leaf.public_bytes(serialization.Encoding.DER))
    assert certs.facts(reread).spiffe_id == uri
    assert certs.parse_spiffe_id(certs.facts(reread).spiffe_id or "") == ("cluster.local", ns, sa)


_PROPERTY_KEY = ec.generate_private_key(ec.SECP256R1())
