"""A small, pure X.509 (DER) reader: the resident sidecar never loads ``cryptography``.

Why: ``cryptography`` adds ~10 MiB RSS to a process that runs once per pod, and the
long-running sidecar needs only a handful of facts about a certificate: per connection the
peer's identity for the refusal log, ``--allowed-peer``, the software CRL check and the
HTTP-mode headers; per reload our own leaf's serial and validity. This module reads
exactly those (serial, issuer and subject as RFC 4514 text, validity, SANs, basic
constraints, extended key usage, the public key's type and size) and nothing else. It
verifies no signature: every certificate it reads was verified by OpenSSL (a handshake) or
by the vetting child (``vet``), except a refused peer's, whose facts are only logged.
``tests/sidecar/test_der.py`` checks it against ``cryptography``'s parse of every test
certificate.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import ipaddress
import re

from kubemtls_sidecar import certs

__all__ = ["Cert", "facts", "parse", "pem_certificates", "rfc4514"]

_SEQUENCE, _SET, _OID, _INTEGER, _BOOLEAN = 0x30, 0x31, 0x06, 0x02, 0x01
_BIT_STRING, _OCTET_STRING = 0x03, 0x04
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)

# cryptography's short names in RFC 4514 text (``x509.name._NAMEOID_TO_NAME``).
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
# ASN.1 string types → Python codec.
_STRING_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString (as cryptography reads it)
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}
_SAN, _BASIC_CONSTRAINTS, _EKU = "2.5.29.17", "2.5.29.19", "2.5.29.37"
_SERVER_AUTH, _CLIENT_AUTH = "1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"
_RSA, _EC = "1.2.840.113549.1.1.1", "1.2.840.10045.2.1"
_CURVES = {
    "1.2.840.10045.3.1.7": "secp256r1",
    "1.3.132.0.34": "secp384r1",
    "1.3.132.0.35": "secp521r1",
}
_OTHER_KEYS = {"1.3.101.112": "ed25519", "1.3.101.113": "ed448"}


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out, pos = [], start
    while pos < end:
        tag, s, e = _tlv(data, pos)
        out.append((tag, s, e))
        pos = e
    return out


def _oid(raw: bytes) -> str:
    parts, value = [], 0
    for b in raw:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    if not parts:
        raise ValueError("empty OID")
    first = parts[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(p) for p in head + parts[1:])


def _escape(value: str) -> str:
    """RFC 4514 escaping, exactly as ``cryptography``'s ``_escape_dn_value``."""
    if not value:
        return ""
    for ch in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(ch, "\\" + ch)
    value = value.replace("\0", "\\00")
    if value[0] == "#" or (value[0] == " " and len(value) > 1):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def rfc4514(data: bytes, start: int, end: int) -> str:
    """A Name (the content of its SEQUENCE) as ``cryptography``'s ``rfc4514_string()``."""
    rdns = []
    for _, s, e in _children(data, start, end):  # each RDN: a SET of attributes
        attrs = []
        for _, a_s, a_e in _children(data, s, e):
            (_, o_s, o_e), (v_tag, v_s, v_e) = _children(data, a_s, a_e)[:2]
            oid = _oid(data[o_s:o_e])
            codec = _STRING_CODECS.get(v_tag)
            raw = data[v_s:v_e]
            text = (
                "#" + binascii.hexlify(raw).decode()
                if codec is None
                else _escape(raw.decode(codec))
            )
            attrs.append(f"{_SHORT_NAMES.get(oid, oid)}={text}")
        rdns.append("+".join(attrs))
    return ",".join(reversed(rdns))


def _time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii")
    if not text.endswith("Z"):
        raise ValueError("certificate time not in UTC")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, 50-99 → 19xx
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    # By hand, not strptime: _strptime and calendar would stay loaded in every sidecar.
    if len(text) != 15 or not text[:14].isdigit():
        raise ValueError(f"certificate time {text!r} is not YYYYMMDDHHMMSSZ")
    mo, d, h, mi, sec = (int(text[i : i + 2]) for i in (4, 6, 8, 10, 12))
    return datetime.datetime(int(text[:4]), mo, d, h, mi, sec, tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Cert:
    """What the sidecar reads from a certificate (see the module docstring)."""

    der: bytes
    serial_number: int
    issuer: str  # RFC 4514, as cryptography writes it
    subject: str
    not_valid_before_utc: datetime.datetime
    not_valid_after_utc: datetime.datetime
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    is_ca: bool
    client_auth: bool
    server_auth: bool
    spki: bytes  # SubjectPublicKeyInfo DER
    key: str  # "ecdsa-secp256r1", "rsa-2048", "ed25519" or the algorithm's OID

    @property
    def spiffe_id(self) -> str | None:
        return certs.first_spiffe_id(self.uris)


def _key(data: bytes, start: int, end: int) -> str:
    (_, alg_s, alg_e), (_, bits_s, bits_e) = _children(data, start, end)[:2]
    alg = _children(data, alg_s, alg_e)
    oid = _oid(data[alg[0][1] : alg[0][2]])
    if oid == _RSA:
        bits = data[bits_s + 1 : bits_e]  # skip the unused-bits byte
        _, seq_s, seq_e = _tlv(bits, 0)
        _, n_s, n_e = _children(bits, seq_s, seq_e)[0]
        return f"rsa-{int.from_bytes(bits[n_s:n_e], 'big').bit_length()}"
    if oid == _EC and len(alg) > 1 and alg[1][0] == _OID:
        curve = _oid(data[alg[1][1] : alg[1][2]])
        return f"ecdsa-{_CURVES.get(curve, curve)}"
    return _OTHER_KEYS.get(oid, oid)


def parse(der: bytes) -> Cert:
    """Read a DER certificate.

    Raises:
        ValueError: not a well-formed certificate.
    """
    try:
        return _parse(der)
    except (IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed certificate: {e}") from None


def _parse(der: bytes) -> Cert:
    tag, c_s, _ = _tlv(der, 0)
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, t_s, t_e = _tlv(der, c_s)
    tbs = _children(der, t_s, t_e)
    if tbs[0][0] == 0xA0:  # [0] version
        tbs = tbs[1:]
    serial_tlv, _alg, issuer, validity, subject, spki = tbs[:6]
    if serial_tlv[0] != _INTEGER:
        raise ValueError("no serial number")
    serial = int.from_bytes(der[serial_tlv[1] : serial_tlv[2]], "big", signed=True)
    (nb_tag, nb_s, nb_e), (na_tag, na_s, na_e) = _children(der, validity[1], validity[2])
    uris: list[str] = []
    dns: list[str] = []
    ips: list[str] = []
    is_ca = False
    client_auth = server_auth = True  # no EKU: any usage (RFC 5280 §4.2.1.12)
    for tag, s, _ in tbs[6:]:
        if tag != 0xA3:  # [3] extensions (skipping [1]/[2] unique IDs)
            continue
        _, exts_s, exts_e = _tlv(der, s)
        for _, x_s, x_e in _children(der, exts_s, exts_e):
            parts = _children(der, x_s, x_e)
            oid = _oid(der[parts[0][1] : parts[0][2]])
            _, v_s, _ = parts[-1]  # extnValue: an OCTET STRING holding the DER
            if oid == _SAN:
                _, g_s, g_e = _tlv(der, v_s)
                for g_tag, n_s, n_e in _children(der, g_s, g_e):
                    if g_tag == 0x86:
                        uris.append(der[n_s:n_e].decode("ascii"))
                    elif g_tag == 0x82:
                        dns.append(der[n_s:n_e].decode("ascii"))
                    elif g_tag == 0x87:
                        ips.append(str(ipaddress.ip_address(der[n_s:n_e])))
            elif oid == _BASIC_CONSTRAINTS:
                _, b_s, b_e = _tlv(der, v_s)
                inner = _children(der, b_s, b_e)
                is_ca = bool(inner) and inner[0][0] == _BOOLEAN and der[inner[0][1]] != 0
            elif oid == _EKU:
                _, k_s, k_e = _tlv(der, v_s)
                usages = {_oid(der[o_s:o_e]) for _, o_s, o_e in _children(der, k_s, k_e)}
                client_auth, server_auth = _CLIENT_AUTH in usages, _SERVER_AUTH in usages
    return Cert(
        der=der,
        serial_number=serial,
        issuer=rfc4514(der, issuer[1], issuer[2]),
        subject=rfc4514(der, subject[1], subject[2]),
        not_valid_before_utc=_time(nb_tag, der[nb_s:nb_e]),
        not_valid_after_utc=_time(na_tag, der[na_s:na_e]),
        uris=tuple(uris),
        dns_names=tuple(dns),
        ip_addresses=tuple(ips),
        is_ca=is_ca,
        client_auth=client_auth,
        server_auth=server_auth,
        spki=der[subject[2] : spki[2]],  # the SPKI element follows the subject's
        key=_key(der, spki[1], spki[2]),
    )


def facts(cert: Cert | bytes) -> certs.CertFacts:
    """``certs.facts`` for a DER certificate, without ``cryptography``."""
    c = parse(cert) if isinstance(cert, bytes) else cert
    return certs.CertFacts(
        serial=format(c.serial_number, "x"),
        subject=c.subject,
        issuer=c.issuer,
        not_before=c.not_valid_before_utc,
        not_after=c.not_valid_after_utc,
        uris=c.uris,
        dns_names=c.dns_names,
        ip_addresses=c.ip_addresses,
        is_ca=c.is_ca,
        client_auth=c.client_auth,
        server_auth=c.server_auth,
        fingerprint_sha256=certs.fingerprint_sha256(c.der),
        x5t_s256=certs.x5t_s256(c.der),
    )


def pem_certificates(pem: bytes) -> list[bytes]:
    """The DER of every certificate in a PEM bundle, in order (no parsing).

    Raises:
        ValueError: a block is not valid base64.
    """
    try:
        return [
            base64.b64decode(b"".join(m.split()), validate=True) for m in _PEM_CERT.findall(pem)
        ]
    except binascii.Error as e:
        raise ValueError(f"a PEM certificate is not valid base64: {e}") from None
