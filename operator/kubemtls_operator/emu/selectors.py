"""Label and field selectors, and the JSONPath subset printer columns use."""

from __future__ import annotations

import json
import re
from typing import Any

from kubemtls_operator.emu import kmockfix  # noqa: F401  (patches kmock first)


# ---------------------------------------------------------------------------------------------
# Selectors and JSONPath (for label/field selectors and printer columns).
def parse_label_selector(s: str) -> list[tuple[str, str, set[str]]]:
    reqs = []
    for part in re.findall(r"(?:[^,(]|\([^)]*\))+", s or ""):
        part = part.strip()
        if not part:
            continue
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\(([^)]*)\)", part):
            reqs.append((m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}))
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", part):
            reqs.append((m[1], "!=" if m[2] == "!=" else "=", {m[3]}))
        elif part.startswith("!"):
            reqs.append((part[1:].strip(), "!", set()))
        else:
            reqs.append((part, "exists", set()))
    return reqs


def match_labels(reqs: list, labels: dict) -> bool:
    labels = labels or {}
    for key, op, vals in reqs:
        has, val = key in labels, labels.get(key)
        if op == "=" and not (has and val in vals):
            return False
        if op == "!=" and has and val in vals:
            return False
        if op == "in" and not (has and val in vals):
            return False
        if op == "notin" and has and val in vals:
            return False
        if op == "exists" and not has:
            return False
        if op == "!" and has:
            return False
    return True


def dig(obj: Any, dotted: str) -> Any:
    for part in dotted.strip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def match_fields(selector: str, obj: dict) -> bool:
    for part in (selector or "").split(","):
        if not part.strip():
            continue
        m = re.fullmatch(r"\s*([^!=\s]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            continue
        val = dig(obj, m[1])
        val = (
            ""
            if val is None
            else (json.dumps(val) if isinstance(val, (dict, list, bool)) else str(val))
        )
        if (m[2] == "!=") == (val == m[3]):
            return False
    return True


_JP = re.compile(
    r"""\.([A-Za-z0-9_\-$/]+)|\[(\d+|\*)\]|\['([^']+)'\]|\.\*|"""
    r"""\[\?\(@((?:\.[A-Za-z0-9_\-/]+)+)\s*(==|!=)\s*(?:"([^"]*)"|'([^']*)'|([^)\s]+))\s*\)\]"""
)


def jsonpath_first(obj: Any, path: str) -> Any:
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    path = path.lstrip("$")
    if path and not path.startswith((".", "[")):
        path = "." + path
    values, pos = [obj], 0
    while pos < len(path):
        m = _JP.match(path, pos)
        if not m:
            return None
        pos, new = m.end(), []
        for v in values:
            if m[1] is not None or m[3] is not None:
                key = m[1] if m[1] is not None else m[3]
                if isinstance(v, dict) and key in v:
                    new.append(v[key])
            elif m[2] is not None:
                if m[2] == "*":
                    new.extend(
                        v if isinstance(v, list) else v.values() if isinstance(v, dict) else []
                    )
                elif isinstance(v, list) and int(m[2]) < len(v):
                    new.append(v[int(m[2])])
            elif m[4] is not None:
                want = next(x for x in (m[6], m[7], m[8]) if x is not None)
                for item in v if isinstance(v, list) else []:
                    got = dig(item, m[4])
                    got = (
                        str(got).lower()
                        if isinstance(got, bool)
                        else str(got)
                        if got is not None
                        else None
                    )
                    if (got == want) == (m[5] == "=="):
                        new.append(item)
            else:  # .*
                new.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else [])
        values = new
    return values[0] if values else None


def label_selector_reqs(sel: dict | None) -> list[tuple[str, str, set[str]]]:
    """A metav1.LabelSelector as requirements for match_labels(); None or {} matches everything."""
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    reqs = [(k, "=", {v}) for k, v in ((sel or {}).get("matchLabels") or {}).items()]
    return reqs + [
        (e["key"], ops.get(e.get("operator"), "in"), set(e.get("values") or []))
        for e in (sel or {}).get("matchExpressions") or []
    ]
