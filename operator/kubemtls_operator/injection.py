"""Decide whether a pod gets the sidecar, then patch it in: the webhook's pure core.

"Decide, then patch" (Linkerd ``pkg/inject``): :func:`decide` looks at a pod and returns a
:class:`Decision` with a snake_case reason code and a sentence for logs and events;
:func:`additions` says what the injection adds, without touching the pod. Two consumers:
:mod:`kubemtls_operator.podpatch` turns it into the JSON Patch the webhook sends, and
:func:`inject_sidecar` applies it to a pod dict in place — idempotent and taking only the
pod, so it also serves as a kopf ``patch.fns`` function (the handler's fallback outside our
webhook server) and as the tests' reference. The containers and volumes themselves are
built in :mod:`kubemtls_operator.sidecarspec`. No kopf, no Kubernetes client, no I/O here.
"""

# No ``from __future__ import annotations``: it would shadow our module of that name.

import dataclasses
import datetime
import functools
from collections.abc import Mapping
from typing import Any, Literal

from kubemtls_sidecar import contract

from kubemtls_operator import annotations, sidecarspec

__all__ = [
    "REASONS",
    "Additions",
    "Decision",
    "InjectionSettings",
    "additions",
    "decide",
    "inject_sidecar",
    "is_injected",
]

Action = Literal["inject", "skip", "deny"]

#: Reason code → the sentence for logs and Events (Linkerd ``report.go``'s ``Reasons``).
REASONS: Mapping[str, str] = {
    "injectable": 'the pod opted in (kubemtls.io/inject: "true") and its annotations are valid',
    "not_opted_in": "the pod has no kubemtls.io/inject annotation or label",
    "opted_out": 'the pod says kubemtls.io/inject: "false"',
    "sidecar_already_exists": "the pod already has a kubemtls-sidecar container",
    "already_injected": "the pod already carries the kubemtls.io/injected annotation",
    "not_a_pod": "the admission request does not carry a pod with a spec and containers",
    "invalid_annotations": "the pod's kubemtls.io annotations are not valid",
    "host_network": "the pod uses hostNetwork, so a sidecar would listen on the node itself",
    "name_taken": "the pod already uses a container or volume name that kubemtls injects",
    "unsupported_probe": "a gRPC probe targets an intercepted port, which cannot be forwarded",
}


@dataclasses.dataclass(frozen=True)
class InjectionSettings:
    """What the webhook needs of the operator's settings (see COMMON.md's table)."""

    sidecar_image: str = "ghcr.io/kubemtls/kubemtls:0.1.0"
    sidecar_image_pull_policy: str = "IfNotPresent"
    sidecar_resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    native_sidecar: bool = True
    signer_url: str = "https://kubemtls.kubemtls.svc:9444"
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    cert_duration_min: datetime.timedelta = datetime.timedelta(minutes=10)
    cert_duration_max: datetime.timedelta = datetime.timedelta(hours=720)
    dns_allow_list: tuple[str, ...] = ()
    token_expiration: int = 3600

    @classmethod
    def of(cls, config: Any) -> "InjectionSettings":
        """:meth:`from_config`, built once per config object (the webhook asks per review)."""
        cached = _SETTINGS.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        settings = cls.from_config(config)
        _SETTINGS.clear()  # one operator, one config: keep the last one only
        _SETTINGS[id(config)] = (config, settings)
        return settings

    @classmethod
    def from_config(cls, config: Any) -> "InjectionSettings":
        """Read the operator config's attributes of the same names (``memo.config``)."""
        allow = config.dns_allow_list
        if isinstance(allow, str):
            allow = tuple(x.strip() for x in allow.split(",") if x.strip())
        return cls(
            sidecar_image=str(config.sidecar_image),
            sidecar_image_pull_policy=str(config.sidecar_image_pull_policy),
            sidecar_resources=dict(config.sidecar_resources or {}),
            native_sidecar=bool(config.native_sidecar),
            signer_url=str(config.signer_url),
            trust_domain=str(config.trust_domain),
            cluster_domain=str(config.cluster_domain),
            cert_duration_min=_timedelta(
                getattr(config, "cert_duration_min", datetime.timedelta(minutes=10))
            ),
            cert_duration_max=_timedelta(config.cert_duration_max),
            dns_allow_list=tuple(allow or ()),
            token_expiration=int(config.token_expiration),
        )

    @functools.cached_property
    def limits(self) -> annotations.Limits:
        """What annotations may ask for in this cluster."""
        return annotations.Limits(
            trust_domain=self.trust_domain,
            cluster_domain=self.cluster_domain,
            cert_duration_min=self.cert_duration_min,
            cert_duration_max=self.cert_duration_max,
            dns_allow_list=self.dns_allow_list,
        )


#: id(config) → (config, its settings): :meth:`InjectionSettings.of`'s one-entry cache.
_SETTINGS: dict[int, tuple[Any, InjectionSettings]] = {}


def _timedelta(value: object) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        return value
    if isinstance(value, int | float):
        return datetime.timedelta(seconds=value)
    return annotations.parse_duration(str(value))


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with a pod, and why (``reason`` is a key of :data:`REASONS`)."""

    action: Action
    reason: str
    message: str
    spec: annotations.AnnotationSpec | None = None
    warnings: tuple[str, ...] = ()

    @property
    def status_code(self) -> int:
        """The HTTP code of a denial: 400 for a malformed request, 422 for a bad pod."""
        return 400 if self.reason == "not_a_pod" else 422


def _decision(action: Action, reason: str, message: str | None = None, **kw: Any) -> Decision:
    return Decision(action, reason, message or REASONS[reason], **kw)


def is_injected(pod: Mapping[str, Any]) -> bool:
    """The pod has our annotation, or a container or init container named like our sidecar."""
    meta = pod.get("metadata") or {}
    if contract.ANN_INJECTED in (meta.get("annotations") or {}):
        return True
    return contract.SIDECAR_CONTAINER_NAME in sidecarspec.container_names(pod.get("spec") or {})


def decide(pod: object, settings: InjectionSettings) -> Decision:
    """Whether and how to inject ``pod`` (a raw Pod dict as in an AdmissionReview)."""
    if not _looks_like_pod(pod):
        return _decision("deny", "not_a_pod")
    assert isinstance(pod, Mapping)
    meta = pod.get("metadata") or {}
    spec = pod["spec"]
    if contract.SIDECAR_CONTAINER_NAME in sidecarspec.container_names(spec):
        return _decision("skip", "sidecar_already_exists")
    pod_annotations: Mapping[str, object] = meta.get("annotations") or {}
    if contract.ANN_INJECTED in pod_annotations:
        return _decision("skip", "already_injected")
    merged = dict(pod_annotations)
    label = (meta.get("labels") or {}).get(contract.ANN_INJECT)
    if label is not None and contract.ANN_INJECT not in merged:
        merged[contract.ANN_INJECT] = label
    inject = merged.get(contract.ANN_INJECT)
    if inject is None:
        return _decision("skip", "not_opted_in")
    if inject == "false":
        return _decision("skip", "opted_out")
    if spec.get("hostNetwork") is True:
        return _decision(
            "deny",
            "host_network",
            "kubemtls cannot inject a pod with hostNetwork: true (its sidecar would listen on "
            'the node itself); remove hostNetwork or set kubemtls.io/inject: "false"',
        )
    parsed = _parse(merged, meta.get("namespace") or None, settings.limits)
    if isinstance(parsed, str):
        return _decision("deny", "invalid_annotations", parsed)
    taken = sidecarspec.taken_names(spec, parsed)
    if taken:
        return _decision(
            "deny",
            "name_taken",
            f"the pod already has {', '.join(taken)}, which kubemtls injects; rename it, or set "
            'kubemtls.io/inject: "false"',
        )
    grpc = sidecarspec.grpc_probes_on_intercepted_ports(spec, parsed)
    if grpc:
        return _decision(
            "deny",
            "unsupported_probe",
            f"in transparent mode kubelet's probes of intercepted ports go through the sidecar, "
            f"which forwards httpGet and tcpSocket probes but not gRPC: {', '.join(grpc)}; use an "
            "httpGet, tcpSocket or exec probe, or do not intercept that port",
        )
    return _decision("inject", "injectable", spec=parsed, warnings=parsed.warnings)


def _parse(
    merged: Mapping[str, object], namespace: str | None, limits: annotations.Limits
) -> annotations.AnnotationSpec | str:
    """:func:`annotations.parse`, or its error message; memoised on what it reads.

    It reads only the ``kubemtls.io/`` keys, and every pod of a Deployment (or Job, or
    StatefulSet) carries the same ones, so the webhook parses a pod template's annotations
    once and not per pod.
    """
    key = tuple((k, v) for k, v in merged.items() if k.startswith(contract.ANNOTATION_PREFIX))
    try:
        return _parse_cached(key, namespace, limits)
    except TypeError:  # an unhashable value (a JSON list or object): not a valid annotation
        return _parse_uncached(key, namespace, limits)


def _parse_uncached(
    items: tuple[tuple[str, object], ...], namespace: str | None, limits: annotations.Limits
) -> annotations.AnnotationSpec | str:
    try:
        return annotations.parse(dict(items), namespace=namespace, limits=limits)
    except annotations.AnnotationError as e:
        return e.message


_parse_cached = functools.lru_cache(maxsize=512)(_parse_uncached)


def _looks_like_pod(pod: object) -> bool:
    if not isinstance(pod, Mapping):
        return False
    meta, spec = pod.get("metadata", {}), pod.get("spec")
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        return False
    for key in ("annotations", "labels"):
        if not isinstance(meta.get(key) or {}, Mapping):
            return False
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return False
    lists = [containers, spec.get("initContainers") or [], spec.get("volumes") or []]
    return all(isinstance(x, list) and all(map(_is_mapping, x)) for x in lists)


def _is_mapping(value: object) -> bool:
    # A decoded review holds plain dicts: skip the ABC check (~10x slower) for them.
    return type(value) is dict or isinstance(value, Mapping)


@dataclasses.dataclass(frozen=True)
class Additions:
    """What injecting a pod adds to it, computed without changing the pod.

    :func:`inject_sidecar` applies it to a pod dict; :mod:`kubemtls_operator.podpatch`
    turns it into the RFC 6902 operations the webhook answers with.
    """

    #: Put first in ``spec.initContainers``, in this order (kubemtls-init, native sidecar).
    init_containers: tuple[dict[str, Any], ...]
    #: Put first in ``spec.containers`` (the legacy layout's sidecar).
    containers: tuple[dict[str, Any], ...]
    #: Appended to ``spec.volumes``.
    volumes: tuple[dict[str, Any], ...]
    #: App probes pointed at the sidecar (transparent mode).
    probes: tuple[sidecarspec.ProbeRewrite, ...]
    #: Set in ``metadata.annotations``.
    annotations: Mapping[str, str]


def additions(
    pod: Mapping[str, Any], spec: annotations.AnnotationSpec, settings: InjectionSettings
) -> Additions:
    """The containers, volumes, probe changes and annotation the injection adds to ``pod``."""
    pod_spec: Mapping[str, Any] = pod.get("spec") or {}
    probes = sidecarspec.probe_rewrites(pod_spec, spec) if spec.mode == "transparent" else []
    env = sidecarspec.sidecar_env(spec, settings.signer_url, {p.path: p.original for p in probes})
    sidecar = sidecarspec.sidecar_container(
        spec,
        env,
        image=settings.sidecar_image,
        pull_policy=settings.sidecar_image_pull_policy,
        resources=settings.sidecar_resources,
        native=settings.native_sidecar,
    )
    front: list[dict[str, Any]] = []
    if spec.mode == "transparent":
        front.append(
            sidecarspec.init_container(
                env,
                image=settings.sidecar_image,
                pull_policy=settings.sidecar_image_pull_policy,
                resources=settings.sidecar_resources,
            )
        )
    if settings.native_sidecar:
        front.append(sidecar)
    return Additions(
        init_containers=tuple(front),
        containers=() if settings.native_sidecar else (sidecar,),
        volumes=tuple(sidecarspec.volumes(spec, token_expiration=settings.token_expiration)),
        probes=tuple(probes),
        annotations={contract.ANN_INJECTED: "true"},
    )


def inject_sidecar(
    pod: dict[str, Any], spec: annotations.AnnotationSpec, settings: InjectionSettings
) -> None:
    """Add the sidecar (and, transparent mode, kubemtls-init) to ``pod`` in place.

    Idempotent: a pod that :func:`is_injected` is left as it is. Changes nothing but what
    it adds, except the app's httpGet/tcpSocket probes on intercepted ports (transparent).
    """
    if is_injected(pod):
        return
    added = additions(pod, spec, settings)
    pod_spec: dict[str, Any] = pod.setdefault("spec", {})
    for r in added.probes:
        r.apply(pod_spec)
    if added.init_containers:
        pod_spec["initContainers"] = [
            *added.init_containers,
            *(pod_spec.get("initContainers") or []),
        ]
    if added.containers:
        pod_spec["containers"] = [*added.containers, *(pod_spec.get("containers") or [])]
    pod_spec["volumes"] = [*(pod_spec.get("volumes") or []), *added.volumes]
    meta: dict[str, Any] = pod.setdefault("metadata", {})
    if not isinstance(meta.get("annotations"), dict):
        meta["annotations"] = {}
    meta["annotations"].update(added.annotations)
