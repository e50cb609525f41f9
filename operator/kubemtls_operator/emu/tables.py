"""Server-side Table output (printer columns) for kubectl."""

from __future__ import annotations

import datetime
import json
from typing import Any

from kubemtls_operator.emu import kmockfix  # noqa: F401  (patches kmock first)
from kubemtls_operator.emu.base import age, header, human_duration, parse_time
from kubemtls_operator.emu.selectors import jsonpath_first


def cell_for(column_type: str, value: Any) -> Any:
    """Mirrors apiextensions-apiserver's tableconvertor for one printer-column cell."""
    if value is None:
        return None
    if column_type == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if column_type == "integer":
        return (
            int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        )
    if column_type == "number":
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if column_type == "boolean":
        return value if isinstance(value, bool) else None
    if column_type == "date":
        t = parse_time(value)
        return (
            "<invalid>"
            if t is None
            else human_duration((datetime.datetime.now(datetime.UTC) - t).total_seconds())
        )
    return None


# Printer columns for a few builtins (so `kubectl get pods` looks familiar); others get NAME + AGE.
def _pod_cells(o: dict) -> list:
    cs = o.get("status", {}).get("containerStatuses") or []
    n = len(o.get("spec", {}).get("containers") or [])
    ready = sum(1 for c in cs if c.get("ready"))
    status = (
        o.get("metadata", {}).get("deletionTimestamp")
        and "Terminating"
        or o.get("status", {}).get("reason")
        or o.get("status", {}).get("phase")
        or "Pending"
    )
    return [
        f"{ready}/{n}",
        status,
        sum(int(c.get("restartCount") or 0) for c in cs),
        age(o),
        o.get("status", {}).get("podIP") or "<none>",
        o.get("spec", {}).get("nodeName") or "<none>",
    ]


BUILTIN_COLUMNS = {
    "pods": (
        [
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "integer", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
        ],
        _pod_cells,
    ),
    "namespaces": (
        [("Status", "string", 0), ("Age", "string", 0)],
        lambda o: [o.get("status", {}).get("phase", "Active"), age(o)],
    ),
    "configmaps": (
        [("Data", "integer", 0), ("Age", "string", 0)],
        lambda o: [len(o.get("data") or {}) + len(o.get("binaryData") or {}), age(o)],
    ),
    "secrets": (
        [("Type", "string", 0), ("Data", "integer", 0), ("Age", "string", 0)],
        lambda o: [o.get("type", "Opaque"), len(o.get("data") or {}), age(o)],
    ),
}


class TablesMixin:
    # ----- Table output (server-side printing for kubectl) -----------------------------------
    @staticmethod
    def wants_table(request) -> bool:
        return "as=Table" in header(request, "Accept")

    def table(self, request, res, objs: list[dict], rv: str | None = None) -> dict:
        defs: list[dict] = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name must be unique within a namespace.",
            }
        ]
        if res in self.columns:
            cols = self.columns[res]
            defs += [
                {
                    "name": c["name"],
                    "type": c.get("type", "string"),
                    "format": c.get("format", ""),
                    "priority": c.get("priority", 0),
                    "description": c.get("description")
                    or f"Custom resource definition column (in JSONPath "
                    f"format): {c.get('jsonPath')}",
                }
                for c in cols
            ]
            cells_of = lambda o: [
                cell_for(c.get("type", "string"), jsonpath_first(o, c.get("jsonPath", "")))
                for c in cols
            ]
        elif res.group == "" and res.plural in BUILTIN_COLUMNS:
            cols, cells_of = BUILTIN_COLUMNS[res.plural]
            defs += [
                {"name": n, "type": t, "format": "", "priority": p, "description": n}
                for n, t, p in cols
            ]
        else:
            defs.append(
                {"name": "Age", "type": "string", "format": "", "priority": 0, "description": "Age"}
            )
            cells_of = lambda o: [age(o)]
        include = request.params.get("includeObject", "PartialObjectMetadata")
        rows = []
        for o in objs:
            row: dict[str, Any] = {"cells": [o.get("metadata", {}).get("name")] + cells_of(o)}
            if include == "Object":
                row["object"] = o
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o.get("metadata", {}),
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": rv or str(self.rv)},
            "columnDefinitions": defs,
            "rows": rows,
        }
