"""RFC 7386 merge patch and an approximation of strategic merge patch."""

from __future__ import annotations

import copy
import json
from typing import Any

from kubemtls_operator.emu import kmockfix  # noqa: F401  (patches kmock first)


# ---------------------------------------------------------------------------------------------
# Patching: RFC 7386 merge patch and an approximation of strategic merge patch.
def jcopy(v: Any) -> Any:
    """``copy.deepcopy`` for JSON values (plain dicts, lists, scalars), several times faster.

    Anything else (a dict subclass, a tuple, …) still goes through ``copy.deepcopy``.
    """
    t = type(v)
    if t is dict:
        return {k: jcopy(x) for k, x in v.items()}
    if t is list:
        return [jcopy(x) for x in v]
    if t is str or t is int or t is float or t is bool or v is None:
        return v
    return copy.deepcopy(v)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: a new object (sharing nothing with ``target`` or ``patch``)."""
    if not isinstance(patch, dict):
        return jcopy(patch)
    if not isinstance(target, dict):
        target = {}
    result = {}
    for k, v in target.items():  # each part copied once, in the target's key order
        if k not in patch:
            result[k] = jcopy(v)
        elif patch[k] is not None:
            result[k] = merge_patch(v, patch[k])
    for k, v in patch.items():
        if k not in target and v is not None:
            result[k] = merge_patch(None, v)
    return result


def merge_patch_shared(target: Any, patch: Any, owned: bool = False) -> Any:
    """RFC 7386 as ``merge_patch`` (equal result, same key order), for a stored version, which
    is never changed in place (see ``Emulator.put``): the result shares ``target``'s untouched
    parts instead of copying them, and, when ``owned`` (a body parsed for this request alone),
    ``patch``'s values too. Only the dicts on merged paths are new."""
    if not isinstance(patch, dict):
        return patch if owned else jcopy(patch)
    if not isinstance(target, dict):
        target = {}
    result = {}
    for k, v in target.items():
        if k not in patch:
            result[k] = v
        elif (p := patch[k]) is None:
            continue
        elif isinstance(p, dict):
            result[k] = merge_patch_shared(v, p, owned)
        else:  # a scalar or a list replaces (no call for it)
            result[k] = p if owned else jcopy(p)
    for k, v in patch.items():
        if v is not None and k not in target:
            result[k] = merge_patch_shared(None, v, owned)
    return result


SMP_MERGE_KEYS = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "env": ("name",),
    "imagePullSecrets": ("name",),
    "ports": ("containerPort", "port"),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey",),
    "resourceClaims": ("name",),
}
SMP_PRIMITIVE_MERGE = {"finalizers"}
_DELETE = object()


def _strip_directives(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip_directives(x) for k, x in v.items() if not k.startswith("$")}
    if isinstance(v, list):
        return [_strip_directives(x) for x in v]
    return copy.deepcopy(v)


def strategic_merge_patch(orig: Any, patch: Any) -> Any:
    """Good-enough strategic merge: lists of known fields merge by their merge key, directives honoured."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "delete":
        return _DELETE
    if patch.get("$patch") == "replace":
        return _strip_directives(patch)
    result = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    orders: dict[str, list] = {}
    retain = None
    for key, val in patch.items():
        if key == "$patch":
            continue
        if key == "$retainKeys":
            retain = val
        elif key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = val
        elif key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [x for x in result[field] if x not in (val or [])]
        elif val is None:
            result.pop(key, None)
        elif isinstance(val, dict):
            merged = strategic_merge_patch(result.get(key), val)
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(val, list):
            result[key] = _smp_list(
                key, result.get(key) if isinstance(result.get(key), list) else [], val
            )
        else:
            result[key] = val
    for field, order in orders.items():
        if isinstance(result.get(field), list) and isinstance(order, list) and order:
            if all(isinstance(o, dict) and len(o) == 1 for o in order):
                mk = next(iter(order[0]))
                pos = {json.dumps(o.get(mk)): i for i, o in enumerate(order)}
                result[field].sort(
                    key=lambda x: pos.get(
                        json.dumps(x.get(mk) if isinstance(x, dict) else None), len(pos)
                    )
                )
            else:
                pos = {json.dumps(o): i for i, o in enumerate(order)}
                result[field].sort(key=lambda x: pos.get(json.dumps(x), len(pos)))
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _smp_list(field: str, cur: list, patch: list) -> list:
    if field in SMP_PRIMITIVE_MERGE:
        return copy.deepcopy(cur) + [x for x in patch if x not in cur]
    keys = SMP_MERGE_KEYS.get(field)
    if keys and patch and all(isinstance(x, dict) for x in patch):
        mk = next((k for k in keys if all(k in x for x in patch)), None)
        if mk is not None:
            out = copy.deepcopy(cur)
            for item in patch:
                idx = next(
                    (
                        i
                        for i, x in enumerate(out)
                        if isinstance(x, dict) and x.get(mk) == item.get(mk)
                    ),
                    None,
                )
                if item.get("$patch") == "delete":
                    if idx is not None:
                        out.pop(idx)
                elif idx is None:
                    out.append(_strip_directives(item))
                else:
                    out[idx] = strategic_merge_patch(out[idx], item)
            return out
    return [_strip_directives(x) for x in patch if not (isinstance(x, dict) and x.get("$patch"))]
