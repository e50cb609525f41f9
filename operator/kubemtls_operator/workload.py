"""A pod, as the operator sees it: opted in? injected? which identity and lifetime?

Pure: a pod body in, frozen values out. The leaf's identity comes from here only — the
pod's namespace, service account, name, hostname/subdomain and validated
``kubemtls.io/dns-names`` — never from a CSR. Annotations are validated by the same code
the webhook uses (``podannotations.parse``), so what admission refuses is never signed.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Mapping
from typing import Any

from kubemtls_sidecar import certs, contract

from kubemtls_operator import annotations as podannotations
from kubemtls_operator import config, naming, pki

__all__ = ["PodFacts", "facts", "leaf_identity", "lifetime", "mtlscert_body", "opted_in"]


def opted_in(annotations_: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    """``kubemtls.io/inject: "true"`` as an annotation or a label."""
    return (annotations_ or {}).get(contract.ANN_INJECT) == "true" or (labels or {}).get(
        contract.ANN_INJECT
    ) == "true"


@dataclasses.dataclass(frozen=True, slots=True)
class PodFacts:
    """The few facts of a pod the operator keeps (in the kopf index) and signs from."""

    namespace: str
    name: str
    uid: str
    service_account: str
    opted_in: bool
    injected: bool
    hostname: str = ""
    subdomain: str = ""
    annotations: tuple[tuple[str, str], ...] = ()  # only kubemtls.io/*
    deleting: bool = False

    @property
    def annotation_map(self) -> dict[str, str]:
        return dict(self.annotations)


def facts(body: Mapping[str, Any]) -> PodFacts:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    anns = meta.get("annotations") or {}
    names = {c.get("name") for c in (spec.get("containers") or [])} | {
        c.get("name") for c in (spec.get("initContainers") or [])
    }
    own = tuple(
        sorted((k, str(v)) for k, v in anns.items() if k.startswith(contract.ANNOTATION_PREFIX))
    )
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return PodFacts(
        namespace=sys.intern(meta.get("namespace", "")),
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        service_account=sys.intern(sa),
        opted_in=opted_in(anns, meta.get("labels")),
        injected=contract.SIDECAR_CONTAINER_NAME in names,
        hostname=spec.get("hostname") or "",
        subdomain=spec.get("subdomain") or "",
        annotations=_shared(own),
        deleting=bool(meta.get("deletionTimestamp")),
    )


#: Small annotation sets seen so far: the pods of one workload share theirs. Bounded in
#: entries and in size (a pod's own odd annotations are not kept after the pod is gone).
_ANNOTATIONS: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
_SHARED_MAX, _SHARED_CHARS = 4096, 512


def _shared(anns: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    hit = _ANNOTATIONS.get(anns)
    if hit is None:
        hit = anns
        small = sum(len(k) + len(v) for k, v in anns) <= _SHARED_CHARS
        if small and len(_ANNOTATIONS) < _SHARED_MAX:
            _ANNOTATIONS[anns] = anns
    return hit


def _limits(cfg: config.Config) -> podannotations.Limits:
    return podannotations.Limits(
        trust_domain=cfg.trust_domain,
        cluster_domain=cfg.cluster_domain,
        cert_duration_min=cfg.cert_duration_min,
        cert_duration_max=cfg.cert_duration_max,
        dns_allow_list=cfg.dns_allow_list,
    )


def spec_of(pod: PodFacts, cfg: config.Config) -> podannotations.AnnotationSpec:
    """The pod's validated kubemtls podannotations.

    Raises:
        podannotations.AnnotationError: an annotation admission would have refused.
    """
    return podannotations.parse(pod.annotation_map, namespace=pod.namespace, limits=_limits(cfg))


def lifetime(spec: podannotations.AnnotationSpec, cfg: config.Config) -> datetime.timedelta:
    """The pod's leaf lifetime: its annotation, else the default, within the bounds."""
    wanted = spec.cert_duration or cfg.cert_duration
    return min(max(wanted, cfg.cert_duration_min), cfg.cert_duration_max)


def dns_names(
    pod: PodFacts, spec: podannotations.AnnotationSpec, cfg: config.Config
) -> tuple[str, ...]:
    names: list[str] = []
    if pod.hostname and pod.subdomain:
        names.append(f"{pod.hostname}.{pod.subdomain}.{pod.namespace}.svc.{cfg.cluster_domain}")
    names.extend(spec.dns_names)
    return tuple(dict.fromkeys(names))


def leaf_identity(
    pod: PodFacts, spec: podannotations.AnnotationSpec, cfg: config.Config
) -> pki.LeafIdentity:
    """DESIGN.md §Identity: SPIFFE ID, CN=<pod>, OU=<namespace>, real DNS names only.

    Raises:
        IdentityError: the namespace or service account is not a valid name.
    """
    return pki.LeafIdentity(
        spiffe_id=certs.spiffe_id(cfg.trust_domain, pod.namespace, pod.service_account),
        common_name=pod.name,
        organizational_unit=pod.namespace,
        dns_names=dns_names(pod, spec, cfg),
    )


def mtlscert_body(pod: PodFacts, cfg: config.Config) -> dict[str, Any]:
    """The pod's MTLSCert: named after it, owned by it (deleted with it).

    Raises:
        IdentityError: the namespace or service account is not a valid name.
    """
    try:
        spec = spec_of(pod, cfg)
    except podannotations.AnnotationError:
        spec = podannotations.AnnotationSpec()  # the signer refuses; the record still exists
    return {
        "apiVersion": naming.CRD_API_VERSION,
        "kind": contract.CRD_KIND,
        "metadata": {
            "name": naming.mtlscert_name(pod.name),
            "namespace": pod.namespace,
            "labels": {"app.kubernetes.io/managed-by": naming.MANAGED_BY},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.name,
                    "uid": pod.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "podName": pod.name,
            "podUID": pod.uid,
            "serviceAccount": pod.service_account,
            "identity": certs.spiffe_id(cfg.trust_domain, pod.namespace, pod.service_account),
            "dnsNames": list(dns_names(pod, spec, cfg)),
            "duration": podannotations.format_duration(lifetime(spec, cfg)),
            "keyType": spec.key_type,
        },
    }
