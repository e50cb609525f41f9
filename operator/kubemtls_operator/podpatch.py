"""The webhook's JSON Patch (RFC 6902), built from what the injection adds.

kopf's own way — run :func:`injection.inject_sidecar` on a deep copy of the pod and diff
the two with ``jsonpatch`` — cost about 60 % of the webhook's CPU per injected pod
(bench/admission_bench.py). The injection already knows exactly what it adds, so
:func:`operations` writes the operations directly: ``add`` for the annotation, the
containers and the volumes (into existing lists by index, so nothing already there moves
or changes), and, in transparent mode only, the ``remove``/``replace``/``add`` that point an
app probe's handler at the sidecar. Applied to the admitted pod, the operations give
exactly the pod :func:`injection.inject_sidecar` makes (tests/operator/test_podpatch.py).
Pure: no kopf, no I/O.
"""

# No ``from __future__ import annotations``: it would shadow our module of that name.

from collections.abc import Mapping, Sequence
from typing import Any

from kubemtls_operator import annotations, injection

__all__ = ["Operation", "escape", "operations"]

#: One RFC 6902 operation, as JSON (``op``, ``path`` and, but for ``remove``, ``value``).
Operation = dict[str, Any]


def escape(token: str) -> str:
    """A key as one JSON Pointer reference token (RFC 6901 §3: ``~`` → ``~0``, ``/`` → ``~1``)."""
    return token.replace("~", "~0").replace("/", "~1")


def operations(
    pod: Mapping[str, Any],
    spec: annotations.AnnotationSpec,
    settings: injection.InjectionSettings,
) -> list[Operation]:
    """The JSON Patch that injects ``pod`` (as :func:`injection.decide` accepted it).

    Empty for a pod that :func:`injection.is_injected`, like :func:`injection.inject_sidecar`.
    Probe changes come first, while every container is still at the index it was admitted
    with; list insertions follow.
    """
    if injection.is_injected(pod):
        return []
    added = injection.additions(pod, spec, settings)
    ops = _annotations(pod.get("metadata"), added.annotations)
    for r in added.probes:
        base = f"/spec/{r.list_key}/{r.index}/{escape(r.field)}"
        for handler in r.handlers:
            if handler != "httpGet":
                ops.append({"op": "remove", "path": f"{base}/{handler}"})
        verb = "replace" if "httpGet" in r.handlers else "add"
        ops.append({"op": verb, "path": f"{base}/httpGet", "value": r.http_get})
    pod_spec: Mapping[str, Any] = pod.get("spec") or {}
    ops += _insert(pod_spec, "initContainers", 0, added.init_containers)
    ops += _insert(pod_spec, "volumes", None, added.volumes)
    ops += _insert(pod_spec, "containers", 0, added.containers)
    return ops


def _annotations(meta: object, values: Mapping[str, str]) -> list[Operation]:
    if not isinstance(meta, Mapping):
        return [{"op": "add", "path": "/metadata", "value": {"annotations": dict(values)}}]
    if not isinstance(meta.get("annotations"), Mapping):
        return [{"op": "add", "path": "/metadata/annotations", "value": dict(values)}]
    path = "/metadata/annotations/"
    return [{"op": "add", "path": path + escape(k), "value": v} for k, v in values.items()]


def _insert(
    pod_spec: Mapping[str, Any], key: str, at: int | None, items: Sequence[dict[str, Any]]
) -> list[Operation]:
    """Insert ``items`` into ``spec[key]`` at index ``at`` (None: at the end), in order."""
    if not items:
        return []
    existing = pod_spec.get(key)
    if not isinstance(existing, list):
        return [{"op": "add", "path": f"/spec/{key}", "value": list(items)}]
    start = len(existing) if at is None else at
    return [
        {"op": "add", "path": f"/spec/{key}/{start + i}", "value": item}
        for i, item in enumerate(items)
    ]
