"""Certificate facts shared by the sidecar and the operator (``kubemtls_sidecar.certs``).

SPIFFE IDs are checked against an oracle written here from the Kubernetes rules (RFC
1123 label for namespaces, subdomain for service accounts), not against our regexes;
fingerprints and thumbprints against ``openssl`` and ``hashlib``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import pathlib
import string
import subprocess

import pytest
import testkit
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from kubemtls_sidecar import certs, errors

_ALLOWED = set(string.ascii_lowercase + string.digits + "-")


def is_label(s: str) -> bool:
    """RFC 1123 label as Kubernetes checks a namespace name."""
    return 0 < len(s) <= 63 and set(s) <= _ALLOWED and s[0] != "-" and s[-1] != "-"


def is_subdomain(s: str) -> bool:
    """RFC 1123 subdomain as Kubernetes checks a service account name."""
    if not 0 < len(s) <= 253:
        return False
    return all(lb and set(lb) <= _ALLOWED and lb[0] != "-" and lb[-1] != "-" for lb in s.split("."))


# Text that is sometimes almost right: upper case, dots, underscores, slashes, newlines,
# non-ASCII look-alikes, and runs of valid characters that are too long.
_near_alphabet = st.sampled_from([*"abz09-.", "A", "_", "/", "\n", " ", "\u00e9", "\uff41", ":"])
near_names = st.one_of(
    st.text(_near_alphabet, max_size=20),
    st.text(alphabet="ab0-", min_size=60, max_size=70),
    st.text(alphabet="ab0-.", min_size=250, max_size=260),
    st.text(max_size=12),
)


@settings(max_examples=150, deadline=None)
@given(ns=near_names)
def test_namespace_validity_matches_kubernetes(ns: str) -> None:
    if is_label(ns):
        uri = certs.spiffe_id("cluster.local", ns, "default")
        assert certs.parse_spiffe_id(uri) == ("cluster.local", ns, "default")
    else:
        with pytest.raises(errors.IdentityError) as info:
            certs.spiffe_id("cluster.local", ns, "default")
        assert repr(ns) in str(info.value)
        assert "namespace" in str(info.value)
        assert "not a valid Kubernetes name" in str(info.value)


@settings(max_examples=150, deadline=None)
@given(sa=near_names)
def test_service_account_validity_matches_kubernetes(sa: str) -> None:
    if is_subdomain(sa):
        uri = certs.spiffe_id("cluster.local", "default", sa)
        assert certs.parse_spiffe_id(uri) == ("cluster.local", "default", sa)
    else:
        with pytest.raises(errors.IdentityError) as info:
            certs.spiffe_id("cluster.local", "default", sa)
        assert repr(sa) in str(info.value)
        assert "service account" in str(info.value)


@settings(max_examples=100, deadline=None)
@given(ns=near_names, sa=near_names)
def test_parse_spiffe_id_accepts_exactly_the_valid_ones(ns: str, sa: str) -> None:
    uri = f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
    if is_label(ns) and is_subdomain(sa):
        assert certs.parse_spiffe_id(uri) == ("cluster.local", ns, sa)
    else:
        with pytest.raises(errors.IdentityError, match="SPIFFE ID"):
            certs.parse_spiffe_id(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://cluster.local/ns/ehr/sa/fhir\n",  # "$" would have let this through
        "spiffe://cluster.local/ns/ehr/sa/fhir/extra",
        "spiffe://cluster.local/ns/ehr",
        "spiffe://Cluster.Local/ns/ehr/sa/fhir",
        "spiffe:///ns/ehr/sa/fhir",
        "https://cluster.local/ns/ehr/sa/fhir",
        " spiffe://cluster.local/ns/ehr/sa/fhir",
        "",
    ],
)
def test_parse_spiffe_id_refuses_near_misses(uri: str) -> None:
    with pytest.raises(errors.IdentityError) as info:
        certs.parse_spiffe_id(uri)
    assert repr(uri) in str(info.value)


def test_spiffe_id_shape_and_trust_domain() -> None:
    assert certs.spiffe_id("example.org", "ehr", "a.b") == "spiffe://example.org/ns/ehr/sa/a.b"
    with pytest.raises(errors.IdentityError, match="trust domain"):
        certs.spiffe_id("Example.org", "ehr", "sa")


# --- facts of a real certificate --------------------------------------------------------
@pytest.fixture(scope="module")
def leaf(test_pki: testkit.TestPKI) -> testkit.Leaf:
    return test_pki.leaf(
        "ehr", "fhir-client", name="client-0", dns_names=("api.ehr.svc",),
        ip_addresses=("127.0.0.1", "::1"),
    )  # fmt: skip


def test_facts_read_what_was_issued(leaf: testkit.Leaf, test_pki: testkit.TestPKI) -> None:
    f = certs.facts(leaf.cert)
    assert f.serial == format(leaf.cert.serial_number, "x")
    assert f.subject == "CN=client-0,OU=ehr,O=kubemtls"
    assert f.common_name == "client-0"
    assert f.issuer == test_pki.ca.cert.subject.rfc4514_string()
    assert f.uris == ("spiffe://cluster.local/ns/ehr/sa/fhir-client",)
    assert f.spiffe_id == f.uris[0]
    assert f.dns_names == ("api.ehr.svc",)
    assert f.ip_addresses == ("127.0.0.1", "::1")
    assert (f.is_ca, f.client_auth, f.server_auth) == (False, True, True)
    assert f.not_after - f.not_before == datetime.timedelta(hours=24, minutes=5)
    assert certs.facts(test_pki.ca.cert).is_ca


def test_fingerprint_matches_openssl(leaf: testkit.Leaf, tmp_path: pathlib.Path) -> None:
    (tmp_path / "leaf.pem").write_bytes(leaf.cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "leaf.pem"), "-noout", "-fingerprint",
         "-sha256"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == f"sha256 Fingerprint={certs.fingerprint_sha256(leaf.cert)}"
    assert certs.facts(leaf.cert).fingerprint_sha256 == certs.fingerprint_sha256(leaf.cert)


def test_x5t_s256_is_unpadded_base64url_of_the_der_sha256(leaf: testkit.Leaf) -> None:
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert certs.x5t_s256(leaf.cert) == certs.x5t_s256(der) == expected
    assert len(expected) == 43
    assert "=" not in expected
    assert certs.facts(leaf.cert).x5t_s256 == expected


def test_load_pem_certificates_keeps_order_and_refuses_none(
    leaf: testkit.Leaf, test_pki: testkit.TestPKI
) -> None:
    bundle = leaf.chain_pem + test_pki.ca.cert.public_bytes(serialization.Encoding.PEM)
    assert certs.load_pem_certificates(bundle) == [leaf.cert, test_pki.ca.cert]
    with pytest.raises(ValueError, match="no PEM certificate"):
        certs.load_pem_certificates(b"no certificates here")


def test_facts_of_a_bare_certificate() -> None:
    """No SAN, no EKU (any usage, RFC 5280 §4.2.1.12), a CN with an escaped comma."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EHR, Inc."),
            x509.NameAttribute(NameOID.COMMON_NAME, "Smith, John"),
        ]
    )
    now = testkit.utcnow()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(0xABC)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    f = certs.facts(cert)
    assert (f.uris, f.dns_names, f.ip_addresses, f.spiffe_id) == ((), (), (), None)
    assert (f.is_ca, f.client_auth, f.server_auth) == (False, True, True)
    assert f.serial == "abc"
    assert f.common_name == "Smith, John" == certs.common_name(cert)
