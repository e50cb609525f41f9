"""What the operator knows about its CAs at one moment, and the rollover decisions.

Pure: an :class:`Authority` is built from the CA Secret's data and the state document;
:func:`plan` says which single rollover step is due at ``now``. ``ca.py`` does the I/O and
applies the steps one at a time, re-reading after each, so a restart mid-way converges.

Rollover, in steps (DESIGN.md §Lifecycle commands):
1. a next CA appears in the Secret (supplied by a person, or generated when the current
   one is in its last fifth of life) → it is **published** in every trust bundle;
2. once it has been published for ``CA_ROLLOVER_GRACE`` it is **activated**: it signs, and
   the old CA moves to ``prev.*`` (its key is kept to sign its CRL);
3. once no live certificate chains to the old CA it is **retired**: dropped from bundles.
An unpublished CA never signs: activation requires a recorded publication time.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from cryptography import x509
from kubemtls_sidecar import certs

from kubemtls_operator import naming, pki, revocation

__all__ = [
    "Authority",
    "Step",
    "from_secret",
    "in_last_fifth",
    "plan",
]


@dataclasses.dataclass(frozen=True)
class Authority:
    """The CAs (signing, next, retiring) and the revocation state."""

    signing: pki.CA
    next: pki.CA | None
    previous: pki.CA | None
    state: revocation.State

    @property
    def cas(self) -> tuple[pki.CA, ...]:
        """Every CA whose anchor is in the bundle, signing CA first."""
        return tuple(c for c in (self.signing, self.next, self.previous) if c is not None)

    @property
    def bundle_pem(self) -> bytes:
        return pki.trust_bundle(ca.anchor for ca in self.cas)

    @property
    def crl_pem(self) -> bytes:
        return self.state.crl_pem.encode()

    @property
    def signing_fingerprint(self) -> str:
        return certs.fingerprint_sha256(self.signing.cert)

    def fingerprint_of_issuer(self, issuer_dn: str) -> str:
        """The fingerprint of the trusted CA whose subject is ``issuer_dn`` (or '')."""
        for ca in self.cas:
            if ca.cert.subject.rfc4514_string() == issuer_dn:
                return certs.fingerprint_sha256(ca.cert)
        return ""

    def is_revoked(self, serial_hex: str) -> bool:
        return serial_hex in self.state.revoked_serials


def _load(
    data: Mapping[str, bytes], cert_key: str, key_key: str, now: datetime.datetime
) -> pki.CA | None:
    if cert_key not in data or key_key not in data:
        return None
    return pki.load_ca(data[cert_key], data[key_key], now=now)


def from_secret(
    data: Mapping[str, bytes], state: revocation.State, *, now: datetime.datetime
) -> Authority:
    """Load every CA of the Secret's (decoded) data.

    Raises:
        pki.CAInvalid: ``tls.crt``/``tls.key`` missing, unreadable or not a usable CA
            (a broken ``next.*`` is reported the same way: fix the Secret).
    """
    signing = _load(data, naming.KEY_CERT, naming.KEY_KEY, now)
    if signing is None:
        raise pki.CAInvalid(
            f"the CA Secret has no {naming.KEY_CERT} and {naming.KEY_KEY}; "
            "put the CA's certificate and unencrypted key there"
        )
    nxt = _load(data, naming.KEY_NEXT_CERT, naming.KEY_NEXT_KEY, now)
    try:
        prev = _load(data, naming.KEY_PREV_CERT, naming.KEY_PREV_KEY, now)
    except pki.CAExpired:
        prev = None  # an expired retiring CA vouches for nothing any more
    return Authority(signing=signing, next=nxt, previous=prev, state=state)


def in_last_fifth(cert: x509.Certificate, now: datetime.datetime) -> bool:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= nb + (na - nb) * 0.8


@dataclasses.dataclass(frozen=True)
class Step:
    """One rollover step: ``generate`` | ``publish`` | ``activate`` | ``retire`` | ``none``."""

    action: str
    detail: str = ""


def plan(
    auth: Authority,
    *,
    now: datetime.datetime,
    grace: datetime.timedelta,
    live_issuers: frozenset[str],
) -> Step:
    """The next rollover step due at ``now``.

    ``live_issuers``: issuer DNs of unexpired certificates (from the MTLSCerts' status).
    """
    ro = auth.state.rollover
    if auth.previous is not None:
        old_dn = auth.previous.cert.subject.rfc4514_string()
        if old_dn not in live_issuers or auth.previous.cert.not_valid_after_utc <= now:
            return Step("retire", old_dn)
        return Step("none", f"waiting for certificates of {old_dn} to be replaced")
    if auth.next is not None:
        fp = certs.fingerprint_sha256(auth.next.cert)
        if ro.next_fingerprint != fp or ro.published_at is None:
            return Step("publish", fp)
        if now >= ro.published_at + grace:
            return Step("activate", fp)
        return Step("none", f"next CA published, signs from {ro.published_at + grace}")
    if in_last_fifth(auth.signing.cert, now) and auth.signing.is_root:
        return Step("generate", "the signing CA is in its last fifth of life")
    return Step("none")


def phase_of(auth: Authority) -> str:
    """The rollover phase as the Secret shows it (the state's copy may lag one step)."""
    if auth.previous is not None:
        return revocation.PHASE_RETIRING
    if auth.next is not None:
        return revocation.PHASE_NEXT_PUBLISHED
    return revocation.PHASE_STABLE
