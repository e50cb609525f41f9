"""A CA replaced in place (cert-manager): what to write so that it becomes a rollover.

cert-manager renews a CA by rewriting ``tls.crt``/``tls.key`` in the CA Secret — no
``next.crt`` phase. The new CA signs at once (its key replaced the old one; nothing can
hold it back), so the operator's part is to keep the **old** CA trusted (``prev.crt``, and
``prev.key`` when a replica still holds the key, so it keeps signing its CRL) until no
live certificate chains to it — the retirement rule of a normal rollover — and to say
plainly that the new CA signed before it was published.

Pure: :func:`apply` returns the Secret patch, the new state and the events; ``ca.py``
writes them. The state records the CA last seen signing (:func:`stamp`), which is how a
replacement is recognised after a restart too (``rollover.replacement``).
"""

from __future__ import annotations

import dataclasses
import datetime

from cryptography import x509
from kubemtls_sidecar import certs

from kubemtls_operator import naming, pki, revocation, rollover

__all__ = ["Event", "Writes", "apply", "normalized", "stamp"]

#: (type, reason, message) of an Event on the CA Secret.
Event = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Writes:
    secret: dict[str, bytes | None]  # empty: the Secret stays as it is
    state: revocation.State
    events: tuple[Event, ...]


def stamp(ro: revocation.Rollover, ca: pki.CA) -> revocation.Rollover:
    """``ro`` recording ``ca`` as the CA now signing."""
    return dataclasses.replace(
        ro,
        signing_fingerprint=certs.fingerprint_sha256(ca.cert),
        signing_pem=pki.cert_pem(ca.cert, *ca.chain).decode(),
    )


def normalized(auth: rollover.Authority, now: datetime.datetime) -> revocation.Rollover:
    """The rollover record as the Secret says it is (after a state write that was lost)."""
    ro = stamp(auth.state.rollover, auth.signing)
    if auth.retiring:
        fp = certs.fingerprint_sha256(auth.retiring[0])
        if ro.retiring_fingerprint != fp or ro.activated_at is None:
            ro = dataclasses.replace(
                ro, phase=revocation.PHASE_RETIRING, retiring_fingerprint=fp, activated_at=now
            )
    return ro


def apply(
    auth: rollover.Authority,
    step: rollover.Step,
    *,
    old_key: pki.PrivateKey | None,
    now: datetime.datetime,
    where: str,
) -> Writes:
    """The writes for a ``replace`` or ``renewed`` step of ``rollover.plan``.

    ``old_key``: the replaced CA's key if a replica still holds it (None: it is gone, the
    old CA is trusted from its recorded certificate and its last CRL is frozen).
    ``where``: ``namespace/name`` of the CA Secret, for the messages.
    """
    old = rollover.recorded_signing(auth.state)
    old_dn, new_dn = old[0].subject.rfc4514_string(), auth.signing.cert.subject.rfc4514_string()
    ro = stamp(auth.state.rollover, auth.signing)
    if step.action == "renewed":
        message = (
            f"the CA certificate {new_dn} in {where} was renewed in place with the same key: "
            "certificates issued under the old certificate keep verifying, and the same key "
            "signs the CRL"
        )
        return Writes(
            {},
            dataclasses.replace(auth.state, rollover=ro),
            (("Normal", naming.Reason.CA_RENEWED, message),),
        )
    kept = rollover.Authority(auth.signing, auth.next, None, auth.state, retiring=old)
    secret = {
        naming.KEY_PREV_CERT: pki.cert_pem(*old),
        naming.KEY_PREV_KEY: pki.key_pem(old_key) if old_key is not None else None,
        naming.KEY_BUNDLE: kept.bundle_pem,
    }
    ro = dataclasses.replace(
        ro, phase=revocation.PHASE_RETIRING, activated_at=now, retiring_fingerprint=step.detail
    )
    if ro.published_at and ro.next_fingerprint == auth.signing_fingerprint:
        published = f"it was published as the next CA at {revocation.format_time(ro.published_at)}"
    else:
        published = (
            "it signed before it was published: peers learn it from /v1/trust within 30 s "
            "(sidecars poll) and from the kubemtls-trust ConfigMaps within about a minute "
            "(kubelet sync), and may refuse certificates it signs until then"
        )
    events: list[Event] = [
        (
            "Warning",
            naming.Reason.CA_REPLACED,
            f"the CA in {where} was replaced in place (tls.crt/tls.key, not next.crt): "
            f"{new_dn} signs from now on; {published}. The replaced CA {old_dn} stays trusted "
            "(prev.crt) until no live certificate chains to it; its pods renew within 10 minutes",
        )
    ]
    if old_key is None:
        events.append(
            (
                "Warning",
                naming.Reason.CA_PREVIOUS_KEY_UNAVAILABLE,
                f"the replaced CA {old_dn} stays trusted from its recorded certificate, but its "
                "key is gone (no replica held it when tls.key was replaced): its CRL cannot be "
                "re-signed, so certificates it issued can no longer be revoked (its last CRL "
                f"stays published{_stale_at(kept)}). To cut one off, delete its pod (the new "
                "certificate comes from the new CA), or put the old key into the Secret as "
                "prev.key",
            )
        )
    return Writes(secret, dataclasses.replace(auth.state, rollover=ro), tuple(events))


def _stale_at(auth: rollover.Authority) -> str:
    pem = revocation.kept_crls(auth.state, auth.keyless)
    crl = x509.load_pem_x509_crl(pem) if pem else None
    if crl is None or crl.next_update_utc is None:
        return ""
    return f" until it goes stale at {revocation.format_time(crl.next_update_utc)}"
