"""Constants and small helpers of the emulated API server (errors, time, names)."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import kmock
import orjson
from kmock import KubernetesError

from kubemtls_operator.emu import kmockfix  # (patches kmock first)

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
EVENT_LOG_SIZE = 2000
R_CRD = kmockfix.intern(kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"))
R_NS = kmockfix.intern(kmock.resource("", "v1", "namespaces"))
R_PODS = kmockfix.intern(kmock.resource("", "v1", "pods"))
R_SA = kmockfix.intern(kmock.resource("", "v1", "serviceaccounts"))
R_NODES = kmockfix.intern(kmock.resource("", "v1", "nodes"))
R_SECRETS = kmockfix.intern(kmock.resource("", "v1", "secrets"))
R_MWC = kmockfix.intern(
    kmock.resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations")
)
R_VWC = kmockfix.intern(
    kmock.resource("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations")
)


# ---------------------------------------------------------------------------------------------
# Small helpers.
def dumps(obj: Any) -> bytes:
    """JSON as kube-apiserver sends it (compact), by orjson; json for what orjson refuses
    (integers beyond 64 bits, non-string keys)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: Any) -> datetime.datetime | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        t = datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration, as kubectl prints AGE."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m" if s % 60 == 0 else f"{m}m{s % 60}s"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h" if m % 60 == 0 else f"{h}h{m % 60}m"
    if h < 48:
        return f"{h}h"
    if h < 24 * 8:
        return f"{h // 24}d" if h % 24 == 0 else f"{h // 24}d{h % 24}h"
    if h < 24 * 365 * 2:
        return f"{h // 24}d"
    if h < 24 * 365 * 8:
        dy = (h // 24) % 365
        return f"{h // 24 // 365}y" if dy == 0 else f"{h // 24 // 365}y{dy}d"
    return f"{h // 24 // 365}y"


def age(obj: dict) -> str | None:
    t = parse_time(obj.get("metadata", {}).get("creationTimestamp"))
    return (
        None
        if t is None
        else human_duration((datetime.datetime.now(datetime.UTC) - t).total_seconds())
    )


def gv(res: kmock.resource) -> str:
    return f"{res.group}/{res.version}" if res.group else str(res.version)


def qual(res: kmock.resource) -> str:
    return f"{res.plural}.{res.group}" if res.group else str(res.plural)


def _err(status: int, reason: str, message: str, details: dict | None = None) -> KubernetesError:
    return KubernetesError(status=status, reason=reason, message=message, details=details or {})


def not_found(res: kmock.resource, name: str | None) -> KubernetesError:
    return _err(
        404,
        "NotFound",
        f'{qual(res)} "{name}" not found',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def conflict(res: kmock.resource, name: str) -> KubernetesError:
    return _err(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qual(res)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        {"name": name, "group": res.group, "kind": res.plural},
    )


def bad_request(message: str) -> KubernetesError:
    return _err(400, "BadRequest", message)


def invalid(
    res: kmock.resource, name: str | None, message: str, kind: str | None = None
) -> KubernetesError:
    return _err(
        422,
        "Invalid",
        f'{kind or res.plural} "{name}" is invalid: {message}',
        {
            "name": name,
            "group": res.group,
            "kind": kind or res.plural,
            "causes": [{"message": message}],
        },
    )


def method_of(request: kmock.Request) -> str:
    m = request.method
    return str(getattr(m, "value", m)).upper()


def header(request: kmock.Request, name: str) -> str:
    raw = request._raw_request
    if raw is not None:
        return raw.headers.get(name, "")
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), "")


def version_key(v: str) -> tuple:
    """Kubernetes version priority: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > anything else."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", v)
    if not m:
        return (0, 0, 0, v)
    return (1, {"alpha": 0, "beta": 1, None: 2}[m[2]], int(m[1]), int(m[3] or 0))
