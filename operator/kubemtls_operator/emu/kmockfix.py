"""Fixes to kmock 0.8 internals that every part of the emulator relies on (imported first)."""

from __future__ import annotations

import sys

import kmock
from kmock._internal import parsing as _parsing
from kmock._internal import rendering as _rendering

if not str(getattr(kmock, "__version__", "")).startswith("0.8"):
    print(
        f"k8semu: warning: tested with kmock 0.8, found {getattr(kmock, '__version__', '?')}",
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------
# kmock 0.8 cannot parse /api/v1/namespaces[/NAME[/status|/finalize]] (ValueError, then 500).
_orig_parse_path = _parsing.parse_path


def _parse_path(path: str) -> _parsing.ParsedPath:
    p = path.strip("/").split("/")
    if p[:3] == ["api", "v1", "namespaces"] and (
        len(p) <= 4 or (len(p) == 5 and p[4] in ("status", "finalize"))
    ):
        return _parsing.ParsedPath(
            group="",
            version="v1",
            plural="namespaces",
            namespace=None,
            name=p[3] if len(p) >= 4 else None,
            subresource=p[4] if len(p) == 5 else None,
        )
    return _orig_parse_path(path)


_parsing.parse_path = _parse_path

# kmock 0.8 decodes every body as UTF-8 text, so a binary (protobuf) body fails before any handler runs.
_orig_request_parse = _rendering.Request._parse.__func__


async def _request_parse(cls, raw_request, *, id: int = 0):
    try:
        return await _orig_request_parse(cls, raw_request, id=id)
    except UnicodeDecodeError:
        k8s = _parsing.parse_path(raw_request.path)
        resource = (
            None
            if k8s.group is None
            else kmock.resource(group=k8s.group, version=k8s.version, plural=k8s.plural)
        )
        return cls(
            id=id,
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            data=None,
            body=await raw_request.read(),
            text="",
            action=_parsing.guess_k8s(
                k8s, kmock.method(raw_request.method), dict(raw_request.query)
            ),
            resource=resource,
            namespace=k8s.namespace,
            name=k8s.name,
            subresource=k8s.subresource,
        )


_rendering.Request._parse = classmethod(_request_parse)
