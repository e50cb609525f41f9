"""The /_emu side channel: tokens, objects, requests, reset."""

from __future__ import annotations

import copy
import re

import aiohttp.web

from kubemtls_operator.emu import kmockfix  # noqa: F401  (patches kmock first)
from kubemtls_operator.emu.base import DEFAULT_NAMESPACES, R_CRD, R_NS, _err, bad_request, gv


class SideChannelMixin:
    # ----- the /_emu side channel -------------------------------------------------------------
    async def side_channel(self, request, path: str, method: str) -> aiohttp.web.Response:
        if path == "/_emu/tokens" and method == "GET":
            return self.respond({"tokens": self.tokens})
        if path == "/_emu/tokens" and method == "POST":
            body = request.data
            if not isinstance(body, dict) or not all(
                isinstance(v, dict) or v is None for v in body.values()
            ):
                raise bad_request('expected {"<token>": {...} | null, ...}')
            for token, entry in body.items():
                if entry is None:
                    self.tokens.pop(token, None)
                else:
                    self.tokens[token] = entry
            return self.respond({"tokens": len(self.tokens)})
        if path == "/_emu/objects" and method == "GET":
            want_res, want_ns = request.params.get("resource"), request.params.get("namespace")
            async with self._lock:
                items = [
                    {"resource": f"{gv(r)}/{r.plural}", "namespace": n, "name": nm, "object": o.raw}
                    for (r, n, nm), o in self.store.items()
                    if not o.deleted
                ]
            items = [
                i
                for i in items
                if (
                    not want_res
                    or i["resource"] == want_res
                    or i["resource"].endswith("/" + want_res)
                )
                and (not want_ns or i["namespace"] == want_ns)
            ]
            return self.respond({"resourceVersion": str(self.rv), "items": items})
        if path == "/_emu/requests" and method == "GET":
            return self.respond({"requests": list(self.request_log)})
        if path == "/_emu/latency" and method == "POST":
            # {"pattern": "<regex on 'METHOD /path'>", "seconds": 1.5}; seconds 0 removes it.
            # Like a slow etcd, for tests of what a client does while a write is in flight.
            body = request.data if isinstance(request.data, dict) else {}
            pattern = str(body.get("pattern") or "")
            seconds = float(body.get("seconds") or 0)
            self.latency = [(p, s) for p, s in self.latency if p.pattern != pattern]
            if seconds > 0:
                self.latency.append((re.compile(pattern), seconds))
            return self.respond({"latency": [[p.pattern, s] for p, s in self.latency]})
        if path == "/_emu/reset" and method == "POST":
            body = request.data if isinstance(request.data, dict) else {}
            self.latency = []
            async with self._lock:
                for (r, n, nm), o in list(self.store.items()):
                    if (
                        o.deleted
                        or (r == R_CRD and not body.get("crds"))
                        or (r == R_NS and nm in DEFAULT_NAMESPACES)
                    ):
                        continue
                    if self.live(r, n, nm) is not None:
                        self.remove(r, n, nm)  # forced: finalizers are ignored
                if not body.get("keepTokens"):
                    self.tokens = copy.deepcopy(self.initial_tokens)
                self.request_log.clear()
            return self.respond(
                {"reset": True, "objects": sum(1 for o in self.store.values() if not o.deleted)}
            )
        raise _err(
            404,
            "NotFound",
            "unknown /_emu endpoint: GET|POST /_emu/tokens, GET /_emu/objects, "
            "GET /_emu/requests, POST /_emu/latency, POST /_emu/reset",
        )
