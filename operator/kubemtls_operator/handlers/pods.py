"""Opted-in pods: index them for the signer, give each its MTLSCert, catch missed injection.

Raw event handlers (``on.event``), not ``on.create``: they keep no progress annotations on
users' pods, and they see every pod again when the operator restarts, so a restart
converges. Creating the MTLSCert is create-or-get on its deterministic name (the pod's).
"""

from __future__ import annotations

from typing import Any

import kopf
from kubemtls_sidecar import contract

from kubemtls_operator import naming, status, workload

__all__ = ["pod_event", "pod_index"]


def _opted_in(annotations: kopf.Annotations, labels: kopf.Labels, **_: Any) -> bool:
    return workload.opted_in(annotations, labels)


@kopf.index("v1", "pods", when=_opted_in)
async def pod_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    """(namespace, name) → PodFacts: what the signing API checks a token's pod against."""
    return {(namespace or "", name): workload.facts(body)}


def _injected_condition(pod: workload.PodFacts) -> status.Condition:
    if pod.injected:
        return status.Condition(
            "Injected", "True", naming.Reason.INJECTED, "the sidecar is in the pod"
        )
    return status.Condition(
        "Injected",
        "False",
        naming.Reason.NOT_INJECTED,
        f"the pod opted in but has no {contract.SIDECAR_CONTAINER_NAME} container: the webhook "
        "did not run (failurePolicy Ignore?); delete the pod so that it is re-created with it",
    )


@kopf.on.event("v1", "pods", when=_opted_in)
async def pod_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Create the pod's MTLSCert (once per pod UID) with its Injected condition."""
    rt = memo.runtime
    pod = workload.facts(body)
    if type == "DELETED":
        rt.forget(pod)
        return
    if pod.deleting or not pod.uid or pod.uid in rt.seen:
        return
    rt.note_injected(pod, pod.injected)
    await rt.publisher.ensure(pod.namespace)
    cert, _ = await rt.client.create_or_get(
        naming.mtlscerts_path(pod.namespace), workload.mtlscert_body(pod, rt.cfg)
    )
    if cert["spec"].get("podUID") != pod.uid:  # left over from an earlier pod of that name
        await rt.client.delete(naming.mtlscerts_path(pod.namespace, pod.name))
        raise kopf.TemporaryError("replaced a stale MTLSCert of an earlier pod", delay=1)
    injected = _injected_condition(pod)
    old = status.condition((cert.get("status") or {}).get("conditions"), "Injected")
    if old is None or (old.status, old.reason) != (injected.status, injected.reason):
        await rt.client.update_mtlscert_status(
            pod.namespace, pod.name, lambda obj: _initial_status(obj, injected), known=cert
        )
        if not pod.injected:
            kopf.warn(body, reason=naming.Reason.NOT_INJECTED, message=injected.message)
            logger.warning(f"opted in but not injected: {injected.message}")
    rt.seen.add(pod.uid)


def _initial_status(obj: dict[str, Any], injected: status.Condition) -> dict[str, Any]:
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    old = obj.get("status") or {}
    conds = status.merge_conditions(old.get("conditions"), [injected], now)
    others = [c for c in old.get("conditions") or () if c.get("type") != "Injected"]
    if not old.get("phase"):
        ev = status.evaluate(
            status.CertView(), now=now, alert_window=datetime.timedelta(0), injected=injected
        )
        return {"phase": ev.phase, "conditions": status.merge_conditions(None, ev.conditions, now)}
    return {"conditions": [*others, *conds]}
