"""Fixes to kmock 0.8 internals that every part of the emulator relies on (imported first)."""

from __future__ import annotations

import sys
from typing import Any

import kmock
import orjson
from kmock._internal import parsing as _parsing
from kmock._internal import references as _references
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

# kmock 0.8 decodes every body as UTF-8 text, so a binary (protobuf) body fails before any
# handler runs. Its parse was also the largest part of the emulator's per-request cost
# (bench/emulator_bench.py): stdlib json, a resource reference parsed from the path on every
# request (an isinstance against a runtime-checkable Protocol), an enum lookup by value. The
# replacement below builds the same Request: orjson for the body where it gives what json gives
# (not when the body has a run of 19+ digits: orjson turns integers beyond 64 bits into floats;
# not for other charsets; anything it refuses goes the original way: json, then form data), the
# path's parse and resource remembered per path (both immutable), the method member looked up
# once per name.
_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")  # a run of digits → a run of b"0"
_LONG_RUN = b"0" * 19  # (a regex scan cost as much as the rest of the parse)
_UTF8 = ("utf-8", "utf8", "us-ascii", "ascii")
_PATH_MEMORY = 2048
_paths: dict[str, tuple[_parsing.ParsedPath, kmock.resource | None]] = {}
_methods: dict[str, kmock.method] = {}


def intern(resource: kmock.resource) -> kmock.resource:
    """One instance per (group, version, plural): the store's and the watchers' dict lookups
    then match by identity instead of calling ``resource.__eq__``."""
    return _interned.setdefault((resource.group, resource.version, resource.plural), resource)


_interned: dict[tuple[str | None, str | None, str | None], kmock.resource] = {}


def _parsed(path: str) -> tuple[_parsing.ParsedPath, kmock.resource | None]:
    try:
        return _paths[path]
    except KeyError:
        pass
    k8s = _parsing.parse_path(path)
    resource = (
        None
        if k8s.group is None
        else intern(kmock.resource(group=k8s.group, version=k8s.version, plural=k8s.plural))
    )
    if len(_paths) >= _PATH_MEMORY:
        _paths.clear()
    _paths[path] = k8s, resource
    return k8s, resource


parsed_path = _parsed  # (the emulator's fast path: emu/fastpath.py)


def has_long_integers(body: bytes) -> bool:
    """Whether ``body`` has a run of 19+ digits (orjson would make a float of such an integer)."""
    return _LONG_RUN in body.translate(_DIGITS_TO_0)


def _method(name: str) -> kmock.method:
    try:
        return _methods[name]
    except KeyError:
        m = kmock.method(name)
        if len(_methods) < 64:
            _methods[name] = m
        return m


async def _request_parse(cls, raw_request, *, id: int = 0):
    body = await raw_request.read()
    try:
        text = await raw_request.text()
    except UnicodeDecodeError:
        text = None
    data: Any = None
    parsed = False
    charset = (raw_request.charset or "utf-8").lower()
    if text and charset in _UTF8 and _LONG_RUN not in body.translate(_DIGITS_TO_0):
        try:
            data, parsed = orjson.loads(text), True
        except orjson.JSONDecodeError:
            pass
    if not parsed and text is not None:
        try:
            data = await raw_request.json()
        except ValueError:  # as kmock: form data, or None
            try:
                data = await raw_request.post() or None
            except ValueError:
                data = None
    k8s, resource = _parsed(raw_request.path)
    method = _method(raw_request.method)
    query = dict(raw_request.query)
    return cls(
        id=id,
        raw_request=raw_request,
        url=raw_request.url,
        method=method,
        params=query,
        headers=dict(raw_request.headers),
        cookies=dict(raw_request.cookies),
        data=data,
        body=body,
        text="" if text is None else text,
        action=_parsing.guess_k8s(k8s, method, query),
        resource=resource,
        namespace=k8s.namespace,
        name=k8s.name,
        subresource=k8s.subresource,
    )


_rendering.Request._parse = classmethod(_request_parse)

# kmock's resource.__eq__ is a `match` whose first case is an isinstance check; resources are
# compared on every store, watcher and resource-info lookup. The same answer, sooner, for the
# common cases (itself, another resource); anything else still goes to kmock's.
_orig_resource_eq = _references.resource.__eq__


def _resource_eq(self: Any, other: object) -> bool:
    if other is self:
        return True
    if type(other) is _references.resource:
        return (
            self.group == other.group
            and self.version == other.version
            and self.plural == other.plural
        )
    return _orig_resource_eq(self, other)  # type: ignore[no-any-return]


_references.resource.__eq__ = _resource_eq  # type: ignore[method-assign,assignment]
