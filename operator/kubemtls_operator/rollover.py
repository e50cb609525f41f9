"""What the operator knows about its CAs at one moment, and the rollover decisions.

Pure: an :class:`Authority` is built from the CA Secret's data and the state document;
:func:`plan` says which single rollover step is due at ``now``. ``ca.py`` does the I/O and
applies the steps one at a time, re-reading after each, so a restart mid-way converges.

Rollover, in steps (DESIGN.md §Lifecycle commands):
1. a next CA appears in the Secret (supplied by a person, or generated when the current
   one is in its last fifth of life) → it is **published** in every trust bundle;
2. once it has been published for ``CA_ROLLOVER_GRACE`` it is **activated**: it signs, and
   the old CA moves to ``prev.*`` (its key is kept to sign its CRL);
3. once no live certificate chains to the old CA it is **retired**: dropped from bundles
   (an expired one is **pruned** at once: past its notAfter it validates nothing).
An unpublished CA never signs: activation requires a recorded publication time.

A CA **replaced in place** (cert-manager rewrites ``tls.crt``/``tls.key``; no ``next``
phase) has already signed before anyone published it; :func:`replacement` spots it (the
state records the CA last seen signing) and the old CA joins step 3 as ``prev.*``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping

from cryptography import x509
from kubemtls_sidecar import certs

from kubemtls_operator import naming, pki, revocation

__all__ = [
    "Authority",
    "Step",
    "from_secret",
    "in_last_fifth",
    "plan",
    "recorded_signing",
    "replacement",
    "same_key",
    "trust_bundle",
]


@dataclasses.dataclass(frozen=True)
class Authority:
    """The CAs (signing, next, retiring) and the revocation state.

    ``previous`` is the retiring CA with its key (it signs its CRL); ``retiring`` is its
    certificate and chain as ``prev.crt`` holds them — also when the key is gone (a CA
    replaced in place while no replica held its key): trusted, but its CRL is frozen.
    ``expired``: ``prev.crt`` when it (or a certificate above it) has expired: trusted
    nowhere, still in the Secret until :func:`plan` prunes it.
    """

    signing: pki.CA
    next: pki.CA | None
    previous: pki.CA | None
    state: revocation.State
    retiring: tuple[x509.Certificate, ...] = ()
    expired: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not self.retiring and self.previous is not None:
            object.__setattr__(self, "retiring", (self.previous.cert, *self.previous.chain))

    @property
    def cas(self) -> tuple[pki.CA, ...]:
        """Every CA with a key whose anchor is in the bundle, signing CA first."""
        return tuple(c for c in (self.signing, self.next, self.previous) if c is not None)

    @property
    def keyless(self) -> tuple[x509.Certificate, ...]:
        """The retiring CA when its key is gone (its last CRL is carried over)."""
        return self.retiring[:1] if self.retiring and self.previous is None else ()

    @property
    def bundle_pem(self) -> bytes:
        """``ca.crt``: every trusted CA (see :func:`trust_bundle`)."""
        return trust_bundle((self.signing, self.next), self.retiring)

    @property
    def retiring_dn(self) -> str:
        return self.retiring[0].subject.rfc4514_string() if self.retiring else ""

    def is_retiring_issuer(self, issuer_dn: str) -> bool:
        """Whether a leaf with this issuer DN chains to the retiring CA.

        False when the signing (or next) CA has the same subject — a CA renewed in place
        under the same name: its leaves cannot be told apart by name, and renewing every
        leaf at once would be a storm for nothing.
        """
        return bool(self.retiring) and issuer_dn == self.retiring_dn and not self.ambiguous

    @property
    def ambiguous(self) -> bool:
        """The retiring CA has the name of the signing (or next) CA: leaves don't tell."""
        names = {ca.cert.subject.rfc4514_string() for ca in (self.signing, self.next) if ca}
        return self.retiring_dn in names

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


def trust_bundle(
    cas: Iterable[pki.CA | None], retiring: tuple[x509.Certificate, ...] = ()
) -> bytes:
    """The trust bundle: the anchors first, then every intermediate below them.

    ``cas``: the signing and next CAs; ``retiring``: the retiring CA and its chain, as
    ``prev.crt`` holds them. The anchors (a root when the Secret carries it) are what peers
    trust; the intermediates are the CAs that sign leaves and CRLs, listed so that a
    relying party keeps each CRL for a CA of its bundle (docs/revocation.md: only a CA
    that signs leaves needs a CRL). OpenSSL treats a non-self-signed certificate of the
    bundle as a store certificate: a verifier without ``PARTIAL_CHAIN`` still needs the root.
    """
    present = [ca for ca in cas if ca is not None]
    anchors = [ca.anchor for ca in present] + list(retiring[-1:])
    below = [c for ca in present for c in ca.intermediates] + list(retiring[:-1])
    return pki.trust_bundle([*anchors, *below])


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
    retiring: tuple[x509.Certificate, ...] = ()
    try:
        prev = _load(data, naming.KEY_PREV_CERT, naming.KEY_PREV_KEY, now)
        if prev is None and naming.KEY_PREV_CERT in data:
            retiring = _certificates(data[naming.KEY_PREV_CERT])
    except pki.CAExpired:
        prev, retiring = None, _certificates(data[naming.KEY_PREV_CERT])
    expired: tuple[x509.Certificate, ...] = ()
    if retiring and min(c.not_valid_after_utc for c in retiring) <= now:
        retiring, expired = (), retiring  # an expired retiring CA vouches for nothing any more
    return Authority(
        signing=signing, next=nxt, previous=prev, state=state, retiring=retiring, expired=expired
    )


def _certificates(pem: bytes) -> tuple[x509.Certificate, ...]:
    """``prev.crt`` without a usable ``prev.key``: the certificates, () when unreadable."""
    try:
        return tuple(certs.load_pem_certificates(pem))
    except ValueError:
        return ()


def recorded_signing(state: revocation.State) -> tuple[x509.Certificate, ...]:
    """The CA (and chain) the state last saw signing; () when none was recorded."""
    pem = state.rollover.signing_pem
    try:
        return tuple(certs.load_pem_certificates(pem.encode())) if pem else ()
    except ValueError:
        return ()


def same_key(a: x509.Certificate, b: x509.Certificate) -> bool:
    return bool(a.public_key() == b.public_key())


def in_last_fifth(cert: x509.Certificate, now: datetime.datetime) -> bool:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= nb + (na - nb) * 0.8


@dataclasses.dataclass(frozen=True)
class Step:
    """One rollover step: ``generate`` | ``publish`` | ``activate`` | ``retire`` | ``prune``
    (an expired ``prev.crt`` leaves the Secret) | ``replace`` | ``renewed`` | ``none``."""

    action: str
    detail: str = ""


def replacement(auth: Authority) -> Step:
    """Whether ``tls.crt`` was replaced in place since the state last recorded it.

    ``replace``: another CA signs now, and the one recorded must stay trusted (and go
    to ``prev.*``); ``renewed``: the same key and name with a new certificate, which
    vouches for everything the old one signed. ``none``: nothing was replaced in place
    (nothing recorded yet, the recorded CA is the retiring one, i.e. our own activation).
    """
    ro = auth.state.rollover
    fp = auth.signing_fingerprint
    if not ro.signing_fingerprint or ro.signing_fingerprint == fp:
        return Step("none")
    if auth.retiring and certs.fingerprint_sha256(auth.retiring[0]) == ro.signing_fingerprint:
        return Step("none")
    old = recorded_signing(auth.state)
    if not old:
        return Step("none")  # unreadable record: nothing to keep
    if same_key(old[0], auth.signing.cert) and old[0].subject == auth.signing.cert.subject:
        return Step("renewed", ro.signing_fingerprint)
    return Step("replace", ro.signing_fingerprint)


def plan(
    auth: Authority,
    *,
    now: datetime.datetime,
    grace: datetime.timedelta,
    live_issuers: frozenset[str],
    max_leaf_life: datetime.timedelta = datetime.timedelta(hours=720),
) -> Step:
    """The next rollover step due at ``now``.

    ``live_issuers``: issuer DNs of unexpired certificates (from the MTLSCerts' status).
    ``max_leaf_life``: CERT_DURATION_MAX; a retiring CA with the signing CA's name (its
    leaves are indistinguishable by issuer) retires once that long has passed.
    """
    ro = auth.state.rollover
    swap = replacement(auth)
    if swap.action != "none":
        return swap
    if auth.expired:
        return Step("prune", auth.expired[0].subject.rfc4514_string())
    if auth.retiring:
        old_dn = auth.retiring_dn
        expired = auth.retiring[0].not_valid_after_utc <= now
        if auth.ambiguous:
            since = ro.activated_at or now
            if expired or now >= since + max_leaf_life:
                return Step("retire", old_dn)
            return Step("none", f"{old_dn} retires at {since + max_leaf_life}")
        if old_dn not in live_issuers or expired:
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
    if auth.retiring:
        return revocation.PHASE_RETIRING
    if auth.next is not None:
        return revocation.PHASE_NEXT_PUBLISHED
    return revocation.PHASE_STABLE
