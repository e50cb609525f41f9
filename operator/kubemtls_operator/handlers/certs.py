"""MTLSCerts: index them (for the sweeper, /v1/trust and CA retirement), and revoke on request.

``kubectl annotate mtlscert NAME kubemtls.io/revoke=<reason>`` → the serial goes into the
state ConfigMap and the CRL (re-signed, published to every trust ConfigMap), then into
``status.revocations`` with phase Revoked, and the annotation is removed. Each step is
idempotent, so a retry or a restart mid-way neither loses nor duplicates a revocation.
"""

from __future__ import annotations

import datetime
from typing import Any

import kopf
from kubemtls_sidecar import contract

from kubemtls_operator import metrics, naming, pki, revocation, status, sweeper

__all__ = ["mtlscert_index", "mtlscert_revoke"]

R = naming.Reason


@kopf.index(naming.CRD_API_VERSION.split("/")[0], contract.CRD_VERSION, contract.CRD_PLURAL)
async def mtlscert_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[Any, Any]:
    return {(namespace or "", name): sweeper.CertRecord.from_body(body)}


@kopf.on.event(
    contract.CRD_GROUP,
    contract.CRD_VERSION,
    contract.CRD_PLURAL,
    annotations={contract.ANN_REVOKE: kopf.PRESENT},
)
async def mtlscert_revoke(
    type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Revoke the MTLSCert's current serial (reason from the annotation)."""
    if type == "DELETED":
        return
    rt = memo.runtime
    meta, st = body["metadata"], body.get("status") or {}
    ns, name, reason = meta["namespace"], meta["name"], meta["annotations"][contract.ANN_REVOKE]
    serial = st.get("serial", "")
    if reason not in pki.REVOCATION_REASONS:
        kopf.warn(
            body,
            reason=R.REVOCATION_INVALID,
            message=f"{reason!r} is not a revocation reason; use one of "
            + ", ".join(pki.REVOCATION_REASONS),
        )
    elif not serial:
        kopf.warn(body, reason=R.NOTHING_TO_REVOKE, message="no certificate has been issued yet")
    else:
        await _revoke(rt, body, serial, reason)
        logger.info(f"revoked serial {serial} ({reason})")
    await rt.client.merge_patch(
        naming.mtlscerts_path(ns, name), {"metadata": {"annotations": {contract.ANN_REVOKE: None}}}
    )


async def _revoke(rt: Any, body: kopf.Body, serial: str, reason: str) -> None:
    """State + CRL + trust ConfigMaps (``ca.Manager.revoke``), then the MTLSCert's status."""
    if rt.cas.authority is None:
        raise kopf.TemporaryError("no CA loaded yet", delay=5)
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
    kopf.info(body, reason=R.REVOKED, message=message)


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
