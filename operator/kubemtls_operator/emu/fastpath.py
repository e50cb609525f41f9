"""The emulator's hot route served without kmock's per-request machinery.

Every certificate the operator signs costs the emulator one status merge patch of an MTLSCert
(``PATCH .../<name>/status``, ``application/merge-patch+json``, a ``metadata.resourceVersion``
precondition in the body) and one watch event. Through kmock, each such request first becomes a
``kmock.Request`` (attrs init with converters, a stream bus, a yarl URL join, its headers and
cookies copied, the body decoded twice) that nothing on this route reads, and goes through
kmock's ``RawHandler.__call__`` and the emulator's dispatch. Here the request is recognised from
what aiohttp parsed already (method, path, Content-Type, an empty query string) and handed to
the very same ``Emulator.patch`` (same rules, answers, 409s, 404s, admission webhooks), inside
the same bookkeeping as ``Emulator._handle``: the ``request_log`` entry, ``latency`` injection,
``--verbose`` lines, and kmock's error accumulation and Status rendering.

The one difference: these requests are not appended to kmock's ``_requests`` history (which the
emulator trims to a few hundred and nothing reads). Anything else (a query string such as
``dryRun``, another content type, a charset parameter, a body that is not a JSON object or has
integers beyond 64 bits, an unknown resource, a request limit) goes kmock's way unchanged.

The answer's JSON is remembered for the object just written (``encoded``), so the watch event
carrying that same object reuses the bytes instead of serialising it again.
"""

from __future__ import annotations

from typing import Any

import aiohttp.web
import orjson

from kubemtls_operator.emu import kmockfix
from kubemtls_operator.emu.base import dumps

__all__ = ["FastPathMixin"]

_MERGE = "application/merge-patch+json"
_ENCODED_MEMORY = 256


class FastPathMixin:
    """``__call__`` for aiohttp: the status merge patch directly, anything else through kmock."""

    _encoded: dict[int, tuple[dict, bytes]]

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.method == "PATCH":
            response = await self._fast_status_patch(raw_request)
            if response is not None:
                return response
        return await super().__call__(raw_request)  # type: ignore[misc]

    def encoded(self, obj: dict) -> bytes | None:
        """The JSON of ``obj`` if it was just sent as an answer (the same object, not equal)."""
        hit = self._encoded.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None

    def _remember_encoded(self, obj: dict, body: bytes) -> None:
        if len(self._encoded) >= _ENCODED_MEMORY:
            self._encoded.clear()
        self._encoded[id(obj)] = (obj, body)  # (obj held: its id is not reused meanwhile)

    async def _fast_status_patch(
        self, raw_request: aiohttp.web.BaseRequest
    ) -> aiohttp.web.StreamResponse | None:
        """The answer to a plain status merge patch, or None: not one, let kmock's path serve it."""
        emu: Any = self
        if raw_request.query_string or emu.limit is not None:
            return None
        path = raw_request.path
        k8s, res = kmockfix.parsed_path(path)
        if (
            res is None
            or k8s.subresource != "status"
            or k8s.name is None
            or res.plural is None
            or res.version is None
            or raw_request.headers.get("Content-Type") != _MERGE
            or emu.info(res) is None
        ):
            return None
        body = await raw_request.read()
        if not body or kmockfix.has_long_integers(body):
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None

        async def serve() -> aiohttp.web.StreamResponse:
            obj, status = await emu.patch(
                None, data, res, k8s.namespace, k8s.name, "status", _MERGE, False, owned=True
            )
            answer = dumps(obj)
            self._remember_encoded(obj, answer)
            return aiohttp.web.Response(body=answer, status=status, content_type="application/json")

        # Emulator._handle's bookkeeping, then kmock's RawHandler.__call__'s on errors.
        try:
            return await emu.logged("PATCH", path, path, serve)  # type: ignore[no-any-return]
        except Exception as e:
            if not emu._errors:
                raise
            emu._errors[-1].append(e)
            return await emu._render_error(e)  # type: ignore[no-any-return]
