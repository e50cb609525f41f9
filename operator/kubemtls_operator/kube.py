"""The only module that talks to the Kubernetes API.

A small aiohttp REST client built from kopf's login result (``kopf.ConnectionInfo``: the
standard KUBECONFIG / in-cluster configuration), so the operator's own calls (CA Secret,
state and trust ConfigMaps, MTLSCerts, TokenReviews, Events) share one connection pool in
kopf's event loop. Every API error becomes an ``errors.APIError`` (404 ``NotFound``, 409
``Conflict``), which kopf retries. It never logs a Secret's data.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import ssl
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf
import orjson

from kubemtls_operator import errors, naming

__all__ = ["Client", "configmap_path", "login", "secret_path"]

logger = logging.getLogger(__name__)

Obj = dict[str, Any]
RECENT_WRITES = 1024
_REMEMBERED_META = ("name", "namespace", "uid", "resourceVersion")


def secret_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{namespace}/secrets"
    return f"{base}/{name}" if name else base


def configmap_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    return f"{base}/{name}" if name else base


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=str(info.ca_path))
    if info.ca_data:
        data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        ctx.load_verify_locations(cadata=data)
    if info.certificate_path and info.private_key_path:
        ctx.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    return ctx


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, else $KUBECONFIG (read now, not at import).

    kopf's own parsers, not the ``kubernetes`` library's: that one fixes the KUBECONFIG
    path when it is first imported.
    """
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )


class Client:
    """Async access to the few API paths the operator uses."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._info = info
        self._base = info.server.rstrip("/")
        #: The MTLSCerts this client wrote last (bounded): the next status write of a fresh
        #: pod's MTLSCert starts from it instead of a GET.
        self._recent: dict[tuple[str, str], Obj] = {}
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        connector = aiohttp.TCPConnector(ssl=_ssl_context(info), limit=64)
        self._session = aiohttp.ClientSession(
            headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        )

    @classmethod
    def from_login(cls, settings: kopf.OperatorSettings) -> Client:
        """Log in as kopf does (in-cluster or KUBECONFIG) and build a client."""
        info = login(settings)
        if info is None:
            raise errors.APIError("no Kubernetes credentials (KUBECONFIG or in-cluster)")
        return cls(info)

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Obj:
        """One API call. Returns the JSON body.

        Raises:
            errors.NotFound: 404.
            errors.Conflict: 409.
            errors.APIError: any other error status, or no answer.
        """
        headers = {"Content-Type": content_type} if body is not None else {}
        payload = orjson.dumps(body) if body is not None else None
        try:
            async with self._session.request(
                method, self._base + path, data=payload, headers=headers, params=params
            ) as rsp:
                raw = await rsp.read()
                data = orjson.loads(raw) if raw.strip() else None
                status = rsp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise errors.APIError(f"{method} {path}: {e}") from e
        if status < 400:
            return data if isinstance(data, dict) else {}
        message = data.get("message", "") if isinstance(data, dict) else str(data)
        text = f"{method} {path}: {status} {message}"
        if status == 404:
            raise errors.NotFound(text, status=status)
        if status == 409:
            raise errors.Conflict(text, status=status, delay=1.0)
        raise errors.APIError(text, status=status)

    async def get(self, path: str) -> Obj:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.get(path)
        except errors.NotFound:
            return None

    async def create(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body=body)

    async def create_or_get(self, path: str, body: Obj) -> tuple[Obj, bool]:
        """Create ``body`` at ``path``; if it exists already, read it. ``(object, created)``."""
        try:
            return await self.create(path, body), True
        except errors.Conflict:
            name = body["metadata"]["name"]
            return await self.get(f"{path}/{name}"), False

    async def merge_patch(self, path: str, patch: Obj) -> Obj:
        """A JSON merge patch; a ``metadata.resourceVersion`` in it is a precondition (409)."""
        return await self.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str) -> None:
        with contextlib.suppress(errors.NotFound):
            await self.request("DELETE", path)

    async def list_items(self, path: str, **params: str) -> list[Obj]:
        data = await self.request("GET", path, params=params or None)
        items = data.get("items") or []
        return list(items)

    async def watch(
        self,
        path: str,
        on_event: Callable[[Obj], None],
        *,
        resource_version: str,
        timeout_seconds: int = 300,
    ) -> None:
        """One watch stream from ``resource_version`` (with bookmarks), each event to
        ``on_event`` (the JSON line parsed once), until the server ends it (``timeout_seconds``).

        ``on_event`` may raise to end the stream early; that exception propagates.

        Raises:
            errors.APIError: an error status (``status=410``: the resourceVersion is too old),
                or the connection failed.
        """
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        # No total timeout (the stream lasts timeout_seconds); a silent stream past that is dead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_seconds + 30)
        try:
            async with self._session.get(self._base + path, params=params, timeout=timeout) as rsp:
                if rsp.status >= 400:
                    raw = await rsp.read()
                    raise errors.APIError(
                        f"watch {path}: {rsp.status} {raw[:200]!r}", status=rsp.status
                    )
                rest = b""
                async for chunk in rsp.content.iter_any():
                    *lines, rest = (rest + chunk).split(b"\n")
                    for line in lines:
                        if line:
                            on_event(orjson.loads(line))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise errors.APIError(f"watch {path}: {e}") from e

    async def token_review(self, token: str, audiences: list[str]) -> Obj:
        """POST a TokenReview; returns its ``status``."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        data = await self.create("/apis/authentication.k8s.io/v1/tokenreviews", body)
        status = data.get("status") or {}
        return dict(status)

    async def post_event(self, involved: Obj, *, type_: str, reason: str, message: str) -> None:
        """An Event about ``involved`` (a full object or a reference with kind/name/namespace/uid).

        Events are best effort: a failure is logged, never raised.
        """
        meta = involved.get("metadata", involved)
        ns = meta.get("namespace") or "default"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ref = {
            "apiVersion": involved.get("apiVersion", "v1"),
            "kind": involved.get("kind", ""),
            "name": meta.get("name", ""),
            "namespace": ns,
            "uid": meta.get("uid", ""),
        }
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ref['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "involvedObject": ref,
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": naming.MANAGED_BY},
            "reportingComponent": naming.MANAGED_BY,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.create(f"/api/v1/namespaces/{ns}/events", body)
        except errors.APIError as e:
            logger.warning("could not post event %s on %s/%s: %s", reason, ns, ref["name"], e)

    # --- MTLSCerts --------------------------------------------------------------------------
    async def patch_mtlscert_status(self, namespace: str, name: str, status: Obj) -> Obj:
        path = naming.mtlscerts_path(namespace, name) + "/status"
        return await self.merge_patch(path, {"status": status})

    async def get_mtlscert(self, namespace: str, name: str) -> Obj | None:
        return await self.get_or_none(naming.mtlscerts_path(namespace, name))

    async def update_mtlscert_status(
        self,
        namespace: str,
        name: str,
        compute: Callable[[Obj], Obj | None],
        *,
        create: Obj | Callable[[], Obj] | None = None,
        known: Obj | None = None,
    ) -> Obj | None:
        """Read-modify-write an MTLSCert's status with a resourceVersion precondition.

        ``compute(obj)`` returns the new status (merged into the old), or None for "no
        change". A conflict re-reads and recomputes. A missing object is created from
        ``create`` (an object, or a function building it only when needed) first, or the
        call returns None. ``known``: an object just read (saves
        the first GET); else the last version this client wrote, if any (a stale one costs a
        409 and a re-read, nothing else; it is kept slim, so when ``compute`` finds nothing
        to change there, the object is read in full before it is returned).
        """
        path = naming.mtlscerts_path(namespace, name)
        remembered = self._recent.pop((namespace, name), None) if known is None else None
        known = known or remembered
        for _ in range(10):
            obj, known = (
                (known, None) if known is not None else (await self.get_or_none(path), None)
            )
            if obj is None:
                if create is None:
                    return None
                body = create() if callable(create) else create
                obj, _ = await self.create_or_get(naming.mtlscerts_path(namespace), body)
            new = compute(obj)
            if new is None:
                if obj is remembered:  # only a slim copy: the caller gets the full object
                    remembered = None
                    continue
                return obj
            patch = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": new,
            }
            try:
                written = await self.merge_patch(path + "/status", patch)
            except errors.Conflict:
                continue
            self._remember((namespace, name), written)
            return written
        raise errors.APIError(f"MTLSCert {namespace}/{name} kept changing; will retry", delay=1.0)

    def _remember(self, key: tuple[str, str], obj: Obj) -> None:
        """Keep what the next status write starts from: identity, resourceVersion, status."""
        if len(self._recent) >= RECENT_WRITES:
            self._recent.pop(next(iter(self._recent)))
        meta = obj.get("metadata") or {}
        self._recent[key] = {
            "metadata": {k: meta[k] for k in _REMEMBERED_META if k in meta},
            "status": obj.get("status") or {},
        }

    async def get_pod(self, namespace: str, name: str) -> Obj | None:
        return await self.get_or_none(f"/api/v1/namespaces/{namespace}/pods/{name}")

    async def patch_webhook_ca_bundle(self, name: str, ca_bundle_b64: str) -> None:
        """Set ``caBundle`` on every webhook of the chart-owned MutatingWebhookConfiguration."""
        path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
        obj = await self.get(path)
        hooks = obj.get("webhooks") or []
        if all(h.get("clientConfig", {}).get("caBundle") == ca_bundle_b64 for h in hooks):
            return
        for h in hooks:
            h.setdefault("clientConfig", {})["caBundle"] = ca_bundle_b64
        patch = {
            "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
            "webhooks": hooks,
        }
        await self.merge_patch(path, patch)
