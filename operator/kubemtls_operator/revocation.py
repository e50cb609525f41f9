"""The durable CA state (revoked serials, CRL numbers, rollover phase) and CRL signing.

Pure: the state is a frozen value read from and written to the ``kubemtls-state``
ConfigMap as one JSON document (``ca.py`` does the I/O). Every change returns a new value,
and applying the same change twice gives the same state (a restart mid-revocation
converges, nothing is listed twice). One CRL is signed per CA in the trust bundle — the next
and the retiring CA's too, even if empty — with a CRL number that only grows.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from kubemtls_sidecar import certs

from kubemtls_operator import pki

__all__ = [
    "CRL_NEXT_UPDATE",
    "CRL_RESIGN_AFTER",
    "PHASE_NEXT_PUBLISHED",
    "PHASE_RETIRING",
    "PHASE_STABLE",
    "Revocation",
    "Rollover",
    "State",
    "add",
    "format_time",
    "kept_crls",
    "needs_crl",
    "parse_time",
    "sign_crls",
]

CRL_NEXT_UPDATE = datetime.timedelta(days=8)  # ≥ 7 days ahead, even just before a re-sign
CRL_RESIGN_AFTER = datetime.timedelta(days=1)
PHASE_STABLE = "Stable"
PHASE_NEXT_PUBLISHED = "NextPublished"
PHASE_RETIRING = "Retiring"
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def format_time(t: datetime.datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` (as Kubernetes writes times), whole seconds."""
    if t.tzinfo is not datetime.UTC:
        t = t.astimezone(datetime.UTC)
    # Not strftime: this runs ~6 times per signed certificate, and %-formatting the
    # fields is 2.5x faster.
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (  # noqa: UP031
        t.year,
        t.month,
        t.day,
        t.hour,
        t.minute,
        t.second,
    )


def parse_time(s: str | None) -> datetime.datetime | None:
    if not s:
        return None
    t = datetime.datetime.fromisoformat(s)  # 3.11 reads the "Z" itself
    return t if t.tzinfo is datetime.UTC else t.astimezone(datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Revocation:
    serial: str  # hex, lower case
    reason: str
    time: datetime.datetime
    not_after: datetime.datetime
    issuer: str  # SHA-256 fingerprint of the issuing CA certificate
    subject: str = ""  # "namespace/name" of the MTLSCert, for people reading the state

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "reason": self.reason,
            "time": format_time(self.time),
            "notAfter": format_time(self.not_after),
            "issuer": self.issuer,
            "subject": self.subject,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Revocation:
        t, na = parse_time(d["time"]), parse_time(d["notAfter"])
        if t is None or na is None:
            raise ValueError(f"revocation of {d.get('serial')} lacks a time or notAfter")
        return cls(d["serial"], d["reason"], t, na, d["issuer"], d.get("subject", ""))


@dataclasses.dataclass(frozen=True)
class Rollover:
    phase: str = PHASE_STABLE
    next_fingerprint: str = ""
    published_at: datetime.datetime | None = None
    activated_at: datetime.datetime | None = None
    retiring_fingerprint: str = ""
    #: The CA last seen signing (``tls.crt``): its fingerprint and PEM (with its chain;
    #: public data). A different ``tls.crt`` that is not the published next CA was replaced
    #: in place (cert-manager), and this is the CA to keep trusted while its leaves live.
    signing_fingerprint: str = ""
    signing_pem: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "nextFingerprint": self.next_fingerprint,
            "publishedAt": format_time(self.published_at) if self.published_at else "",
            "activatedAt": format_time(self.activated_at) if self.activated_at else "",
            "retiringFingerprint": self.retiring_fingerprint,
            "signingFingerprint": self.signing_fingerprint,
            "signingPEM": self.signing_pem,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rollover:
        return cls(
            d.get("phase", PHASE_STABLE),
            d.get("nextFingerprint", ""),
            parse_time(d.get("publishedAt")),
            parse_time(d.get("activatedAt")),
            d.get("retiringFingerprint", ""),
            d.get("signingFingerprint", ""),
            d.get("signingPEM", ""),
        )


@dataclasses.dataclass(frozen=True)
class State:
    revocations: tuple[Revocation, ...] = ()
    crl_number: int = 0
    crl_signed_at: datetime.datetime | None = None
    crl_pem: str = ""
    #: What the current CRLs cover: CA fingerprints and revoked serials (to spot changes).
    crl_cas: tuple[str, ...] = ()
    crl_serials: tuple[str, ...] = ()
    rollover: Rollover = Rollover()

    def to_json(self) -> str:
        return json.dumps(
            {
                "revocations": [r.to_json() for r in self.revocations],
                "crlNumber": self.crl_number,
                "crlSignedAt": format_time(self.crl_signed_at) if self.crl_signed_at else "",
                "crlPEM": self.crl_pem,
                "crlCAs": list(self.crl_cas),
                "crlSerials": list(self.crl_serials),
                "rollover": self.rollover.to_json(),
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> State:
        if not text:
            return cls()
        d = json.loads(text)
        return cls(
            revocations=tuple(Revocation.from_json(r) for r in d.get("revocations", [])),
            crl_number=int(d.get("crlNumber", 0)),
            crl_signed_at=parse_time(d.get("crlSignedAt")),
            crl_pem=d.get("crlPEM", ""),
            crl_cas=tuple(d.get("crlCAs", [])),
            crl_serials=tuple(d.get("crlSerials", [])),
            rollover=Rollover.from_json(d.get("rollover", {})),
        )

    @property
    def revoked_serials(self) -> frozenset[str]:
        return frozenset(r.serial for r in self.revocations)


def add(state: State, revocation: Revocation) -> State:
    """The state with ``revocation`` recorded (unchanged when the serial is there already)."""
    if revocation.serial in state.revoked_serials:
        return state
    return dataclasses.replace(state, revocations=(*state.revocations, revocation))


def _fingerprints(cas: Iterable[pki.CA], kept: Iterable[x509.Certificate]) -> tuple[str, ...]:
    return (
        *(certs.fingerprint_sha256(ca.cert) for ca in cas),
        *(certs.fingerprint_sha256(c) for c in kept),
    )


def _live(
    state: State,
    cas: Iterable[pki.CA],
    now: datetime.datetime,
    kept: Iterable[x509.Certificate] = (),
) -> tuple[Revocation, ...]:
    """Entries still worth listing: the certificate has not expired and its CA is trusted."""
    fps = set(_fingerprints(cas, kept))
    return tuple(r for r in state.revocations if r.not_after > now and r.issuer in fps)


def kept_crls(state: State, kept: Iterable[x509.Certificate]) -> bytes:
    """The last CRL each of ``kept`` signed, from the state (PEM; for a CA whose key is gone).

    A CA replaced in place whose key the operator no longer holds cannot sign again: its
    last CRL stays published (stale after its nextUpdate) until the CA retires.
    """
    out: list[bytes] = []
    pems = [m.group(0) for m in _PEM_CRL.finditer(state.crl_pem.encode())]
    for ca in kept:
        for pem in pems:
            crl = x509.load_pem_x509_crl(pem)
            if crl.issuer == ca.subject and _signed_by(crl, ca):
                out.append(pem + b"\n")
                break
    return b"".join(out)


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def needs_crl(
    state: State,
    cas: Iterable[pki.CA],
    now: datetime.datetime,
    kept: Iterable[x509.Certificate] = (),
) -> bool:
    """Whether the CRLs must be (re)signed: a CA or a revocation changed, or a day passed.

    ``kept``: retiring CAs without a key, whose last CRL is carried over unchanged.
    """
    cas, kept = tuple(cas), tuple(kept)
    fps = _fingerprints(cas, kept)
    serials = tuple(sorted(r.serial for r in _live(state, cas, now, kept)))
    return (
        not state.crl_pem
        or state.crl_signed_at is None
        or now - state.crl_signed_at >= CRL_RESIGN_AFTER
        or state.crl_cas != fps
        or state.crl_serials != serials
    )


def sign_crls(
    state: State,
    cas: Iterable[pki.CA],
    now: datetime.datetime,
    kept: Iterable[x509.Certificate] = (),
) -> State:
    """New CRLs (one per CA, number + 1), dropping entries of expired certificates.

    ``kept``: retiring CAs without a key; their last CRL is carried over as it is.
    """
    cas, kept = tuple(cas), tuple(kept)
    live = _live(state, cas, now, kept)
    number = state.crl_number + 1
    pems: list[bytes] = []
    for ca in cas:
        fp = certs.fingerprint_sha256(ca.cert)
        entries = [
            pki.RevokedEntry(int(r.serial, 16), r.reason, r.time) for r in live if r.issuer == fp
        ]
        crl = pki.build_crl(ca, entries, now=now, number=number, next_update=CRL_NEXT_UPDATE)
        pems.append(pki.crl_pem(crl))
    pems.append(kept_crls(state, kept))
    return dataclasses.replace(
        state,
        revocations=live,
        crl_number=number,
        crl_signed_at=now,
        crl_pem=b"".join(pems).decode(),
        crl_cas=_fingerprints(cas, kept),
        crl_serials=tuple(sorted(r.serial for r in live)),
    )
