"""``kubemtls_sidecar.der`` reads what ``cryptography`` reads, for every kind of test certificate.

The oracle is ``certs.facts`` over ``cryptography``'s parse (what the sidecar used before
it stopped loading ``cryptography``), plus its public key type and SPKI bytes; subjects
with characters RFC 4514 escapes are generated with hypothesis.
"""

from __future__ import annotations

import datetime

import dataplane
import pytest
import testkit
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from kubemtls_operator import pki
from kubemtls_sidecar import certs, der

DAY = datetime.timedelta(days=1)


def key_description(cert: x509.Certificate) -> str:
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        return f"rsa-{pub.key_size}"
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return f"ecdsa-{pub.curve.name}"


def check(cert: x509.Certificate) -> None:
    raw = cert.public_bytes(serialization.Encoding.DER)
    parsed = der.parse(raw)
    assert der.facts(raw) == certs.facts(cert)
    assert parsed.serial_number == cert.serial_number
    assert parsed.issuer == cert.issuer.rfc4514_string()
    assert parsed.key == key_description(cert)
    assert parsed.spki == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def every_test_certificate(
    test_pki: testkit.TestPKI, other: testkit.TestPKI
) -> list[x509.Certificate]:
    now = testkit.utcnow()
    inter = pki.issue_intermediate_ca(
        test_pki.ca, now=now, common_name="kubemtls issuing", lifetime=DAY * 30
    )
    return [
        test_pki.ca.cert,
        other.ca.cert,
        inter.cert,
        test_pki.leaf("billing", "api").cert,
        test_pki.leaf("ehr", "fhir", dns_names=(), ip_addresses=("::1", "10.0.0.7")).cert,
        test_pki.leaf(name='odd;name,"x" +<y>#', key_type="rsa-2048").cert,
        test_pki.leaf(name=" lead and trail ", client_auth=False).cert,
        test_pki.leaf(name="Zürich ☃", server_auth=False).cert,
        test_pki.leaf(issuer=inter, lifetime=DAY * 10).cert,
        dataplane.raw_leaf(test_pki.ca, not_before=now - DAY * 3, not_after=now - DAY).cert,
        other.leaf("a", "b").cert,
        dataplane.raw_leaf(None, not_before=now, not_after=now + DAY).cert,  # self-signed
        dataplane.raw_leaf(
            test_pki.ca,
            not_before=now,
            not_after=now + DAY,
            key=rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - a refused weak peer
        ).cert,
        # UTCTime before 2000 and GeneralizedTime after 2049
        dataplane.raw_leaf(
            None,
            not_before=datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC),
            not_after=datetime.datetime(2051, 1, 1, tzinfo=datetime.UTC),
        ).cert,
    ]


def test_every_test_certificate_reads_as_cryptography_reads_it(
    test_pki: testkit.TestPKI, other_pki: testkit.TestPKI
) -> None:
    for cert in every_test_certificate(test_pki, other_pki):
        check(cert)


def build(
    name: x509.Name, *, extensions: list[x509.ExtensionType] | None = None
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    now = testkit.utcnow()
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + DAY)
    )
    for ext in extensions or []:
        b = b.add_extension(ext, critical=False)
    return b.sign(key, hashes.SHA256())


_ATTRS = [
    NameOID.COMMON_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.LOCALITY_NAME,
    NameOID.STATE_OR_PROVINCE_NAME,
    NameOID.STREET_ADDRESS,
    NameOID.USER_ID,
    NameOID.GIVEN_NAME,  # no short name: dotted OID
    NameOID.PSEUDONYM,
]
_values = st.text(
    alphabet=st.sampled_from([*'ab z#+,;<>\\"=é\u2603', "\x00"]), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(attrs=st.lists(st.tuples(st.sampled_from(_ATTRS), _values), min_size=1, max_size=4))
def test_names_escape_as_cryptography_escapes_them(
    attrs: list[tuple[x509.ObjectIdentifier, str]],
) -> None:
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    check(build(name))


def test_multi_valued_rdn_country_and_basic_constraints() -> None:
    name = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "CH")]),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example")]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@example.org")]
            ),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "two"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "values"),
                ]
            ),
        ]
    )
    check(build(name, extensions=[x509.BasicConstraints(ca=False, path_length=None)]))
    check(
        build(
            name,
            extensions=[
                x509.BasicConstraints(ca=True, path_length=0),
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
            ],
        )
    )


def test_pem_bundles_and_garbage(test_pki: testkit.TestPKI) -> None:
    leaf = test_pki.leaf()
    ders = der.pem_certificates(leaf.chain_pem)
    assert ders == [
        c.public_bytes(serialization.Encoding.DER)
        for c in certs.load_pem_certificates(leaf.chain_pem)
    ]
    assert der.pem_certificates(b"no certificate here") == []
    for bad in (b"", b"\x30", b"\x30\x82\xff\xff", b"\x04\x00", ders[0][:-20]):
        with pytest.raises(ValueError, match=r"DER|certificate"):
            der.parse(bad)
