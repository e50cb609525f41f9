"""A minimal protobuf decoder for the few kinds kubectl's typed commands send."""

from __future__ import annotations

import base64
from typing import Any

from kubemtls_operator.emu import kmockfix  # noqa: F401  (patches kmock first)

# ---------------------------------------------------------------------------------------------
# kubectl's typed commands (create ns|secret|configmap|sa|token, auth can-i|whoami) send protobuf.
# A minimal decoder for those kinds; field numbers come from k8s.io/api and apimachinery generated.proto.
PB_SCHEMA = {
    "ObjectMeta": {
        1: ("name", "string"),
        2: ("generateName", "string"),
        3: ("namespace", "string"),
        4: ("selfLink", "string"),
        5: ("uid", "string"),
        6: ("resourceVersion", "string"),
        7: ("generation", "int64"),
        10: ("deletionGracePeriodSeconds", "int64"),
        11: ("labels", "map:string"),
        12: ("annotations", "map:string"),
        13: ("ownerReferences", "repeated:OwnerReference"),
        14: ("finalizers", "repeated:string"),
    },
    "OwnerReference": {
        1: ("kind", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
        5: ("apiVersion", "string"),
        6: ("controller", "bool"),
        7: ("blockOwnerDeletion", "bool"),
    },
    "ConfigMap": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:string"),
        3: ("binaryData", "map:bytes"),
        4: ("immutable", "bool"),
    },
    "Secret": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:bytes"),
        3: ("type", "string"),
        4: ("stringData", "map:string"),
        5: ("immutable", "bool"),
    },
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "repeated:string")},
    "ServiceAccount": {
        1: ("metadata", "ObjectMeta"),
        2: ("secrets", "repeated:ObjectReference"),
        3: ("imagePullSecrets", "repeated:LocalObjectReference"),
        4: ("automountServiceAccountToken", "bool"),
    },
    "ObjectReference": {
        1: ("kind", "string"),
        2: ("namespace", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
        5: ("apiVersion", "string"),
        6: ("resourceVersion", "string"),
        7: ("fieldPath", "string"),
    },
    "LocalObjectReference": {1: ("name", "string")},
    "TokenRequest": {1: ("metadata", "ObjectMeta"), 2: ("spec", "TokenRequestSpec")},
    "TokenRequestSpec": {
        1: ("audiences", "repeated:string"),
        3: ("boundObjectRef", "BoundObjectReference"),
        4: ("expirationSeconds", "int64"),
    },
    "BoundObjectReference": {
        1: ("kind", "string"),
        2: ("apiVersion", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
    },
    "SelfSubjectReview": {1: ("metadata", "ObjectMeta")},
    "TokenReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "TokenReviewSpec")},
    "TokenReviewSpec": {1: ("token", "string"), 2: ("audiences", "repeated:string")},
    "SelfSubjectAccessReview": {
        1: ("metadata", "ObjectMeta"),
        2: ("spec", "SelfSubjectAccessReviewSpec"),
    },
    "SelfSubjectAccessReviewSpec": {
        1: ("resourceAttributes", "ResourceAttributes"),
        2: ("nonResourceAttributes", "NonResourceAttributes"),
    },
    "ResourceAttributes": {
        1: ("namespace", "string"),
        2: ("verb", "string"),
        3: ("group", "string"),
        4: ("version", "string"),
        5: ("resource", "string"),
        6: ("subresource", "string"),
        7: ("name", "string"),
    },
    "NonResourceAttributes": {1: ("path", "string"), 2: ("verb", "string")},
    "SelfSubjectRulesReview": {
        1: ("metadata", "ObjectMeta"),
        2: ("spec", "SelfSubjectRulesReviewSpec"),
    },
    "SelfSubjectRulesReviewSpec": {1: ("namespace", "string")},
    "SubjectAccessReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SubjectAccessReviewSpec")},
    "SubjectAccessReviewSpec": {
        1: ("resourceAttributes", "ResourceAttributes"),
        2: ("nonResourceAttributes", "NonResourceAttributes"),
        3: ("user", "string"),
        4: ("groups", "repeated:string"),
        6: ("uid", "string"),
    },
    "LocalSubjectAccessReview": {
        1: ("metadata", "ObjectMeta"),
        2: ("spec", "SubjectAccessReviewSpec"),
    },
}

PB_KINDS = [
    "ConfigMap",
    "LocalSubjectAccessReview",
    "Namespace",
    "Secret",
    "SelfSubjectAccessReview",
    "SelfSubjectReview",
    "SelfSubjectRulesReview",
    "ServiceAccount",
    "SubjectAccessReview",
    "TokenRequest",
    "TokenReview",
]


def _pb_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _pb_fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _pb_varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _pb_varint(buf, i)
        elif wire == 2:
            n, i = _pb_varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _pb_value(typ: str, value: Any) -> Any:
    if typ == "string":
        return value.decode()
    if typ == "bytes":
        return base64.b64encode(value).decode()
    if typ == "bool":
        return bool(value)
    if typ in ("int32", "int64"):
        return value - (1 << 64) if value >= 1 << 63 else value
    return pb_decode(typ, value)


def pb_decode(message: str, buf: bytes) -> dict:
    schema, out = PB_SCHEMA[message], {}
    for num, value in _pb_fields(buf):
        if num not in schema:
            continue
        name, typ = schema[num]
        if typ.startswith("map:"):
            entry = dict(_pb_fields(value))
            out.setdefault(name, {})[entry.get(1, b"").decode()] = _pb_value(
                typ[4:], entry.get(2, b"")
            )
        elif typ.startswith("repeated:"):
            out.setdefault(name, []).append(_pb_value(typ[9:], value))
        else:
            out[name] = _pb_value(typ, value)
    return out


def decode_k8s_protobuf(body: bytes) -> dict:
    """The k8s protobuf envelope: 'k8s\\0' + runtime.Unknown{typeMeta{apiVersion, kind}, raw}."""
    if body[:4] != b"k8s\x00":
        raise ValueError("not a Kubernetes protobuf envelope")
    unknown = dict(_pb_fields(body[4:]))
    type_meta = dict(_pb_fields(unknown.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    if kind not in PB_SCHEMA:
        raise KeyError(kind)
    return {"apiVersion": api_version, "kind": kind, **pb_decode(kind, unknown.get(2, b""))}
