"""MTLSCerts: revoke on request (``certwatch.Cache`` sees the annotation and calls this).

``kubectl annotate mtlscert NAME kubemtls.io/revoke=<reason>`` → the serial goes into the
state ConfigMap and the CRL (re-signed, published to every trust ConfigMap), then into
``status.revocations`` with phase Revoked, and the annotation is removed. Each step is
idempotent, so a retry or a restart mid-way neither loses nor duplicates a revocation.

No kopf handler here any more: kopf does not watch MTLSCerts at all (every status write
would come back to it as an event; see ``certwatch``). The records for the sweeper,
``/v1/trust`` and CA retirement are ``certwatch.Cache``'s. Every replica follows MTLSCerts,
but with peering only the one kopf runs its handlers on revokes (as when this was a kopf
handler): the others ask again later, and take over if that one goes.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from kubemtls_sidecar import contract

from kubemtls_operator import certwatch, errors, metrics, naming, pki, revocation, status

__all__ = ["active_replica", "revoke_requested"]

logger = logging.getLogger(__name__)

R = naming.Reason


async def revoke_requested(rt: Any, body: dict[str, Any]) -> None:
    """Revoke the MTLSCert's current serial (reason from the annotation), then drop the
    annotation. ``body``: the object as just read. Raises on failure (the caller retries).

    Raises:
        certwatch.Later: another replica is the active one (kopf peering).
    """
    await _check_active(rt)
    meta, st = body["metadata"], body.get("status") or {}
    ns, name, reason = meta["namespace"], meta["name"], meta["annotations"][contract.ANN_REVOKE]
    serial = st.get("serial", "")
    ref = {**body, "apiVersion": naming.CRD_API_VERSION, "kind": "MTLSCert"}
    if reason not in pki.REVOCATION_REASONS:
        message = f"{reason!r} is not a revocation reason; use one of " + ", ".join(
            pki.REVOCATION_REASONS
        )
        await rt.client.post_event(
            ref, type_="Warning", reason=R.REVOCATION_INVALID, message=message
        )
    elif not serial:
        await rt.client.post_event(
            ref,
            type_="Warning",
            reason=R.NOTHING_TO_REVOKE,
            message="no certificate has been issued yet",
        )
    else:
        await _revoke(rt, ref, serial, reason)
        logger.info("revoked serial %s of MTLSCert %s/%s (%s)", serial, ns, name, reason)
    await rt.client.merge_patch(
        naming.mtlscerts_path(ns, name), {"metadata": {"annotations": {contract.ANN_REVOKE: None}}}
    )


def active_replica(
    peers: dict[str, Any], priority: int, now: datetime.datetime | None = None
) -> bool:
    """Whether kopf runs its handlers on the replica of ``priority``, from its peering
    object's ``status`` (identity → priority, lifetime, lastseen): no live peer ranks higher
    (kopf's ``process_peering_event``)."""
    now = now or datetime.datetime.now(datetime.UTC)
    for info in peers.values():
        if not isinstance(info, dict) or int(info.get("priority") or 0) <= priority:
            continue
        try:
            seen = revocation.parse_time(info.get("lastseen")) or now
        except ValueError:
            seen = now
        if seen + datetime.timedelta(seconds=int(info.get("lifetime") or 60)) > now:
            return False
    return True


async def _check_active(rt: Any) -> None:
    if not rt.cfg.peering or rt.peering_priority is None:
        return
    path = f"/apis/kopf.dev/v1/clusterkopfpeerings/{rt.cfg.peering}"
    peering = await rt.client.get_or_none(path)
    if peering is not None and not active_replica(peering.get("status") or {}, rt.peering_priority):
        raise certwatch.Later("another replica runs the handlers (peering)", delay=5.0)


async def _revoke(rt: Any, body: dict[str, Any], serial: str, reason: str) -> None:
    """State + CRL + trust ConfigMaps (``ca.Manager.revoke``), then the MTLSCert's status."""
    if rt.cas.authority is None:
        raise errors.CAUnavailable("no CA loaded yet", delay=5)
    ns, name, st = body["metadata"]["namespace"], body["metadata"]["name"], body["status"]
    now = datetime.datetime.now(datetime.UTC)
    issuer = rt.cas.authority.fingerprint_of_issuer(st.get("issuer", ""))
    not_after = revocation.parse_time(st.get("notAfter")) or now
    entry = revocation.Revocation(serial, reason, now, not_after, issuer, f"{ns}/{name}")
    await rt.cas.revoke(entry)
    await rt.client.update_mtlscert_status(
        ns, name, lambda obj: _revoked_status(obj, serial, reason, now, rt)
    )
    metrics.REVOKED.labels(reason).inc()
    message = f"serial {serial} revoked ({reason}); the sidecar re-keys"
    await rt.client.post_event(body, type_="Normal", reason=R.REVOKED, message=message)


def _revoked_status(
    obj: dict[str, Any], serial: str, reason: str, now: datetime.datetime, rt: Any
) -> dict[str, Any] | None:
    old = obj.get("status") or {}
    revs = list(old.get("revocations") or [])
    if any(r.get("serial") == serial for r in revs) and old.get("serial") != serial:
        return None  # recorded, and re-issued since
    if not any(r.get("serial") == serial for r in revs):
        revs.append({"serial": serial, "reason": reason, "time": revocation.format_time(now)})
    view = status.CertView.from_status(old)
    ctx = rt.checker.context(view)
    ctx["revoked"] = ctx.get("revoked", False) or view.serial == serial
    ev = status.evaluate(
        view,
        now=now,
        alert_window=rt.cfg.alert_window,
        injected=status.condition(old.get("conditions"), "Injected"),
        **ctx,
    )
    return {
        "revocations": revs,
        "phase": ev.phase,
        "conditions": status.merge_conditions(old.get("conditions"), ev.conditions, now),
    }
