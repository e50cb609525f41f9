"""The durable CA state and the rollover plan (pure): idempotent, restart-safe decisions."""

from __future__ import annotations

import datetime

from cryptography import x509
from kubemtls_operator import pki, revocation, rollover, tokens
from kubemtls_sidecar import certs
from testkit import TestPKI, utcnow


def test_a_revocation_is_recorded_once_and_survives_a_round_trip(test_pki: TestPKI) -> None:
    now = utcnow().replace(microsecond=0)
    fp = certs.fingerprint_sha256(test_pki.ca.cert)
    r = revocation.Revocation(
        "abc",
        "keyCompromise",
        now.replace(microsecond=0),
        now.replace(microsecond=0) + datetime.timedelta(hours=1),
        fp,
    )
    state = revocation.add(revocation.add(revocation.State(), r), r)
    assert len(state.revocations) == 1
    signed = revocation.sign_crls(state, [test_pki.ca], now)
    assert revocation.State.from_json(signed.to_json()) == signed
    assert not revocation.needs_crl(signed, [test_pki.ca], now)
    assert revocation.needs_crl(signed, [test_pki.ca], now + datetime.timedelta(days=1))
    crl = x509.load_pem_x509_crl(signed.crl_pem.encode())
    assert crl.get_revoked_certificate_by_serial_number(0xABC) is not None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - now >= datetime.timedelta(days=7)
    again = revocation.sign_crls(signed, [test_pki.ca], now)
    assert again.crl_number == signed.crl_number + 1


def test_expired_entries_leave_the_crl(test_pki: TestPKI) -> None:
    now = utcnow()
    fp = certs.fingerprint_sha256(test_pki.ca.cert)
    r = revocation.Revocation("abc", "superseded", now, now + datetime.timedelta(minutes=1), fp)
    later = revocation.sign_crls(
        revocation.add(revocation.State(), r), [test_pki.ca], now + datetime.timedelta(hours=1)
    )
    assert later.revocations == ()


def test_the_plan_publishes_before_it_activates_and_retires_last() -> None:
    now = utcnow()
    grace = datetime.timedelta(hours=1)
    cur, nxt = (
        pki.bootstrap_ca(now=now, common_name="cur"),
        pki.bootstrap_ca(now=now, common_name="nxt"),
    )
    fp = certs.fingerprint_sha256(nxt.cert)
    a = rollover.Authority(cur, nxt, None, revocation.State())
    assert rollover.plan(a, now=now, grace=grace, live_issuers=frozenset()).action == "publish"
    published = revocation.State(rollover=revocation.Rollover("NextPublished", fp, now))
    a = rollover.Authority(cur, nxt, None, published)
    assert (
        rollover.plan(a, now=now + grace / 2, grace=grace, live_issuers=frozenset()).action
        == "none"
    )
    assert (
        rollover.plan(a, now=now + grace, grace=grace, live_issuers=frozenset()).action
        == "activate"
    )
    # A different next CA than the one published is published again before it may sign.
    other = pki.bootstrap_ca(now=now, common_name="other")
    a = rollover.Authority(cur, other, None, published)
    assert (
        rollover.plan(a, now=now + 2 * grace, grace=grace, live_issuers=frozenset()).action
        == "publish"
    )
    a = rollover.Authority(nxt, None, cur, published)
    live = frozenset({cur.cert.subject.rfc4514_string()})
    assert rollover.plan(a, now=now, grace=grace, live_issuers=live).action == "none"
    assert rollover.plan(a, now=now, grace=grace, live_issuers=frozenset()).action == "retire"


def test_a_root_in_its_last_fifth_gets_a_successor() -> None:
    now = utcnow()
    old = pki.bootstrap_ca(
        now=now - datetime.timedelta(days=9), lifetime=datetime.timedelta(days=10)
    )
    a = rollover.Authority(old, None, None, revocation.State())
    assert (
        rollover.plan(a, now=now, grace=datetime.timedelta(0), live_issuers=frozenset()).action
        == "generate"
    )


def test_jwt_expiry_is_read_without_verifying() -> None:
    import base64
    import json

    def part(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': 'RS256'})}.{part({'exp': 1900000000})}.sig"
    assert tokens.jwt_expiry(token) == 1900000000
    assert tokens.jwt_expiry("opaque") is None
    assert tokens.jwt_expiry("a.!!!.c") is None
