"""Which CAs need a CRL when the bundle holds an intermediate (docs/revocation.md).

The operator publishes ``ca.crt`` as the anchors, then the intermediates that sign leaves
and CRLs (``rollover.trust_bundle``). A root above an intermediate, whose key the operator
does not hold, can publish no CRL: it must not make the set look missing (never fresh,
revocation never handed to OpenSSL, a stale-CRL alert forever).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from kubemtls_operator import pki, revocation, rollover
from kubemtls_sidecar import certs, crl
from testkit import utcnow

DAY = datetime.timedelta(days=1)


def _leaf(ca: pki.CA, now: datetime.datetime) -> x509.Certificate:
    return pki.issue_leaf(
        ca, pki.generate_key("ecdsa-p256").public_key(),
        pki.LeafIdentity("spiffe://cluster.local/ns/a/sa/b", "p", "a", (), ()),
        now=now, lifetime=DAY,
    )  # fmt: skip


def test_the_bundle_lists_the_anchor_then_the_intermediate_that_signs() -> None:
    now = utcnow()
    root = pki.bootstrap_ca(now=now, common_name="corp root")
    inter = pki.issue_intermediate_ca(root, now=now, common_name="kubemtls", lifetime=90 * DAY)
    auth = rollover.Authority(inter, None, None, revocation.State())
    assert certs.load_pem_certificates(auth.bundle_pem) == [root.cert, inter.cert]
    # A root CA (bootstrap) alone: unchanged, one certificate.
    alone = rollover.Authority(root, None, None, revocation.State())
    assert certs.load_pem_certificates(alone.bundle_pem) == [root.cert]


def test_a_root_above_the_intermediate_needs_no_crl_and_the_intermediate_does() -> None:
    now = utcnow()
    root = pki.bootstrap_ca(now=now, common_name="corp root")
    inter = pki.issue_intermediate_ca(root, now=now, common_name="kubemtls", lifetime=90 * DAY)
    leaf = _leaf(inter, now)
    listed = pki.build_crl(
        inter, [pki.RevokedEntry(leaf.serial_number, "keyCompromise", now)], now=now, number=2
    )
    bundle = [root.cert, inter.cert]

    merged = crl.merge(bundle, {}, [listed])
    assert merged.missing == ()
    assert merged.fresh(now)  # OpenSSL may enforce it: certificate_revoked in the handshake
    assert crl.revoked(merged, leaf)

    # Without the intermediate's CRL, the intermediate (not the root) is missing.
    none = crl.merge(bundle, {}, [])
    assert none.missing == (inter.cert.subject,)
    assert not none.fresh(now)

    # Only the anchor in the bundle (the representation before the fix): the CRL of the
    # intermediate is dropped and the revoked leaf goes unnoticed.
    before = crl.merge([root.cert], {}, [listed])
    assert before.by_issuer == {}
    assert not crl.revoked(before, leaf)


def test_two_roots_both_need_crls_and_a_forged_child_exempts_nobody() -> None:
    now = utcnow()
    current = pki.bootstrap_ca(now=now, common_name="mesh root")
    following = pki.bootstrap_ca(now=now, common_name="mesh root 2")
    merged = crl.merge([current.cert, following.cert], {}, [])
    assert set(merged.missing) == {current.cert.subject, following.cert.subject}

    # A CA that names ``current`` as its issuer but was signed by another key.
    impostor = pki.bootstrap_ca(now=now, common_name="mesh root")
    fake = pki.issue_intermediate_ca(impostor, now=now, common_name="fake", lifetime=DAY * 30)
    fake_crl = pki.build_crl(fake, [], now=now, number=1)
    merged = crl.merge([current.cert, fake.cert], {}, [fake_crl])
    assert merged.missing == (current.cert.subject,)


def test_a_renewed_intermediate_and_the_retiring_one_both_need_their_crls() -> None:
    """cert-manager replaced the intermediate in place: both stay, each with its own CRL."""
    now = utcnow()
    root = pki.bootstrap_ca(now=now, common_name="corp root")
    old = pki.issue_intermediate_ca(root, now=now, common_name="kubemtls", lifetime=90 * DAY)
    new = pki.issue_intermediate_ca(root, now=now, common_name="kubemtls", lifetime=90 * DAY)
    with_key = rollover.Authority(new, None, old, revocation.State())
    keyless = rollover.Authority(
        new, None, None, revocation.State(), retiring=(old.cert, *old.chain)
    )
    for auth in (with_key, keyless):
        bundle = certs.load_pem_certificates(auth.bundle_pem)
        assert bundle == [root.cert, new.cert, old.cert]
        only_new = crl.merge(bundle, {}, [pki.build_crl(new, [], now=now, number=1)])
        assert only_new.missing == (old.cert.subject,)  # same name, other key: still missing
        both = crl.merge(bundle, {}, [pki.build_crl(c, [], now=now, number=1) for c in (new, old)])
        assert both.missing == ()
        assert both.fresh(now)
