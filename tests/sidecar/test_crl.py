"""CRL selection: newest number per CA, by key (a rollover may reuse the name), signed only."""

from __future__ import annotations

import datetime

from kubemtls_operator import pki
from kubemtls_sidecar import crl
from testkit import utcnow


def test_newest_crl_per_ca_survives_a_same_named_next_ca():
    now = utcnow()
    current = pki.bootstrap_ca(now=now, common_name="mesh root")
    following = pki.bootstrap_ca(now=now, common_name="mesh root")  # same subject, new key
    leaf_serial = 0x1234
    old = pki.build_crl(current, [], now=now, number=1)
    newer = pki.build_crl(
        current, [pki.RevokedEntry(leaf_serial, "keyCompromise", now)], now=now, number=2
    )
    empty_next = pki.build_crl(following, [], now=now, number=5)
    cas = [current.cert, following.cert]
    merged = crl.merge(cas, {}, [newer, empty_next, old])  # order must not matter
    assert merged.missing == ()
    assert merged.by_issuer[crl.ca_key(current.cert)] is newer
    assert merged.by_issuer[crl.ca_key(following.cert)] is empty_next
    assert merged.fresh(now)
    # a later, lower-numbered CRL never replaces a newer one
    again = crl.merge(cas, merged.by_issuer, [old])
    assert again.by_issuer[crl.ca_key(current.cert)] is newer


def test_forged_crl_is_ignored_and_a_ca_without_crl_is_missing():
    now = utcnow()
    real = pki.bootstrap_ca(now=now, common_name="mesh root")
    impostor = pki.bootstrap_ca(now=now, common_name="mesh root")
    forged = pki.build_crl(impostor, [], now=now, number=99)
    merged = crl.merge([real.cert], {}, [forged])
    assert merged.by_issuer == {}
    assert merged.missing == (real.cert.subject,)
    assert not merged.fresh(now)


def test_stale_crl_is_not_fresh_but_still_revokes():
    now = utcnow()
    ca = pki.bootstrap_ca(now=now - datetime.timedelta(days=5), common_name="mesh root")
    leaf = pki.issue_leaf(
        ca, pki.generate_key("ecdsa-p256").public_key(),
        pki.LeafIdentity("spiffe://cluster.local/ns/a/sa/b", "p", "a", (), ()),
        now=now - datetime.timedelta(days=4), lifetime=datetime.timedelta(days=30),
    )  # fmt: skip
    past = now - datetime.timedelta(days=3)
    stale = pki.build_crl(
        ca, [pki.RevokedEntry(leaf.serial_number, "keyCompromise", past)], now=past, number=3,
        next_update=datetime.timedelta(days=1),
    )  # fmt: skip
    merged = crl.merge([ca.cert], {}, crl.load_crls(pki.crl_pem(stale)))
    assert not merged.fresh(now)
    assert crl.revoked(merged, leaf)
